"""Debian's headless Chromium driven by Selenium, for the web page's end-to-end tests.

The browser is required, not optional: when it is missing the tests fail and say how to
install it (`.ci/run` does). Chromium runs with a fresh profile, no network beyond the
server under test, and never downloads anything (Selenium is given both binaries, so its
driver manager is not consulted).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = os.environ.get("LLMUP_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LLMUP_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
DESKTOP = (1280, 860)
PHONE = (390, 844)
ARTIFACTS = Path(
    os.environ.get("LLMUP_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts")
)


def require_chromium() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(
            f"the web page tests need Chromium and its driver; missing {', '.join(missing)}: "
            "install them with `apt-get install -y chromium chromium-driver` (.ci/run does), "
            "or point LLMUP_CHROMIUM / LLMUP_CHROMEDRIVER at them",
            pytrace=False,
        )


def artifact(name: str) -> Path:
    """Where a test keeps a screenshot (git-ignored; LLMUP_TEST_ARTIFACTS moves it)."""
    folder = ARTIFACTS / "web"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


class Page:
    """One browser (its own profile) on the llmup page at `url`."""

    def __init__(self, url: str, size: tuple[int, int] = DESKTOP) -> None:
        require_chromium()
        self.url = url
        self.profile = tempfile.mkdtemp(prefix="llmup-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in [
            *FLAGS,
            f"--user-data-dir={self.profile}",
            "--window-size={},{}".format(*size),
        ]:
            options.add_argument(flag)
        self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))

    def close(self) -> None:
        self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)

    # ----- navigation

    def open(
        self, key: str | None, *, settings: dict[str, Any] | None = None, hash: str = ""
    ) -> None:
        """Load the page with this key remembered (as if "remember" were ticked) and these
        settings in local storage, then wait for it."""
        # The storage is set from another page of the same origin (/health, open to all),
        # then the page is loaded once: a single navigation, which nothing can race.
        self.driver.get(self.url + "/health")
        self.js(
            "localStorage.clear(); sessionStorage.clear();"
            "if (arguments[0] !== null) localStorage.setItem('llmup.rememberedKey', arguments[0]);"
            "localStorage.setItem('llmup.settings', arguments[1]);",
            key,
            json.dumps(settings or {}),
        )
        self.driver.get(self.url + "/" + hash)
        self.wait(
            lambda: self.js("return document.body.dataset.ready === '1'"), "the page to start"
        )

    def reload(self) -> None:
        self.driver.refresh()
        self.wait(
            lambda: self.js("return document.body.dataset.ready === '1'"), "the page to start"
        )

    # ----- reading and waiting

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
            lambda _: condition(), f"timed out waiting for {what}"
        )

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        """textContent (what is in the DOM, also when hidden or scrolled away)."""
        return self.js("return document.querySelector(arguments[0])?.textContent ?? ''", css)

    def session_id(self) -> str:
        return self.js("return location.hash.replace('#session=', '')")

    def screenshot(self, name: str) -> Path:
        path = artifact(name)
        self.driver.save_screenshot(str(path))
        return path
