"""The CLI's tables read in an 80-column terminal (and use a wider one): `llmup profiles` keeps
every model name whole with the machines' descriptions on lines of their own, and the closest
candidates of `llmup plan` give each reason at most two lines, the whole text in `--json`."""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_cli

from launcher.profiles import all_profiles
from launcher.render import short_quant, short_reason
from launcher.settings import Settings

WIDTHS = [80, 120]
MODEL_ROW = re.compile(r"^llama-2-\d+b-chat ")


def cli(*args: str, width: int, ok: tuple[int, ...] = (0,)) -> str:
    result = run_cli(*args, env={"COLUMNS": str(width)})
    assert result.returncode in ok, result.stderr
    return result.stdout


def rows_of(text: str, start: re.Pattern) -> list[list[str]]:
    """A table's rows: a line matching `start` and the continuation lines under it (those
    starting with a space), up to the table's end (an empty line or a line that is neither)."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if start.match(line):
            rows.append([line])
        elif rows and line.startswith(" ") and line.strip():
            rows[-1].append(line)
        elif rows:
            break
    return rows


@pytest.mark.parametrize("width", WIDTHS)
def test_profiles_keep_model_names_whole_and_descriptions_on_their_own_lines(width):
    text = cli("profiles", width=width)
    plans = {
        row["name"]: row["plan"]
        for row in json.loads(cli("profiles", "--json", width=width))["profiles"]
    }
    assert all(len(line) <= width for line in text.splitlines())
    profiles = {p.name: p for p in all_profiles(Settings().home)}
    names = re.compile("|".join(re.escape(name) + " " for name in profiles))
    caption = "* assumed: a described CPU (typical figures for its memory and cores)"
    plans_part, machines_part = text.split(caption)
    plan_rows, machine_rows = rows_of(plans_part, names), rows_of(machines_part, names)
    assert len(plan_rows) == len(machine_rows) == len(profiles)
    for row in plan_rows:
        name = row[0].split()[0]
        model, quant, backend, decode = row[0].split()[1:5]
        plan = plans[name]
        assert (model, quant, backend) == (
            plan["model"]["id"],
            plan["quant"],
            plan["backend"],
        )  # the model name whole, on the profile's first line
        speed = plan["speed"]
        assert speed["decode_tokens_per_s"] is not None  # every profile has a speed
        assert decode == f"{speed['decode_tokens_per_s']:.3g}" + ("*" if speed["assumed"] else "")
    for row in machine_rows:  # each description whole, on one line of its own
        name, description = row[0].split(maxsplit=1)
        assert len(row) == 1 and description.strip() == profiles[name].description


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize(
    "args",
    [
        ("--hardware", "profile", "--profile", "rtx3060-12g", "--model", "70b"),  # nothing fits
        ("--hardware", "profile", "--profile", "rtx-a6000-48g"),  # Q5/Q6/Q8 and 3-bit GPTQ miss
        ("--hardware", "tests/data/machines/rtx3090-3060-a4000.json", "--model", "70b"),
        ("--hardware", "profile", "--profile", "cpu-16g", "--min-tokens-per-s", "30"),
    ],
)
def test_closest_candidates_give_each_reason_two_lines_at_most(width, args):
    text = cli("plan", *args, width=width, ok=(0, 3))
    data = json.loads(run_cli("plan", "--json", *args).stdout)
    reasons = {
        (r["model"], short_quant(r["quant"])): r["reason"]
        for r in data.get("closest") or data["rejected"]
    }
    rows = rows_of(text.split("candidates")[-1], MODEL_ROW)  # the model name whole
    assert rows and all(len(row) <= 2 and max(map(len, row)) <= width for row in rows)
    for row in rows:
        reason = short_reason(reasons[tuple(row[0].split()[:2])])
        flat = " ".join(" ".join(row).split())
        assert " ".join(reason.split()[:3]) in flat  # shortened, never another candidate's
        if width == 120:  # wide enough: every reason on one line, shortened but whole
            assert len(row) == 1 and flat.endswith(reason)


def test_reasons_are_shortened_the_same_way_the_json_says_them():
    assert short_reason("needs 28.5 GiB on cuda:0, 10.7 GiB free after reserve") == (
        "needs 28.5 GiB, cuda:0 has 10.7"
    )
    assert short_reason("needs 48.6 GiB of RAM, 12.0 GiB available after reserve") == (
        "needs 48.6 GiB, RAM has 12.0"
    )
    assert short_reason(
        "fits, but decodes at about 11.02 tokens/s, below --min-tokens-per-s 30"
    ) == ("fits; slower than --min-tokens-per-s 30")
    assert short_reason("something new") == "something new"
