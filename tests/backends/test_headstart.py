"""The head start's parts: which commands are the same one, the record of a launch (without
its key), the newest launches kept, and a launch moved to another port with another key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from launcher.backends.spec import BackendSpec
from launcher.backends.supervise.headstart import (
    KEPT,
    invocation,
    recorded_spec,
    spec_from_record,
    spec_record,
    wants_head_start,
    with_launch,
)
from launcher.hardware.system import detect_system, held_by
from launcher.units import MIB


def spec(tmp_path: Path, port: int = 4000) -> BackendSpec:
    return BackendSpec(
        name="llama.cpp",
        command=[sys.executable, "-m", "worker", "--model", "m.gguf", "--port", str(port)],
        port=port,
        log_path=tmp_path / "logs" / "w.log",
        env={"PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""},
        env_unset=frozenset({"PORT", "HOST"}),
        ready_timeout_s=33.0,
        model_alias="m",
        api_key="secret",
        state_dirs=(tmp_path / "slots",),
    )


def test_the_same_command_is_the_same_invocation_and_any_llmup_setting_another():
    env = {"LLMUP_HOME": "/h", "TERM": "xterm"}
    same = invocation(["serve", "--model-file", "m"], env, "/work")
    assert same == invocation(["serve", "--model-file", "m"], env | {"TERM": "dumb"}, "/work")
    assert same != invocation(["serve", "--model-file", "m", "-q"], env, "/work")
    assert same != invocation(["serve", "--model-file", "m"], env | {"LLMUP_API_KEY": "k"}, "/work")
    assert same != invocation(["serve", "--model-file", "m"], env, "/elsewhere")  # relative paths


def test_only_serve_gets_a_head_start():
    assert wants_head_start(["serve", "--model-file", "m"])
    assert not wants_head_start(["serve", "--help"])
    assert not wants_head_start(["plan"]) and not wants_head_start([])


def test_a_launch_is_recorded_without_its_key_and_read_back_whole(tmp_path):
    launch = spec(tmp_path)
    record = json.loads(json.dumps(spec_record(launch)))
    assert "secret" not in json.dumps(record)
    assert spec_from_record(record) == launch.with_run(port=launch.port, api_key=None)


def test_a_recorded_launch_starts_on_a_new_port_with_a_new_key(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    stat = model.stat()
    launch = spec(tmp_path)
    identity = {"path": str(model), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    again = recorded_spec({"model": identity, "spec": spec_record(launch)})
    assert again is not None and again.api_key and again.api_key != "secret"
    assert again.command[-1] == str(again.port) and again.command[:-1] == launch.command[:-1]
    assert again.with_run(port=launch.port, api_key="secret") == launch
    model.write_bytes(b"GGUF2")  # another file now: no head start
    assert recorded_spec({"model": identity, "spec": spec_record(launch)}) is None


def test_the_most_recently_started_commands_are_kept(tmp_path):
    launches: dict = {}
    for i in range(KEPT + 3):
        launches = with_launch(launches, f"cmd{i}", {"spec": i})["launches"]
    assert set(launches) == {f"cmd{i}" for i in range(3, KEPT + 3)}
    launches = with_launch(launches, "cmd0", {"spec": "again"})["launches"]  # started again
    assert launches["cmd0"]["spec"] == "again"
    assert set(launches) == {"cmd0", *(f"cmd{i}" for i in range(4, KEPT + 3))}  # cmd3 oldest


def test_ram_a_head_started_backend_holds_counts_as_available():
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; b = bytearray(300 << 20); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        for _ in range(100):  # until the child touched its 300 MiB
            held = held_by(holder.pid)
            if held >= 300 * MIB:
                break
            subprocess.run(["sleep", "0.05"])
        assert held >= 300 * MIB
        plain, counted = detect_system(), detect_system(held_pid=holder.pid)
        assert counted.ram_available_mib >= plain.ram_available_mib + 200  # 300, minus drift
        assert counted.ram_available_mib <= counted.ram_total_mib
    finally:
        holder.kill()
        holder.wait()
    assert held_by(holder.pid) == 0  # gone: nothing held
