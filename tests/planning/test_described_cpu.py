"""A machine profile describes its CPU (`ram_type`, a core class in `cpu_name`): the planner
takes the device table's typical figures for it, marks the speed as assumed and says so; a
measured CPU always wins over a description."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
from conftest import MACHINES, run_cli

from launcher.catalog.devices import device_table
from launcher.hardware.snapshot import load_snapshot
from launcher.planning import PlanRequest, make_plan
from launcher.planning.speed import EFFICIENCY
from launcher.profiles import all_profiles, find_profile
from launcher.profiles.listing import profile_request
from launcher.settings import Settings

SPEED_GRADE = re.compile(r"^DDR([45])-(\d+) (dual|quad|8|12)")
CHANNELS = {"dual": 2, "quad": 4, "8": 8, "12": 12}


def described(ram_type: str | None, cpu_name: str | None = None, **system):
    snap = load_snapshot(MACHINES / "cpu-64gb.json")
    fields = {"ram_type": ram_type, "cpu_name": cpu_name, **system}
    return snap.model_copy(update={"system": snap.system.model_copy(update=fields)})


def test_each_memory_entry_is_its_speed_grade_times_its_channels():
    """Peak bandwidth = MT/s x 8 bytes per 64-bit channel x channels (JEDEC speed grades)."""
    table = device_table()
    assert len(table.cpu_memory) >= 8
    for memory in table.cpu_memory:
        ddr, rate, channels = SPEED_GRADE.match(memory.name).groups()
        assert memory.bandwidth_gbs == pytest.approx(
            int(rate) * 8 * CHANNELS[channels] / 1000, abs=0.05
        )
        assert (
            memory.source.startswith("https://www.jedec.org/") and f"jesd79-{ddr}" in memory.source
        )
    for core in table.cpu_cores:
        assert core.source.startswith("https://") and core.gflops > 0


@pytest.mark.parametrize(
    ("text", "memory", "core"),
    [
        ("DDR4-3200 dual channel", "DDR4-3200 dual channel", None),
        ("ddr5-4800, 12 channels", "DDR5-4800 12 channels", None),
        ("DDR4-3200 8-channel (Threadripper Pro)", "DDR4-3200 8 channels", None),
        ("DDR4-3000 dual channel", None, None),  # not a listed speed grade: no guess
        ("16-core x86-64, AVX2", None, "x86-64 AVX2 core"),
        ("Xeon Gold 6338 (AVX-512)", None, "x86-64 AVX-512 core"),
    ],
)
def test_descriptions_are_matched_whole_words(text, memory, core):
    found_memory, found_core = device_table().memory(text), device_table().core(text)
    assert (found_memory.name if found_memory else None) == memory
    assert (found_core.name if found_core else None) == core


def test_a_described_cpu_gets_an_assumed_speed_from_the_table():
    snap = described("DDR5-5600 dual channel", "16-core x86-64, AVX2", memory_bandwidth_gbs=None)
    plan = make_plan(PlanRequest(hardware=snap, model="13b"))
    eff = EFFICIENCY["cpu_table"]
    weights = plan.memory_mib.weights * 2**20 - 32000 * 5120 * 34 / 32  # token_embd unread
    assert plan.speed.assumed is True
    assert plan.speed.decode_tokens_per_s == pytest.approx(
        89.6e9 * eff.bandwidth / weights, rel=0.02
    )
    assert plan.speed.prompt_tokens_per_s > 0  # 16 x 96 GFLOPS, the AVX2 core class
    (basis,) = plan.speed.basis
    assert basis.startswith("cpu: assumed DDR5-5600 dual channel 89.6 GB/s x 0.60, 16 x 96 GFLOPS")
    assert "not measured" in basis


def test_without_a_core_class_only_decode_is_estimated():
    plan = make_plan(PlanRequest(hardware=described("DDR4-3200 quad channel"), model="7b"))
    assert plan.speed.assumed and plan.speed.decode_tokens_per_s > 0
    assert plan.speed.prompt_tokens_per_s is None
    assert "GFLOPS unknown (no core class in system.cpu_name)" in plan.speed.basis[0]


def test_a_measured_cpu_wins_over_its_description():
    snap = described("DDR4-3200 dual channel", "AVX2", memory_bandwidth_gbs=40.0, cpu_gflops=500.0)
    plan = make_plan(PlanRequest(hardware=snap, model="7b"))
    assert plan.speed.assumed is False and plan.speed.basis[0].startswith("cpu: measured 40 GB/s")


def test_neither_measured_nor_described_says_how_to_get_a_speed():
    plan = make_plan(PlanRequest(hardware=described(None), model="7b"))
    assert plan.speed.decode_tokens_per_s is None and not plan.speed.assumed
    assert "describe its memory: system.ram_type" in plan.speed.basis[0]


def test_every_profile_has_an_expected_speed_and_cpu_ones_are_assumed():
    for profile in all_profiles(Settings().home):
        plan = make_plan(profile_request(profile))
        assert plan.speed.decode_tokens_per_s is not None, profile.name
        cpu_only = not profile.hardware.gpus
        assert plan.speed.assumed is cpu_only, profile.name


def test_a_gpu_profile_with_offload_gets_a_speed_for_its_host_layers():
    """The profile's described CPU also prices the layers partial offload leaves on it."""
    profile = find_profile("rtx3060-12g", Settings().home)
    request = replace(profile_request(profile), model="70b", max_model=None, allow_offload=True)
    plan = make_plan(request)
    assert plan.placement.offload == "partial" and plan.speed.assumed
    assert plan.speed.decode_tokens_per_s is not None


def test_the_plan_command_shows_the_assumption():
    result = run_cli("plan", "--hardware", "profile", "--profile", "cpu-16g")
    assert result.returncode == 0, result.stderr
    assert "expected speed (assumed CPU figures): 4.38 tokens/s decode" in result.stdout
    assert "from cpu: assumed DDR4-3200 dual channel 51.2 GB/s" in result.stdout
    data = json.loads(
        run_cli("plan", "--json", "--hardware", "profile", "--profile", "cpu-16g").stdout
    )
    assert data["speed"]["assumed"] is True and data["speed"]["decode_tokens_per_s"] == 4.38
