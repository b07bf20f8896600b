"""llmup's llama.cpp session-slot worker as a real child process on 127.0.0.1.

`SlotWorker.start(model, slots_dir, ...)` runs `python -m launcher.workers.llamacpp_slots.server`
as the supervisor would and waits for /health; `stop()` sends SIGTERM (the worker then saves
its sessions to disk) and waits. `chat(...)` posts one chat request, optionally in a session
named by the proxy's private headers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from launcher.netaddr import free_port
from launcher.protocol import BACKEND_OWNER_HEADER, BACKEND_SESSION_HEADER
from launcher.workers.llamacpp_slots.slot_store import MAGIC
from support.backend_fixtures import TEMPLATE
from support.ggufgen import write_llama_gguf

# No end of sequence and no byte tokens for the generated model: replies run to max_tokens
# in whole words, so a reply's text tokenizes back to (mostly) the same ids.
CLEAN_WORDS = {str(token): -100.0 for token in range(2, 259)}


def write_chat_model(folder: Path, *, seed: int = 3) -> Path:
    """The generated tiny model with the tests' chat template, as the workers load it."""
    return write_llama_gguf(folder / "tiny-chat.gguf", chat_template=TEMPLATE, seed=seed)


def session_headers(owner: str, session: str) -> dict[str, str]:
    return {BACKEND_OWNER_HEADER: owner, BACKEND_SESSION_HEADER: session}


@dataclass
class SlotWorker:
    proc: subprocess.Popen
    port: int
    log: Path
    model: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        model: Path,
        slots_dir: Path,
        *args: str,
        alias: str = "tiny",
        env: dict[str, str] | None = None,
    ) -> SlotWorker:
        port = free_port()
        log = slots_dir.parent / f"worker-{port}.log"
        command = [
            sys.executable, "-m", "launcher.workers.llamacpp_slots.server",
            "--model", str(model), "--port", str(port), "--model-alias", alias,
            "--slots-dir", str(slots_dir), "--threads", "1", *args,
        ]  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        worker = cls(proc, port, log, alias)
        worker._wait_ready()
        return worker

    def _wait_ready(self, timeout: float = 120.0) -> None:
        """Until /health answers (200, or 401 from a worker that wants a key)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code in (200, 401):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError(f"worker not ready in {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def chat(
        self,
        messages: list[dict[str, str]],
        session: tuple[str, str] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        body = {"model": self.model, "messages": messages, "temperature": 0, **fields}
        headers = session_headers(*session) if session else {}
        reply = httpx.post(
            self.url + "/v1/chat/completions", json=body, headers=headers, timeout=120
        )
        assert reply.status_code == 200, reply.text
        return reply.json()


def text_of(reply: dict[str, Any]) -> str:
    return reply["choices"][0]["message"]["content"]


def cached_of(reply: dict[str, Any]) -> int:
    return reply["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)


def rewrite_state_header(path: Path, **changes: Any) -> None:
    """A saved-state file with its JSON header changed (its length field made to fit), as
    a damaged or hand-edited file would be; the rest of the file is left as it was."""
    blob = path.read_bytes()
    start = len(MAGIC) + 4
    length = int.from_bytes(blob[len(MAGIC) : start], "little")
    header = json.loads(blob[start : start + length])
    raw = json.dumps({**header, **changes}).encode()
    path.write_bytes(MAGIC + len(raw).to_bytes(4, "little") + raw + blob[start + length :])
