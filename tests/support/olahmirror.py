"""olah (PyPI) serving local git repositories as a Hugging Face hub mirror, offline.

A repository is a plain git repo under `<root>/models/<org>/<name>` whose weight files are
git-lfs pointer files with their objects in `.git/lfs/objects/<aa>/<bb>/<sha256>`, the layout
git-lfs itself uses (written here directly: git-lfs is not needed). olah lists such a
repository's files by name only in model info, and answers paths-info with each LFS file's
sha256 from its pointer: the case llmup must verify through paths-info.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from launcher.netaddr import free_port

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}


def lfs_repo(root: Path, repo_id: str, files: dict[str, bytes], *, flip: str | None = None) -> str:
    """A git repo whose files are LFS objects; `flip` names one whose stored object has one
    byte flipped (its pointer keeps the true sha256). Returns the commit."""
    repo = root / "models" / repo_id
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    for name, data in files.items():
        oid = hashlib.sha256(data).hexdigest()
        stored = bytearray(data)
        if name == flip:
            stored[len(stored) // 2] ^= 0x01
        obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
        obj.parent.mkdir(parents=True, exist_ok=True)
        obj.write_bytes(bytes(stored))
        pointer = (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n"
        )
        (repo / name).write_text(pointer)
    (repo / "README.md").write_text("# a mirrored model\n")
    env = {**os.environ, **GIT_ENV}
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "commit", "-qm", "weights"], check=True, env=env)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True)
    return head.stdout.decode().strip()


class OlahMirror:
    """`with OlahMirror(root) as url:` olah on 127.0.0.1 serving the repos under root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def _config(self) -> Path:
        netloc = f"127.0.0.1:{self.port}"
        config = self.root / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'mirror-netloc = "{netloc}"\nmirror-lfs-netloc = "{netloc}"\n'
            f'repos-path = "{self.root / "cache"}"\nmirrors-path = ["{self.root}"]\n'
            "[accessibility]\noffline = true\n"
        )
        return config

    def __enter__(self) -> str:
        command = [sys.executable, "-c", "from olah.server import cli; cli()"]
        args = ["-c", str(self._config()), "--log-path", str(self.root / "logs")]
        self.log = open(self.root / "olah.out", "w")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            command + args, cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "olah.out").read_text()
            try:
                httpx.get(self.url + "/api/models/x/y", timeout=2)
                return self.url
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("olah did not start:\n" + (self.root / "olah.out").read_text())

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()
