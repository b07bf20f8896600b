"""The backend dies in the middle of a streamed reply: the proxy and the session survive."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import openai
import pytest
from backend_fixtures import MODEL, NO_EOS, proxy_settings, serve_proxy, start_backend

pytestmark = pytest.mark.timeout(120)


def _wait_restarted(supervisor, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (supervisor.restarts >= 1 and supervisor.state == "ready"):
        assert time.monotonic() < deadline, f"no restart: {supervisor.state}"
        time.sleep(0.05)


def test_backend_killed_mid_stream(tmp_path: Path) -> None:
    supervisor = start_backend(tmp_path / "backend")
    proxy = serve_proxy(proxy_settings(tmp_path / "home"), supervisor)
    try:
        client = proxy.client()
        sid = {"X-Session-Id": "crash"}
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "first"}], max_tokens=3,
            extra_headers=sid,
        )  # fmt: skip
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "second"}], max_tokens=460,
            stream=True, logit_bias=NO_EOS, extra_headers=sid,
        )  # fmt: skip
        pieces = []
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                    if len(pieces) == 3:
                        os.killpg(supervisor.pid, signal.SIGKILL)
        assert len(pieces) >= 3 and "nothing was stored" in caught.value.message

        stored = proxy.http().get("/v1/sessions/crash").json()
        assert stored["turns"] == 1
        assert [m["content"] for m in stored["messages"] if m["role"] == "user"] == ["first"]

        _wait_restarted(supervisor)
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "third"}], max_tokens=3,
            extra_headers=sid,
        )  # fmt: skip
        assert reply.choices[0].finish_reason in ("stop", "length")
        stored = proxy.http().get("/v1/sessions/crash").json()
        users = [m["content"] for m in stored["messages"] if m["role"] == "user"]
        assert stored["turns"] == 2 and users == ["first", "third"]
        assert proxy.metric("llmup_backend_restarts") == 1
        assert proxy.metric("llmup_stream_errors_total") == 1
    finally:
        proxy.stop()
        supervisor.stop()
