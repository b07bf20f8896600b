"""Why a backend failed: its output classified, and a message that says what to do next.

A child that exits before it was ready is a load failure, classified from its output (out of
memory, corrupt model, missing dependency, port in use) so `serve` can react: fall back to a
smaller candidate on out of memory, stop with a clear message otherwise.
"""

from __future__ import annotations

import re
import signal

from launcher.backends.spec import BackendSpec
from launcher.errors import BackendLoadError

TAIL_LINES = 200

# Order matters: an allocation failure is followed by "failed to load model", and a failed
# import can mention anything, so the more specific causes are looked for first.
FAILURE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("port_in_use", re.compile(r"address already in use|errno 98\b|EADDRINUSE", re.I)),
    (
        "missing_dependency",
        re.compile(
            r"ModuleNotFoundError|ImportError|No module named|cannot open shared object file"
            r"|Failed to load shared library|Library not loaded|^llmup: cannot run ",
            re.I,
        ),
    ),
    (
        "out_of_memory",
        re.compile(
            r"out of memory|failed to allocate|unable to allocate|cudaMalloc failed"
            r"|ggml_backend_cuda_buffer_type_alloc_buffer|std::bad_alloc|MemoryError"
            r"|Cannot allocate memory|^Killed$",
            re.I,
        ),
    ),
    (
        "corrupt_model",
        re.compile(
            r"failed to load model|invalid magic|unknown model architecture|unsupported model"
            r"|not within the file bounds|model is corrupted|gguf_init_from|invalid gguf"
            r"|wrong number of tensors|has wrong shape|unknown pre-tokenizer",
            re.I,
        ),
    ),
)
ERRORISH = re.compile(
    r"error|failed|does not|cannot|can't|invalid|unsupported|requires|not supported", re.I
)
# Warnings that look like failures but are not (llama.cpp's mlock warning names ENOMEM).
BENIGN = re.compile(r"mlock", re.I)
OWN_LINE = "==== llmup:"  # the supervisor's own lines in the log, not the backend's output

KIND_TEXT = {
    "out_of_memory": "out of memory",
    "corrupt_model": "corrupt or unsupported model file",
    "missing_dependency": "missing dependency",
    "port_in_use": "port in use",
    "timeout": "not ready in time",
    "unhealthy": "failing its health checks",
    "unknown": "cause not recognised",
}
ADVICE = {
    "out_of_memory": "The model, its KV cache or its buffers did not fit: pick a smaller quant "
    "or a shorter context (`llmup plan --context N`), or free memory other processes hold.",
    "corrupt_model": "The model file is damaged or not one this llama.cpp can load: delete it "
    "and download it again (`llmup pull`).",
    "missing_dependency": "A package or shared library the backend needs is missing: "
    "reinstall llmup with the backend's extra (e.g. `pip install 'llmup[exllamav2]'`).",
    "port_in_use": "Another process listens on {address}: stop it, or let llmup pick a port.",
    "timeout": "It did not answer within {timeout:.0f} s: read the log; a slow disk needs a "
    "longer ready timeout.",
    "unhealthy": "It stopped answering (hung) or reported itself failed: read the log.",
    "unknown": "Read the log for the cause.",
}


def classify_failure(output: str, returncode: int | None = None) -> tuple[str, str]:
    """(kind, most relevant line) of a backend that exited before it was ready.

    The first matching line of the output's tail is the root cause; what follows it is
    usually the same error propagated ("failed to load model", a Python traceback).
    """
    lines = [ln.strip() for ln in output.splitlines()[-TAIL_LINES:]]
    lines = [ln for ln in lines if ln and not BENIGN.search(ln) and not ln.startswith(OWN_LINE)]
    for kind, pattern in FAILURE_PATTERNS:
        hit = next((ln for ln in lines if pattern.search(ln)), None)
        if hit is not None:
            return kind, hit
    if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return "out_of_memory", f"killed by SIGKILL (exit {returncode}), most likely the OOM killer"
    return "unknown", _unknown_cause(lines, returncode)


def _unknown_cause(lines: list[str], returncode: int | None) -> str:
    """The last line, preceded by the error-like line just before a Python traceback
    (llama.cpp says why, e.g. "K cache type q8_0 ... does not divide", then Python raises
    "Failed to create llama_context")."""
    if not lines:
        return f"exit code {returncode} and no output"
    last = lines[-1]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("Traceback")), None)
    if start is None:
        return last
    cause = next(
        (ln for ln in reversed(lines[max(start - 5, 0) : start]) if ERRORISH.search(ln)), None
    )
    return f"{cause} | {last}" if cause else last


def exit_text(returncode: int | None) -> str:
    """'exit code 3' or 'killed by SIGSEGV' (a negative code is the signal's number)."""
    if returncode is not None and returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            pass
    return f"exit code {returncode}"


def load_error(spec: BackendSpec, kind: str, line: str, returncode: int | None) -> BackendLoadError:
    """A BackendLoadError whose message names the cause, the log and what to do next."""
    advice = ADVICE[kind].format(address=f"{spec.host}:{spec.port}", timeout=spec.ready_timeout_s)
    code = "" if returncode is None else f" ({exit_text(returncode)})"
    message = (
        f"the {spec.name} backend failed to start: {KIND_TEXT[kind]}{code}.\n"
        f"  {line}\n  log: {spec.log_path}\n  {advice}"
    )
    return BackendLoadError(
        message, kind=kind, log_path=str(spec.log_path), line=line, returncode=returncode
    )
