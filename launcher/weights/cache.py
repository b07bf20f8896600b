"""Where weights live: the standard hub cache (shared with every hub tool) and the llmup home.

Environment is read on every call rather than at import, so a process (or a test) that sets
HF_HOME / HF_HUB_CACHE / HF_ENDPOINT / HF_HUB_OFFLINE / LLMUP_HOME later is still obeyed;
huggingface_hub itself freezes these at import time.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name

from launcher.catalog.pins import is_commit
from launcher.errors import UnsafePathError

log = logging.getLogger(__name__)

_TRUE = {"1", "on", "yes", "true"}


def hub_cache_dir(explicit: str | Path | None = None) -> Path:
    """The hub cache folder: explicit > HF_HUB_CACHE > HF_HOME/hub > the hub's default."""
    if explicit is not None:
        return Path(explicit).expanduser().resolve()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser().resolve()
    if os.environ.get("HF_HOME"):
        return (Path(os.environ["HF_HOME"]).expanduser() / "hub").resolve()
    return Path(constants.HF_HUB_CACHE).expanduser().resolve()


def llmup_home() -> Path:
    """LLMUP_HOME, default ~/.local/share/llmup (logs, calibration, verification records)."""
    home = os.environ.get("LLMUP_HOME") or "~/.local/share/llmup"
    return Path(home).expanduser().resolve()


def hub_endpoint() -> str | None:
    """HF_ENDPOINT as set now; None lets huggingface_hub use its default."""
    endpoint = os.environ.get("HF_ENDPOINT")
    return endpoint.rstrip("/") if endpoint else None


def endpoint_label() -> str:
    """The hub address for messages."""
    return hub_endpoint() or constants.ENDPOINT


def offline_from_env() -> bool:
    """HF_HUB_OFFLINE=1 means cache only, exactly like the hub's own tools."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def repo_folder(cache_dir: Path, repo_id: str) -> Path:
    """The hub's per-repo storage folder (`models--org--name`)."""
    return cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")


def snapshot_folder(cache_dir: Path, repo_id: str, commit: str) -> Path:
    return repo_folder(cache_dir, repo_id) / "snapshots" / commit


def inside(folder: Path, path: Path) -> Path:
    """`path` itself, if it lies inside `folder` (the folder's real location; the path's own
    last part is not followed, so a link is judged by where it is); else UnsafePathError."""
    base = Path(os.path.realpath(folder))
    where = Path(os.path.realpath(path.parent)) / path.name
    if path.name in ("", ".", "..") or where == base or not where.is_relative_to(base):
        raise UnsafePathError(
            f"refusing to create, link or delete {path}: it is outside {folder}, the "
            "repository's cache folder; nothing was changed"
        )
    return path


def resolve_commit(cache_dir: Path, repo_id: str, revision: str) -> str | None:
    """The commit a branch pointed to at the last download (the hub's `refs/` file)."""
    if is_commit(revision):
        return revision
    ref = repo_folder(cache_dir, repo_id) / "refs" / revision
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    return commit if is_commit(commit) else None  # a ref file is a path part's source too


def record_ref(cache_dir: Path, repo_id: str, revision: str, commit: str) -> None:
    """Point `refs/<revision>` at `commit`, as the hub's own downloads do.

    llmup downloads by commit (so metadata and bytes match), which skips the hub's ref
    bookkeeping; without the ref, offline use could not find the files by branch name.
    """
    if revision == commit:
        return
    refs = repo_folder(cache_dir, repo_id) / "refs"
    ref = inside(refs, refs / revision)
    if ref.is_file() and ref.read_text().strip() == commit:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)


def cached_file(cache_dir: Path, repo_id: str, name: str, revision: str) -> Path | None:
    """The snapshot path of `name` if the cache holds it (the blob behind it exists)."""
    found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision)
    return Path(found) if isinstance(found, str) else None


def link_blob(cache_dir: Path, repo_id: str, name: str, commit: str, blob_name: str) -> Path | None:
    """Make `name` of snapshot `commit` point at an existing blob, as the hub client would.

    The hub names a blob by its ETag: the sha256 for LFS files, the git blob id otherwise,
    i.e. the checksum the listing gives. A file unchanged across commits is the same blob, so
    a new commit's snapshot can link it without a request. None when no such blob is here.
    """
    repo = repo_folder(cache_dir, repo_id)
    blob = inside(repo / "blobs", repo / "blobs" / blob_name)
    if not blob.is_file():
        return None
    pointer = inside(repo / "snapshots", snapshot_folder(cache_dir, repo_id, commit) / name)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(f".{pointer.name}.{uuid.uuid4().hex[:8]}.link")
    os.symlink(os.path.relpath(blob, pointer.parent), tmp)
    os.replace(tmp, pointer)
    log.info("%s of %s is the blob an earlier commit fetched; linked, not downloaded", name, commit)
    return pointer


def remove_cached_file(repo: Path, pointer: Path) -> Path:
    """Delete a snapshot entry of `repo` (its cache folder) and its blob; return the blob path.

    The blob survives when another snapshot of the repo still links to it, so removing a
    file from one revision never breaks another. Both must lie inside `repo`: a link that
    points out of it is refused, and nothing is deleted.
    """
    blob = inside(repo, Path(os.path.realpath(inside(repo, pointer))))
    pointer.unlink(missing_ok=True)
    if blob != pointer and not _other_links(blob, pointer):
        blob.unlink(missing_ok=True)
    log.info("removed %s (blob %s)", pointer, blob)
    return blob


def _other_links(blob: Path, pointer: Path) -> bool:
    snapshots = blob.parent.parent / "snapshots"
    try:
        relative = Path(*pointer.relative_to(snapshots).parts[1:])
    except ValueError:
        relative = Path(pointer.name)
    for snap in snapshots.glob("*"):
        other = snap / relative
        if other != pointer and other.is_symlink() and other.resolve() == blob:
            return True
    return False
