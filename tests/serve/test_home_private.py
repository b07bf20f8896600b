"""The llmup home is its owner's alone: after a real `llmup serve` with a session and a saved
KV file, every folder under it is 0700 and every file 0600, the SQLite WAL included, also
where an older llmup had left them readable; and a key given in a file never shows in `ps`."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx
import psutil
import pytest
from support.ggufgen import write_llama_gguf
from support.serving import Served

from launcher.catalog.pins import write_pins
from launcher.jsonfile import write_json_atomic
from launcher.netaddr import free_port
from launcher.private import private_dir, private_home

pytestmark = pytest.mark.timeout(240)

KEY = "k-private-home-test"
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def modes(home: Path) -> dict[str, int]:
    """Every entry under `home` (itself included) with its permission bits."""
    found = {".": stat.S_IMODE(home.stat().st_mode)}
    for path in home.rglob("*"):
        found[str(path.relative_to(home))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def not_private(found: dict[str, int], home: Path) -> dict[str, str]:
    wrong = {}
    for name, mode in found.items():
        want = 0o700 if (home / name).is_dir() else 0o600
        if mode != want:
            wrong[name] = oct(mode)
    return wrong


def legacy_home(home: Path) -> None:
    """What an older llmup left: a 0755 home, 0755 folders, 0644 files."""
    (home / "logs").mkdir(parents=True)
    (home / "logs" / "llamacpp-old.log").write_text("==== llmup: an older run\n")
    (home / "calibration.json").write_text("{}")
    for path in (home, home / "logs"):
        path.chmod(0o755)
    for path in (home / "logs" / "llamacpp-old.log", home / "calibration.json"):
        path.chmod(0o644)


def chat_twice(server: Served, model: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "X-Session-Id": "private"}
    body = {"model": model, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "hello world"}]}  # fmt: skip
    for _ in range(2):
        reply = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers)
        assert reply.status_code == 200, reply.text


def test_the_home_is_private_after_a_real_serve(tmp_path):
    model = write_llama_gguf(tmp_path / "tiny-chat.gguf", tensor_type="F32", chat_template=TEMPLATE)
    home = tmp_path / "llmup-home"
    legacy_home(home)
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    previous = os.umask(0o022)  # the usual umask: files 0644 unless llmup says otherwise
    try:
        server = Served(
            ["--model-file", str(model), "--context", "512", "--api-key-file", str(keys)],
            tmp_path,
            free_port(),
            env={"LLMUP_HOME": str(home)},
        )
    finally:
        os.umask(previous)
    try:
        server.wait_ready()
        processes = [
            psutil.Process(server.proc.pid),
            *psutil.Process(server.proc.pid).children(True),
        ]
        assert not [p.pid for p in processes if KEY in " ".join(p.cmdline())]
        chat_twice(server, "tiny-chat")
        running = modes(home)
        assert {"sessions.sqlite3", "sessions.sqlite3-wal", "sessions.sqlite3-shm"} <= set(running)
        assert not_private(running, home) == {}
    finally:
        server.stop()
    after = modes(home)
    assert [n for n in after if n.startswith("slots/") and n.endswith(".kv")], after
    assert [n for n in after if n.startswith("logs/llamacpp") and n != "logs/llamacpp-old.log"]
    assert not_private(after, home) == {}


def test_writers_in_the_home_make_private_files_and_folders(tmp_path):
    previous = os.umask(0o022)
    try:
        deep = private_dir(tmp_path / "new" / "a" / "b")
        write_json_atomic(tmp_path / "new" / "records" / "x.json", {"a": 1})
        write_pins(tmp_path / "new" / "pins.json", {"o/r": {"main": "0" * 40}})
        write_pins(tmp_path / "shipped.json", {}, shipped=True)  # the package's own file
    finally:
        os.umask(previous)
    assert deep.is_dir()
    assert not_private(modes(tmp_path / "new"), tmp_path / "new") == {}
    assert stat.S_IMODE((tmp_path / "shipped.json").stat().st_mode) == 0o644


def test_an_existing_home_is_taken_back_but_nothing_else_in_it(tmp_path):
    home = tmp_path / "home"
    legacy_home(home)
    (home / "notes.txt").write_text("the user's own file")
    (home / "notes.txt").chmod(0o644)
    private_home(home)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "logs" / "llamacpp-old.log").stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "notes.txt").stat().st_mode) == 0o644  # not llmup's
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o1777)  # a /tmp-like folder named as the home is never closed to others
    private_home(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
