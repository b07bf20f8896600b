"""Catalog schema: model specs and their downloadable variants.

The data lives in `catalog/data/*.json`; adding a family (Llama 3, Qwen, Mistral) is a
new data file, not new code.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Architecture(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_layer: int = Field(gt=0)
    n_embd: int = Field(gt=0)
    n_ff: int = Field(gt=0)
    n_head: int = Field(gt=0)
    n_head_kv: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    n_vocab: int = Field(gt=0)
    n_ctx_train: int = Field(gt=0)
    tied_embeddings: bool = False

    @property
    def n_embd_kv(self) -> int:
        """Width of one K (or V) row: n_head_kv * head_dim (smaller than n_embd under GQA)."""
        return self.n_head_kv * self.head_dim


class GgufQuant(BaseModel):
    """How a GGUF quantization mix stores the two large non-repeating tensors."""

    model_config = ConfigDict(extra="forbid")

    token_embd: str
    output: str
    quality: str = ""
    legacy: bool = False
    recommended: bool = False


class GgufVariant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quant: str
    file: str
    bytes: int = Field(gt=0)
    parts: list[str] | None = None  # raw byte halves to concatenate in order


class GgufSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_id: str
    revision: str = "main"
    variants: list[GgufVariant]


class GptqVariant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    branch: str
    bits: int = Field(gt=0)
    group_size: int | None
    act_order: bool
    bytes: int = Field(gt=0)
    exllamav2: bool
    approximate_size: bool = False

    @property
    def label(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "g-none"
        return f"GPTQ-{self.bits}bit-{group}{'-actorder' if self.act_order else ''}"


class GptqSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_id: str
    variants: list[GptqVariant]
    files: list[str]
    embedding_bytes: int = Field(ge=0)


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    family: str
    label: str
    params: int = Field(gt=0)
    architecture: Architecture
    chat_format: str
    gguf: GgufSource | None = None
    gptq: GptqSource | None = None


class CatalogFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    family: str
    sources: list[str] = []
    gguf_quants: dict[str, GgufQuant] = {}
    models: list[ModelSpec]
