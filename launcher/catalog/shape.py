"""Where a model's bytes are: the weight layout the memory models place on devices.

A layout comes from the catalog (file size and the quant's tensor types, an estimate)
or from a GGUF header (exact tensor sizes, `weights.gguf_file`); the memory models in
`planning` only see this value. It lives here, below both, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.catalog.models import Architecture, GgufQuant, GgufVariant
from launcher.errors import CatalogError


@dataclass(frozen=True)
class WeightLayout:
    """Tensor bytes by placement group.

    token_embd stays on the host in llama.cpp (and in exllamav2); `output` is the
    output norm plus the output (lm_head) matrix; `layers[i]` is everything of block i.
    """

    token_embd: int
    output: int
    layers: tuple[int, ...]
    file_bytes: int
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> bytes

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @property
    def tensor_bytes(self) -> int:
        return self.token_embd + self.output + sum(self.layers)


@dataclass(frozen=True)
class ModelShape:
    """Architecture plus layout: everything a memory model needs to know of a model."""

    arch: Architecture
    layout: WeightLayout
    name: str = ""
    arch_name: str = "llama"
    sliding_window: int | None = None
    swa_layers: tuple[bool, ...] = ()
    n_params: int = 0
    quant: str = ""
    chat_template: str | None = None  # a GGUF file's own (None: none, or not from a file)


def type_bytes(type_name: str, n_elements: int) -> int:
    """Bytes of `n_elements` stored as ggml type `type_name` (Q4_K, F16, ...)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # numpy-heavy: on first use

    try:
        qtype = GGMLQuantizationType[type_name.upper()]
    except KeyError:
        raise CatalogError(f"unknown ggml tensor type {type_name!r}") from None
    block, size = GGML_QUANT_SIZES[qtype]
    return n_elements // block * size


def layout_from_catalog(arch: Architecture, variant: GgufVariant, quant: GgufQuant) -> WeightLayout:
    """Estimate the layout of a catalog GGUF file from its size and its quant's mix.

    The two V x E matrices are stored in known types; the rest of the file is blocks
    of equal size (the GGUF header and vocabulary, ~1 MB, are counted in the blocks,
    which errs on the safe side).
    """
    n_vocab_embd = arch.n_vocab * arch.n_embd
    token_embd = type_bytes(quant.token_embd, n_vocab_embd)
    output = type_bytes(quant.output, n_vocab_embd) + arch.n_embd * 4
    per_layer = (variant.bytes - token_embd - output) // arch.n_layer
    return WeightLayout(
        token_embd=token_embd,
        output=output,
        layers=(per_layer,) * arch.n_layer,
        file_bytes=variant.bytes,
    )
