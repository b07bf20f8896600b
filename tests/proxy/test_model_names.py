"""What an OpenAI app's settings assume: a fixed model name (`--model-alias`) and a base URL
without `/v1`. In front of llmup's slot worker, which refuses any model name but its own, so
a request reaches it only with the served id the proxy resolved."""

from __future__ import annotations

import openai
import pytest
from support.backend_fixtures import TEMPLATE, proxy_settings, serve_proxy
from support.ggufgen import write_llama_gguf
from support.openai_schemas import check_chat
from support.serving import Served
from support.worker_fixtures import CLEAN_WORDS, SlotWorker

from launcher.netaddr import free_port
from launcher.served import StaticBackend, WorkerKind
from launcher.settings import Settings

pytestmark = pytest.mark.timeout(180)

ALIASES = ["gpt-4o-mini", "llama2"]
HELLO = [{"role": "user", "content": "hello"}]
OPENAI_PATHS = ["/models", "/chat/completions", "/completions", "/embeddings"]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model-names")
    model = write_llama_gguf(folder / "tiny-chat.gguf", chat_template=TEMPLATE, seed=5)
    running = SlotWorker.start(model, folder / "slots", "--parallel", "2")
    yield running
    running.stop()


@pytest.fixture
def make(worker, tmp_path):
    started = []

    def proxy(**settings):
        backend = StaticBackend(
            base_url=worker.url, model_id="tiny", context=512, kind=WorkerKind.LLAMACPP_SLOTS
        )
        running = serve_proxy(proxy_settings(tmp_path / f"home{len(started)}", **settings), backend)
        started.append(running)
        return running

    yield proxy
    for running in started:
        running.stop()


def bare_client(proxy, key: str = "no-key") -> openai.OpenAI:
    """The official client with the base URL a user typed without `/v1`."""
    return openai.OpenAI(base_url=proxy.url, api_key=key, max_retries=0)


def test_an_alias_answers_under_both_base_urls_and_the_reply_names_the_served_id(make):
    proxy = make(model_aliases=ALIASES)
    for client in (bare_client(proxy), proxy.client()):
        assert [m.id for m in client.models.list().data] == ["tiny", *ALIASES]
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, max_tokens=4, logit_bias=CLEAN_WORDS
        )
        check_chat(reply.model_dump(mode="json", exclude_unset=True))
        assert reply.model == "tiny"  # as OpenAI does: the model that answered, resolved
        assert reply.usage.completion_tokens == 4
        chunks = list(
            client.chat.completions.create(
                model="llama2", messages=HELLO, max_tokens=3, stream=True, logit_bias=CLEAN_WORDS
            )
        )
        assert {c.model for c in chunks} == {"tiny"}
        assert chunks[-1].choices[0].finish_reason == "length"
        text = client.completions.create(model="llama2", prompt="hello world", max_tokens=2)
        assert text.model == "tiny" and text.usage.completion_tokens == 2


def test_an_unknown_name_is_a_404_that_lists_what_is_served(make):
    proxy = make(model_aliases=ALIASES)
    for client in (bare_client(proxy), proxy.client()):
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="gpt-4", messages=HELLO, max_tokens=2)
        error = caught.value.body
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert "`gpt-4`" in error["message"]
        assert "`tiny`, `gpt-4o-mini`, `llama2`" in error["message"]
    # without aliases: only the id, and the error says how to add a name
    plain = make()
    with pytest.raises(openai.NotFoundError) as caught:
        bare_client(plain).completions.create(model="Tiny", prompt="hi", max_tokens=1)
    assert "serves `tiny` (" in caught.value.body["message"]
    assert "--model-alias" in caught.value.body["message"]
    assert [m.id for m in bare_client(plain).models.list().data] == ["tiny"]


def test_the_wildcard_alias_takes_any_name_but_is_not_listed(make):
    proxy = make(model_aliases=["*"])
    client = bare_client(proxy)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = client.chat.completions.create(model="gpt-3.5-turbo", messages=HELLO, max_tokens=2)
    assert reply.model == "tiny" and reply.choices[0].message.role == "assistant"


def test_only_openais_routes_have_a_second_path_and_the_schema_lists_each_once(make):
    proxy = make(api_keys=["k1"])
    http = proxy.http("k1")
    schema = http.get("/openapi.json").json()["paths"]
    for path in OPENAI_PATHS:
        assert "/v1" + path in schema and path not in schema
    ids = [[m["id"] for m in http.get(p).json()["data"]] for p in ("/models", "/v1/models")]
    assert ids == [["tiny"], ["tiny"]]
    # llmup's own routes stay where they are: no /sessions or /plan at the top level
    assert http.get("/v1/sessions").status_code == 200
    for path in ("/sessions", "/plan", "/v1/health", "/v1/metrics"):
        reply = http.get(path)
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found"
    assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200


def test_the_key_guard_and_the_metrics_treat_both_paths_alike(make):
    proxy = make(api_keys=["k1"])
    for path in ("/chat/completions", "/v1/chat/completions"):
        # refused before the body is read: an unparseable body is still a 401
        reply = proxy.http().post(path, content=b"{not json", headers={"Content-Length": "9"})
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
        ok = proxy.http("k1").post(path, json={"model": "tiny", "messages": HELLO, "max_tokens": 1})
        assert ok.status_code == 200, ok.text
    metrics = proxy.http("k1").get("/metrics").text
    for route in ("/chat/completions", "/v1/chat/completions"):
        assert f'llmup_requests_total{{route="{route}",status="200"}} 1.0' in metrics
    # a 401 is decided before routing, the same for both paths
    assert 'llmup_requests_total{route="unmatched",status="401"} 2.0' in metrics


def test_without_keys_the_host_check_covers_the_top_level_paths(make):
    proxy = make()
    for path in ("/models", "/v1/models"):
        refused = proxy.http().get(path, headers={"Host": "attacker.example"})
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "invalid_host"
        assert proxy.http().get(path).status_code == 200


def test_aliases_from_the_environment_and_a_profile(monkeypatch):
    monkeypatch.setenv("LLMUP_PROXY__MODEL_ALIASES", " gpt-4o-mini, Llama-2 ,gpt-4o-mini,")
    assert Settings().proxy.model_aliases == ["gpt-4o-mini", "Llama-2"]  # case kept


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["slots", "server"])
def test_serve_with_model_alias_answers_a_fixed_name_app(tmp_path, impl):
    """`llmup serve --model-alias` end to end: the ready line names the alias, and an app
    configured with base URL `http://host:port` and model `gpt-3.5-turbo` gets replies."""
    model = write_llama_gguf(tmp_path / "tiny-chat.gguf", chat_template=TEMPLATE, seed=5)
    args = ["--model-file", str(model), "--context", "256", "--llamacpp-impl", impl]
    server = Served([*args, "--model-alias", "gpt-3.5-turbo"], tmp_path, free_port())
    try:
        server.wait_ready()
        assert "also answers to: gpt-3.5-turbo" in server.output()
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
        names = [m.id for m in client.models.list().data]
        assert names == ["tiny-chat", "gpt-3.5-turbo"]
        reply = client.chat.completions.create(
            model="gpt-3.5-turbo", messages=HELLO, max_tokens=3, logit_bias=CLEAN_WORDS
        )
        assert reply.model == "tiny-chat" and reply.usage.completion_tokens == 3
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4", messages=HELLO, max_tokens=1)
    finally:
        server.stop()
