"""A real llama_cpp.server on a generated tiny GGUF, and the proxy served by real uvicorn.

Test modules import the fixtures they use (`from support.backend_fixtures import tiny_backend`). The
backend is started as `llmup serve` starts it: llmup's llama.cpp worker
(`launcher.workers.llamacpp_python.server`: llama_cpp.server with llmup's additions, /health and
the per-run key) under the project's Supervisor (so a test can kill it and watch the restart); each
proxy runs in a uvicorn thread on 127.0.0.1 with its own settings and session store.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from launcher.backends.launch.llamacpp_python import SERVER_ENV_NAMES, SERVER_MODULE
from launcher.backends.spec import BackendSpec
from launcher.backends.supervise.supervisor import Supervisor
from launcher.netaddr import free_port
from launcher.proxy import SessionStore, create_app, open_store
from launcher.runkey import new_backend_key
from launcher.serve import SupervisedModel
from launcher.served import ServedModel, WorkerKind
from launcher.settings import Settings
from support.ggufgen import write_llama_gguf

MODEL = "tiny"
N_CTX = 512
# The generated vocabulary has no chat template of its own: a Zephyr-like one whose role
# markers cost ~13 tokens per message and for the reply's header (spelled out in byte and
# letter tokens).
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# logit_bias that keeps a stream going until max_tokens: no </s>, and no byte tokens either
# (random weights emit runs of bytes that are not UTF-8, which llama_cpp.server holds back
# and re-decodes quadratically without yielding, so it would not see a client leave).
NO_EOS = {str(token): -100 for token in range(2, 259)}


def write_tiny_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_llama_gguf(folder / "tiny.gguf", tensor_type="F32", chat_template=TEMPLATE)


def llama_spec(model: Path, log_dir: Path, *, embedding: bool = True) -> BackendSpec:
    port = free_port()
    command = [
        sys.executable, "-m", SERVER_MODULE,
        "--model", str(model), "--model_alias", MODEL,
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(N_CTX), "--n_threads", "1", "--n_threads_batch", "1",
        "--embedding", "true" if embedding else "false",
        "--cache", "false", "--verbose", "false", "--interrupt_requests", "false",
    ]  # fmt: skip
    return BackendSpec(
        name="tiny-llama",
        command=command,
        port=port,
        log_path=log_dir / "backend.log",
        env={"PYTHONUNBUFFERED": "1"},
        env_unset=SERVER_ENV_NAMES,
        health_path="/health",
        ready_timeout_s=60,
        model_alias=MODEL,
        api_key=new_backend_key(),
    )


def start_backend(folder: Path) -> Supervisor:
    """A supervised llama_cpp.server on the tiny model; the caller stops it."""
    spec = llama_spec(write_tiny_model(folder), folder)
    supervisor = Supervisor(spec, backoff_initial=0.2, max_restarts=3)
    return supervisor.start()


def served(
    supervisor: Supervisor,
    kind: WorkerKind = WorkerKind.LLAMACPP_PYTHON,
    *,
    embeddings: bool = True,
) -> SupervisedModel:
    """A supervised tiny backend as the proxy sees it: by default llama-cpp-python's server
    as `start_backend` starts it (with `--embedding true`, so embeddings go through)."""
    return SupervisedModel(supervisor, MODEL, N_CTX, kind, embeddings=embeddings)


@pytest.fixture(scope="module")
def tiny_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    supervisor = start_backend(tmp_path_factory.mktemp("backend"))
    yield supervisor
    supervisor.stop()


def proxy_settings(home: Path, **proxy: Any) -> Settings:
    """Settings for a test proxy: the tiny context, and the test template's real overhead."""
    fields = {"message_overhead_tokens": 14, **proxy}
    return Settings(home=home, planning={"context": N_CTX}, proxy=fields)


@dataclass
class RunningProxy:
    url: str
    app: Any
    server: uvicorn.Server
    thread: threading.Thread
    store: SessionStore

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def client(self, key: str = "no-key", **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.v1, api_key=key, max_retries=0, **kw)

    def async_client(self, key: str = "no-key", **kw: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.v1, api_key=key, max_retries=0, **kw)

    def http(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, trust_env=False)

    def metric(self, name: str, key: str | None = None) -> float:
        """One sample's value from /metrics (summed over label sets), 0 when absent."""
        text = self.http(key).get("/metrics").text
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{")
        ]
        return sum(values)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.store.close()


def serve_proxy(settings: Settings, backend: ServedModel) -> RunningProxy:
    """create_app + uvicorn in a thread on a free port; returns once it accepts requests."""
    store = open_store(settings)
    app = create_app(settings, backend, store)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="proxy", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the proxy did not start")
        time.sleep(0.02)
    return RunningProxy(f"http://127.0.0.1:{port}", app, server, thread, store)


@pytest.fixture
def make_proxy(tmp_path: Path, tiny_backend: Supervisor) -> Iterator[Any]:
    """Start proxies with given proxy settings in front of the module's backend."""
    running: list[RunningProxy] = []

    def make(backend: Any = None, **proxy: Any) -> RunningProxy:
        home = tmp_path / f"home{len(running)}"
        started = serve_proxy(proxy_settings(home, **proxy), backend or served(tiny_backend))
        running.append(started)
        return started

    yield make
    for proxy in running:
        proxy.stop()


def long_text(words: int, tag: str = "") -> str:
    """`words` one-token words of the tiny vocabulary (plus a tag to keep texts distinct)."""
    vocab = ["hello", "world", "the", "time", "word", "what", "some", "thing"]
    return " ".join([tag, *(vocab[i % len(vocab)] for i in range(words))]).strip()
