"""The plan options are defined once (`PlanFlags`) and reach `plan`, `pull` and `serve` alike:
the same options with the same spellings and defaults, first in each command's help, and
handed to the command as one value."""

from __future__ import annotations

import json
from dataclasses import fields

from conftest import MACHINES, run_cli
from typer.main import get_command

from launcher.cli import app
from launcher.cli.options import PlanFlags

PLAN_COMMANDS = ("plan", "pull", "serve")


def options_of(command: str) -> list[tuple[str, tuple[str, ...], object]]:
    params = get_command(app).commands[command].params  # type: ignore[attr-defined]
    return [(p.name, tuple(p.opts), p.default) for p in params]


def test_plan_pull_and_serve_take_the_plan_flags_first_and_alike():
    names = [f.name for f in fields(PlanFlags)]
    assert len(names) == 16
    first = {cmd: options_of(cmd)[: len(names)] for cmd in PLAN_COMMANDS}
    assert [name for name, _, _ in first["plan"]] == names
    assert first["plan"] == first["pull"] == first["serve"]
    assert ("model_file", ("--model-file",), None) in first["plan"]


def test_a_plan_flag_reaches_the_planner_and_a_saved_plan_refuses_it(tmp_path):
    hardware = str(MACHINES / "a6000-48gb.json")
    done = run_cli("plan", "--hardware", hardware, "--model", "7b", "--kv-cache", "q8_0", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["model"]["id"] == "llama-2-7b-chat" and plan["settings"]["kv_cache_type"] == "q8_0"
    saved = tmp_path / "plan.json"
    saved.write_text(done.stdout)
    refused = run_cli("pull", "--plan", str(saved), "--kv-cache", "q4_0", "--dry-run")
    assert refused.returncode == 2
    assert "--plan cannot be combined with --kv-cache" in refused.stderr


def test_flash_attention_is_a_plan_flag_with_its_smaller_compute_buffer():
    """auto (the default): on for a machine without GPUs, off with GPUs (not measured there
    yet); a quantized KV cache always has it; on and off as asked."""

    def plan(machine: str, *flags: str) -> dict:
        done = run_cli("plan", "--hardware", str(MACHINES / f"{machine}.json"), "--model", "7b",
                       *flags, "--json")  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    on, off = plan("cpu-16gb", "--flash-attn", "on"), plan("cpu-16gb", "--flash-attn", "off")
    assert on["settings"]["flash_attn"] is True and off["settings"]["flash_attn"] is False
    assert on["memory_mib"]["compute"] < off["memory_mib"]["compute"]
    assert plan("cpu-16gb")["settings"]["flash_attn"] is True
    assert plan("rtx4090-24gb")["settings"]["flash_attn"] is False
    assert plan("rtx4090-24gb", "--kv-cache", "q8_0")["settings"]["flash_attn"] is True
    refused = run_cli("plan", "--hardware", str(MACHINES / "cpu-16gb.json"), "--flash-attn", "x")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "error: --flash-attn must be auto, on or off, got 'x'"
    ]
