"""A plan expected to decode below reading speed says so and names what would be fast enough:
the exact `--min-tokens-per-s` flag and what the planner then serves (checked by planning with
that flag). Shown by `llmup plan` (a note, and `speed_warning` in the JSON), the serve ready
line (test_serve.py) and the web page's header (test_web_browser.py)."""

from __future__ import annotations

import json

import pytest
from conftest import MACHINES, run_cli

from launcher.hardware.snapshot import load_snapshot
from launcher.planning.planner import PlanRequest, make_plan
from launcher.planning.speed_floor import floor_2_digits

TWO_CORES = MACHINES / "cpu-2core-24gb.json"  # this development box: 13B Q8_0 at ~1 token/s
HW = load_snapshot(TWO_CORES)


def served_by(flag: str, **request):
    """The plan `flag` (a --min-tokens-per-s) gets."""
    return make_plan(PlanRequest(hardware=HW, min_tokens_per_s=float(flag.split()[-1]), **request))


def test_the_largest_stays_and_the_plan_names_what_the_flag_serves():
    plan = make_plan(PlanRequest(hardware=HW))
    warning = plan.speed_warning
    assert (plan.model.id, plan.quant) == ("llama-2-13b-chat", "Q8_0")  # the policy stays
    assert warning.decode_tokens_per_s == plan.speed.decode_tokens_per_s < 5
    assert warning.readable_tokens_per_s == 5 and warning.message in plan.notes
    faster = served_by(warning.faster.flag)
    shown = (warning.faster.model, warning.faster.quant, warning.faster.decode_tokens_per_s)
    assert (faster.model.id, faster.quant, faster.speed.decode_tokens_per_s) == shown
    assert f"`{warning.faster.flag}` serves {shown[0]} {shown[1]} at ~" in warning.message
    # nothing here reaches 5 tokens/s: the flag names the fastest candidate that fits
    assert "the fastest that fits" in warning.message and float(warning.faster.flag.split()[-1]) < 5
    assert faster.speed_warning.faster is None
    assert faster.speed_warning.message.endswith("nothing that fits here is faster")


def test_a_reading_speed_some_candidate_reaches():
    plan = make_plan(PlanRequest(hardware=HW, readable_tokens_per_s=3))
    faster = plan.speed_warning.faster
    assert faster.flag == "--min-tokens-per-s 3" and faster.decode_tokens_per_s >= 3
    assert "below reading speed (3 tokens/s" in plan.speed_warning.message
    served = served_by(faster.flag, readable_tokens_per_s=3)
    assert (served.model.id, served.quant) == (faster.model, faster.quant)
    assert served.speed_warning is None  # at reading speed: nothing to say


@pytest.mark.parametrize(
    ("machine", "request_fields"),
    [
        ("a6000-48gb.json", {}),  # 70B at ~11 tokens/s
        ("cpu-2core-24gb.json", {"readable_tokens_per_s": 0.5}),  # a slower reader
        ("cpu-16gb.json", {}),  # no CPU figures: speed unknown, nothing claimed
    ],
)
def test_fast_enough_or_unknown_says_nothing(machine, request_fields):
    plan = make_plan(PlanRequest(hardware=load_snapshot(MACHINES / machine), **request_fields))
    assert plan.speed_warning is None
    assert not any("reading speed" in note for note in plan.notes)


def test_floor_keeps_the_candidate_it_is_taken_from():
    for value in (3.27, 0.0734, 12.7, 4.58, 2.3, 1.0):
        floor = floor_2_digits(value)
        assert floor <= value and value - floor < value * 0.1, (value, floor)


def test_llmup_plan_shows_it_and_the_setting_changes_it():
    shown = run_cli("plan", "--hardware", str(TWO_CORES))
    assert shown.returncode == 0, shown.stderr
    assert (
        "below reading speed (5 tokens/s" in shown.stdout and "--min-tokens-per-s" in shown.stdout
    )
    env = {"LLMUP_PLANNING__READABLE_TOKENS_PER_S": "3"}
    data = json.loads(run_cli("plan", "--hardware", str(TWO_CORES), "--json", env=env).stdout)
    assert data["speed_warning"]["readable_tokens_per_s"] == 3
    assert data["speed_warning"]["faster"]["flag"] == "--min-tokens-per-s 3"
    bad = run_cli("plan", "--hardware", str(TWO_CORES), env={**env, **{next(iter(env)): "0"}})
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("error: LLMUP_PLANNING__READABLE_TOKENS_PER_S='0'")
