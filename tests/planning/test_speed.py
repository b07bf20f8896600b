"""Expected speed: the device table, the arithmetic, --min-tokens-per-s, the CPU probe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import MACHINES, run_cli

from launcher.catalog.devices import device_table
from launcher.errors import NothingFitsError, UsageError
from launcher.hardware import cpuspeed
from launcher.hardware.snapshot import load_snapshot
from launcher.planning import PlanRequest, make_plan
from launcher.planning.speed import EFFICIENCY
from launcher.units import MIB


def plan_on(machine: str, **kw):
    return make_plan(PlanRequest(hardware=load_snapshot(MACHINES / f"{machine}.json"), **kw))


@pytest.mark.parametrize(
    ("name", "entry"),
    [
        ("NVIDIA L40S", "NVIDIA L40S"),
        ("NVIDIA L4", "NVIDIA L4"),
        ("NVIDIA A10", "NVIDIA A10"),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB SXM"),
        ("NVIDIA A100 80GB PCIe", "NVIDIA A100 80GB PCIe"),
        ("NVIDIA GeForce RTX 3090 Ti", "NVIDIA GeForce RTX 3090 Ti"),
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
        ("Apple M2", "Apple M2"),
        ("Apple M2 Max", "Apple M2 Max"),
        ("NVIDIA GeForce GT 1030", None),
    ],
)
def test_device_table_matches_whole_words_longest_first(name, entry):
    found = device_table().lookup(name)
    assert (found.name if found else None) == entry


def test_every_device_cites_its_source():
    assert all(d.source.startswith("https://") for d in device_table().devices)


def test_decode_is_bytes_over_effective_bandwidth():
    plan = plan_on("a6000-48gb")
    (dev,) = plan.placement.devices
    read = dev.breakdown_mib["weights"] * MIB  # token_embd stays on the host, unread
    expected = 768e9 * EFFICIENCY["cuda"].bandwidth / read
    assert plan.speed.decode_tokens_per_s == pytest.approx(expected, rel=0.01)
    flops = 2 * (68_976_648_192 - 32000 * 8192) + 4 * 8192 * 256 * 80
    prompt = 154.8e12 * EFFICIENCY["cuda"].prompt / flops
    assert plan.speed.prompt_tokens_per_s == pytest.approx(prompt, rel=0.01)
    assert "NVIDIA RTX A6000" in plan.speed.basis[0]


def test_a_layer_split_adds_the_devices_times():
    plan = plan_on("rtx3090-3060-a4000")
    bandwidth = {"cuda:0": 936e9, "cuda:1": 360e9, "cuda:2": 448e9}
    seconds = sum(
        d.breakdown_mib["weights"] * MIB / (bandwidth[d.device] * EFFICIENCY["cuda"].bandwidth)
        for d in plan.placement.devices
    )
    assert plan.speed.decode_tokens_per_s == pytest.approx(1 / seconds, rel=0.01)


def test_an_unknown_gpu_has_no_speed_and_says_why():
    snap = load_snapshot(MACHINES / "a6000-48gb.json")
    gpu = snap.gpus[0].model_copy(update={"name": "NVIDIA Mystery Card"})
    plan = make_plan(PlanRequest(hardware=snap.model_copy(update={"gpus": [gpu]})))
    assert plan.speed.decode_tokens_per_s is None
    assert "not in the device table" in plan.speed.basis[0]


def test_the_largest_that_fits_on_two_cores_is_slow_and_the_floor_picks_a_faster_one():
    slow = plan_on("cpu-2core-24gb")
    assert (slow.model.id, slow.quant) == ("llama-2-13b-chat", "Q8_0")
    assert slow.speed.decode_tokens_per_s < 2
    fast = plan_on("cpu-2core-24gb", min_tokens_per_s=3)
    assert fast.speed.decode_tokens_per_s >= 3
    assert fast.model.id == "llama-2-7b-chat"
    passed_over = next(r for r in fast.rejected if r.quant == "Q8_0" and "13b" in r.model)
    assert "below --min-tokens-per-s 3" in passed_over.reason


def test_no_candidate_fast_enough_is_nothing_fits():
    with pytest.raises(NothingFitsError, match="decodes at 500 tokens/s or more") as info:
        plan_on("cpu-2core-24gb", min_tokens_per_s=500)
    assert info.value.closest and all(r.decode_tokens_per_s < 500 for r in info.value.closest)


def test_negative_floor_is_refused():
    with pytest.raises(UsageError, match="--min-tokens-per-s"):
        plan_on("cpu-2core-24gb", min_tokens_per_s=-1)


def test_apple_cpu_and_gpu_speeds_come_from_the_chip():
    plan = plan_on("apple-m2max-64gb")
    assert "Apple M2 Max: 400 GB/s" in plan.speed.basis[0]
    assert 2 < plan.speed.decode_tokens_per_s < 6  # 70B Q4_K_S, ~39 GB at 400 GB/s x 0.37


def test_cpu_probe_is_measured_once_and_cached(tmp_path, monkeypatch):
    system = load_snapshot(MACHINES / "cpu-2core-24gb.json").system
    first = cpuspeed.cpu_speed(tmp_path, system)
    assert first.memory_bandwidth_gbs > 0.5 and first.gflops > 1 and first.threads == 2

    def no_second_measurement(threads):
        raise AssertionError("measured again")

    monkeypatch.setattr(cpuspeed, "measure_cpu_speed", no_second_measurement)
    assert cpuspeed.cpu_speed(tmp_path, system) == first
    cached = json.loads((tmp_path / cpuspeed.CACHE_FILE).read_text())
    assert list(cached) == [cpuspeed.cache_key(system)]


def test_plan_for_a_file_shows_speed_and_never_probes(tmp_path):
    home = tmp_path / "home"
    res = run_cli(
        "plan", "--hardware", str(MACHINES / "gt1030-rtx4090.json"), "--json",
        env={"LLMUP_HOME": str(home)},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["speed"]["decode_tokens_per_s"] > 10
    assert plan["placement"]["devices"][0]["device"] == "cuda:1"
    assert not (home / cpuspeed.CACHE_FILE).exists()
    shown = run_cli("plan", "--hardware", str(MACHINES / "gt1030-rtx4090.json"))
    assert "expected speed:" in shown.stdout and "not used: cuda:0 left out" in shown.stdout


def test_plan_cli_min_tokens_per_s_and_gpus():
    res = run_cli(
        "plan", "--hardware", str(MACHINES / "cpu-2core-24gb.json"),
        "--min-tokens-per-s", "3", "--json",
    )  # fmt: skip
    assert json.loads(res.stdout)["model"]["id"] == "llama-2-7b-chat"
    bad = run_cli("plan", "--hardware", str(MACHINES / "a6000-48gb.json"), "--gpus", "3")
    assert bad.returncode == 2 and "no GPU '3' here" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_detect_reports_backends_and_cpu_speed(tmp_path):
    res = run_cli("detect", "--json", env={"LLMUP_HOME": str(tmp_path)})
    snap = json.loads(res.stdout)
    assert snap["backends"]["llama_cpp"]["installed"] is True
    assert snap["backends"]["llama_cpp"]["gpu_offload"] is False
    assert snap["system"]["memory_bandwidth_gbs"] > 0
    assert (tmp_path / cpuspeed.CACHE_FILE).exists()


def test_planning_a_file_loads_neither_llama_cpp_nor_the_hub_client():
    """`llmup plan --hardware FILE` stays fast: no llama.cpp library, no huggingface_hub."""
    code = (
        "import sys\n"
        "from launcher.cli import app\n"
        "try:\n    app(['plan', '--hardware', sys.argv[1], '--json'])\n"
        "except SystemExit:\n    pass\n"
        "print('LOADED', [m for m in ('llama_cpp', 'huggingface_hub') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(MACHINES / "a6000-48gb.json")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert '"llama-2-70b-chat"' in out.stdout
    assert "LOADED []" in out.stdout, out.stdout[-300:] + out.stderr[-300:]
