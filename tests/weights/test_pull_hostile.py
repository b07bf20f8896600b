"""A hostile hub or mirror at HF_ENDPOINT: checksums, blob ids, commits, file names and
download headers that are really paths. The pull fails with one line and nothing outside
the repository's cache folder is created, linked or deleted. The real huggingface-hub
client against the local hub (tests/support/hubserver.py), answering as the issue's fake hub did."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
from conftest import run_cli
from support.hub_fixtures import GGUF_FILE, GGUF_REPO, gguf_source, publish_gguf, saved_plan

from launcher.errors import HubAnswerError, UnsafePathError
from launcher.weights import cache
from launcher.weights.pull import pull

pytestmark = pytest.mark.usefixtures("hub_env")

SECRET = b"not the hub's to delete"


def up_to_root(folder: Path) -> str:
    """A relative path from `folder` to `/`: what a hostile value climbs with."""
    return "../" * (len(folder.resolve().parts) + 2)


def repo_cache(tmp_path: Path) -> Path:
    return tmp_path / "hf" / "hub" / ("models--" + GGUF_REPO.replace("/", "--"))


def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "x"
    folder.mkdir(exist_ok=True)
    (folder / "secret.txt").write_bytes(SECRET)
    return folder


def everything_but_the_repo(tmp_path: Path) -> dict[str, bytes | None]:
    """Every file and link under tmp_path except the repository's cache folder and the llmup
    home (records): what must be the same before and after a hostile pull."""
    skip = (repo_cache(tmp_path), tmp_path / "llmup")
    found = {}
    for path in tmp_path.rglob("*"):
        if any(path == s or s in path.parents for s in skip) or path in skip[0].parents:
            continue  # the folders above the repository's are the cache's too
        found[str(path)] = path.read_bytes() if path.is_file() else None
    return found


def sibling(data: dict, name: str) -> dict:
    return next(s for s in data["siblings"] if s["rfilename"] == name)


def traversal_to(target: Path, start: Path) -> str:
    return up_to_root(start) + str(target.resolve()).lstrip("/")


def hostile_listings(tmp_path: Path):
    """(id, tamper function) for each kind of value a listing could smuggle a path in."""
    blobs = repo_cache(tmp_path) / "blobs"
    secret = tmp_path / "x" / "secret.txt"

    def lfs_sha256(kind, data):  # the issue's reproduction
        if kind == "model_info":
            sibling(data, GGUF_FILE)["lfs"]["sha256"] = traversal_to(secret, blobs)
        return data

    def blob_id(kind, data):  # a small file's git blob id
        if kind == "model_info":
            sibling(data, "README.md")["blobId"] = traversal_to(secret, blobs)
        return data

    def commit(kind, data):
        if kind == "model_info":
            data["sha"] = up_to_root(blobs) + str(tmp_path / "x").lstrip("/")
        return data

    def name(value):
        def tamper(kind, data):
            if kind == "model_info":
                extra = copy.deepcopy(sibling(data, GGUF_FILE))
                extra["rfilename"] = value
                data["siblings"].append(extra)
            return data

        return tamper

    def paths_info_oid(kind, data):  # a mirror's bare listing, completed from paths-info
        if kind == "model_info":
            for entry in data["siblings"]:
                entry.pop("lfs", None), entry.pop("blobId", None), entry.pop("size", None)
        else:
            for entry in data:
                if "lfs" in entry:
                    entry["lfs"]["oid"] = traversal_to(secret, blobs)
        return data

    return [
        ("lfs-sha256", lfs_sha256),
        ("blob-id", blob_id),
        ("commit", commit),
        ("name-dotdot", name("../../../../x/evil.gguf")),
        ("name-absolute", name(str(secret))),
        ("name-backslash", name("..\\..\\evil.gguf")),
        ("paths-info-oid", paths_info_oid),
    ]


CASES = [case for case, _ in hostile_listings(Path("/tmp"))]


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_listing_is_refused_and_nothing_outside_is_touched(hub, tmp_path, case):
    publish_gguf(hub)
    pull(gguf_source(), progress=False)  # an earlier pull: the repo's blobs/ folder exists
    outside(tmp_path)
    before = everything_but_the_repo(tmp_path)
    hub.state.tamper = dict(hostile_listings(tmp_path))[case]
    downloads = len(hub.downloads())
    with pytest.raises(HubAnswerError, match="refusing its answer") as refused:
        pull(gguf_source(), progress=False, cache_dir=None)
    assert "\n" not in str(refused.value)
    assert everything_but_the_repo(tmp_path) == before
    assert (tmp_path / "x" / "secret.txt").read_bytes() == SECRET
    assert len(hub.downloads()) == downloads  # refused before a byte was fetched


def test_the_issues_command_fails_with_one_line_and_the_file_stays(hub, tmp_path):
    """`llmup pull` as the issue ran it: the fake hub's sha256 climbs to a file outside."""
    publish_gguf(hub)
    pull(gguf_source(), progress=False)
    secret = outside(tmp_path) / "secret.txt"
    hub.state.tamper = dict(hostile_listings(tmp_path))["lfs-sha256"]
    plan = saved_plan(tmp_path, gguf_source())
    res = run_cli("pull", "--plan", str(plan), "--quiet")
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "is not 64 hex digits" in res.stderr and "deleted its blob" not in res.stderr
    assert secret.read_bytes() == SECRET


@pytest.mark.parametrize("header", ["X-Linked-Etag", "ETag", "X-Repo-Commit"])
def test_a_download_header_naming_a_path_is_refused_before_the_client_writes(hub, tmp_path, header):
    """huggingface_hub names the blob after the ETag (and the snapshot after X-Repo-Commit)
    of the file's answer: a forged one must not make it write outside the cache."""
    publish_gguf(hub)
    target = outside(tmp_path) / "pwned"
    climb = up_to_root(repo_cache(tmp_path) / "blobs") + str(target).lstrip("/")
    hub.state.file_headers = {header: f'"{climb}"' if "tag" in header.lower() else climb}
    if header == "ETag":  # the LFS answer's X-Linked-Etag would win: make it absent
        hub.state.file_headers["X-Linked-Etag"] = ""
    before = everything_but_the_repo(tmp_path)
    with pytest.raises(HubAnswerError, match="refusing its answer"):
        pull(gguf_source(), progress=False)
    assert not target.exists() and not target.with_suffix(".lock").exists()
    assert everything_but_the_repo(tmp_path) == before


def test_the_guard_refuses_links_and_deletes_outside_the_repository(hub, tmp_path):
    publish_gguf(hub)
    pointer = pull(gguf_source(), progress=False).path
    repo = repo_cache(tmp_path)
    (blob,) = (repo / "blobs").iterdir()
    secret = outside(tmp_path) / "secret.txt"
    os.replace(pointer, pointer.with_name("moved"))  # a snapshot entry pointing out of the repo
    pointer.symlink_to(secret)
    with pytest.raises(UnsafePathError, match="outside"):
        cache.remove_cached_file(repo, pointer)
    assert secret.read_bytes() == SECRET and pointer.is_symlink()
    with pytest.raises(UnsafePathError):
        cache.link_blob(repo.parent, GGUF_REPO, "a.gguf", "0" * 40, "../../../x/secret.txt")
    with pytest.raises(UnsafePathError):
        cache.link_blob(repo.parent, GGUF_REPO, "../../../x/b.gguf", "0" * 40, blob.name)
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["secret.txt"]
