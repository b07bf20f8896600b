"""`llmup --help` stays quick: it imports the CLI's definitions and typer, not the model
machinery (pydantic-settings, the planner, the detectors, numpy, gguf, the hub client,
FastAPI, llama-cpp-python). benchmarks/cli_speed.py times it; this keeps the cause away."""

from __future__ import annotations

import subprocess
import sys

HEAVY = (
    "numpy",
    "gguf",
    "pydantic_settings",
    "launcher.settings",
    "launcher.planning.planner",
    "launcher.hardware.detect",
    "huggingface_hub",
    "fastapi",
    "llama_cpp",
)
CODE = f"""
import sys
from launcher.__main__ import main
sys.argv = ["llmup", "--help"]
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
print("heavy:", [m for m in {HEAVY!r} if m in sys.modules])
"""


def test_help_imports_none_of_the_heavy_modules():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "serve" in proc.stdout and "heavy: []" in proc.stdout, proc.stdout[-500:]
