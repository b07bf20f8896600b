"""The plainest request works: no `max_tokens`, on every route, streamed or not, in a session
or not, through `llmup serve` with llmup's slot worker and with llama-cpp-python's server, on a
generated Llama GGUF without a chat template (llmup renders Meta's Llama-2 format, as for
TheBloke's files, whose GGUFs carry none) and on one with a template; and the ready line's
own examples, run as printed.

A reply without max_tokens may run to the end of the context as the backend counts it: all
of it on the slot worker, all but the 3 tokens llama-cpp-python's worker keeps free. With the
end-of-sequence token banned a reply runs exactly that far.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import httpx
import pytest
from support.backend_fixtures import NO_EOS, TEMPLATE, long_text
from support.ggufgen import write_llama_gguf
from support.openai_schemas import (
    check_chat,
    check_chunk,
    check_completion,
    check_completion_chunk,
    check_fingerprint,
    sse_events,
)
from support.serving import Served

from launcher.netaddr import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CONTEXT = 256
MODEL = "llama-chat"
USABLE = {"slots": CONTEXT, "server": CONTEXT - 3}  # the context each worker counts against
KINDS = {
    "slots-no-template": ("slots", None),
    "slots-template": ("slots", TEMPLATE),
    "server-no-template": ("server", None),
    "server-template": ("server", TEMPLATE),
}
CHAT = "/v1/chat/completions"
USAGE = {"stream_options": {"include_usage": True}}
FINGERPRINTS: dict[str, str] = {}  # kind -> the fingerprint its server sends


@pytest.fixture(scope="module", params=list(KINDS))
def served(request, tmp_path_factory):
    impl, template = KINDS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    model = write_llama_gguf(folder / f"{MODEL}.gguf", tensor_type="F32", chat_template=template)
    server = Served(
        ["--model-file", str(model), "--context", str(CONTEXT), "--llamacpp-impl", impl],
        folder,
        free_port(),
    )
    server.wait_ready()
    server.kind, server.usable = request.param, USABLE[impl]
    yield server
    server.stop()


def http(served) -> httpx.Client:
    return httpx.Client(base_url=served.url, timeout=120, trust_env=False)


def user(text: str = "hi") -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}]}


def total(usage: dict) -> int:
    return usage["prompt_tokens"] + usage["completion_tokens"]


SYSTEM = {"role": "system", "content": "be brief"}


@pytest.mark.parametrize("system", [[], [SYSTEM]], ids=["user", "system-and-user"])
def test_the_issues_request_gets_a_reply(served, system):
    """POST {"model", "messages": [{"role": "user", "content": "hi"}]}: nothing else. (With
    a system message, Meta's Llama-2 format costs more tokens than the proxy used to guess,
    and the worker refused the max_tokens the proxy had filled in from that guess.)"""
    body = user()
    reply = http(served).post(CHAT, json={**body, "messages": system + body["messages"]})
    assert reply.status_code == 200, reply.text
    check_chat(reply.json())
    assert total(reply.json()["usage"]) <= served.usable
    assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_chat_reply_runs_to_the_end_of_the_context(served):
    client = http(served)
    reply = client.post(CHAT, json={**user(), "logit_bias": NO_EOS}).json()
    check_chat(reply)
    assert reply["choices"][0]["finish_reason"] == "length"
    assert total(reply["usage"]) == served.usable
    events = sse_events(client.post(CHAT, json={**user(), "logit_bias": NO_EOS,
                                                "stream": True, **USAGE}).text)  # fmt: skip
    assert events[-1] == "[DONE]"
    for chunk in events[:-1]:
        check_chunk(chunk)
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert total(events[-2]["usage"]) == served.usable
    prints = {check_fingerprint(c) for c in events[:-1]} | {reply["system_fingerprint"]}
    assert len(prints) == 1  # one build, one fingerprint


def test_completions_get_16_tokens_or_what_is_left(served):
    client = http(served)
    body = {"model": MODEL, "prompt": "hello world", "logit_bias": NO_EOS}
    reply = client.post("/v1/completions", json=body).json()
    check_completion(reply)
    assert reply["usage"]["completion_tokens"] == 16  # OpenAI's default
    events = sse_events(client.post("/v1/completions", json={**body, "stream": True,
                                                             **USAGE}).text)  # fmt: skip
    for chunk in events[:-1]:
        check_completion_chunk(chunk)
    assert events[-2]["usage"]["completion_tokens"] == 16
    # a prompt that leaves 5 tokens: the reply gets those 5, no refusal
    near = {**body, "prompt": long_text(served.usable - 6)}  # + BOS: usable - 5 tokens
    reply = client.post("/v1/completions", json=near)
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    assert usage["prompt_tokens"] == served.usable - 5 and usage["completion_tokens"] == 5


def test_a_session_without_max_tokens_leaves_out_what_no_longer_fits(served):
    """Each reply fills the context, so the next turn leaves the earlier ones out."""
    client, headers = http(served), {"X-Session-Id": "plain"}
    first = client.post(CHAT, json={**user(), "logit_bias": NO_EOS}, headers=headers)
    assert first.status_code == 200, first.text
    assert total(first.json()["usage"]) == served.usable
    assert first.headers["X-Llmup-Context-Dropped"] == "0"
    second = client.post(CHAT, json={**user("and now?"), "logit_bias": NO_EOS, "stream": True,
                                     **USAGE}, headers=headers)  # fmt: skip
    assert second.status_code == 200 and second.headers["X-Llmup-Context-Dropped"] == "1"
    events = sse_events(second.text)
    assert events[-1] == "[DONE]" and total(events[-2]["usage"]) == served.usable
    third = client.post(CHAT, json=user("thanks"), headers=headers)
    assert third.status_code == 200, third.text
    check_chat(third.json())
    assert client.get("/v1/sessions/plain").json()["turns"] == 3


def ready_line(served, start: str) -> str:
    lines = [line.strip() for line in served.output().splitlines()]
    return next(line for line in lines if line.startswith(start))


def test_the_ready_lines_examples_run_as_printed(served):
    curl = ready_line(served, "curl ")
    assert "max_tokens" not in curl
    done = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    check_chat(reply)
    assert reply["choices"][0]["message"]["role"] == "assistant"
    snippet = ready_line(served, "python -c ")
    command = shlex.quote(sys.executable) + snippet.removeprefix("python")
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_fingerprint_names_the_build(served):
    """The same for every reply of one server, different for another model file or worker."""
    client = http(served)
    chat = client.post(CHAT, json={**user(), "max_tokens": 2}).json()
    text = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    prints = {chat["system_fingerprint"], text.json()["system_fingerprint"]}
    assert len(prints) == 1
    (fingerprint,) = prints
    others = {kind: seen for kind, seen in FINGERPRINTS.items() if kind != served.kind}
    assert fingerprint not in others.values(), others
    FINGERPRINTS[served.kind] = fingerprint
