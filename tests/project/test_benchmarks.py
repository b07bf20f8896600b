"""The benchmarks keep working: each script's --quick run (under a minute) prints its table and
writes a well-formed results file, and benchmarks/report.py renders benchmarks/README.md from
such files. The figures themselves are not asserted (these machines are shared and noisy);
their shape is. The README's sections are checked against the committed results."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# The first test pays for every benchmark's --quick run (the module's fixture): minutes on a
# busy 2-core machine, so the limits are wide; nothing here judges a speed
pytestmark = pytest.mark.timeout(3600)

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
SCRIPTS = (
    "calibration", "proxy_overhead", "cold_start", "cli_speed", "memory_over_time", "scale_out",
    "responses_chain",
    "tool_turns",
    "batch_streams",
)  # fmt: skip
OWN_TABLE = {  # a title each script prints
    "calibration": "Error per component",
    "proxy_overhead": "Through llmup vs the backend directly",
    "cold_start": "Cold start to the first answer",
    "cli_speed": "CLI wall time",
    "memory_over_time": "RSS over a long run",
    "plan_speed": "Expected vs reference speed",
    "scale_out": "Session turns through HAProxy and PostgreSQL",
    "responses_chain": "Responses chain vs chat resend",
    "tool_turns": "Session turns with and without tools",
    "batch_streams": "streams at once, total tokens/s per",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def quick(folder) -> dict[str, tuple[subprocess.CompletedProcess, dict]]:
    """Every benchmark's --quick run, its results in one folder (module-scoped: each runs once)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LLMUP_")},
        "LLMUP_HOME": str(folder / "home"),
        "HF_HOME": str(folder / "hf"),
        "LLMUP_BENCH_CACHE": str(folder / "models"),
        "COLUMNS": "200",
    }
    runs = {}
    for name in (*SCRIPTS, "plan_speed"):
        out = folder / "results" / f"{name}.json"
        proc = subprocess.run(
            [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--out", str(out)],
            capture_output=True, text=True, env=env, timeout=900, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        runs[name] = (proc, json.loads(out.read_text()))
    return runs


@pytest.mark.parametrize("name", [*SCRIPTS, "plan_speed"])
def test_quick_run_prints_its_table_and_writes_the_common_envelope(quick, name):
    proc, report = quick[name]
    assert OWN_TABLE[name] in proc.stdout and "written to" in proc.stdout
    assert report["benchmark"] == name and report["quick"] is True
    assert f"benchmarks/{name}.py --quick" in report["command"]
    machine = report["machine"]
    assert machine["cpu"] and machine["physical_cores"] >= 1 and machine["ram_gib"] > 0
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", machine["llama_cpp_python"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", machine["date"])
    for when in ("before", "after"):
        assert len(report["load_average"][when]) == 3
    for t in report["targets"]:
        assert set(t) == {"name", "value", "limit", "direction", "unit", "met"}
        assert t["direction"] in ("below", "at most", "at least")
        assert t["met"] is None or t["met"] == _holds(t)


def _holds(t: dict) -> bool:
    v, limit = t["value"], t["limit"]
    return {"below": v < limit, "at most": v <= limit, "at least": v >= limit}[t["direction"]]


def test_calibration_rows_cover_each_component_and_summarize_them(quick):
    report = quick["calibration"][1]
    points = {(r["model"], r["n_ctx"], r["kv_type"]) for r in report["rows"]}
    components = {"model", "kv", "compute", "process", "total"}
    assert len(points) == 2 and len(report["rows"]) == len(components) * len(points)
    assert {r["component"] for r in report["rows"]} == components
    assert all(r["measured_mib"] > 0 and r["predicted_mib"] > 0 for r in report["rows"])
    for s in report["summary"]:
        assert s["points"] == 2 and s["max_abs_error_pct"] >= s["median_abs_error_pct"] >= 0


def test_proxy_overhead_covers_both_modes_at_each_concurrency(quick):
    rows = quick["proxy_overhead"][1]["rows"]
    assert {r["model"] for r in rows} == {"generated tiny Llama"}
    hop = rows.pop(0)  # the hop alone: 1-token chats, one client
    assert hop["mode"] == "hop" and hop["requests"] > 0 and hop["direct_p50_ms"] > 0
    assert hop["p50_added_ms"] == pytest.approx(
        hop["llmup_p50_ms"] - hop["direct_p50_ms"], abs=0.002
    )
    floor = rows.pop(0)  # one client's streams: direct, a bare relay, llmup
    assert floor["mode"] == "streams1" and floor["streams"] > 0
    for side in ("direct", "bare", "llmup"):
        assert floor[f"{side}_tokens_per_s"] > 0
    for side in ("bare", "llmup"):
        assert floor[f"{side}_ratio"] == pytest.approx(
            floor[f"{side}_tokens_per_s"] / floor["direct_tokens_per_s"], abs=0.002
        )
        assert floor[f"{side}_cpu_ms_per_stream"] > 0
    assert [(r["mode"], r["concurrency"]) for r in rows] == [
        (m, c) for m in ("stateless", "session") for c in (1, 4, 16)
    ]
    for r in rows:
        for side in ("direct", "llmup"):
            assert 0 < r[side]["p50_ms"] <= r[side]["p99_ms"] and r[side]["tokens_per_s"] > 0
        assert r["p50_added_ms"] == pytest.approx(r["llmup"]["p50_ms"] - r["direct"]["p50_ms"])
    assert len(quick["proxy_overhead"][1]["targets"]) == 3 * len(rows) + 1


def test_cold_start_compares_and_breaks_llmup_down(quick):
    (row,) = quick["cold_start"][1]["rows"]
    assert row["llmup_s"] > 0 and row["llama_cpp_server_s"] > 0
    assert row["ratio"] == pytest.approx(row["llmup_s"] / row["llama_cpp_server_s"], rel=0.01)
    assert row["parallel"] >= 1 and row["llmup_one_sequence_s"] > 0
    assert row["one_sequence_ratio"] == pytest.approx(
        row["llmup_one_sequence_s"] / row["llama_cpp_server_s"], rel=0.01
    )
    steps = row["llmup_breakdown"]["steps"]
    assert "GGUF header reads" in steps and "waiting for the backend" in " ".join(steps)
    assert all(s >= 0 for s in steps.values())
    # the probed start runs the command of the timed later starts: it gets the head start
    assert row["llmup_breakdown"]["head_start"] is True
    # a later start of the same file reads no header (kept in the home since the first)
    assert row["llmup_breakdown"]["header_reads"] == 0
    assert row["llmup_first_s"] > 0
    assert row["first_ratio"] == pytest.approx(
        row["llmup_first_s"] / row["llama_cpp_server_s"], rel=0.01
    )


def test_cli_speed_times_each_command(quick):
    report = quick["cli_speed"][1]
    assert [r["command"] for r in report["rows"]] == [
        "python -c pass", "llmup --help", "llmup plan --hardware FILE", "llmup detect"
    ]  # fmt: skip
    assert all(r["median_ms"] >= r["min_ms"] > 0 for r in report["rows"])
    assert report["slowest_imports"] and len(report["targets"]) == 3


def test_memory_over_time_samples_both_processes(quick):
    workloads = quick["memory_over_time"][1]["workloads"]
    assert set(workloads) == {"stateless", "session"}
    for res in workloads.values():
        assert len(res["samples"]) >= 2
        assert all(s["proxy"] > 0 and s["backend"] > 0 for s in res["samples"])


def test_scale_out_measures_every_arm_the_overheads_and_a_failover(quick):
    report = quick["scale_out"][1]
    (model,) = report["models"]
    assert [r["arm"] for r in model["rows"]] == [
        "direct, SQLite", "direct, PostgreSQL", "HAProxy, 1 replica", "HAProxy, 2 replicas"
    ]  # fmt: skip
    for r in model["rows"]:
        assert r["turns"] > 0 and r["turns_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
    arms = {r["arm"]: r for r in model["rows"]}
    hop = model["overhead"]["haproxy_hop"]
    assert hop["p50_ms"] == pytest.approx(
        arms["HAProxy, 1 replica"]["p50_ms"] - arms["direct, PostgreSQL"]["p50_ms"], abs=0.02
    )
    assert set(model["overhead"]) == {
        "postgres_vs_sqlite", "postgres_vs_sqlite_store_only", "haproxy_hop",
        "haproxy_hop_health_only",
    }  # fmt: skip
    assert set(model["hop_only"]) == {"direct", "haproxy"}
    store = model["store_only"]
    assert set(store) == {"sqlite", "postgresql"}
    assert all(0 < c["p50_ms"] <= c["p99_ms"] for c in store.values())
    assert len(model["failover_s"]) >= 1 and all(d > 0 for d in model["failover_s"])
    assert "PostgreSQL" in report["conditions"]["postgresql"]
    assert "HAProxy version 2." in report["conditions"]["haproxy"]


def test_responses_chain_times_every_turn_of_both_arms(quick):
    report = quick["responses_chain"][1]
    turns = report["conditions"]["turns"]
    chain, resend = report["arms"]["chain"], report["arms"]["resend"]
    assert len(chain) == len(resend) == turns
    for rows in (chain, resend):
        assert all(r["ttft_s"] > 0 and r["prompt_tokens"] > 0 for r in rows)
        assert [r["prompt_tokens"] for r in rows] == sorted(r["prompt_tokens"] for r in rows)
    # each chained turn reuses at least the previous turn's prompt from the session's KV
    assert all(b["cached_tokens"] >= a["prompt_tokens"] for a, b in zip(chain, chain[1:]))


def test_tool_turns_measures_both_sessions_and_the_round_trips(quick):
    report = quick["tool_turns"][1]
    assert [t["turn"] for t in report["turns"]] == [1, 2, 3]
    for turn in report["turns"][1:]:  # a continued turn reuses what the session holds
        for side in ("plain", "tools"):
            assert 0 < turn[side]["cached_tokens"] < turn[side]["prompt_tokens"]
        assert turn["tools"]["prompt_tokens"] > turn["plain"]["prompt_tokens"]
    assert len(report["rounds"]) == 2
    assert all(r["result_prompt_tokens"] > r["call_prompt_tokens"] for r in report["rounds"])
    assert [t["name"] for t in report["targets"]] == [
        "continued_turn_ttft_tools_vs_plain", "result_turn_reuses_the_call_prompt"
    ]  # fmt: skip


def test_report_renders_every_section_as_well_formed_tables(quick, folder, tmp_path):
    results = folder / "results"
    readme = tmp_path / "README.md"
    readme.write_text((BENCH / "README.md").read_text())
    proc = subprocess.run(
        [sys.executable, str(BENCH / "report.py"), "--results", str(results), "--readme",
         str(readme)], capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    for name in OWN_TABLE:
        body = text.split(f"<!-- BEGIN results:{name} -->")[1].split("<!-- END")[0]
        assert "(--quick)" in body and "llama-cpp-python" in body
        _assert_tables(body)


def _assert_tables(markdown: str) -> None:
    """Every table's rows have as many cells as its header, under a separator line."""
    blocks = re.findall(r"((?:^\|.*\|\n)+)", markdown, re.MULTILINE)
    assert blocks
    for block in blocks:
        lines = block.splitlines()
        cells = [len(re.split(r"(?<!\\)\|", line)) for line in lines]
        assert re.fullmatch(r"\|(---\|)+", lines[1]) and len(set(cells)) == 1, block


def test_the_committed_readme_matches_the_committed_results():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "report.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_batch_streams_alternates_rounds_and_reports_the_median_ratio(quick):
    report = quick["batch_streams"][1]
    rounds = report["rounds"]
    assert len(rounds) == 2 and all(r["llmup"] > 0 and r["anchor"] > 0 for r in rounds)
    ratios = [r["llmup"] / r["anchor"] for r in rounds]
    assert report["summary"]["median_ratio"] == pytest.approx(
        sorted(ratios)[0] / 2 + sorted(ratios)[1] / 2, rel=0.01
    )
    (goal,) = report["targets"]
    assert goal["value"] == report["summary"]["median_ratio"] and goal["limit"] == 1.0
