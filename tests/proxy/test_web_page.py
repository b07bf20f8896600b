"""The web page's server side, without a browser: what `/` and its files serve (to anyone,
revealing nothing), the plan endpoint behind the key, session titles, and the packaging.

The page itself runs in a real Chromium in test_web_browser.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MACHINES
from support.backend_fixtures import proxy_settings, serve_proxy

from launcher.hardware.snapshot import load_snapshot
from launcher.planning.planner import PlanRequest, make_plan
from launcher.proxy import StaticBackend
from launcher.proxy.auth import owner_of
from launcher.proxy.page import WEB_DIR
from launcher.proxy.store import SqliteStore
from launcher.proxy.store.base import TITLE_CHARS
from launcher.serve import SupervisedModel
from launcher.served import WorkerKind

KEY = "page-key"
ROOT = Path(__file__).resolve().parents[2]
SECRET = "the launch code is 0000"
# Ways a script could turn text into markup or code; the page builds nodes from text only.
MARKUP_SINKS = re.compile(
    r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|DOMParser"
    r"|createContextualFragment|setAttribute\(\s*[\"']on"
)


@pytest.fixture
def page_proxy(tmp_path):
    plan = {"model": {"id": "tiny", "params": 1}, "quant": "F32", "context": 512}
    backend = StaticBackend("http://127.0.0.1:9", "tiny", 512, plan_json=plan)
    proxy = serve_proxy(proxy_settings(tmp_path / "home", api_keys=[KEY]), backend)
    proxy.store.commit_turn(
        owner_of(KEY),
        "private-session",
        [{"role": "user", "content": SECRET}, {"role": "assistant", "content": "noted"}],
    )
    yield proxy
    proxy.stop()


def page_files() -> list[str]:
    return sorted(p.name for p in WEB_DIR.iterdir() if p.is_file())


def test_page_and_its_files_need_no_key_and_reveal_no_session(page_proxy) -> None:
    http = page_proxy.http()
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    head = http.head("/")  # what Claude Code sends to see that the server is up
    assert head.status_code == 200 and head.content == b""
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert {"index.html", "app.js", "markdown.js", "style.css"} <= set(page_files())
    for name in page_files():
        response = http.get(f"/web/{name}")
        assert response.status_code == 200, name
        assert "private-session" not in response.text and SECRET not in response.text
    assert http.get("/v1/sessions").status_code == 401  # what the page asks for needs the key
    listed = page_proxy.http(KEY).get("/v1/sessions").json()["data"]
    assert [s["id"] for s in listed] == ["private-session"]
    missing = http.get("/web/nothing.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_every_byte_comes_from_llmup() -> None:
    """No CDN: the page loads only its own relative files, and no script builds markup."""
    html = (WEB_DIR / "index.html").read_text()
    for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert ref.startswith("web/") and (WEB_DIR / ref.removeprefix("web/")).is_file(), ref
    for script in WEB_DIR.glob("*.js"):
        text = script.read_text()
        imports = re.findall(r'^import .* from "([^"]+)";', text, flags=re.M)
        assert all(i.startswith("./") and (WEB_DIR / i[2:]).is_file() for i in imports), imports
        assert not MARKUP_SINKS.search(text), (script.name, MARKUP_SINKS.search(text))
        assert not re.search(r"fetch\(\s*[\"'`](https?:)?//", text), script.name


def test_plan_endpoint_needs_the_key(page_proxy) -> None:
    assert page_proxy.http().get("/v1/plan").status_code == 401
    wrong = page_proxy.http("not-the-key").get("/v1/plan")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    body = page_proxy.http(KEY).get("/v1/plan").json()
    assert body == {
        "object": "plan",
        "model": "tiny",
        "context": 512,
        "plan": {"model": {"id": "tiny", "params": 1}, "quant": "F32", "context": 512},
    }


def test_plan_of_a_real_plan_keeps_all_but_the_fallbacks() -> None:
    hardware = load_snapshot(MACHINES / "a6000x2-busy.json")
    plan = make_plan(PlanRequest(hardware=hardware, allow_offload=True))
    assert plan.fallbacks and plan.rejected
    shown = SupervisedModel.for_plan(None, plan).plan_json
    assert "fallbacks" not in shown and shown["quant"] == plan.quant
    assert shown["placement"] == plan.placement.model_dump(mode="json")
    assert shown["memory_mib"]["total"] == plan.memory_mib.total
    assert len(shown["rejected"]) == len(plan.rejected)
    assert SupervisedModel(None, "tiny", 512, WorkerKind.LLAMACPP_SLOTS).plan_json is None


def test_session_title_is_the_first_user_message_on_one_line(tmp_path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    long = "Explain\n  the   plan " + "word " * 40
    store.commit_turn(
        "o",
        "a",
        [{"role": "user", "content": long}, {"role": "assistant", "content": "sure"}],
        system={"role": "system", "content": "be brief"},
    )
    store.commit_turn("o", "a", [{"role": "user", "content": "second"}])
    store.commit_turn("o", "b", [{"role": "user", "content": "short one"}])
    titles = {info.id: info.title for info in store.list_sessions("o")}
    assert titles["b"] == "short one"
    assert titles["a"].startswith("Explain the plan word") and "\n" not in titles["a"]
    assert len(titles["a"]) == TITLE_CHARS and titles["a"].endswith("\u2026")
    assert store.info("o", "a").as_json()["title"] == titles["a"]
    store.close()


def test_the_page_is_package_data(tmp_path) -> None:
    """setuptools' own build of the package carries every file of the page."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(
        ROOT / "launcher", tmp_path / "launcher", ignore=shutil.ignore_patterns("__pycache__")
    )
    build = tmp_path / "out"
    subprocess.run(
        [sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py",
         "--build-lib", str(build)],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    built = sorted(p.name for p in (build / "launcher" / "proxy" / "web").iterdir())
    assert built == page_files()
