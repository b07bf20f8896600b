"""The per-run backend key in llmup's own workers: nothing reaches the app without it.

The llama.cpp worker is checked end to end in test_serve_life.py (a real `llmup serve`);
here the exllamav2 worker's entry point, with the fake generator standing in for CUDA, and
the middleware's edge cases, over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import httpx
import pytest
from support.exllamav2_fakes import MODEL, FakeGenerator, serving_app

from launcher.runkey import KEY_ENV, new_backend_key
from launcher.workers import api as worker_api
from launcher.workers.backend_key import BackendKeyMiddleware, require_backend_key
from launcher.workers.exllamav2 import server as exllamav2_server


@pytest.fixture
def worker_app(monkeypatch, tmp_path):
    """What the exllamav2 worker's main() hands to uvicorn (through the workers' shared
    `run_worker`), the key set as the supervisor sets it (in the environment)."""
    key = new_backend_key()
    monkeypatch.setenv(KEY_ENV, key)
    monkeypatch.setattr(exllamav2_server.ExllamaGenerator, "load", lambda options: FakeGenerator())
    served: list = []
    monkeypatch.setattr(worker_api.uvicorn, "run", lambda app, **kw: served.append(app))
    args = ["--model-dir", str(tmp_path), "--port", "1", "--model-alias", MODEL]
    assert exllamav2_server.main(args) == 0
    return served[0], key


def test_exllamav2_worker_refuses_requests_without_the_run_key(worker_app):
    app, key = worker_app
    with serving_app(app) as url:
        for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": key}):
            refused = httpx.get(url + "/v1/models", headers=headers, timeout=5)
            assert (
                refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
            )
        assert httpx.get(url + "/health", timeout=5).status_code == 401
        ok = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5)
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL


def test_without_a_key_in_the_environment_the_app_is_left_as_it_is():
    app = object()
    assert require_backend_key(app, {}) is app
    assert isinstance(require_backend_key(app, {KEY_ENV: "k"}), BackendKeyMiddleware)
