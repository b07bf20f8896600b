"""The write-up's headline machine: one 48 GB RTX A6000 gets 70B Q4_K_M on llama.cpp, and the
plan's notes say why not the write-up's GPTQ 4-bit on exllamav2, in the planner's own figures
for the GPTQ candidates it evaluated there, and what `--backend exllamav2` would serve."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
from conftest import run_cli

from launcher.planning import make_plan
from launcher.planning.gptq_note import MAINTENANCE
from launcher.profiles import find_profile
from launcher.profiles.listing import profile_request
from launcher.settings import Settings


def a6000(**changes):
    request = profile_request(find_profile("rtx-a6000-48g", Settings().home))
    return make_plan(replace(request, **changes))


def gptq_notes(plan) -> list[str]:
    return [n for n in plan.notes if "is chosen over its GPTQ" in n]


def test_the_a6000_plan_says_why_not_gptq_in_the_planners_own_figures():
    plan = a6000()
    assert (plan.model.id, plan.quant, plan.backend) == ("llama-2-70b-chat", "Q4_K_M", "llama.cpp")
    (note,) = gptq_notes(plan)
    gptq = [r for r in plan.rejected if r.backend == "exllamav2" and r.reason.startswith("fits")]
    assert len(gptq) == 4  # the four 4-bit branches fit; 3-bit is not an exllamav2 format
    speeds = sorted(r.decode_tokens_per_s for r in gptq)
    mine = plan.speed.decode_tokens_per_s
    assert note.startswith(
        f"llama-2-70b-chat Q4_K_M on llama.cpp ({plan.bits_per_weight:.2f} bits/weight, "
        f"~{mine:.3g} tokens/s) is chosen over its GPTQ on exllamav2, which fits too: more "
        "bits per weight rank before the backend"
    )
    faster = round(100 * (speeds[-1] / mine - 1))
    assert f"~{speeds[0]:.3g}-{speeds[-1]:.3g} tokens/s: at most {faster}% faster" in note
    assert f"; {MAINTENANCE}." in note
    assert "exllamav2 0.3.2 is its last release (upstream moved to exllamav3" in note


def test_the_note_names_exactly_what_backend_exllamav2_plans():
    note = gptq_notes(a6000())[0]
    pinned = a6000(backend="exllamav2")
    (device,) = pinned.placement.devices
    need, budget = device.need_mib / 1024, device.budget_mib / 1024
    tps = pinned.speed.decode_tokens_per_s
    expected = (
        f"`--backend exllamav2` serves {pinned.quant} ({pinned.bits_per_weight:.2f} bits/weight): "
        f"{need:.1f} of {budget:.1f} GiB on cuda:0, ~{tps:.3g} tokens/s"
    )
    assert note.endswith(expected)
    bits = re.search(r"has fewer \(([\d.]+)-([\d.]+) bits/weight", note).groups()
    assert float(bits[1]) == pytest.approx(pinned.bits_per_weight, abs=0.005)
    assert float(bits[0]) < float(bits[1]) < a6000().bits_per_weight


def test_no_note_without_a_gptq_that_fits():
    assert gptq_notes(a6000(backend="llama.cpp")) == []  # GPTQ never evaluated
    assert gptq_notes(a6000(model="7b", backend="exllamav2")) == []  # exllamav2 chosen
    cpu = make_plan(profile_request(find_profile("cpu-16g", Settings().home)))
    assert gptq_notes(cpu) == []


def test_plan_json_and_table_carry_the_note():
    result = run_cli("plan", "--hardware", "profile", "--profile", "rtx-a6000-48g", "--json")
    assert result.returncode == 0, result.stderr
    notes = json.loads(result.stdout)["notes"]
    assert sum("is chosen over its GPTQ on exllamav2" in n for n in notes) == 1
    shown = run_cli("plan", "--hardware", "profile", "--profile", "rtx-a6000-48g")
    assert "note: llama-2-70b-chat Q4_K_M on llama.cpp (4.80 bits/weight" in shown.stdout
