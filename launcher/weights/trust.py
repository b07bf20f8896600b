"""What a hub says, checked before any of it becomes part of a path.

The hub cache names blobs by checksum (`blobs/<sha256 or git blob id>`) and snapshots by
commit (`snapshots/<commit>/<file name>`), and llmup links and deletes there by those names.
They come from whatever answers at `HF_ENDPOINT`: a mirror, or someone posing as one. A
"sha256" of `../../../../home/me/.bashrc` would otherwise have llmup link to and, when the
content failed verification, delete that file. So:

- every value of a listing is checked where the listing is read (`launcher.weights.remote`
  builds its files through `check_*` only): a sha256 is 64 lower-case hex digits, a git blob
  id and a commit 40; a file name is a relative POSIX path with no `..`, `.` or empty part, no
  backslash and no control character. One bad value refuses the whole listing
  (`HubAnswerError`), before anything is written;
- the hub client's own download names its blob after the response's ETag header (and finds
  the commit in X-Repo-Commit), unchecked in huggingface_hub 2.4 (a hostile ETag wrote a file
  outside the cache here): `guard_hub_client` checks those headers on the client's responses
  before the client uses them;
- every file llmup creates, links or deletes in the cache goes through `cache.inside(folder,
  path)`: whatever got past the checks above (a cache changed by hand, a link pointing out)
  still cannot make llmup touch anything outside the repository's own cache folder.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from huggingface_hub import get_session

from launcher.catalog.pins import is_commit
from launcher.errors import HubAnswerError
from launcher.weights.cache import endpoint_label

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_NAME = 1000  # the hub's paths are far shorter; a bound keeps messages and paths sane
BLOB_HEADERS = ("x-linked-etag", "etag")  # the hub client names a blob after the first given
COMMIT_HEADER = "x-repo-commit"


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def is_blob_name(value: object) -> bool:
    """A name the hub gives a blob: an LFS file's sha256 or a git blob id."""
    return is_sha256(value) or (isinstance(value, str) and is_commit(value))


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 90 else text[:87] + "..."


def _refused(what: str, value: object, rule: str) -> HubAnswerError:
    return HubAnswerError(
        f"the hub at {endpoint_label()} sent {what} {_shown(value)}, which is not {rule}; "
        "refusing its answer (nothing was downloaded, written or deleted). Check HF_ENDPOINT: "
        "a real hub or mirror never sends this"
    )


def check_commit(value: object, *, what: str = "a commit") -> str:
    if not isinstance(value, str) or not is_commit(value):
        raise _refused(what, value, "a commit id (40 hex digits)")
    return value


def check_digest(algo: str, value: object, *, name: str | None = None) -> str:
    """A sha256 (64 hex digits) or a git blob id (40), as the listing gives it for `name`."""
    of = f" for {name!r}" if name else ""
    if algo == "sha256":
        if not is_sha256(value):
            raise _refused(f"the sha256{of}", value, "64 hex digits")
    elif not isinstance(value, str) or not is_commit(value):
        raise _refused(f"the git blob id{of}", value, "40 hex digits")
    return value


def check_repo_path(name: object) -> str:
    """A file name inside a repository: relative, POSIX, no `..`, `.` or empty parts."""
    rule = "a relative file name inside the repository"
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise _refused("the file name", name, rule)
    parts = name.split("/")
    bad = (
        name.startswith("/")
        or "\\" in name
        or _CONTROL.search(name)
        or any(part in ("", ".", "..") for part in parts)
        or PurePosixPath(name).is_absolute()
        or re.match(r"^[A-Za-z]:", name)
    )
    if bad:
        raise _refused("the file name", name, rule)
    return name


def check_size(value: object, *, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _refused(f"the size of {name!r}", value, "a byte count")
    return value


def _normalized_etag(value: str) -> str:
    """What huggingface_hub makes of an ETag before naming a blob after it."""
    return value.removeprefix("W/").strip('"')


def check_download_headers(response) -> None:
    """An httpx response hook: the headers the hub client builds cache paths from must be a
    commit and a checksum, on every answer about a file (`/resolve/`)."""
    headers = response.headers
    if COMMIT_HEADER in headers:
        check_commit(headers[COMMIT_HEADER], what="the X-Repo-Commit header")
    if "/resolve" not in response.request.url.path:
        return
    for name in BLOB_HEADERS:
        if name in headers:
            if not is_blob_name(_normalized_etag(headers[name])):
                raise _refused(f"the {name} header", headers[name], "a sha256 or git blob id")
            return


def guard_hub_client() -> None:
    """Make the hub client's current HTTP session check its download headers (once; a
    session the client makes anew later gets the check at the next call)."""
    client = get_session()
    hooks = client.event_hooks
    if check_download_headers not in hooks["response"]:
        client.event_hooks = {**hooks, "response": [*hooks["response"], check_download_headers]}
