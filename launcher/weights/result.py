"""What a pull returns (`PullResult`, one `PulledFile` per file) and what it works with
(`PullContext`, resolved once from the arguments and the environment)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from launcher.catalog.pins import Pins
from launcher.planning.plan import Source
from launcher.weights import cache

GB = 1_000_000_000


@dataclass(frozen=True)
class PulledFile:
    """One file of the pull. `cached`: it was already there before this pull."""

    name: str
    size: int | None
    cached: bool
    path: Path | None = None


@dataclass(frozen=True)
class PullResult:
    """Where the weights are and what it took; `path` is what the backend loads."""

    repo_id: str | None
    revision: str
    commit: str | None
    path: Path | None
    files: tuple[PulledFile, ...]
    downloaded_bytes: int
    cache_dir: Path
    dry_run: bool = False
    offline: bool = False
    joined: bool = False
    notes: tuple[str, ...] = field(default=())
    catalog_bytes: int | None = None  # offline dry run: the catalog's total, sizes unknown
    pinned: bool = False  # `commit` came from the pins, not from where the branch points now
    unverified: tuple[str, ...] = ()  # files accepted without a checksum (--no-verify)

    @property
    def total_bytes(self) -> int:
        if self.catalog_bytes is not None and any(f.size is None for f in self.files):
            return self.catalog_bytes
        return sum(f.size or 0 for f in self.files)

    @property
    def missing_bytes(self) -> int:
        """Bytes a real pull would still fetch."""
        return self.total_bytes - sum(f.size or 0 for f in self.files if f.cached)

    def to_dict(self) -> dict:
        """JSON-ready, for `llmup pull --json`."""
        files = [
            {
                "name": f.name,
                "size": f.size,
                "cached": f.cached,
                "path": str(f.path) if f.path else None,
            }
            for f in self.files
        ]
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "path": str(self.path) if self.path else None,
            "files": files,
            "total_bytes": self.total_bytes,
            "missing_bytes": self.missing_bytes,
            "downloaded_bytes": self.downloaded_bytes,
            "cache_dir": str(self.cache_dir),
            "dry_run": self.dry_run,
            "offline": self.offline,
            "joined": self.joined,
            "pinned": self.pinned,
            "unverified": list(self.unverified),
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """The closing lines the CLI prints."""
        if self.dry_run:
            head = (
                f"dry run: {len(self.files)} file(s), {self.total_bytes / GB:.2f} GB, "
                f"{self.missing_bytes / GB:.2f} GB to download"
            )
        else:
            head = (
                f"{len(self.files)} file(s), {self.total_bytes / GB:.2f} GB "
                f"({self.downloaded_bytes / GB:.2f} GB downloaded)"
            )
        where = self.path or "(known once the hub has been reached)"
        lines = [head, f"model: {where}", f"cache: {self.cache_dir}"]
        if self.commit and self.repo_id:
            how = "pinned; `llmup pins refresh` moves it" if self.pinned else self.revision
            lines.append(f"commit: {self.commit} ({how})")
        if self.unverified:
            lines.append(f"NOT verified (--no-verify): {', '.join(self.unverified)}")
        return "\n".join(lines + list(self.notes))


@dataclass(frozen=True)
class PullContext:
    """Everything one pull needs, resolved once from arguments and the environment."""

    source: Source
    repo_id: str
    cache_dir: Path
    home: Path
    token: str | None
    progress: bool
    verify: bool = True
    pins: Pins | None = None
    pin: str | None = None  # the pinned commit of source.revision, None when not pinned

    @property
    def revision(self) -> str:
        """What to fetch: the pinned commit, else the plan's revision (a branch)."""
        return self.pin or self.source.revision

    @property
    def repo_folder(self) -> Path:
        return cache.repo_folder(self.cache_dir, self.repo_id)

    def result(
        self, commit: str | None, path: Path | None, files: list[PulledFile], **kw
    ) -> PullResult:
        downloaded = sum(f.size or 0 for f in files if not f.cached)
        kw.setdefault("downloaded_bytes", downloaded)
        kw.setdefault("pinned", self.pin is not None)
        return PullResult(
            repo_id=self.repo_id,
            revision=self.source.revision,
            commit=commit,
            path=path,
            files=tuple(files),
            cache_dir=self.cache_dir,
            **kw,
        )
