"""A local Hugging Face Hub for tests: real HTTP on 127.0.0.1, answered the way the hub does.

It serves the endpoints the installed huggingface_hub calls for a download:

- `GET /api/models/{repo}[/revision/{rev}][?blobs=true]`: model info, siblings with size,
  blob id and LFS sha256 (what `HfApi.model_info(files_metadata=True)` reads);
- `POST /api/models/{repo}/paths-info/{rev}`: size, blob id and LFS sha256 of the named paths
  (what `HfApi.get_paths_info` reads);
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: ETag (sha256 for LFS files, git blob id otherwise),
  X-Linked-Etag, X-Linked-Size, X-Repo-Commit, Content-Length, ranged GETs (206);
- the hub's error headers (X-Error-Code: RepoNotFound / RevisionNotFound / EntryNotFound /
  GatedRepo) so the client raises its typed exceptions.

No Xet headers are ever sent, so the client uses plain HTTP (and its own resume logic).
Every commit published stays reachable by its id after a branch moves on. Knobs for tests:
`cut_after` (drop the connection once after N body bytes), `corrupt` (flip a byte while
advertising the true sha256), `bare_listing` (model info names the files only, as a mirror
like olah does), `paths_info` (False: no such endpoint), `require_token`, `requests` (a
log of every request with its Range header and the body bytes sent), and for a hostile hub
`tamper` (rewrites the JSON of model info and paths-info before it is sent) and
`file_headers` (overrides headers of every file answer, e.g. a forged ETag).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")
_MODEL_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?/?$")
_PATHS_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>[^/]+)$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class HubFile:
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else git_blob_sha1(self.content)


@dataclass
class Revision:
    commit: str
    files: dict[str, HubFile]


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    authorization: str | None
    status: int = 0
    sent: int = 0


@dataclass
class HubState:
    repos: dict[str, dict[str, Revision]] = field(default_factory=dict)
    require_token: str | None = None
    cut_after: dict[str, int] = field(default_factory=dict)  # file name -> bytes, used once
    corrupt: set[str] = field(default_factory=set)
    bare_listing: bool = False
    paths_info: bool = True
    tamper: Callable[[str, Any], Any] | None = None  # ("model_info" | "paths_info", json)
    file_headers: dict[str, str] = field(default_factory=dict)
    history: dict[str, list[Revision]] = field(default_factory=dict)
    requests: list[Logged] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def find(self, repo: str, rev: str) -> Revision | None:
        revisions = self.repos.get(repo, {})
        if rev in revisions:
            return revisions[rev]
        return next((r for r in self.history.get(repo, []) if r.commit == rev), None)


class HubServer:
    """Start with `with HubServer() as hub:`; `hub.url` goes into HF_ENDPOINT."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        revision: str = "main",
        lfs: set[str] | None = None,
    ) -> str:
        """Publish `files` at `revision`; LFS by default for weight files. Returns the commit."""
        commit = secrets.token_hex(20)
        entries = {
            name: HubFile(data, name in lfs if lfs is not None else _is_lfs(name))
            for name, data in files.items()
        }
        published = Revision(commit, entries)
        self.state.repos.setdefault(repo_id, {})[revision] = published
        self.state.history.setdefault(repo_id, []).append(published)
        return commit

    @property
    def requests(self) -> list[Logged]:
        return self.state.requests

    def downloads(self, name: str | None = None) -> list[Logged]:
        """GET requests for file bytes (`/resolve/`), optionally of one file."""
        return [
            r
            for r in self.requests
            if r.method == "GET"
            and "/resolve/" in r.path
            and (name is None or r.path.endswith("/" + name))
        ]


def _is_lfs(name: str) -> bool:
    return name.endswith(_LFS_SUFFIXES) or "-split-" in name


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        """Quiet: the request log is `state.requests`."""

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        entry = Logged("POST", unquote(url.path), None, self.headers.get("Authorization"))
        with self.state.lock:
            self.state.requests.append(entry)
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        m = _PATHS_INFO.match(entry.path)
        if not self._authorized(entry):
            return
        if m is None or not self.state.paths_info:
            return self._error(entry, 404, None, "Not found")
        self._paths_info(entry, m["repo"], m["rev"], form.get("paths", []))

    def _dispatch(self, body: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        entry = Logged(
            self.command, path, self.headers.get("Range"), self.headers.get("Authorization")
        )
        with self.state.lock:
            self.state.requests.append(entry)
        if not self._authorized(entry):
            return
        if m := _MODEL_INFO.match(path):
            self._model_info(entry, m["repo"], m["rev"] or "main", parse_qs(url.query))
        elif m := _RESOLVE.match(path):
            self._resolve(entry, m["repo"], m["rev"], m["file"], body)
        else:
            self._error(entry, 404, None, "Not found")

    def _authorized(self, entry: Logged) -> bool:
        token = self.state.require_token
        if token is None or entry.authorization == f"Bearer {token}":
            return True
        if entry.authorization:
            self._error(entry, 401, None, "Invalid credentials in Authorization header")
        else:
            self._error(
                entry,
                401,
                "GatedRepo",
                "Access to this model is restricted. You must be authenticated to access it.",
            )
        return False

    def _model_info(self, entry: Logged, repo: str, rev: str, query: dict) -> None:
        if repo not in self.state.repos:
            return self._error(entry, 404, "RepoNotFound", "Repository not found")
        revision = self.state.find(repo, rev)
        if revision is None:
            return self._error(entry, 404, "RevisionNotFound", "Invalid rev id: " + rev)
        blobs = query.get("blobs", ["false"])[0].lower() == "true" and not self.state.bare_listing
        siblings = [_sibling(name, f, blobs) for name, f in revision.files.items()]
        data = {
            "id": repo,
            "modelId": repo,
            "sha": revision.commit,
            "private": False,
            "siblings": siblings,
        }
        if self.state.tamper is not None:
            data = self.state.tamper("model_info", data)
        self._send(
            entry, 200, json.dumps(data).encode(), {"Content-Type": "application/json"}, body=True
        )

    def _paths_info(self, entry: Logged, repo: str, rev: str, paths: list[str]) -> None:
        revision = self.state.find(repo, rev)
        if revision is None:
            return self._error(entry, 404, "RevisionNotFound", "Invalid rev id: " + rev)
        infos = [_path_info(p, revision.files[p]) for p in paths if p in revision.files]
        if self.state.tamper is not None:
            infos = self.state.tamper("paths_info", infos)
        payload = json.dumps(infos).encode()
        self._send(entry, 200, payload, {"Content-Type": "application/json"}, body=True)

    def _resolve(self, entry: Logged, repo: str, rev: str, name: str, body: bool) -> None:
        if repo not in self.state.repos:
            return self._error(entry, 404, "RepoNotFound", "Repository not found")
        revision = self.state.find(repo, rev)
        if revision is None:
            return self._error(entry, 404, "RevisionNotFound", "Invalid rev id: " + rev)
        hub_file = revision.files.get(name)
        if hub_file is None:
            return self._error(
                entry,
                404,
                "EntryNotFound",
                f"{name} does not exist",
                {"X-Repo-Commit": revision.commit},
            )
        self._send_file(entry, revision.commit, name, hub_file, body)

    def _send_file(self, entry: Logged, commit: str, name: str, f: HubFile, body: bool) -> None:
        content = f.content
        if name in self.state.corrupt:
            middle = len(content) // 2
            content = content[:middle] + bytes([content[middle] ^ 0xFF]) + content[middle + 1 :]
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{f.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{name.split("/")[-1]}"',
        }
        if f.lfs:
            headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(content))}
        headers |= self.state.file_headers
        status, start, end = 200, 0, len(content)
        if body and entry.range and (m := _RANGE.match(entry.range)):
            start = int(m[1])
            end = int(m[2]) + 1 if m[2] else len(content)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(content)}"
        self._send(entry, status, content[start:end], headers, body=body, name=name)

    def _send(
        self,
        entry: Logged,
        status: int,
        payload: bytes,
        headers: dict[str, str],
        *,
        body: bool,
        name: str | None = None,
    ) -> None:
        entry.status = status
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(key, value)
        self.end_headers()
        if not body:
            return
        cut = self._take_cut(name) if name else None
        if cut is not None and cut < len(payload):
            payload = payload[:cut]
            self.close_connection = True  # the client sees fewer bytes than Content-Length
        self.wfile.write(payload)
        self.wfile.flush()
        entry.sent = len(payload)

    def _take_cut(self, name: str) -> int | None:
        with self.state.lock:
            return self.state.cut_after.pop(name, None)

    def _error(
        self,
        entry: Logged,
        status: int,
        code: str | None,
        message: str,
        extra: dict[str, str] | None = None,
    ) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        payload = json.dumps({"error": message}).encode()
        self._send(entry, status, payload, headers, body=self.command != "HEAD")


def _pointer(f: HubFile) -> bytes:
    """The git-lfs pointer file git stores in place of an LFS file's content."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{f.sha256}\n"
        f"size {len(f.content)}\n"
    ).encode()


def _sibling(name: str, f: HubFile, blobs: bool) -> dict:
    if not blobs:
        return {"rfilename": name}
    entry: dict = {"rfilename": name, "size": len(f.content), "blobId": git_blob_sha1(f.content)}
    if f.lfs:
        pointer = _pointer(f)
        entry["blobId"] = git_blob_sha1(pointer)
        entry["lfs"] = {"size": len(f.content), "sha256": f.sha256, "pointerSize": len(pointer)}
    return entry


def _path_info(name: str, f: HubFile) -> dict:
    """One entry of paths-info, as the hub (and olah) answer it."""
    entry: dict = {"type": "file", "path": name, "size": len(f.content)}
    entry["oid"] = git_blob_sha1(_pointer(f) if f.lfs else f.content)
    if f.lfs:
        entry["lfs"] = {"oid": f.sha256, "size": len(f.content), "pointerSize": len(_pointer(f))}
    return entry
