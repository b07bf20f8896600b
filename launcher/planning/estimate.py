"""`llmup estimate`: the bytes-per-parameter rule of thumb, made exact and checkable.

The project starts from a public write-up: weights need 4 / 2 / 1 / 0.5 bytes per parameter
in fp32 / fp16 / int8 / int4, and training adds ~8 / 4 / 2 bytes per parameter of optimizer
state for AdamW / Adafactor / 8-bit AdamW. Those figures are lower bounds; this module
reproduces them exactly (nominal 7e9 / 13e9 / 70e9 parameters), can switch to the catalog's
real counts (`exact=True`), and adds the one large cost the rule leaves out at inference:
the KV cache at a given context.

What is deliberately NOT counted, so nobody mistakes these numbers for a plan:
- activations (training) and compute buffers (inference): they depend on batch size,
  sequence length and kernels; `llmup plan` models them for llama.cpp / exllamav2;
- runtime context (CUDA ~250-460 MiB per device) and allocator slack;
- llama.cpp's KV padding (kv_size is n_ctx rounded up to a multiple of 256).

GB here is 10^9 bytes. Every `*_gb` figure is rounded to 2 decimals for display;
`*_bytes` fields keep the exact value.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field
from rich.table import Table

from launcher.catalog.loader import load_catalog
from launcher.catalog.models import Architecture, ModelSpec
from launcher.errors import CatalogError, UsageError

GB = 1_000_000_000
WEIGHT_BYTES_PER_PARAM: dict[str, float] = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
OPTIMIZER_BYTES_PER_PARAM: dict[str, float] = {"adamw": 8.0, "adafactor": 4.0, "adamw_8bit": 2.0}
# Mixed-precision training keeps fp16 weights, fp16 gradients and fp32 master weights
# alongside the optimizer state: 2 + 2 + 4 bytes per parameter before the optimizer.
TRAINING_BASE_BYTES_PER_PARAM = 2.0 + 2.0 + 4.0
DEFAULT_LABELS: tuple[str, ...] = ("7B", "13B", "70B")
ASSUMPTIONS: tuple[str, ...] = (
    "GB = 10^9 bytes; weights only for inference_gb (no compute buffers, no runtime context)",
    "kv_cache_gb: K and V for every layer at the full context, no llama.cpp 256-token padding",
    "training_total_gb: fp16 weights (2) + fp16 gradients (2) + fp32 master weights (4) "
    "+ optimizer state, per parameter; activations are excluded",
)


class EstimateInput(BaseModel):
    """One model to estimate: a parameter count, plus the architecture that sizes its KV."""

    label: str
    params: int
    architecture: Architecture | None = None
    model_id: str | None = None

    @classmethod
    def from_catalog(cls, model_id: str, *, exact: bool = True) -> EstimateInput:
        """A catalog model; `exact=False` swaps in the nominal count its label names (7B -> 7e9)."""
        spec = load_catalog().get(model_id)
        params = spec.params if exact else _nominal_params(spec)
        return cls(
            label=spec.label, params=params, architecture=spec.architecture, model_id=spec.id
        )

    @classmethod
    def from_params(cls, params: float, label: str | None = None) -> EstimateInput:
        """An arbitrary model known only by its size (`--params 1.5e9`); KV borrows an arch."""
        count = _validate_params(params)
        return cls(label=label or f"{_format_params(count)} params", params=count)


class PrecisionGb(BaseModel):
    fp32: float
    fp16: float
    int8: float
    int4: float


class OptimizerGb(BaseModel):
    adamw: float
    adafactor: float
    adamw_8bit: float


class ModelEstimate(BaseModel):
    label: str
    params: int
    inference_gb: PrecisionGb
    kv_cache_gb: float
    kv_cache_bytes: int
    inference_with_kv_gb: PrecisionGb
    optimizer_state_gb: OptimizerGb
    training_total_gb: OptimizerGb
    architecture_from: str | None = Field(
        default=None, description="catalog id whose architecture sized the KV cache"
    )
    notes: list[str] = Field(default_factory=list)


class EstimateReport(BaseModel):
    models: list[ModelEstimate]
    context: int
    exact: bool
    kv_bytes_per_element: float = 2.0
    assumptions: list[str] = Field(default_factory=lambda: list(ASSUMPTIONS))


def estimate(
    models: list[EstimateInput] | None = None,
    *,
    context: int = 4096,
    exact: bool = False,
    kv_bytes_per_element: float = 2.0,
) -> EstimateReport:
    """Weights, KV, optimizer and training memory for each model (default: 7B, 13B, 70B).

    `exact` only chooses the default model list (nominal vs catalog parameter counts);
    models passed in are estimated with the counts they carry.
    """
    _validate_context(context)
    _validate_kv_bytes(kv_bytes_per_element)
    inputs = models if models is not None else default_inputs(exact=exact)
    rows = [_estimate_one(item, context, kv_bytes_per_element) for item in inputs]
    return EstimateReport(
        models=rows, context=context, exact=exact, kv_bytes_per_element=kv_bytes_per_element
    )


def default_inputs(*, exact: bool = False) -> list[EstimateInput]:
    """7B, 13B, 70B: nominal 7e9/13e9/70e9 reproduce the write-up; exact uses real counts."""
    return [EstimateInput.from_catalog(label, exact=exact) for label in DEFAULT_LABELS]


def parse_params(text: str) -> float:
    """Parse a CLI parameter count: '1.5e9', '6738415616', '7B', '270M' (B = 1e9, M = 1e6).

    The CLI needs this so `--params 7B` and `--params 7e9` mean the same thing.
    """
    raw = text.strip().replace(",", "").replace("_", "")
    scale = {"b": 1e9, "m": 1e6, "k": 1e3}.get(raw[-1:].lower(), 1.0)
    number = raw[:-1] if scale != 1.0 else raw
    try:
        value = float(number) * scale
    except ValueError:
        raise UsageError(f"--params {text!r} is not a number (try 7e9 or 7B)") from None
    _validate_params(value)
    return value


def kv_cache_bytes(arch: Architecture, context: int, bytes_per_element: float = 2.0) -> int:
    """K and V for every layer: 2 * n_layer * context * n_head_kv * head_dim * bytes/element.

    Uses n_head_kv, not n_head, so grouped-query attention (70B: 8 KV heads) is 8x smaller.
    """
    return round(2 * arch.n_layer * context * arch.n_embd_kv * bytes_per_element)


def estimate_table(report: EstimateReport) -> Table:
    """The report as a rich table for the terminal; JSON output uses the report itself."""
    table = Table(
        title=f"Memory estimate (GB = 1e9 bytes, context {report.context})",
        caption="Weights only per precision; KV is extra at inference. "
        "Training = fp16 weights + grads + fp32 master + optimizer; activations excluded.",
    )
    for header in ("Model", "Params", "fp32", "fp16", "int8", "int4", "KV cache"):
        table.add_column(header, justify="left" if header == "Model" else "right")
    for header in ("Train AdamW", "Train Adafactor", "Train 8-bit AdamW"):
        table.add_column(header, justify="right")
    for row in report.models:
        table.add_row(*_table_cells(row))
    return table


def _table_cells(row: ModelEstimate) -> list[str]:
    """One table row; a note marker (*) flags a borrowed architecture or other caveat."""
    weights = row.inference_gb
    train = row.training_total_gb
    label = row.label + (" *" if row.notes else "")
    return [
        label,
        f"{row.params:,}",
        *(f"{v:.2f}" for v in (weights.fp32, weights.fp16, weights.int8, weights.int4)),
        f"{row.kv_cache_gb:.2f}",
        *(f"{v:.2f}" for v in (train.adamw, train.adafactor, train.adamw_8bit)),
    ]


def _estimate_one(item: EstimateInput, context: int, kv_bpe: float) -> ModelEstimate:
    """All figures for one model; KV uses its own architecture or the nearest catalog one."""
    params = _validate_params(item.params)
    arch, arch_id, notes = _architecture_for(item)
    kv_bytes = kv_cache_bytes(arch, context, kv_bpe)
    if context > arch.n_ctx_train:
        notes.append(f"context {context} exceeds the trained context {arch.n_ctx_train}")
    weights = {k: params * v for k, v in WEIGHT_BYTES_PER_PARAM.items()}
    optimizer = {k: params * v for k, v in OPTIMIZER_BYTES_PER_PARAM.items()}
    training = {k: params * TRAINING_BASE_BYTES_PER_PARAM + v for k, v in optimizer.items()}
    return ModelEstimate(
        label=item.label,
        params=params,
        inference_gb=PrecisionGb(**_to_gb(weights)),
        kv_cache_gb=_gb(kv_bytes),
        kv_cache_bytes=kv_bytes,
        inference_with_kv_gb=PrecisionGb(**_to_gb({k: v + kv_bytes for k, v in weights.items()})),
        optimizer_state_gb=OptimizerGb(**_to_gb(optimizer)),
        training_total_gb=OptimizerGb(**_to_gb(training)),
        architecture_from=arch_id,
        notes=notes,
    )


def _architecture_for(item: EstimateInput) -> tuple[Architecture, str | None, list[str]]:
    """The input's own architecture, else the catalog model nearest in parameter count."""
    if item.architecture is not None:
        return item.architecture, item.model_id, []
    spec = _nearest_spec(item.params)
    note = (
        f"no architecture given: KV cache uses {spec.id} ({spec.params:,} params, nearest "
        f"parameter count); the real figure depends on the model's layers and KV heads"
    )
    return spec.architecture, spec.id, [note]


def _nearest_spec(params: int) -> ModelSpec:
    """Catalog model with the smallest absolute difference in parameter count."""
    models = load_catalog().models
    if not models:
        raise CatalogError("the catalog holds no models to borrow an architecture from")
    return min(models, key=lambda spec: abs(spec.params - params))


def _nominal_params(spec: ModelSpec) -> int:
    """The round count a label like '7B' names; the write-up's figures assume it."""
    label = spec.label.strip().upper()
    if not label.endswith("B"):
        return spec.params
    try:
        return round(float(label[:-1]) * GB)
    except ValueError:
        return spec.params


def _format_params(params: int) -> str:
    """'1.5e9' for round counts (readable), '6,738,415,616' otherwise (nothing hidden)."""
    mantissa, _, exponent = f"{params:.4g}".partition("e")
    if exponent and float(f"{params:.4g}") == params:
        return f"{mantissa}e{int(exponent)}"
    return f"{params:,}"


def _validate_params(params: float) -> int:
    """Parameter counts must be finite and positive; returns the integer count."""
    if isinstance(params, bool) or not isinstance(params, (int, float)):
        raise UsageError(f"params must be a number, got {params!r}")
    if not math.isfinite(params) or round(params) <= 0:
        raise UsageError(f"params must be a positive number of parameters, got {params!r}")
    return round(params)


def _validate_context(context: int) -> None:
    """Context is a token count; zero or negative would silently yield a zero KV cache."""
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise UsageError(f"context must be a positive number of tokens, got {context!r}")


def _validate_kv_bytes(value: float) -> None:
    """Bytes per KV element (f16 2, q8_0 34/32, q4_0 18/32) must be finite and positive."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"kv_bytes_per_element must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"kv_bytes_per_element must be positive, got {value!r}")


def _to_gb(values: dict[str, float]) -> dict[str, float]:
    return {key: _gb(value) for key, value in values.items()}


def _gb(n_bytes: float) -> float:
    """Bytes to decimal GB, 2 decimals: the precision the write-up quotes."""
    return round(n_bytes / GB, 2)
