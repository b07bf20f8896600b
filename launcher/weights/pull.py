"""Fetch exactly the files a plan names into the standard hub cache, verified.

`pull()` is what `llmup pull` prints and what `llmup serve` calls before starting a backend:
it returns the one path the backend loads (a `.gguf` file, the joined `.gguf` of split halves,
or a GPTQ snapshot folder). Downloads, resume and the cache layout are huggingface_hub's;
llmup adds the pinned commit (`catalog.pins`), the disk check before, the checksum after
(a file the hub gives no checksum for is refused unless `verify=False`), the join, the reuse
of what an earlier commit already fetched (same checksum, same blob), and clear errors.
"""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.utils import filter_repo_objects

from launcher.catalog.pins import Pins
from launcher.errors import (
    DiskSpaceError,
    DownloadError,
    HubUnreachableError,
    ModelFileError,
    OfflineMissError,
    UnverifiableFileError,
    UsageError,
)
from launcher.planning.plan import Source
from launcher.private import private_home
from launcher.weights import cache
from launcher.weights.diskspace import Need, check_disk_space
from launcher.weights.joined import (
    join_into_snapshot,
    joined_if_current,
    output_path,
    unrecorded_ok,
)
from launcher.weights.remote import (
    RemoteFile,
    fetch_listing,
    hub_errors,
    is_pattern_selection,
)
from launcher.weights.result import GB, PullContext, PulledFile, PullResult
from launcher.weights.trust import guard_hub_client
from launcher.weights.verify import Digest, VerifiedRecords, check_or_discard, has_gguf_magic

log = logging.getLogger(__name__)


def pull(
    source: Source,
    *,
    offline: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    token: str | None = None,
    cache_dir: str | Path | None = None,
    verify: bool = True,
) -> PullResult:
    """Make the plan's weights present and verified; return where they are.

    offline (or HF_HUB_OFFLINE=1): use only the cache. dry_run: report files, sizes and
    what is cached without downloading (from the catalog's sizes when offline). verify
    False accepts a file the hub gives no checksum for (and says so in the result).
    """
    if source.local_path:
        return _local(source, cache.hub_cache_dir(cache_dir))
    if not source.repo_id or not source.files:
        raise UsageError("the plan's source names no hub repository and files to pull")
    home = cache.llmup_home()
    pins = Pins.load(home)
    ctx = PullContext(
        source=source,
        repo_id=source.repo_id,
        cache_dir=cache.hub_cache_dir(cache_dir),
        home=home,
        token=token,
        progress=progress,
        verify=verify,
        pins=pins,
        pin=pins.commit(source.repo_id, source.revision),
    )
    offline = offline or cache.offline_from_env()
    if dry_run:
        return _dry_run(ctx, offline)
    return _pull_offline(ctx) if offline else _pull_online(ctx)


def _local(source: Source, cache_dir: Path) -> PullResult:
    """A plan for a local file: nothing to fetch, but it must exist."""
    path = Path(source.local_path).expanduser()
    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist")
    size = path.stat().st_size if path.is_file() else None
    return PullResult(
        repo_id=None,
        revision=source.revision,
        commit=None,
        path=path,
        files=(PulledFile(path.name, size, True, path),),
        downloaded_bytes=0,
        cache_dir=cache_dir,
    )


# --- online ---------------------------------------------------------------------------------


def _pull_online(ctx: PullContext) -> PullResult:
    private_home(ctx.home)  # verification records and pins: the owner's, like the rest of it
    listing = fetch_listing(ctx.source, ctx.token, revision=ctx.revision)
    commit, wanted = listing.commit, listing.files
    unverified = _unverifiable(ctx, wanted)
    cache.record_ref(ctx.cache_dir, ctx.repo_id, ctx.source.revision, commit)
    records = VerifiedRecords.load(ctx.home, ctx.repo_folder.name, commit)
    if ctx.source.join:
        joined = joined_if_current(ctx, commit, wanted, records)
        if joined is not None:
            _pin_on_first_use(ctx, commit)
            return joined
    try:
        present = {f.name: _verified_cached(ctx, f, commit, records) for f in wanted}
        check_disk_space(_needs(ctx, wanted, present, commit))
        files = [_fetch(ctx, f, commit, records, present[f.name]) for f in wanted]
        records.set_selection(_selection_key(ctx.source), [f.name for f in wanted])
        path, joined_now = _finish(ctx, commit, files, records)
    finally:
        if records.data["files"]:
            records.save()  # what did verify stays verified, even when a later file failed
    _pin_on_first_use(ctx, commit)
    return ctx.result(commit, path, files, joined=joined_now, unverified=unverified)


def _unverifiable(ctx: PullContext, wanted: list[RemoteFile]) -> tuple[str, ...]:
    """Files the hub gave no checksum for: refused (before any byte) unless verify is off."""
    bare = tuple(f.name for f in wanted if f.digest is None)
    if bare and ctx.verify:
        raise UnverifiableFileError(
            f"the hub at {cache.endpoint_label()} gives no checksum for {', '.join(bare)} "
            f"({ctx.repo_id}), neither in its file listing nor in paths-info, so a corrupted "
            "copy could not be told from a good one; nothing was downloaded. Use another hub "
            "endpoint, or pass --no-verify to accept the file unverified"
        )
    for name in bare:
        log.warning("%s has no checksum on the hub; accepted unverified (--no-verify)", name)
    return bare


def _pin_on_first_use(ctx: PullContext, commit: str) -> None:
    """A source without a pin stays on the commit its first pull used."""
    if ctx.pin is None:
        ctx.pins.record(ctx.repo_id, ctx.source.revision, commit)
        log.info("pinned %s@%s to %s", ctx.repo_id, ctx.source.revision, commit)


def _verified_cached(
    ctx: PullContext, f: RemoteFile, commit: str, records: VerifiedRecords
) -> Path | None:
    """The cached copy of `f` if it verifies; a corrupt cached copy is deleted and refetched.

    A file whose blob an earlier commit fetched (same checksum) is linked, not downloaded."""
    pointer = cache.cached_file(ctx.cache_dir, ctx.repo_id, f.name, commit)
    if pointer is None and f.digest is not None:
        pointer = cache.link_blob(ctx.cache_dir, ctx.repo_id, f.name, commit, f.digest.value)
    if pointer is None or f.digest is None:
        return pointer
    if records.is_verified(f.name, pointer, f.digest):
        records.add(f.name, pointer, f.digest)
        return pointer
    try:
        check_or_discard(pointer, f.name, f.digest, f.size, repo=ctx.repo_folder)
    except DownloadError as exc:
        log.warning("cached copy is corrupt, downloading again: %s", exc)
        return None
    records.add(f.name, pointer, f.digest)
    return pointer


def _needs(
    ctx: PullContext, wanted: list[RemoteFile], present: dict[str, Path | None], commit: str
) -> list[Need]:
    missing = sum(f.size for f in wanted if present[f.name] is None)
    blobs = ctx.repo_folder / "blobs"
    needs = [Need(blobs, missing, "to download")]
    if ctx.source.join:
        total = sum(f.size for f in wanted)
        needs.append(
            Need(
                cache.snapshot_folder(ctx.cache_dir, ctx.repo_id, commit),
                total,
                "for the joined copy of the split halves",
            )
        )
    return needs


def _fetch(
    ctx: PullContext, f: RemoteFile, commit: str, records: VerifiedRecords, present: Path | None
) -> PulledFile:
    """Download one file through the hub client (which resumes after a dropped connection)."""
    if present is not None:
        log.info("%s already in the cache", f.name)
        return PulledFile(f.name, f.size, True, present)
    log.info("downloading %s (%.2f GB)", f.name, f.size / GB)
    pointer = _download(ctx, f.name, commit)
    if f.digest is not None:
        check_or_discard(pointer, f.name, f.digest, f.size, repo=ctx.repo_folder)
        records.add(f.name, pointer, f.digest)
    return PulledFile(f.name, f.size, False, pointer)


def _download(ctx: PullContext, name: str, commit: str) -> Path:
    guard_hub_client()  # the client names the blob after the answer's ETag: checked first
    try:
        with hub_errors(ctx.source, name):
            return Path(
                hf_hub_download(
                    ctx.repo_id,
                    name,
                    revision=commit,
                    cache_dir=ctx.cache_dir,
                    token=ctx.token,
                    endpoint=cache.hub_endpoint(),
                    tqdm_class=_bar_class(name, not ctx.progress),
                )
            )
    except (OSError, ValueError, *_XET_ERRORS) as exc:  # the hub's own transfer failures
        if getattr(exc, "errno", None) == errno.ENOSPC:
            raise DiskSpaceError(
                f"the disk filled up while downloading {name} into "
                f"{ctx.cache_dir}; free space and run `llmup pull` again"
            ) from exc
        raise DownloadError(f"downloading {name} failed: {exc}; run `llmup pull` again") from exc


def _xet_errors() -> tuple[type[BaseException], ...]:
    try:
        from huggingface_hub.errors import XetDownloadError
    except ImportError:  # older huggingface_hub
        return ()
    return (XetDownloadError,)


_XET_ERRORS = _xet_errors()


def _bar_class(label: str, quiet: bool) -> type:
    """The hub's own tqdm bar (bytes, speed, ETA), labelled with the file name, or silent."""
    from huggingface_hub.utils.tqdm import tqdm as hub_tqdm

    class FileBar(hub_tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["desc"] = label
            if quiet:
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return FileBar


# --- finishing: the one path a backend loads ------------------------------------------------


def _finish(
    ctx: PullContext, commit: str, files: list[PulledFile], records: VerifiedRecords
) -> tuple[Path, bool]:
    """Join split halves, or pick the single file, or the snapshot folder for GPTQ."""
    if ctx.source.join:
        return join_into_snapshot(ctx, commit, files, records), True
    if len(files) == 1 and not is_pattern_selection(ctx.source.files):
        path = files[0].path
        if path.name.endswith(".gguf") and not has_gguf_magic(path):
            raise ModelFileError(f"{path} is not a GGUF file (no GGUF magic); check the plan")
        return path, False
    return cache.snapshot_folder(ctx.cache_dir, ctx.repo_id, commit), False


def _selection_key(source: Source) -> str:
    return json.dumps(sorted(source.files))


# --- offline --------------------------------------------------------------------------------


def _pull_offline(ctx: PullContext) -> PullResult:
    """Cache only; a miss names the file and writes nothing."""
    commit = ctx.pin or cache.resolve_commit(ctx.cache_dir, ctx.repo_id, ctx.source.revision)
    if commit is None:
        raise _offline_miss(ctx, ctx.source.join.output if ctx.source.join else ctx.source.files[0])
    records = VerifiedRecords.load(ctx.home, ctx.repo_folder.name, commit)
    if ctx.source.join:
        output = output_path(ctx, commit)
        if records.is_joined(ctx.source.join.output, output) or unrecorded_ok(output):
            joined = PulledFile(output.name, output.stat().st_size, True, output)
            return ctx.result(commit, output, [joined], offline=True, joined=True)
    files = [
        _offline_file(ctx, name, commit, records) for name in _offline_names(ctx, commit, records)
    ]
    if ctx.source.join:
        check_disk_space(
            [
                Need(
                    cache.snapshot_folder(ctx.cache_dir, ctx.repo_id, commit),
                    sum(f.size or 0 for f in files),
                    "for the joined copy",
                )
            ]
        )
    path, joined = _finish(ctx, commit, files, records)
    private_home(ctx.home)
    records.save()
    return ctx.result(commit, path, files, offline=True, joined=joined)


def _offline_names(ctx: PullContext, commit: str, records: VerifiedRecords) -> list[str]:
    """Exact names as planned; for patterns, what an earlier pull (or the hub) recorded."""
    if not is_pattern_selection(ctx.source.files):
        return list(ctx.source.files)
    names = records.selection(_selection_key(ctx.source))
    if names:
        return names
    try:
        from huggingface_hub import get_cached_repo_tree  # huggingface_hub >= 1.x

        tree = get_cached_repo_tree(ctx.repo_id, revision=commit, cache_dir=ctx.cache_dir)
    except Exception:  # no such helper, or the hub's "no tree cached": the list is unknown
        raise _offline_miss(ctx, " ".join(ctx.source.files)) from None
    return list(filter_repo_objects([t.path for t in tree], allow_patterns=ctx.source.files))


def _offline_file(ctx: PullContext, name: str, commit: str, records: VerifiedRecords) -> PulledFile:
    pointer = cache.cached_file(ctx.cache_dir, ctx.repo_id, name, commit)
    if pointer is None:
        raise _offline_miss(ctx, name)
    if not records.is_verified(name, pointer):
        digest = Digest.from_blob_name(pointer.resolve())
        if digest is None:
            raise OfflineMissError(
                f"{name} is cached but cannot be verified offline; "
                "run `llmup pull` with network access"
            )
        check_or_discard(pointer, name, digest, None, repo=ctx.repo_folder)
        records.add(name, pointer, digest)
    return PulledFile(name, pointer.stat().st_size, True, pointer)


def _offline_miss(ctx: PullContext, name: str) -> OfflineMissError:
    return OfflineMissError(
        f"offline: {name} ({ctx.repo_id}, revision {ctx.source.revision}) is not in the hub "
        f"cache at {ctx.cache_dir}; run `llmup pull` with network access first "
        "(without --offline and HF_HUB_OFFLINE)"
    )


# --- dry run --------------------------------------------------------------------------------


def _dry_run(ctx: PullContext, offline: bool) -> PullResult:
    """What a pull would fetch; never writes. Offline or unreachable: catalog sizes."""
    if not offline:
        try:
            listing = fetch_listing(ctx.source, ctx.token, revision=ctx.revision)
        except HubUnreachableError as exc:
            return _dry_run_catalog(ctx, f"hub unreachable, sizes from the catalog: {exc}")
        return _dry_run_listing(ctx, listing.commit, listing.files)
    return _dry_run_catalog(ctx, "offline: sizes from the catalog")


def _dry_run_listing(ctx: PullContext, commit: str, wanted: list[RemoteFile]) -> PullResult:
    snapshot = cache.snapshot_folder(ctx.cache_dir, ctx.repo_id, commit)
    if ctx.source.join and (snapshot / ctx.source.join.output).is_file():
        output = snapshot / ctx.source.join.output
        joined = PulledFile(output.name, output.stat().st_size, True, output)
        return ctx.result(commit, output, [joined], dry_run=True, downloaded_bytes=0, joined=True)
    files = [_dry_entry(ctx, f.name, commit, f.size) for f in wanted]
    return ctx.result(
        commit, _would_load(ctx, snapshot, files), files, dry_run=True, downloaded_bytes=0
    )


def _dry_entry(ctx: PullContext, name: str, revision: str, size: int | None) -> PulledFile:
    pointer = cache.cached_file(ctx.cache_dir, ctx.repo_id, name, revision)
    if pointer is not None:
        size = pointer.stat().st_size
    return PulledFile(name, size, pointer is not None, pointer)


def _would_load(ctx: PullContext, snapshot: Path, files: list[PulledFile]) -> Path:
    if ctx.source.join:
        return snapshot / ctx.source.join.output
    if len(files) == 1 and not is_pattern_selection(ctx.source.files):
        return snapshot / files[0].name
    return snapshot


def _dry_run_catalog(ctx: PullContext, note: str) -> PullResult:
    """File names as planned; sizes from the cache where present, else the catalog's total."""
    revision = ctx.revision
    commit = ctx.pin or cache.resolve_commit(ctx.cache_dir, ctx.repo_id, revision)
    single = len(ctx.source.files) == 1 and not is_pattern_selection(ctx.source.files)
    size = ctx.source.download_bytes if single else None
    files = [_dry_entry(ctx, name, revision, size) for name in ctx.source.files]
    snapshot = cache.snapshot_folder(ctx.cache_dir, ctx.repo_id, commit) if commit else None
    path = _would_load(ctx, snapshot, files) if snapshot else None
    return ctx.result(
        commit,
        path,
        files,
        dry_run=True,
        offline=True,
        downloaded_bytes=0,
        notes=(note,),
        catalog_bytes=ctx.source.download_bytes,
    )
