"""The joined `.gguf` of split halves, as a pull keeps it: built once, found again, shared.

A joined file lives in its commit's snapshot folder and is recorded with the digests of the
halves it was built from. A later pull finds it there; a pull of a new commit whose halves
have the same digests (say, the new commit only changed the README) hard-links the existing
joined file into the new snapshot instead of downloading 56 GB and keeping a second copy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from launcher.weights import cache
from launcher.weights.join import join_parts
from launcher.weights.remote import RemoteFile
from launcher.weights.result import PullContext, PulledFile, PullResult
from launcher.weights.verify import VerifiedRecords, has_gguf_magic

log = logging.getLogger(__name__)


def output_path(ctx: PullContext, commit: str) -> Path:
    snapshots = ctx.repo_folder / "snapshots"
    output = cache.snapshot_folder(ctx.cache_dir, ctx.repo_id, commit) / ctx.source.join.output
    return cache.inside(snapshots, output)


def join_into_snapshot(
    ctx: PullContext, commit: str, files: list[PulledFile], records: VerifiedRecords
) -> Path:
    """Join the verified halves into the snapshot, record it, then drop the halves."""
    spec = ctx.source.join
    by_name = {f.name: f for f in files}
    parts = [by_name[name].path for name in spec.parts]
    output = output_path(ctx, commit)
    blobs = cache.inside(ctx.repo_folder, ctx.repo_folder / "blobs")
    join_parts(parts, output, tmp_dir=blobs, progress=ctx.progress)
    records.add_joined(spec.output, output, _part_digests(spec.parts, records))
    records.save()  # the halves go next: the joined file must be on record first
    for part in parts:
        cache.remove_cached_file(ctx.repo_folder, part)
    return output


def _part_digests(parts: list[str], records: VerifiedRecords) -> dict[str, str]:
    return {name: records.data["files"].get(name, {}).get("digest", "") for name in parts}


def joined_if_current(
    ctx: PullContext, commit: str, wanted: list[RemoteFile], records: VerifiedRecords
) -> PullResult | None:
    """The joined file, if one built from the hub's current halves is here: in this
    commit's snapshot, or in another commit's (then linked into this one)."""
    spec = ctx.source.join
    output = output_path(ctx, commit)
    parts = {f.name: f.digest.value if f.digest else "" for f in wanted}
    size = sum(f.size for f in wanted)
    if not records.is_joined(spec.output, output, parts) and not _recover(
        ctx, output, parts, records, size
    ):
        return None
    log.info("%s already joined", output)
    joined = PulledFile(spec.output, output.stat().st_size, True, output)
    return ctx.result(commit, output, [joined], joined=True)


def _recover(
    ctx: PullContext, output: Path, parts: dict[str, str], records: VerifiedRecords, size: int
) -> bool:
    """A joined file this commit has no record of: another commit's, or an unrecorded one."""
    if _link_from_other_commit(ctx, output, parts, records):
        return True
    if not unrecorded_ok(output, size):
        return False
    records.add_joined(ctx.source.join.output, output, parts)  # llmup home wiped; checks hold
    records.save()
    return True


def _link_from_other_commit(
    ctx: PullContext, output: Path, parts: dict[str, str], records: VerifiedRecords
) -> bool:
    """Hard-link a joined file another commit recorded with the same part digests."""
    name = ctx.source.join.output
    if not all(parts.values()):
        return False  # without the halves' digests there is nothing to compare
    for other in records.others():
        source = output_path(ctx, other.commit)
        if other.is_joined(name, source, parts):
            _link(source, output)
            records.add_joined(name, output, parts)
            records.save()
            log.info("%s: same halves as commit %s, linked its joined file", name, other.commit)
            return True
    return False


def _link(source: Path, dest: Path) -> None:
    """One file, two snapshot entries: a hard link (a move where links are impossible)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)  # dest is output_path's: inside the repository's snapshots
    try:
        os.link(source, dest)
    except OSError as exc:
        log.warning("cannot hard-link %s (%s); moving it instead", source, exc)
        os.replace(source, dest)


def unrecorded_ok(output: Path, size: int | None = None) -> bool:
    """A joined file without a record (llmup home wiped): the join's own checks, size and magic."""
    if not output.is_file() or (size is not None and output.stat().st_size != size):
        return False
    return has_gguf_magic(output)
