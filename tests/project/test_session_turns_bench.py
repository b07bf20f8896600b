"""benchmarks/session_turns.py keeps working: its --quick mode (a generated tiny model, llmup
with the slot worker and with the stock server) runs end to end and writes its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_session_turns_benchmark(tmp_path):
    out = tmp_path / "session_turns.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/session_turns.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["arms"]) == {"llmup", "llmup-stock"}
    for arm in report["arms"].values():
        assert len(arm["interleaved"]) == 3 and all(len(turn) == 2 for turn in arm["interleaved"])
        assert all(ttft > 0 for turn in arm["interleaved"] for ttft in turn)
        assert arm["concurrent"]["total_tokens_per_s"] > 0
        assert set(arm["rss_mib"]) == {
            "after_interleaved",
            "after_eight_on_four",
            "after_concurrent",
        }
    assert "rss_within_plan" in {t["name"] for t in report["targets"]}
    assert "mean TTFT per" in run.stdout and "written to" in run.stdout
