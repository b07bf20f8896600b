"""`llmup estimate`: the write-up's rule of thumb reproduced exactly, then made exact."""

from __future__ import annotations

import json
import math

import pytest
from rich.console import Console

from launcher.errors import UsageError
from launcher.planning.estimate import (
    EstimateInput,
    estimate,
    estimate_table,
    kv_cache_bytes,
    parse_params,
)


def _by_label(report) -> dict:
    return {row.label: row for row in report.models}


# The write-up's figures (reference section 7): weights only, GB = 1e9 bytes.
NOMINAL_WEIGHTS = {
    "7B": {"fp32": 28.0, "fp16": 14.0, "int8": 7.0, "int4": 3.5},
    "13B": {"fp32": 52.0, "fp16": 26.0, "int8": 13.0, "int4": 6.5},
    "70B": {"fp32": 280.0, "fp16": 140.0, "int8": 70.0, "int4": 35.0},
}


@pytest.mark.parametrize("label", ["7B", "13B", "70B"])
def test_nominal_weights_match_write_up(label: str) -> None:
    row = _by_label(estimate())[label]
    assert row.inference_gb.model_dump() == NOMINAL_WEIGHTS[label]


def test_nominal_params_and_order() -> None:
    report = estimate()
    assert [(r.label, r.params) for r in report.models] == [
        ("7B", 7_000_000_000),
        ("13B", 13_000_000_000),
        ("70B", 70_000_000_000),
    ]
    assert report.context == 4096 and report.exact is False


def test_optimizer_state_7b_adamw_is_56() -> None:
    row = _by_label(estimate())["7B"]
    assert row.optimizer_state_gb.model_dump() == {
        "adamw": 56.0,
        "adafactor": 28.0,
        "adamw_8bit": 14.0,
    }


def test_training_totals_are_mixed_precision_plus_optimizer() -> None:
    rows = _by_label(estimate())
    # 2 (fp16 weights) + 2 (fp16 grads) + 4 (fp32 master) + optimizer: 16 / 12 / 10 bytes.
    assert rows["7B"].training_total_gb.model_dump() == {
        "adamw": 112.0,
        "adafactor": 84.0,
        "adamw_8bit": 70.0,
    }
    assert rows["70B"].training_total_gb.adamw == 1120.0


def test_exact_mode_uses_catalog_counts() -> None:
    rows = _by_label(estimate(exact=True))
    assert rows["7B"].params == 6_738_415_616
    assert rows["13B"].params == 13_015_864_320
    assert rows["70B"].params == 68_976_648_192
    assert rows["7B"].inference_gb.fp16 == 13.48
    assert rows["70B"].inference_gb.int4 == 34.49  # 68,976,648,192 * 0.5
    assert estimate(exact=True).exact is True


def test_kv_cache_7b_is_2048_mib_at_4096() -> None:
    row = _by_label(estimate())["7B"]
    assert row.kv_cache_bytes == 2_147_483_648 == 2048 * 2**20
    assert row.kv_cache_gb == 2.15


def test_kv_cache_70b_uses_gqa_heads() -> None:
    row = _by_label(estimate())["70B"]
    assert row.kv_cache_bytes == 1280 * 2**20  # 8 KV heads, not 64
    assert row.kv_cache_gb == 1.34


def test_kv_cache_scales_with_context_and_element_size() -> None:
    row = _by_label(estimate(context=2048, kv_bytes_per_element=34 / 32))["7B"]
    assert row.kv_cache_bytes == 2 * 32 * 2048 * 4096 * 34 // 32


def test_inference_with_kv_adds_cache_to_weights() -> None:
    row = _by_label(estimate())["7B"]
    assert row.inference_with_kv_gb.fp16 == 16.15  # 14 GB + 2.147483648 GB
    assert row.inference_with_kv_gb.int4 == 5.65


def test_kv_cache_bytes_helper() -> None:
    spec = EstimateInput.from_catalog("llama-2-13b-chat")
    assert spec.architecture is not None
    assert kv_cache_bytes(spec.architecture, 1) == int(0.78125 * 2**20)


def test_json_shape() -> None:
    data = json.loads(estimate().model_dump_json())
    first = data["models"][0]
    assert data["context"] == 4096 and data["exact"] is False
    assert first["label"] == "7B" and first["params"] == 7_000_000_000
    assert first["inference_gb"] == {"fp32": 28.0, "fp16": 14.0, "int8": 7.0, "int4": 3.5}
    assert set(first["training_total_gb"]) == {"adamw", "adafactor", "adamw_8bit"}
    assert isinstance(first["kv_cache_gb"], float)


def test_custom_params_borrows_nearest_architecture() -> None:
    report = estimate([EstimateInput.from_params(1.5e9)])
    row = report.models[0]
    assert row.label == "1.5e9 params"
    assert row.params == 1_500_000_000
    assert row.inference_gb.model_dump() == {"fp32": 6.0, "fp16": 3.0, "int8": 1.5, "int4": 0.75}
    assert row.optimizer_state_gb.adamw == 12.0
    assert row.training_total_gb.adamw == 24.0
    assert row.architecture_from == "llama-2-7b-chat"
    assert row.kv_cache_bytes == 2_147_483_648
    assert any("nearest" in note for note in row.notes)


def test_custom_params_nearest_is_by_parameter_count() -> None:
    rows = estimate([EstimateInput.from_params(60e9), EstimateInput.from_params(12e9)]).models
    assert rows[0].architecture_from == "llama-2-70b-chat"
    assert rows[1].architecture_from == "llama-2-13b-chat"


def test_custom_label_for_unround_count() -> None:
    assert EstimateInput.from_params(6_738_415_616).label == "6,738,415,616 params"
    assert EstimateInput.from_params(7e9, label="mine").label == "mine"


def test_catalog_model_keeps_no_notes_within_trained_context() -> None:
    assert all(not row.notes for row in estimate().models)
    assert all(row.notes for row in estimate(context=8192).models)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1.5e9", 1.5e9), ("7B", 7e9), ("270m", 270e6), ("6,738,415,616", 6_738_415_616)],
)
def test_parse_params(text: str, expected: float) -> None:
    assert parse_params(text) == expected


@pytest.mark.parametrize("context", [0, -1, 1.5, True])
def test_bad_context_raises_usage_error(context) -> None:
    with pytest.raises(UsageError, match="context"):
        estimate(context=context)


@pytest.mark.parametrize("params", [0, -7e9, math.nan, math.inf, 0.4])
def test_bad_params_raise_usage_error(params) -> None:
    with pytest.raises(UsageError, match="params"):
        EstimateInput.from_params(params)


def test_bad_params_in_direct_input_raise_usage_error() -> None:
    with pytest.raises(UsageError, match="params"):
        estimate([EstimateInput(label="x", params=0)])


@pytest.mark.parametrize("text", ["abc", "0", "-3B", ""])
def test_bad_params_text_raises_usage_error(text: str) -> None:
    with pytest.raises(UsageError):
        parse_params(text)


@pytest.mark.parametrize("value", [0, -2.0, math.nan])
def test_bad_kv_bytes_raise_usage_error(value: float) -> None:
    with pytest.raises(UsageError, match="kv_bytes_per_element"):
        estimate(kv_bytes_per_element=value)


def test_usage_error_messages_are_one_line() -> None:
    with pytest.raises(UsageError) as info:
        estimate(context=0)
    assert "\n" not in str(info.value)


def test_estimate_table_renders_every_model() -> None:
    console = Console(record=True, width=200)
    console.print(estimate_table(estimate()))
    text = console.export_text()
    for needle in ("7B", "13B", "70B", "28.00", "3.50", "280.00", "112.00", "2.15", "1.34"):
        assert needle in text
