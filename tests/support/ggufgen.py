"""Tiny Llama-architecture GGUF files with random weights, for tests and benchmarks.

The files are real llama.cpp models: a byte-fallback SentencePiece vocabulary and every tensor
of a Llama block, so llama-cpp-python loads them and generates (nonsense) text. Shapes are
given in numpy order, the reverse of ggml's ``ne`` (``attn_k`` has ne = [n_embd, n_embd_kv],
so its numpy shape is (n_embd_kv, n_embd)).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType, TokenType

QTYPES: dict[str, GGMLQuantizationType] = {
    "F32": GGMLQuantizationType.F32,
    "F16": GGMLQuantizationType.F16,
    "Q8_0": GGMLQuantizationType.Q8_0,
    "Q4_0": GGMLQuantizationType.Q4_0,
}
FILE_TYPES: dict[str, LlamaFileType] = {
    "F32": LlamaFileType.ALL_F32,
    "F16": LlamaFileType.MOSTLY_F16,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
}
_WORDS_TEXT = (
    "the a an and of to in is it you that he was for on are with as I his they be at one "
    "have this from or had by hot word but what some we can out other were all there when up "
    "use your how said each she which do their time if will way about many then them write "
    "would like so these her long make thing see him two has look more day could go come did "
    "hello world Hello chat user assistant system yes no . , ! ?"
)
WORDS = tuple(_WORDS_TEXT.split())
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    unk: int = 0
    bos: int = 1
    eos: int = 2


def llama_vocab() -> Vocab:
    """<unk> <s> </s>, the 256 byte tokens, then word pieces (with prefixes) and letters."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    # Every prefix of "▁word" is a piece, so SentencePiece merges reach the whole word.
    prefixes = [f"▁{w}"[:k] for w in WORDS for k in range(1, len(w) + 2)]
    pieces = list(dict.fromkeys(prefixes + list(LETTERS)))
    tokens += pieces
    types += [TokenType.NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return Vocab(tokens=tokens, scores=scores, types=[int(t) for t in types])


def tensor_shapes(
    n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int, n_vocab: int
) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama model, numpy shape order (rows, row length)."""
    n_embd_kv = n_embd // n_head * n_head_kv
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (n_vocab, n_embd),
        "output_norm.weight": (n_embd,),
        "output.weight": (n_vocab, n_embd),
    }
    for i in range(n_layer):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (n_embd,),
            f"blk.{i}.attn_q.weight": (n_embd, n_embd),
            f"blk.{i}.attn_k.weight": (n_embd_kv, n_embd),
            f"blk.{i}.attn_v.weight": (n_embd_kv, n_embd),
            f"blk.{i}.attn_output.weight": (n_embd, n_embd),
            f"blk.{i}.ffn_norm.weight": (n_embd,),
            f"blk.{i}.ffn_gate.weight": (n_ff, n_embd),
            f"blk.{i}.ffn_up.weight": (n_ff, n_embd),
            f"blk.{i}.ffn_down.weight": (n_embd, n_ff),
        }
    return shapes


def tensor_nbytes(shape: tuple[int, ...], tensor_type: str) -> int:
    """Bytes of one tensor stored as `tensor_type` (1-d norm tensors are always F32)."""
    qtype = QTYPES["F32" if len(shape) == 1 else tensor_type]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * type_size


def _tensor_type(name: str, tensor_type: str, embd_type: str, output_type: str) -> str:
    if name.endswith("norm.weight"):
        return "F32"
    if name == "token_embd.weight":
        return embd_type
    return output_type if name == "output.weight" else tensor_type


def _encode(values: np.ndarray, tensor_type: str) -> tuple[np.ndarray, GGMLQuantizationType]:
    qtype = QTYPES[tensor_type]
    if tensor_type == "F32":
        return values.astype(np.float32), qtype
    if tensor_type == "F16":
        return values.astype(np.float16), qtype
    if values.shape[-1] % 32:
        raise ValueError(f"{tensor_type} needs rows that are a multiple of 32, got {values.shape}")
    return gguf.quants.quantize(values.astype(np.float32), qtype), qtype


def _add_metadata(w: gguf.GGUFWriter, name: str, dims: dict[str, int], tensor_type: str) -> None:
    w.add_name(name)
    w.add_context_length(dims["n_ctx_train"])
    w.add_embedding_length(dims["n_embd"])
    w.add_block_count(dims["n_layer"])
    w.add_feed_forward_length(dims["n_ff"])
    w.add_head_count(dims["n_head"])
    w.add_head_count_kv(dims["n_head_kv"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(dims["n_embd"] // dims["n_head"])
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(dims["n_vocab"])
    w.add_file_type(FILE_TYPES[tensor_type])


def _add_vocab(w: gguf.GGUFWriter, vocab: Vocab, chat_template: str | None) -> None:
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_unk_token_id(vocab.unk)
    w.add_bos_token_id(vocab.bos)
    w.add_eos_token_id(vocab.eos)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)


def _fit_vocab(vocab: Vocab, n_vocab: int | None) -> Vocab:
    """Pad with unused tokens (or truncate word pieces) to exactly `n_vocab` tokens."""
    if n_vocab is None or n_vocab == len(vocab.tokens):
        return vocab
    if n_vocab < 259 + 2:
        raise ValueError("n_vocab must leave room for <unk>, <s>, </s> and 256 byte tokens")
    extra = max(0, n_vocab - len(vocab.tokens))
    return Vocab(
        tokens=(vocab.tokens + [f"[PAD{i}]" for i in range(extra)])[:n_vocab],
        scores=(vocab.scores + [-1e4] * extra)[:n_vocab],
        types=(vocab.types + [int(TokenType.UNUSED)] * extra)[:n_vocab],
    )


def write_llama_gguf(
    path: str | Path,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 4,
    n_ff: int = 128,
    n_vocab: int | None = None,
    n_ctx_train: int = 4096,
    tensor_type: str = "F32",
    embd_type: str | None = None,
    output_type: str | None = None,
    seed: int = 0,
    chat_template: str | None = None,
    name: str = "tiny-llama",
    weights: Callable[[str, tuple[int, ...]], np.ndarray] | None = None,
) -> Path:
    """Write a random-weight Llama GGUF file to `path` and return the path; `weights`
    (tensor name, shape -> values), when given, makes every tensor instead."""
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head and n_head by n_head_kv")
    vocab = _fit_vocab(llama_vocab(), n_vocab)
    dims = dict(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        n_vocab=len(vocab.tokens),
        n_ctx_train=n_ctx_train,
    )
    path = Path(path)
    writer = gguf.GGUFWriter(path, "llama")
    _add_metadata(writer, name, dims, tensor_type)
    _add_vocab(writer, vocab, chat_template)
    rng = np.random.default_rng(seed)
    shapes = tensor_shapes(n_layer, n_embd, n_head, n_head_kv, n_ff, len(vocab.tokens))
    for tname, shape in shapes.items():
        kind = _tensor_type(
            tname, tensor_type, embd_type or tensor_type, output_type or tensor_type
        )
        values = np.ones(shape) if len(shape) == 1 else rng.standard_normal(shape) * 0.02
        if weights is not None:
            values = weights(tname, shape)
        data, qtype = _encode(values, kind)
        writer.add_tensor(tname, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def model_tensor_bytes(
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 4,
    n_ff: int = 128,
    n_vocab: int | None = None,
    tensor_type: str = "F32",
    embd_type: str | None = None,
    output_type: str | None = None,
) -> int:
    """Total tensor bytes `write_llama_gguf` writes for the same arguments."""
    n_vocab = n_vocab or len(llama_vocab().tokens)
    shapes = tensor_shapes(n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab)
    return sum(
        tensor_nbytes(
            shape,
            _tensor_type(name, tensor_type, embd_type or tensor_type, output_type or tensor_type),
        )
        for name, shape in shapes.items()
    )


def answering_weights(word: str = "hello") -> Callable[[str, tuple[int, ...]], np.ndarray]:
    """Weights of a model that answers every prompt with `word` and then ends its turn.

    Every block's projections are zero, so a block adds nothing and the last hidden state
    is the current token's embedding: the model is a table from the current token to the
    next. Embedding dimension 0 marks `word`, dimension 1 every other token; the output
    gives `word` after any other token and the end token after `word`, with logits so far
    apart that sampling at temperature 1 picks them too (p > 1 - 1e-20). For protocol tests
    that need a reply which ends (an agent client waits for its turn to end) from a model
    small enough to read a 100k-token prompt on a CPU."""
    vocab = llama_vocab()
    answer, eos = vocab.tokens.index(f"\u2581{word}"), vocab.eos

    def make(name: str, shape: tuple[int, ...]) -> np.ndarray:
        values = np.ones(shape) if len(shape) == 1 else np.zeros(shape)
        if name == "token_embd.weight":
            values[:, 1] = 1.0
            values[answer] = 0.0
            values[answer, 0] = 1.0
        elif name == "output.weight":
            values[answer, 1] = 10.0
            values[eos, 0] = 10.0
        return values

    return make
