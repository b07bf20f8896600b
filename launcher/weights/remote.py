"""What the hub holds for a source: the commit, and each file's size and checksum.

One `model_info(files_metadata=True)` call answers both the GGUF case (exact names) and the
GPTQ case (allow-patterns over a branch), and fixes the commit every later download uses,
so metadata and bytes always come from the same revision. Not every server that speaks the
hub's API puts checksums there: a mirror (olah serving a local repository) lists files by
name only, but answers `paths-info` (`HfApi.get_paths_info(..., expand=True)`) with each
LFS file's sha256. Files the listing gives no checksum for are asked about there; a file
that still has none is marked unverifiable, and `pull` refuses it unless told not to verify.
Every value of the listing is checked here, as it is read (`listed_file`, `Listing`): the
names, checksums and commit become parts of cache paths (`launcher.weights.trust`).
Hub exceptions are translated here into llmup errors whose messages say what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from huggingface_hub import HfApi
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

from launcher.errors import (
    AuthError,
    DownloadError,
    HubNotFoundError,
    HubUnreachableError,
    OfflineMissError,
)
from launcher.planning.plan import Source
from launcher.weights.cache import endpoint_label, hub_endpoint
from launcher.weights.trust import (
    check_commit,
    check_digest,
    check_repo_path,
    check_size,
    guard_hub_client,
)
from launcher.weights.verify import Digest

log = logging.getLogger(__name__)

_GLOB = set("*?[")


@dataclass(frozen=True)
class RemoteFile:
    """One file of the listing; only made by `listed_file`, so its name is a safe relative
    path and its digest a checksum (both checked again here, whoever builds one)."""

    name: str
    size: int
    digest: Digest | None  # sha256 for LFS files, the git blob id for small files
    lfs: bool

    def __post_init__(self) -> None:
        check_repo_path(self.name)
        check_size(self.size, name=self.name)


@dataclass(frozen=True)
class Listing:
    commit: str
    files: list[RemoteFile]

    def __post_init__(self) -> None:
        check_commit(self.commit)


def listed_file(
    name: object, size: object, *, sha256: object = None, blob_id: object = None
) -> RemoteFile:
    """The one way a listing's entry becomes a RemoteFile: every value checked, with the
    file's name in the message (an LFS sha256 wins over the blob id, as the hub means it)."""
    name = check_repo_path(name)
    size = check_size(size if size is not None else 0, name=name)
    if sha256 is not None:
        digest = Digest("sha256", check_digest("sha256", sha256, name=name))
        return RemoteFile(name, size, digest, lfs=True)
    if blob_id:
        digest = Digest("git-sha1", check_digest("git-sha1", blob_id, name=name))
        return RemoteFile(name, size, digest, lfs=False)
    return RemoteFile(name, size, None, lfs=False)


def is_pattern_selection(files: list[str]) -> bool:
    """GPTQ plans list allow-patterns (`*.safetensors`); GGUF plans list exact names."""
    return any(_GLOB & set(name) for name in files)


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of whichever HTTP library this huggingface_hub uses."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            lib = __import__(module)
            errors += [lib.ConnectError, lib.TimeoutException, lib.RemoteProtocolError]
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


NETWORK_ERRORS = _network_errors()


@contextmanager
def hub_errors(source: Source, filename: str | None = None) -> Iterator[None]:
    """Translate huggingface_hub exceptions into llmup errors with a next step."""
    try:
        yield
    except OfflineModeIsEnabled as exc:
        raise OfflineMissError(
            f"HF_HUB_OFFLINE is set, so {filename or source.repo_id} cannot be fetched; "
            "unset it or run `llmup pull --offline` to use only the cache"
        ) from exc
    except HfHubHTTPError as exc:
        raise _http_error(exc, source, filename) from exc
    except (LocalEntryNotFoundError, *NETWORK_ERRORS) as exc:
        raise HubUnreachableError(_unreachable(source, exc)) from exc


def _unreachable(source: Source, exc: BaseException) -> str:
    return (
        f"cannot reach the hub at {endpoint_label()} for {source.repo_id} "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
        "check the network, or use --offline if the files are already cached"
    )


def _http_error(exc: HfHubHTTPError, source: Source, filename: str | None) -> DownloadError:
    status = exc.response.status_code if exc.response is not None else None
    repo, rev = source.repo_id, source.revision
    if isinstance(exc, GatedRepoError) or status in (401, 403):
        return AuthError(_auth_message(repo, status, isinstance(exc, GatedRepoError)))
    if isinstance(exc, RepositoryNotFoundError):
        return HubNotFoundError(
            f"repository {repo} does not exist on {endpoint_label()}; "
            "check source.repo_id in the plan"
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubNotFoundError(
            f"revision {rev!r} does not exist in {repo}; "
            "check source.revision (the GPTQ branch) in the plan"
        )
    if isinstance(exc, EntryNotFoundError):
        return HubNotFoundError(f"file {filename} is not in {repo} at revision {rev}")
    return DownloadError(
        f"the hub answered HTTP {status} for {repo}: {str(exc).splitlines()[0]}; try again later"
    )


def _auth_message(repo: str | None, status: int | None, gated: bool) -> str:
    why = "is gated" if gated else "needs a login (it is private, gated or does not exist)"
    if status == 403:
        why = "refuses this token (no access, or the license is not accepted)"
    return (
        f"the hub answered {status} for {repo}: the repository {why}. Log in with "
        "`hf auth login` or set HF_TOKEN to a token with read access, and accept the "
        f"model's license on its page ({endpoint_label()}/{repo})"
    )


def fetch_listing(source: Source, token: str | None, revision: str | None = None) -> Listing:
    """The commit of `revision` (default `source.revision`) and the files of the source,
    with sizes and checksums (from paths-info for files the listing gives none for)."""
    guard_hub_client()
    api = HfApi(endpoint=hub_endpoint(), token=token)
    with hub_errors(source):
        info = api.model_info(
            source.repo_id, revision=revision or source.revision, files_metadata=True
        )
    if not info.sha:
        raise DownloadError(f"the hub at {endpoint_label()} gave no commit for {source.repo_id}")
    commit = check_commit(info.sha)
    files = select(source, [_remote_file(s) for s in info.siblings or []])
    return Listing(commit=commit, files=_with_checksums(api, source, commit, files))


def commit_of(repo_id: str, revision: str, token: str | None = None) -> str:
    """The commit `revision` of `repo_id` points to now (what `llmup pins refresh` pins)."""
    guard_hub_client()
    api = HfApi(endpoint=hub_endpoint(), token=token)
    with hub_errors(Source(repo_id=repo_id, revision=revision)):
        sha = api.model_info(repo_id, revision=revision).sha
    if not sha:
        raise DownloadError(f"the hub at {endpoint_label()} gave no commit for {repo_id}")
    return check_commit(sha)


def _remote_file(sibling) -> RemoteFile:
    if sibling.lfs is not None:
        return listed_file(sibling.rfilename, sibling.lfs.size, sha256=sibling.lfs.sha256)
    return listed_file(sibling.rfilename, sibling.size, blob_id=sibling.blob_id)


def _with_checksums(
    api: HfApi, source: Source, commit: str, files: list[RemoteFile]
) -> list[RemoteFile]:
    """Fill in, from paths-info, the size and checksum of files listed without one."""
    bare = [f.name for f in files if f.digest is None]
    if not bare:
        return files
    try:
        with hub_errors(source):
            infos = api.get_paths_info(source.repo_id, bare, revision=commit, expand=True)
    except DownloadError as exc:  # a server without paths-info: the files stay bare
        log.info("the hub at %s has no paths-info for %s: %s", endpoint_label(), bare, exc)
        return files
    found = {i.path: _from_path_info(i) for i in infos if getattr(i, "size", None) is not None}
    return [found.get(f.name, f) if f.digest is None else f for f in files]


def _from_path_info(info) -> RemoteFile:
    if info.lfs is not None:
        return listed_file(info.path, info.lfs.size, sha256=info.lfs.sha256)
    return listed_file(info.path, info.size, blob_id=info.blob_id)


def select(source: Source, files: list[RemoteFile]) -> list[RemoteFile]:
    """The files of the plan: every exact name must exist; patterns must match something."""
    by_name = {f.name: f for f in files}
    if not is_pattern_selection(source.files):
        missing = [n for n in source.files if n not in by_name]
        if missing:
            raise HubNotFoundError(
                f"file {missing[0]} is not in {source.repo_id} at revision "
                f"{source.revision}; check source.files in the plan"
            )
        return [by_name[n] for n in source.files]
    chosen = list(filter_repo_objects(files, allow_patterns=source.files, key=lambda f: f.name))
    if not chosen:
        raise HubNotFoundError(
            f"no file of {source.repo_id} at revision {source.revision} matches {source.files}"
        )
    return chosen
