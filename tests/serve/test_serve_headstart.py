"""`llmup serve` started again with the same command spawns its backend first, from the
record of the last launch, and serves with it; a record that no longer matches the plan
costs only the wasted load, and a command that fails leaves no backend behind."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest
from conftest import run_cli
from support.ggufgen import write_llama_gguf
from support.serving import Served, gone

from launcher.backends.supervise.headstart import RECORD
from launcher.netaddr import bind_socket, free_port

HEAD_START = "(head start)"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_llama_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf")


def serve_once(model: Path, home: Path, port: int) -> tuple[int, str]:
    """One `llmup serve` until it answers a completion: the backend's pid and the log."""
    server = Served(["--model-file", str(model)], home, port)
    try:
        server.wait_ready()
        backend = server.backend()
        reply = server.client().completions.create(model=model.stem, prompt="a", max_tokens=2)
        assert reply.choices[0].text is not None
        return backend.pid, backend_log(home)
    finally:
        server.stop()


def backend_log(home: Path) -> str:
    return "".join(p.read_text() for p in sorted((home / "logs").glob("llamacpp-slots-*.log")))


def banners(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("==== llmup:")]


def test_a_second_start_serves_from_the_head_started_backend(model, tmp_path):
    port = free_port()
    serve_once(model, tmp_path, port)
    first = banners(backend_log(tmp_path))
    assert len(first) == 1 and HEAD_START not in first[0]
    records = json.loads((tmp_path / RECORD).read_text())["launches"]
    assert len(records) == 1  # recorded: the launch the next start will plan
    (launch,) = records.values()
    assert "--initial-parallel" in launch["spec"]["command"]  # the measured plan's quick start
    assert "api_key" not in launch["spec"]  # a record never holds a run's key

    pid, log = serve_once(model, tmp_path, port)
    second = banners(log)[1:]
    assert len(second) == 1 and HEAD_START in second[0], second  # one attempt: the head start
    again, log = serve_once(model, tmp_path, port)
    assert again != pid and banners(log)[-1].endswith(HEAD_START)


def test_a_record_that_differs_from_the_plan_is_stopped_and_the_plan_served(model, tmp_path):
    port = free_port()
    serve_once(model, tmp_path, port)
    path = tmp_path / RECORD
    record = json.loads(path.read_text())
    (launch,) = record["launches"].values()
    command = launch["spec"]["command"]
    command[command.index("--slot-ram-mib") + 1] = "7"  # what no plan here would say
    path.write_text(json.dumps(record))

    server = Served(["--model-file", str(model)], tmp_path, port)
    try:
        server.wait_ready()
        served = server.backend().cmdline()
        assert served[served.index("--slot-ram-mib") + 1] != "7"
        attempts = banners(backend_log(tmp_path))[1:]
        assert [HEAD_START in a for a in attempts] == [True, False], attempts
        assert not running_with("--slot-ram-mib", "7")  # the head start was stopped
    finally:
        server.stop()
    fixed = json.loads(path.read_text())["launches"]
    (launch,) = fixed.values()
    assert "7" not in launch["spec"]["command"]  # the plan's launch recorded again


def test_a_changed_model_file_gets_no_head_start(model, tmp_path):
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(model.read_bytes())
    port = free_port()
    serve_once(copy, tmp_path, port)
    copy.write_bytes(copy.read_bytes())  # same bytes, a new mtime
    _, log = serve_once(copy, tmp_path, port)
    assert not any(HEAD_START in b for b in banners(log))


def test_a_command_that_fails_leaves_no_head_started_backend(model, tmp_path):
    port = free_port()
    serve_once(model, tmp_path, port)
    before = {p.pid for p in psutil.process_iter()}
    blank = run_cli(
        "serve", "--model-file", str(model), "--port", str(port), "--quiet",
        env={"LLMUP_HOME": str(tmp_path), "LLMUP_API_KEY": " "},
    )  # fmt: skip
    assert blank.returncode != 0 and "Traceback" not in blank.stderr
    assert not any(HEAD_START in b for b in banners(backend_log(tmp_path))), (
        "a different environment is a different command"
    )
    with bind_socket("127.0.0.1", port) as taken:  # the same command; it fails after spawning
        taken.listen()
        failed = run_cli(
            "serve", "--model-file", str(model), "--port", str(port), "--quiet",
            env={"LLMUP_HOME": str(tmp_path)},
        )  # fmt: skip
    assert failed.returncode != 0 and "Traceback" not in failed.stderr, failed.stderr
    assert banners(backend_log(tmp_path))[-1].endswith(HEAD_START)
    time.sleep(0.5)
    left = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.pid not in before and str(model) in " ".join(p.info["cmdline"] or [])
    ]
    assert gone(left, timeout=10), [p.info["cmdline"] for p in left]


def running_with(flag: str, value: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info["cmdline"] or []
        if flag in args[:-1] and args[args.index(flag) + 1] == value:
            found.append(proc)
    return found
