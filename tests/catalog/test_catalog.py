"""The catalog is data: a new family is a new file, and a malformed file is a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import launcher.catalog
from launcher.catalog.loader import load_catalog
from launcher.errors import CatalogError
from launcher.hardware.snapshot import load_snapshot
from launcher.planning.planner import PlanRequest, make_plan

DATA = Path(launcher.catalog.__file__).parent / "data"
MACHINES = Path(__file__).parents[1] / "data" / "machines"


def mistral_family() -> dict:
    arch = dict(
        n_layer=32,
        n_embd=4096,
        n_ff=14336,
        n_head=32,
        n_head_kv=8,
        head_dim=128,
        n_vocab=32000,
        n_ctx_train=32768,
    )
    return {
        "family": "mistral",
        "models": [
            {
                "id": "mistral-7b-instruct",
                "family": "mistral",
                "label": "7B-M",
                "params": 7241732096,
                "architecture": arch,
                "chat_format": "mistral-instruct",
                "gguf": {
                    "repo_id": "TheBloke/Mistral-7B-Instruct-v0.2-GGUF",
                    "variants": [
                        {
                            "quant": "Q4_K_M",
                            "file": "mistral-7b-instruct-v0.2.Q4_K_M.gguf",
                            "bytes": 4368439584,
                        },
                    ],
                },
            }
        ],
    }


def test_new_family_is_a_data_file(tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(DATA, folder)
    (folder / "mistral.json").write_text(json.dumps(mistral_family()))
    catalog = load_catalog(folder)
    assert {m.id for m in catalog.models} >= {"llama-2-7b-chat", "mistral-7b-instruct"}
    plan = make_plan(
        PlanRequest(
            hardware=load_snapshot(MACHINES / "rtx3060-12gb.json"),
            model="mistral-7b-instruct",
            context=8192,
            parallel=1,
        ),
        catalog,
    )
    assert plan.source.repo_id == "TheBloke/Mistral-7B-Instruct-v0.2-GGUF"
    assert plan.memory_mib.kv_cache == 8192 * 32 * 8 * 128 * 4 // 2**20  # GQA: 8 KV heads


def test_malformed_data_file_is_a_catalog_error(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "broken.json").write_text(json.dumps({"family": "x", "models": [{"id": "x"}]}))
    with pytest.raises(CatalogError, match="broken.json"):
        load_catalog(folder)


def test_unknown_id_lists_the_known_ones():
    with pytest.raises(CatalogError, match="llama-2-70b-chat"):
        load_catalog().get("llama-3-8b")
