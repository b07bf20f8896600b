"""The web page end to end: Debian's headless Chromium (Selenium) against `llmup serve` on a
generated tiny GGUF, with an API key.

Each test loads the page as a person would and checks what they would see, and what the
server did: the stored session, the backend's CPU after Stop. Screenshots are kept under
test-artifacts/web/ (git-ignored; one of them is the README's).
"""

from __future__ import annotations

import json
import re
import time

import httpx
import psutil
import pytest
from conftest import MACHINES
from selenium.webdriver.common.keys import Keys
from support.backend_fixtures import NO_EOS, TEMPLATE, long_text, proxy_settings, serve_proxy
from support.browser import DESKTOP, PHONE, Page, require_chromium
from support.ggufgen import write_llama_gguf
from support.serving import Served

from launcher.hardware.snapshot import load_snapshot
from launcher.netaddr import free_port
from launcher.planning.planner import PlanRequest, make_plan
from launcher.proxy import StaticBackend

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KEY = "web-test-key"
CHAT = {"maxTokens": "24", "extra": json.dumps({"logit_bias": NO_EOS})}
STATS = re.compile(r"(\d+) tokens? · [\d.]+ tokens/s · first token \d+ ms · finish: (\w+)")
# llama.cpp's grammar forces the tiny model to answer with markup and Markdown.
MARKUP_GRAMMAR = (
    r'root ::= "**bold** <script>window.pwned=1</script> <img src=x onerror=\"window.pwned=2\">'
    r'\n```html\n<b>not bold</b>\n```"'
)
USER_MARKUP = "<img src=x onerror=window.pwned=3> hi"
SYSTEM_MARKUP = "<i>be terse</i>"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    require_chromium()
    folder = tmp_path_factory.mktemp("web-model")
    model = write_llama_gguf(folder / "tiny-chat.gguf", tensor_type="F32", chat_template=TEMPLATE)
    # llama-cpp-python's server: these tests watch a reply grow and stop it half-way, at its
    # pace on the tiny model; llmup's slot worker writes 900 tokens of it in under a second
    server = Served(
        ["--model-file", str(model), "--context", "1024", "--api-key", KEY]
        + ["--llamacpp-impl", "server"],
        tmp_path_factory.mktemp("web-home"),
        free_port(),
    )
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(served):
    browser = Page(served.url)
    yield browser
    browser.close()


def api(served) -> httpx.Client:
    headers = {"Authorization": f"Bearer {KEY}"}
    return httpx.Client(base_url=served.url, headers=headers, timeout=60, trust_env=False)


def stored(served, session_id: str) -> httpx.Response:
    return api(served).get(f"/v1/sessions/{session_id}")


def busy(page: Page) -> bool:
    return page.js("return document.getElementById('app').classList.contains('busy')")


def finished(page: Page, timeout: float = 60) -> None:
    page.wait(lambda: not busy(page), "the reply to end", timeout)


def send(page: Page, text: str) -> None:
    """Put `text` in the message box (at once, for long texts) and press Enter."""
    page.js("document.getElementById('prompt').value = arguments[0]", text)
    page.find("#prompt").send_keys(Keys.END, Keys.ENTER)


def replies(page: Page) -> list[str]:
    return page.js(
        "return [...document.querySelectorAll('#messages .msg.assistant .body')]"
        ".map(b => b.textContent)"
    )


def backend_cpu_s(served) -> float:
    """CPU seconds used so far by everything `llmup serve` started (the backend)."""
    total = 0.0
    for proc in psutil.Process(served.proc.pid).children(recursive=True):
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def cpu_in(served, seconds: float) -> float:
    before = backend_cpu_s(served)
    time.sleep(seconds)
    return backend_cpu_s(served) - before


def test_streamed_reply_survives_reload_another_tab_and_another_browser(served, page):
    # long enough to be seen growing: the tiny model can write 24 tokens in one 50 ms frame
    page.open(KEY, settings={**CHAT, "maxTokens": "160"})
    assert page.text("#backend-state") == "ready"
    assert "F32 · llama.cpp · context 1024 · CPU only" in page.text("#plan-line")
    page.js(  # every length the reply had on screen while it grew
        "window.__lengths = []; new MutationObserver(() => {"
        "  const b = [...document.querySelectorAll('#messages .msg.assistant .body')].pop();"
        "  if (b) window.__lengths.push(b.textContent.length);"
        "}).observe(document.getElementById('messages'), {subtree: true, childList: true});"
    )
    page.find("#prompt").send_keys("Hello there, web page", Keys.ENTER)
    assert busy(page) and page.find("#stop").is_displayed()
    finished(page)
    lengths = page.js("return window.__lengths")
    assert len({n for n in lengths if n}) >= 3, f"not streamed: {lengths}"
    assert lengths == sorted(lengths)
    (reply,) = replies(page)
    stats = STATS.fullmatch(page.text("#messages .msg.assistant .stats"))
    # llama-cpp-python's usage counts a token or two less than it generated at times
    assert stats and 150 <= int(stats[1]) <= 160 and stats[2] == "length", stats
    session_id = page.session_id()
    messages = stored(served, session_id).json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "Hello there, web page" and messages[1]["content"].strip()
    page.screenshot("chat-desktop.png")

    page.reload()
    assert replies(page) == [reply]
    assert page.text("#messages .msg.user .body") == "Hello there, web page"
    item = page.find(f'#sessions li[data-id="{session_id}"]')
    assert "Hello there, web page" in item.text and "active" in item.get_attribute("class")

    first = page.driver.current_window_handle
    page.driver.switch_to.new_window("tab")
    try:
        page.driver.get(f"{served.url}/#session={session_id}")
        page.wait(lambda: replies(page) == [reply], "the conversation in another tab")
    finally:
        page.driver.close()
        page.driver.switch_to.window(first)

    other = Page(served.url)
    try:
        other.open(KEY, settings=CHAT)
        other.wait(lambda: other.all(f'#sessions li[data-id="{session_id}"]'), "the session list")
        other.find(f'#sessions li[data-id="{session_id}"] .open').click()
        other.wait(lambda: replies(other) == [reply], "the conversation in another browser")
        assert other.session_id() == session_id
        other.find("#prompt").send_keys("And one more turn", Keys.ENTER)
        finished(other)
    finally:
        other.close()
    page.reload()
    assert len(replies(page)) == 2 and replies(page)[0] == reply
    assert len(stored(served, session_id).json()["messages"]) == 4


def test_stop_ends_the_backends_generation_and_keeps_nothing(served, page):
    long_reply = {"maxTokens": "900", "extra": CHAT["extra"]}
    page.open(KEY, settings=long_reply)
    session_id = page.session_id()
    page.find("#prompt").send_keys("Tell me a long story", Keys.ENTER)
    page.wait(lambda: len(replies(page)[-1]) > 40, "part of the reply")
    generating = cpu_in(served, 0.6)
    page.find("#stop").click()
    page.wait(lambda: not busy(page), "the page to stop")
    shown = replies(page)[-1]
    stopped_at = time.monotonic()
    while (idle := cpu_in(served, 0.5)) > 0.05:  # 900 tokens would take half a minute
        assert time.monotonic() - stopped_at < 6, "the backend kept generating after Stop"
    assert generating > 2 * idle, (generating, idle)
    assert replies(page)[-1] == shown, "tokens kept arriving after Stop"
    assert "stopped" in page.text("#messages .msg.assistant .stats")
    assert "not saved" in page.text("#messages .msg.assistant .notice")
    assert stored(served, session_id).status_code == 404  # the turn was not stored

    page.open(KEY, settings=CHAT, hash=f"#session={session_id}")
    page.find("#prompt").send_keys("After the stop", Keys.ENTER)
    finished(page)
    messages = stored(served, session_id).json()["messages"]
    assert [m["content"] for m in messages][:1] == ["After the stop"] and len(messages) == 2


def test_markup_in_a_reply_or_a_stored_message_is_shown_as_text(served, page):
    settings = {
        "maxTokens": "200",
        "systemPrompt": SYSTEM_MARKUP,
        "extra": json.dumps({"grammar": MARKUP_GRAMMAR}),
    }
    page.open(KEY, settings=settings)
    page.find("#prompt").send_keys(USER_MARKUP, Keys.ENTER)
    finished(page)

    def shown_as_text(stored_too: bool) -> None:
        assert page.all("#messages script, #messages img, #messages b, #messages i") == []
        assert page.js("return window.pwned === undefined")
        body = page.text("#messages .msg.assistant .body")
        assert "<script>window.pwned=1</script>" in body and 'onerror="window.pwned=2"' in body
        assert page.find("#messages .msg.assistant strong").text == "bold"
        assert page.text("#messages .msg.assistant pre code") == "<b>not bold</b>"
        assert page.text("#messages .msg.user .body") == USER_MARKUP
        if stored_too:
            assert page.text("#messages .msg.system .body") == SYSTEM_MARKUP

    shown_as_text(stored_too=False)
    page.find("#toggle-plan").click()
    page.screenshot("chat-markup.png")  # the README's picture
    page.reload()  # now everything comes from the session store
    shown_as_text(stored_too=True)
    messages = stored(served, page.session_id()).json()["messages"]
    assert messages[0] == {"role": "system", "content": SYSTEM_MARKUP}
    assert "<script>" in messages[2]["content"]


def test_dropped_turns_are_shown(served, page):
    page.open(KEY, settings={"maxTokens": "4", "extra": CHAT["extra"]})
    for turn in range(3):
        send(page, long_text(350, f"turn{turn}"))
        finished(page)
        assert not page.all("#messages .notice.error"), page.text("#messages .notice.error")
    notes = page.all("#messages .notice.dropped")
    assert len(notes) == 1 and "1 older turn was left out" in notes[0].text
    assert len(stored(served, page.session_id()).json()["messages"]) == 6  # all still stored


def test_settings_reach_the_request_and_stay(served, page):
    page.open(KEY)
    page.find("#toggle-settings").click()
    page.find("#temperature").send_keys("5")
    page.find("#extra").send_keys("{not json")
    page.find("#save-settings").click()  # the browser refuses 5 (the input's max is 2)
    assert page.js("return document.querySelector('#settings :invalid').id") == "temperature"
    page.find("#temperature").clear()
    page.find("#save-settings").click()
    assert "extra request fields must be a JSON object" in page.find("#banner").text
    assert page.js("return localStorage.getItem('llmup.settings')") == "{}"
    page.find("#temperature").send_keys("0.3")
    page.find("#top-p").send_keys("0.9")
    page.find("#max-tokens").send_keys("5")
    page.find("#system-prompt").send_keys("You are terse.")
    page.js("document.getElementById('extra').value = arguments[0]", CHAT["extra"])
    page.find("#save-settings").click()
    assert not page.find("#settings").is_displayed() and not page.find("#banner").is_displayed()
    page.js(
        "window.__bodies = []; const f = window.fetch; window.fetch = (u, i) => {"
        "  if (i && i.body) window.__bodies.push(JSON.parse(i.body)); return f(u, i); };"
    )
    page.find("#prompt").send_keys("Short answer please", Keys.ENTER)
    finished(page)
    body = page.js("return window.__bodies")[-1]
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.3, 0.9, 5)
    assert body["stream"] is True and body["logit_bias"] == NO_EOS
    assert body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Short answer please"},
    ]
    assert page.text("#messages .msg.assistant .stats").startswith("5 tokens"), page.text(
        "#messages"
    )
    page.reload()
    assert page.find("#temperature").get_attribute("value") == "0.3"
    assert page.text("#messages .msg.system .body") == "You are terse."


def test_a_wrong_or_missing_key_shows_the_error(served, page):
    with api(served) as http:
        made = http.post(
            "/v1/chat/completions",
            headers={"X-Session-Id": "made-by-the-api"},
            json={"model": "tiny-chat", "max_tokens": 2, "logit_bias": NO_EOS,
                  "messages": [{"role": "user", "content": "from the API"}]},
        )  # fmt: skip
        assert made.status_code == 200
    page.open("wrong-key", settings=CHAT)
    page.wait(lambda: page.find("#banner").is_displayed(), "the error")
    assert "401: invalid API key (invalid_api_key)" in page.find("#banner").text
    assert page.all("#sessions li") == []
    page.find("#prompt").send_keys("hello?", Keys.ENTER)
    finished(page)
    error = page.find("#messages .notice.error").text
    assert "401: invalid API key" in error and "not saved" in error
    assert page.find("#prompt").get_attribute("value") == "hello?"  # kept to send again

    key = page.find("#api-key")  # the settings are open at the key
    assert key.is_displayed()
    key.clear()
    key.send_keys(KEY, Keys.ENTER)
    page.wait(lambda: page.all('#sessions li[data-id="made-by-the-api"]'), "the sessions")
    assert not page.find("#banner").is_displayed()

    page.open(None)
    page.wait(lambda: page.find("#banner").is_displayed(), "the error")
    assert "401: no API key" in page.find("#banner").text


def _stored_anywhere(page: Page, storage: str) -> list[str]:
    """Names of the items of `storage` whose value holds the key."""
    return page.js(
        f"return Object.keys({storage}).filter(k => {storage}.getItem(k).includes(arguments[0]))",
        KEY,
    )


def _in_a_new_tab(page: Page, served) -> str:
    """The banner a tab opened by hand (no opener, so no session storage) shows."""
    first = page.driver.current_window_handle
    page.driver.switch_to.new_window("tab")
    try:
        page.driver.get(served.url + "/")
        page.wait(lambda: page.js("return document.body.dataset.ready === '1'"), "the new tab")
        banner = page.find("#banner")
        page.wait(
            lambda: banner.is_displayed() or "context 1024" in page.text("#plan-line"),
            "the plan or the 401",
        )
        return banner.text if banner.is_displayed() else ""
    finally:
        page.driver.close()
        page.driver.switch_to.window(first)


def test_the_key_is_forgotten_with_the_tab_unless_remembered(served, page):
    page.open(None)
    assert page.text("#backend-state") == "ready"  # /health's status, without the key
    page.wait(lambda: page.find("#api-key").is_displayed(), "the settings, opened by the 401")
    assert not page.find("#remember-key").is_selected()  # not remembered unless asked
    page.find("#api-key").send_keys(KEY)
    page.find("#save-settings").click()
    page.wait(lambda: "context 1024" in page.text("#plan-line"), "the plan, with the key")
    assert _stored_anywhere(page, "sessionStorage") == ["llmup.apiKey"]
    assert _stored_anywhere(page, "localStorage") == []
    assert "401: no API key" in _in_a_new_tab(page, served)  # a new tab does not have it

    page.find("#toggle-settings").click()
    page.find("#remember-key").click()
    page.find("#save-settings").click()
    assert _stored_anywhere(page, "localStorage") == ["llmup.rememberedKey"]
    assert _in_a_new_tab(page, served) == ""
    page.reload()
    assert page.find("#remember-key").is_selected()

    page.find("#toggle-settings").click()
    page.find("#remember-key").click()  # untick: gone from the browser, kept by this tab
    page.find("#save-settings").click()
    assert _stored_anywhere(page, "localStorage") == []
    assert _stored_anywhere(page, "sessionStorage") == ["llmup.apiKey"]
    assert "401: no API key" in _in_a_new_tab(page, served)


def test_a_key_an_older_page_left_in_local_storage_is_moved_to_the_tab(served, page):
    page.open(None)
    page.js("localStorage.setItem('llmup.apiKey', arguments[0])", KEY)
    page.reload()
    assert _stored_anywhere(page, "localStorage") == []
    assert _stored_anywhere(page, "sessionStorage") == ["llmup.apiKey"]
    assert not page.find("#remember-key").is_selected()
    page.wait(lambda: "context 1024" in page.text("#plan-line"), "the plan with the key")


def test_deleting_a_conversation(served, page):
    with api(served) as http:
        http.post(
            "/v1/chat/completions",
            headers={"X-Session-Id": "to-delete"},
            json={"model": "tiny-chat", "max_tokens": 2, "logit_bias": NO_EOS,
                  "messages": [{"role": "user", "content": "delete me"}]},
        )  # fmt: skip
    page.open(KEY, hash="#session=to-delete")
    assert "delete me" in page.text("#messages")
    page.find('#sessions li[data-id="to-delete"] .delete').click()
    page.driver.switch_to.alert.accept()
    page.wait(lambda: not page.all('#sessions li[data-id="to-delete"]'), "the item to go")
    assert page.session_id() != "to-delete" and page.text("#messages") == ""
    assert stored(served, "to-delete").status_code == 404


def test_phone_width_and_keyboard(served, page):
    page.open(KEY, settings=CHAT)
    page.driver.set_window_size(*PHONE)
    try:
        prompt = page.find("#prompt")
        prompt.send_keys("first line", Keys.SHIFT, Keys.ENTER, Keys.NULL, "second line")
        assert prompt.get_attribute("value") == "first line\nsecond line"
        assert not busy(page) and not replies(page)  # Shift+Enter did not send
        prompt.send_keys(Keys.ENTER)
        finished(page)
        assert page.text("#messages .msg.user .body") == "first line\nsecond line"
        assert len(replies(page)) == 1
        assert page.js("return document.documentElement.scrollWidth <= window.innerWidth")
        assert page.find("#prompt").is_displayed() and page.find("#send").is_displayed()
        sidebar_left = "return document.getElementById('sidebar').getBoundingClientRect().left"
        assert page.js(sidebar_left) < 0  # off screen until asked for
        page.screenshot("chat-phone.png")
        page.find("#toggle-sidebar").click()
        page.wait(lambda: page.js(sidebar_left) >= 0, "the sidebar")
        page.screenshot("chat-phone-sidebar.png")
        page.find("#new-chat").click()
        page.wait(lambda: page.js(sidebar_left) < 0, "the sidebar to close")
        assert page.text("#messages") == ""
    finally:
        page.driver.set_window_size(*DESKTOP)


def test_plan_panel_of_the_served_plan(served, page):
    page.open(KEY)
    page.find("#toggle-plan").click()
    plan = api(served).get("/v1/plan").json()["plan"]
    panel = page.find("#plan").text
    for shown in ("tiny-chat", "F32", "llama.cpp", "1024 tokens", "CPU only", "RAM"):
        assert shown in panel, shown
    assert f"{plan['placement']['ram_need_mib']} MiB" in panel
    assert f"{plan['memory_mib']['total']} MiB" in panel


def gpu_plan() -> dict:
    """A real two-GPU plan, with the device names and expected speeds the page shows."""
    hardware = load_snapshot(MACHINES / "a6000x2-busy.json")
    plan = make_plan(PlanRequest(hardware=hardware)).model_dump(mode="json")
    for device in plan["placement"]["devices"]:
        device.setdefault("name", "NVIDIA RTX A6000")
    if not any("tokens_per_s" in k for k in json.dumps(plan).split('"')):
        plan["speed"] = {"decode_tokens_per_s": 14.2, "prompt_tokens_per_s": 412.0}
    return plan


def test_gpu_plan_speed_and_a_loading_backend(tmp_path, page):
    plan = gpu_plan()
    backend = StaticBackend(
        "http://127.0.0.1:9", plan["model"]["id"], plan["context"], state="loading", plan_json=plan
    )
    proxy = serve_proxy(proxy_settings(tmp_path / "home", api_keys=[KEY]), backend)
    served_url, page.url = page.url, proxy.url
    try:
        page.open(KEY)
        state = page.find("#backend-state")
        assert state.text == "loading" and "warn" in state.get_attribute("class")
        line = page.text("#plan-line")
        assert f"{plan['quant']} · llama.cpp · context {plan['context']}" in line
        assert re.search(r"~[\d.]+ tokens/s decode, ~[\d.]+ tokens/s prompt", line), line
        page.find("#toggle-plan").click()
        panel = page.find("#plan").text
        for device in plan["placement"]["devices"]:
            assert f"{device['device']} NVIDIA RTX A6000" in panel
            assert f"{device['need_mib'] / 1024:.1f} GiB" in panel
        assert f"{plan['model']['params'] / 1e9:.0f} B parameters" in panel
        assert "Expected speed" in panel and "Below reading speed" not in panel
        assert not page.find("#speed-warning").is_displayed()  # 70B at ~11 tokens/s: fast
        page.screenshot("plan-panel.png")
        page.find("#prompt").send_keys("hello", Keys.ENTER)
        finished(page)
        error = page.find("#messages .notice.error").text
        assert error.startswith("Error 503:") and "not saved" in error
    finally:
        page.url = served_url
        proxy.stop()


def test_first_messages_without_max_tokens_on_a_llama_gguf_without_a_template(tmp_path, page):
    """What a newcomer does first: open the page, type a message, nothing set. On a Llama GGUF
    that carries no chat template (llmup renders Meta's Llama-2 format, as for TheBloke's
    files) each reply runs to the end of the context, and the next message still gets one
    (the earlier turn is left out, and the page says so): replies, never an error box."""
    model = write_llama_gguf(tmp_path / "llama-2-tiny.gguf", tensor_type="F32")
    server = Served(
        ["--model-file", str(model), "--context", "256", "--api-key", KEY], tmp_path, free_port()
    )
    served_url, page.url = page.url, server.url
    try:
        server.wait_ready()
        page.open(KEY)  # no settings: no max tokens, no system prompt
        for turn, text in enumerate(["Hello!", "And who are you?"]):
            send(page, text)
            finished(page)
            errors = page.all("#messages .notice.error")
            assert not errors, errors[0].text
            assert len(replies(page)) == turn + 1
            stats = page.all("#messages .msg.assistant .stats")[-1].text
            assert STATS.fullmatch(stats) and STATS.fullmatch(stats)[2] in ("stop", "length")
        messages = api(server).get(f"/v1/sessions/{page.session_id()}").json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    finally:
        page.url = served_url
        server.stop()


def test_a_plan_below_reading_speed_says_so_in_the_header(tmp_path, page):
    """This 2-core machine's plan (13B Q8_0, ~1 token/s) in the header: the warning and the
    flag that would serve something faster; a fast plan shows none."""
    hardware = load_snapshot(MACHINES / "cpu-2core-24gb.json")
    slow = make_plan(PlanRequest(hardware=hardware)).model_dump(mode="json")
    served_url = page.url
    for plan, shown in ((slow, True), (gpu_plan(), False)):
        backend = StaticBackend(
            "http://127.0.0.1:9",
            plan["model"]["id"],
            plan["context"],
            state="loading",
            plan_json=plan,
        )
        proxy = serve_proxy(proxy_settings(tmp_path / f"home-{shown}", api_keys=[KEY]), backend)
        page.url = proxy.url
        try:
            page.open(KEY)
            warning = page.find("#speed-warning")
            page.wait(lambda w=warning, s=shown: w.is_displayed() == s, "the header's warning")
            if shown:
                flag = slow["speed_warning"]["faster"]["flag"]
                assert "below reading speed (5 tokens/s" in warning.text
                assert page.text("#speed-warning code") == flag
                assert warning.location["y"] < page.find("#messages").location["y"]
                page.find("#toggle-plan").click()
                assert "Below reading speed" in page.find("#plan").text
                assert page.text("#plan dd code") == flag
                page.screenshot("slow-plan-header.png")
        finally:
            page.url = served_url
            proxy.stop()


MARKDOWN = [
    ("# Title\ntext", "<h3>Title</h3><p>text</p>"),
    ("line one\nline two", "<p>line one<br>line two</p>"),
    ("- a\n- b\n\n3. x\n4. y", "<ul><li>a</li><li>b</li></ul>"
     '<ol start="3"><li>x</li><li>y</li></ol>'),
    ("> quoted **b**", "<blockquote><p>quoted <strong>b</strong></p></blockquote>"),
    ("`a **b**` and snake_case_name, *em*",
     "<p><code>a **b**</code> and snake_case_name, <em>em</em></p>"),
    ("[ok](https://example.com/x) [bad](javascript:void)",
     '<p><a href="https://example.com/x" rel="noopener noreferrer nofollow" target="_blank">'
     "ok</a> [bad](javascript:void)</p>"),
    ("```py\nx = '<b>'\n",  # still streaming: the fence runs to the end
     '<pre data-lang="py"><code class="language-py">x = \'&lt;b&gt;\'</code></pre>'),
    ("<b>hi</b> & <script>x</script>",
     "<p>&lt;b&gt;hi&lt;/b&gt; &amp; &lt;script&gt;x&lt;/script&gt;</p>"),
    ("a\n\n---\n\nb", "<p>a</p><hr><p>b</p>"),
]  # fmt: skip


def test_markdown_renderer_builds_only_these_nodes(served, page):
    """The page's own renderer, imported in the browser, serialized to compare (test only)."""
    page.open(KEY)
    rendered = page.driver.execute_async_script(
        "const [sources, done] = arguments;"
        "import(new URL('web/markdown.js', location.href).href).then(({ renderMarkdown }) =>"
        "  done(sources.map((s) => {"
        "    const box = document.createElement('div'); box.append(renderMarkdown(s));"
        "    return box.innerHTML; })));",
        [source for source, _ in MARKDOWN],
    )
    assert list(zip(*MARKDOWN))[1] == tuple(rendered)


def test_the_page_opened_while_loading_turns_into_the_chat(tmp_path):
    """Opened while the backend loads (frozen here), `/` is a page that says so and reloads
    itself; once the model is ready the same tab becomes the chat page, with no click."""
    model = write_llama_gguf(tmp_path / "tiny-chat.gguf", tensor_type="F32", chat_template=TEMPLATE)
    server = Served(["--model-file", str(model), "--api-key", KEY], tmp_path, free_port())
    backend = server.wait_backend()
    backend.suspend()
    browser = Page(server.url)
    try:
        browser.driver.get(server.url + "/")
        assert "llmup is loading tiny-chat" in browser.text("body")
        assert browser.js("return document.body.dataset.ready") is None
        # remembered key: /health tells the model's name only to a key holder
        browser.js("localStorage.setItem('llmup.rememberedKey', arguments[0])", KEY)
        backend.resume()
        browser.wait(
            lambda: browser.js("return document.body.dataset.ready === '1'"),
            "the chat page after the load",
            timeout=60,
        )
        assert "tiny-chat" in browser.text("body")
    finally:
        backend.resume()
        browser.close()
        server.stop()


def test_conversations_made_through_every_api_are_shown(served, page):
    """A Responses chain, a Messages session and a conversation with a tool call are
    sessions: each is in the list, and its messages (the call and its result as text) show."""
    with api(served) as http:
        chain = http.post("/v1/responses", json={
            "model": "tiny-chat", "input": "via responses", "max_output_tokens": 3})  # fmt: skip
        assert chain.status_code == 200, chain.text
        message = http.post(
            "/v1/messages", headers={"X-Session-Id": "via-messages"},
            json={"model": "tiny-chat", "max_tokens": 3,
                  "messages": [{"role": "user", "content": "via messages"}]},
        )  # fmt: skip
        assert message.status_code == 200, message.text
        conv = http.post("/v1/conversations", json={"items": [
            {"role": "user", "content": "what is the weather?"},
            {"type": "function_call", "call_id": "c1", "name": "get_weather",
             "arguments": '{"city": "Oslo"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "rain, 7 C"},
        ]}).json()  # fmt: skip
    page.open(KEY, hash=f"#session={conv['id']}")
    shown = page.text("#messages")
    assert "what is the weather?" in shown and "rain, 7 C" in shown
    assert '→ get_weather({"city": "Oslo"})' in shown
    listed = page.text("#sessions")
    assert "via responses" in listed and "via messages" in listed
    page.open(KEY, hash=f"#session={chain.json()['id']}")
    assert "via responses" in page.text("#messages")
