"""A model file's header facts kept in the home: read once per file, read again when it changes."""

from __future__ import annotations

import json
import os

import pytest
from support.ggufgen import write_llama_gguf

from launcher.catalog import shape_cache
from launcher.catalog.gguf_file import read_model_file
from launcher.catalog.shape_cache import CACHE_FILE, model_file_shape


@pytest.fixture
def counted_reads(monkeypatch) -> list[str]:
    """Every real header read, by path."""
    reads: list[str] = []

    def reading(path):
        reads.append(str(path))
        return read_model_file(path)

    monkeypatch.setattr(shape_cache, "read_model_file", reading)
    return reads


def test_second_plan_of_the_same_file_reads_no_header(tmp_path, counted_reads) -> None:
    path = write_llama_gguf(tmp_path / "m.gguf", n_layer=3, chat_template="{{ x }}")
    home = tmp_path / "home"
    first = model_file_shape(path, home=home)
    second = model_file_shape(path, home=home)
    assert counted_reads == [str(path)]
    assert second == first == read_model_file(path)
    assert (home / CACHE_FILE).stat().st_mode & 0o777 == 0o600


def test_a_rewritten_file_is_read_again(tmp_path, counted_reads) -> None:
    path = write_llama_gguf(tmp_path / "m.gguf", n_layer=2)
    home = tmp_path / "home"
    assert model_file_shape(path, home=home).arch.n_layer == 2
    write_llama_gguf(tmp_path / "m.gguf", n_layer=4)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a new mtime for sure
    assert model_file_shape(path, home=home).arch.n_layer == 4
    assert len(counted_reads) == 2


def test_a_malformed_cache_is_read_past_and_replaced(tmp_path, counted_reads) -> None:
    path = write_llama_gguf(tmp_path / "m.gguf")
    home = tmp_path / "home"
    expected = model_file_shape(path, home=home)
    cache = home / CACHE_FILE
    data = json.loads(cache.read_text())
    for entry in data["shapes"].values():
        entry["shape"]["arch"]["n_layer"] = -1  # fails Architecture's check
    cache.write_text(json.dumps(data))
    assert model_file_shape(path, home=home) == expected
    assert model_file_shape(path, home=home) == expected
    assert len(counted_reads) == 2  # the bad entry was replaced by a good one


def test_without_a_home_every_plan_reads(tmp_path, counted_reads) -> None:
    path = write_llama_gguf(tmp_path / "m.gguf")
    model_file_shape(path, home=None)
    model_file_shape(path, home=None)
    assert len(counted_reads) == 2


def test_the_cache_stays_bounded(tmp_path, monkeypatch, counted_reads) -> None:
    monkeypatch.setattr(shape_cache, "MAX_ENTRIES", 2)
    home = tmp_path / "home"
    paths = [write_llama_gguf(tmp_path / f"m{i}.gguf", seed=i) for i in range(3)]
    for path in paths:
        model_file_shape(path, home=home)
    assert len(json.loads((home / CACHE_FILE).read_text())["shapes"]) == 2
    model_file_shape(paths[-1], home=home)
    assert len(counted_reads) == 3  # the newest is still kept
