"""The llmup home on a full disk: a session turn is a clear 507 `insufficient_storage`
(streamed or not), nothing is half-written, and service resumes when space returns.

The disk is real: a small tmpfs mounted for the test, filled up with a file. Mounting needs
root (CI runs as root); without root the test says so and is skipped, and as root a mount
that fails is a failure, not a skip.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from support.backend_fixtures import MODEL, NO_EOS, proxy_settings, serve_proxy, served

pytestmark = pytest.mark.timeout(180)

DISK_MIB = 8


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip(f"needs root to mount a {DISK_MIB} MiB tmpfs to fill up (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m", "tmpfs", str(mount)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"running as root, but cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; returns it (delete it to free the space)."""
    filler = disk / "filler"
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as out:
        while True:
            try:
                out.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    for size in (4096, 512, 1):  # the last few blocks too
        try:
            with open(filler, "ab", buffering=0) as out:
                while True:
                    out.write(b"\0" * size)
        except OSError:
            continue
    return filler


def say(client: openai.OpenAI, text: str, **kw):
    kw.setdefault("max_tokens", 3)
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}],
        extra_headers={"X-Session-Id": "full"}, **kw,
    )  # fmt: skip


def test_full_disk_is_a_clear_507_and_service_resumes(small_disk, tiny_backend) -> None:
    proxy = serve_proxy(proxy_settings(small_disk / "home"), served(tiny_backend))
    try:
        client = proxy.client()
        say(client, "one")
        filler = fill(small_disk)
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as caught:
                say(client, "two", stream=stream)
            assert caught.value.status_code == 507
            assert caught.value.code == "insufficient_storage"
            assert "cannot be stored" in caught.value.message
        assert proxy.http().get("/v1/sessions/full").json()["turns"] == 1  # reads still work

        # space for the checks before the turn, none left when the streamed reply is stored
        filler.unlink()
        # a long reply: the disk fills up well before it ends, however loaded the machine
        stream = say(client, "three", stream=True, logit_bias=NO_EOS, max_tokens=400)
        chunks = iter(stream)
        next(chunks)
        filler = fill(small_disk)
        with pytest.raises(openai.APIError) as caught:
            list(chunks)
        assert caught.value.code == "insufficient_storage"
        assert "could not be stored" in caught.value.message

        filler.unlink()  # space returns: so does the service
        say(client, "four")
        stored = proxy.http().get("/v1/sessions/full").json()
        users = [m["content"] for m in stored["messages"] if m["role"] == "user"]
        assert users == ["one", "four"] and stored["turns"] == 2
    finally:
        proxy.stop()
    with sqlite3.connect(small_disk / "home" / "sessions.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 4
