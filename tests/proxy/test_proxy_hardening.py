"""No request takes the service down: every bad one is a 400 naming the field, checked by
the proxy before the backend sees it, and the backend is never restarted because of one."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from support.backend_fixtures import (
    MODEL,
    NO_EOS,
    proxy_settings,
    serve_proxy,
    served,
    start_backend,
)

pytestmark = pytest.mark.timeout(180)

CHAT = "/v1/chat/completions"
OK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_GRAMMARS = [
    "root ::= (",  # unclosed group: SIGSEGV in llama_cpp.server
    "root ::= foo",  # undefined rule: SIGSEGV
    'start ::= "a"',  # no root rule
    'root ::= root "a"',  # left recursion
    "root ::= " + "(" * 49_000 + '"a"' + ")" * 49_000,  # crashes llama.cpp's parser itself
]


def _deep(levels: int) -> list:
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


def test_bad_fields_are_400_naming_the_field(make_proxy) -> None:
    http = make_proxy().http()
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    cases = [
        ({**OK, "messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
        ({**OK, "junk": _deep(400)}, "junk"),
        ({**OK, "tools": "x"}, "tools"),
        ({**OK, "functions": "x"}, "functions"),
        ({**OK, "logit_bias": {"abc": 5}}, "logit_bias.abc"),
        ({**OK, "logit_bias": {"5": 500}}, "logit_bias.5"),
        ({**OK, "logit_bias": {"99999": 1}}, "logit_bias"),  # beyond the vocabulary
        ({**OK, "top_k": -5}, "top_k"),
        ({**OK, "mirostat_mode": 7}, "mirostat_mode"),
        ({**OK, "repeat_penalty": -1}, "repeat_penalty"),
        ({**OK, "min_p": 5}, "min_p"),
        ({**OK, "logprobs": True}, "logprobs"),
        ({**OK, "n": 2}, "n"),
        ({**OK, "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "g"}}},
         "tool_choice"),
        ({**OK, "seed": 2**70}, "seed"),
        ({**OK, "stop": ["x"] * 17}, "stop"),  # more than 16 stop strings (issue 19)
        ({**OK, "stop": ["x" * 257]}, "stop"),  # one longer than 256 characters
        ({**OK, "stop": "x" * 257}, "stop"),
        ({**OK, "functions": [{"name": "f", "parameters": {"x": 9.2e18}}]},
         "functions.0.parameters"),
    ]  # fmt: skip
    for body, param in cases:
        content = json.dumps(body).encode()  # \ud800 stays an escape, as a client sends it
        response = http.post(CHAT, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, (param, response.text)
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
        # a hint may name llmup's own flags (`--llamacpp-impl`), never llama.cpp's internals
        assert "Traceback" not in error["message"] and "llama_" not in error["message"].lower()
    completion = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    response = http.post("/v1/completions", json={**completion, "logprobs": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"


def test_bad_grammars_are_400_and_the_backend_stays_up(make_proxy, tiny_backend) -> None:
    client = make_proxy().client()
    restarts = tiny_backend.restarts
    for _ in range(2):  # more bad requests than the restart budget would have survived
        for grammar in BAD_GRAMMARS:
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                    extra_body={"grammar": grammar},
                )  # fmt: skip
            assert caught.value.code == "invalid_grammar" and caught.value.param == "grammar"
    with pytest.raises(openai.BadRequestError, match="Undefined rule identifier 'foo'"):
        client.completions.create(
            model=MODEL, prompt="hi", max_tokens=4, extra_body={"grammar": "root ::= foo"}
        )
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(x$"}}}
    bad_format = {"type": "json_object", "schema": schema}
    response = make_proxy().http().post(CHAT, json={**OK, "response_format": bad_format})
    assert response.status_code in (200, 400), response.text  # never a crash
    assert tiny_backend.restarts == restarts and tiny_backend.state == "ready"
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
        extra_body={"grammar": 'root ::= "yes" | "no"'},
    )  # fmt: skip
    assert reply.choices[0].message.content in ("yes", "no")


def test_the_worker_itself_survives_a_bad_grammar(tiny_backend) -> None:
    """The second line of defence: sent straight to llmup's worker, a grammar llama.cpp
    cannot parse is an error reply, not a segfault."""
    restarts = tiny_backend.restarts
    key = tiny_backend.auth_headers  # the per-run backend key, as the proxy sends it
    body = {**OK, "grammar": "root ::= ("}
    response = httpx.post(tiny_backend.base_url + CHAT, json=body, headers=key, timeout=30)
    assert response.status_code == 500 and "could not parse the grammar" in response.text
    models = httpx.get(tiny_backend.base_url + "/v1/models", headers=key, timeout=30)
    assert models.status_code == 200
    assert tiny_backend.restarts == restarts


def test_a_request_in_flight_at_a_crash_is_not_sent_again(tmp_path: Path) -> None:
    supervisor = start_backend(tmp_path / "backend")
    proxy = serve_proxy(proxy_settings(tmp_path / "home"), served(supervisor))
    try:
        client = proxy.client()
        body = {
            "model": MODEL, "messages": [{"role": "user", "content": "go on"}],
            "max_tokens": 400, "logit_bias": NO_EOS,
        }  # fmt: skip
        stream = client.chat.completions.create(**body, stream=True)
        next(iter(stream))
        os.killpg(supervisor.pid, signal.SIGKILL)  # the backend dies with the request at it
        with pytest.raises(openai.APIError):
            list(stream)
        deadline = time.monotonic() + 60
        while not (supervisor.restarts >= 1 and supervisor.state == "ready"):
            assert time.monotonic() < deadline, supervisor.state
            time.sleep(0.05)
        for _ in range(3):  # the same request again, as the openai client retries it
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(**body, stream=True)
            assert caught.value.code == "request_crashed_backend"
        changed = client.chat.completions.create(**{**body, "max_tokens": 3, "seed": 7})
        assert changed.choices[0].finish_reason == "length"
        assert supervisor.restarts == 1
    finally:
        proxy.stop()
        supervisor.stop()


def test_a_500_closes_the_connection_and_the_next_request_works(make_proxy) -> None:
    """A broken session store is a bug the proxy cannot fix: 500, OpenAI-shaped, with
    `Connection: close`, and the client's next request (same keep-alive client) works."""
    proxy = make_proxy()
    http = proxy.http()
    http.post(CHAT, json=OK, headers={"X-Session-Id": "s"}).raise_for_status()
    proxy.store.close()  # every use of the store now raises sqlite3.ProgrammingError
    for _ in range(3):
        response = http.get("/v1/sessions")
        assert response.status_code == 500, response.text
        assert response.headers["connection"] == "close"
        assert response.json()["error"]["type"] == "server_error"
        assert http.get("/health").status_code == 200  # same client, next request: fine
    assert 'status="500"' in http.get("/metrics").text


def test_openapi_document_is_behind_the_key(make_proxy) -> None:
    proxy = make_proxy(api_keys=["k"])
    assert proxy.http().get("/openapi.json").status_code == 401
    document = proxy.http("k").get("/openapi.json").json()
    request = document["components"]["schemas"]["ChatRequest"]["properties"]
    assert {"grammar", "top_k", "tools", "logit_bias", "session_id"} <= set(request)
    assert proxy.http().get("/health").status_code == 200  # the one open route
