"""The local hub (tests/support/hubserver.py), an environment whose every cache and home is in
tmp_path and whose hub client talks to that server only, and what tests publish on it.
Modules that pull use `pytestmark = pytest.mark.usefixtures("hub_env")`."""

from __future__ import annotations

import json
import secrets
import struct
from pathlib import Path

import pytest
from huggingface_hub import constants

from launcher.catalog.loader import load_catalog
from launcher.planning.plan import JoinSpec, Source
from support.ggufgen import write_llama_gguf
from support.hubserver import HubServer

GGUF_REPO = "TheBloke/Llama-2-7B-Chat-GGUF"
GGUF_FILE = "llama-2-7b-chat.Q4_K_M.gguf"
SPLIT_REPO = "TheBloke/Llama-2-70B-Chat-GGUF"


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture
def hub_env(tmp_path, monkeypatch, hub):
    """Every cache and home in tmp_path; the hub client talks to the local server only."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("LLMUP_HOME", str(tmp_path / "llmup"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))


def fake_gguf(size: int) -> bytes:
    """GGUF magic and version, then random bytes: enough for transfer tests."""
    return b"GGUF" + struct.pack("<I", 3) + secrets.token_bytes(size - 8)


def gguf_source() -> Source:
    variant = next(
        v for v in load_catalog().get("llama-2-7b-chat").gguf.variants if v.file == GGUF_FILE
    )
    return Source(repo_id=GGUF_REPO, files=[variant.file], download_bytes=variant.bytes)


def split_source() -> Source:
    variant = next(
        v for v in load_catalog().get("llama-2-70b-chat").gguf.variants if v.quant == "Q6_K"
    )
    return Source(
        repo_id=SPLIT_REPO,
        files=list(variant.parts),
        download_bytes=variant.bytes,
        join=JoinSpec(output=variant.file, parts=list(variant.parts)),
    )


def publish_gguf(hub: HubServer, size: int = 300_000) -> bytes:
    data = fake_gguf(size)
    hub.add_repo(GGUF_REPO, {GGUF_FILE: data, "README.md": b"# card\n"})
    return data


def publish_split(hub: HubServer, tmp_path: Path) -> bytes:
    """A real (tiny) GGUF cut in two raw halves, as TheBloke stored the 70B Q6_K."""
    original = write_llama_gguf(tmp_path / "tiny.gguf", n_layer=2, n_embd=64).read_bytes()
    half = len(original) // 2
    a, b = split_source().join.parts
    hub.add_repo(SPLIT_REPO, {a: original[:half], b: original[half:], "README.md": b"card"})
    return original


def blobs(tmp_path: Path, repo: str) -> list[Path]:
    folder = tmp_path / "hf" / "hub" / ("models--" + repo.replace("/", "--")) / "blobs"
    return sorted(p for p in folder.glob("*") if p.is_file()) if folder.exists() else []


def saved_plan(tmp_path: Path, source: Source) -> Path:
    """A plan file as `llmup plan --json` writes it, reduced to what `pull` reads."""
    plan = {
        "model": {"id": "llama-2-7b-chat", "params": 6738415616},
        "backend": "llama.cpp",
        "format": "gguf",
        "quant": "Q4_K_M",
        "bits_per_weight": 4.85,
        "source": source.model_dump(),
        "context": 4096,
        "placement": {},
        "memory_mib": {"weights": 1, "kv_cache": 1, "compute": 1, "overhead": 1, "total": 4},
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path
