"""The plan's `parallel` figure: sequences the llama.cpp KV cache is sized for."""

from __future__ import annotations

import json

import pytest
from conftest import MACHINES, run_cli

from launcher.errors import NothingFitsError, UsageError
from launcher.hardware.snapshot import load_snapshot
from launcher.planning.planner import PlanRequest, make_plan


def plan_on(machine: str, **request):
    return make_plan(PlanRequest(hardware=load_snapshot(MACHINES / f"{machine}.json"), **request))


@pytest.mark.parametrize("machine", ["cpu-2core-24gb", "a6000-48gb", "rtx4090-24gb"])
def test_auto_parallel_fills_what_the_model_leaves(machine):
    one = plan_on(machine, parallel=1)
    auto = plan_on(machine)
    assert (auto.model.id, auto.quant) == (one.model.id, one.quant)  # never a smaller model
    if auto.backend != "llama.cpp":
        assert auto.parallel == 1
        return
    assert 1 <= auto.parallel <= 8
    assert auto.memory_mib.kv_cache in range(
        auto.parallel * one.memory_mib.kv_cache - 1, auto.parallel * one.memory_mib.kv_cache + 2
    )
    assert auto.placement.offload == one.placement.offload
    if auto.parallel < 8:  # one more sequence would not fit the same way
        try:
            wider = plan_on(machine, parallel=auto.parallel + 1, model=auto.model.id)
        except NothingFitsError:
            return
        placed = (auto.quant, auto.placement.offload, auto.placement.n_gpu_layers)
        assert (wider.quant, wider.placement.offload, wider.placement.n_gpu_layers) != placed


def test_fixed_parallel_and_the_stock_server():
    three = plan_on("cpu-2core-24gb", parallel=3)
    assert three.parallel == 3 and three.settings.llamacpp_impl == "slots"
    assert three.settings.slot_ram_mib > 0
    stock = plan_on("cpu-2core-24gb", llamacpp_impl="server")
    assert stock.parallel == 1 and stock.settings.llamacpp_impl == "server"
    assert stock.settings.slot_ram_mib == 0
    with pytest.raises(UsageError, match="one request at a time"):
        plan_on("cpu-2core-24gb", parallel=2, llamacpp_impl="server")
    with pytest.raises(UsageError, match="--parallel must be"):
        plan_on("cpu-2core-24gb", parallel=0)


def test_fallbacks_never_hold_more_sequences_or_need_more():
    plan = plan_on("a6000-48gb")
    assert plan.fallbacks
    for fallback in plan.fallbacks:
        assert fallback.parallel <= plan.parallel
        assert fallback.memory_mib.total < plan.memory_mib.total


def test_llmup_plan_shows_the_sequences():
    machine = str(MACHINES / "cpu-2core-24gb.json")
    shown = run_cli("plan", "--hardware", machine, "--parallel", "2")
    assert shown.returncode == 0, shown.stderr
    assert "2 sequence(s) of 4096 tokens decoded together" in shown.stdout
    as_json = json.loads(run_cli("plan", "--hardware", machine, "--json").stdout)
    assert as_json["parallel"] >= 1 and as_json["settings"]["llamacpp_impl"] == "slots"
    stock = run_cli("plan", "--hardware", machine, "--llamacpp-impl", "server")
    assert "one request at a time" in stock.stdout
    bad = run_cli("plan", "--hardware", machine, "--parallel", "0")
    assert bad.returncode == 2 and "--parallel must be" in bad.stderr + bad.stdout


def test_the_first_fallback_keeps_the_model_with_one_sequence():
    plan = plan_on("a6000-48gb")
    assert plan.parallel > 1
    first = plan.fallbacks[0]
    assert (first.model.id, first.quant, first.parallel) == (plan.model.id, plan.quant, 1)
    assert first.memory_mib.kv_cache * plan.parallel == pytest.approx(
        plan.memory_mib.kv_cache, abs=plan.parallel
    )
