"""Typed exceptions. Every message tells the user what to do next.

The CLI maps each class to an exit code: bad input is 2, "nothing fits" is 3,
everything else llmup anticipates is 1. Anything not derived from LlmupError is a bug.
"""

from __future__ import annotations


class LlmupError(Exception):
    """Base of every error llmup anticipates; `exit_code` is what the CLI returns."""

    exit_code = 1


class UsageError(LlmupError):
    """The user's input is wrong: unknown id, malformed file, impossible value."""

    exit_code = 2


class HardwareSnapshotError(UsageError):
    """A hardware snapshot file is unreadable or does not follow the schema."""


class CatalogError(UsageError):
    """An unknown model id, or a catalog data file that does not follow the schema."""


class ModelFileError(UsageError):
    """A local model file is missing, unreadable, or not a GGUF file llmup understands."""


class ProfileError(UsageError):
    """A machine profile is unknown, malformed, or names a setting llmup does not have."""


class DetectionError(LlmupError):
    """A hardware probe failed in a way that leaves the snapshot incomplete."""


class NothingFitsError(LlmupError):
    """No candidate fits the machine; carries the plan with the closest misses."""

    exit_code = 3

    def __init__(self, message: str, closest: list | None = None) -> None:
        super().__init__(message)
        self.closest = closest or []


class DownloadError(LlmupError):
    """Fetching weights from the hub failed: network, hub error, or a bad transfer."""


class AuthError(DownloadError):
    """The hub refused the request (401/403): the repo is gated or private, or the token is bad."""


class HubNotFoundError(DownloadError):
    """The repository, revision or file a plan names does not exist on the hub."""


class HubUnreachableError(DownloadError):
    """The hub could not be reached (network down, DNS, proxy); cached files may still serve."""


class ChecksumError(DownloadError):
    """A downloaded file does not match the hub's sha256; its blob has been deleted."""


class UnverifiableFileError(DownloadError):
    """The hub gives no checksum for a file, so its download could not be verified."""


class HubAnswerError(DownloadError):
    """The hub (or a mirror posing as one) answered with a checksum, commit, file name or
    header that cannot be what the hub's API defines, and that llmup would have used as part
    of a path; refused before anything was written or deleted."""


class UnsafePathError(DownloadError):
    """A file llmup was about to create, link or delete lies outside the repository's cache
    folder; nothing was done to it."""


class JoinError(DownloadError):
    """Concatenating split halves did not produce a valid GGUF file; the halves are kept."""


class DiskSpaceError(LlmupError):
    """Not enough free disk for the download; raised before any byte is written."""


class OfflineMissError(LlmupError):
    """Offline mode was asked for and a needed file is not in the local cache."""


class BackendError(LlmupError):
    """The model backend process failed: it would not start, or it kept crashing."""

    def __init__(self, message: str, *, log_path: str | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path


class BackendLoadError(BackendError):
    """The backend exited (or never answered) before it was ready.

    `kind` is one of LOAD_FAILURE_KINDS; `serve` falls back to the plan's next candidate
    on "out_of_memory" and stops with the message on every other kind.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str = "unknown",
        log_path: str | None = None,
        line: str | None = None,
        returncode: int | None = None,
    ) -> None:
        super().__init__(message, log_path=log_path)
        self.kind = kind
        self.line = line
        self.returncode = returncode


class BackendCrashError(BackendError):
    """The backend kept crashing after it had been ready, and the supervisor gave up."""


LOAD_FAILURE_KINDS = (
    "out_of_memory",
    "corrupt_model",
    "missing_dependency",
    "port_in_use",
    "timeout",
    "unknown",
)


class DockerRuntimeError(BackendError):
    """The docker runtime cannot run a backend: no engine, no SDK, no image, no GPU."""


class InsecureBindError(UsageError):
    """`serve` was asked to listen beyond this machine without an API key."""


class SessionStoreError(LlmupError):
    """The session store cannot be opened: a database that does not answer at start, a
    schema newer than this llmup knows, an address llmup cannot use."""


class ApiError(LlmupError):
    """A request an llmup HTTP server (the proxy or a worker) refuses or cannot serve,
    answered as an OpenAI-shaped error.

    `status` is the HTTP status, `code` OpenAI's machine-readable `error.code`, `param` the
    request field at fault; `headers` go on the response (Retry-After on 429 and 503).
    """

    status = 400
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or type(self).code
        self.headers = headers or {}
        self.status = status or type(self).status


class BadRequestError(ApiError):
    """The request is malformed or asks for something the server cannot do (400)."""


class ContextLengthError(BadRequestError):
    """The conversation cannot fit the model's context window under the current policy."""

    code = "context_length_exceeded"


class InvalidApiKeyError(ApiError):
    """No API key, or one that is not among the configured keys (401)."""

    status = 401
    code = "invalid_api_key"


class NotFoundError(ApiError):
    """An unknown model, session or route (404); never says whether another key owns it."""

    status = 404


class BodyTooLargeError(ApiError):
    """The request body exceeds the configured limit (413); it was never parsed."""

    status = 413
    code = "request_too_large"


class QueueFullError(ApiError):
    """Every slot of the bounded queue in front of the backend is taken (429)."""

    status = 429
    code = "rate_limit_exceeded"


class KeyLimitError(ApiError):
    """One API key reached one of its own limits (429): too many requests at once, too many
    sessions, or too many bytes of stored conversations; `code` says which."""

    status = 429


class StorageFullError(ApiError):
    """The session store's disk is full (507): the turn was not stored, nothing half-written."""

    status = 507
    code = "insufficient_storage"


class StoreUnavailableError(ApiError):
    """The session database cannot be reached or did not answer in time (503): nothing was
    stored; retry after Retry-After (service resumes by itself when it answers again)."""

    status = 503
    code = "sessions_store_unavailable"


class SessionConflictError(ApiError):
    """Another process sharing the session store (a second replica) changed the session
    while this turn was generated (409): this turn was not stored; send it again."""

    status = 409
    code = "session_conflict"


class BackendUnavailableError(ApiError):
    """The backend is loading, restarting or unreachable (503): retry after Retry-After."""

    status = 503
    code = "backend_unavailable"


class BackendDroppedError(BackendUnavailableError):
    """The backend closed the connection in the middle of a request: it died (503)."""


class BackendFailedError(ApiError):
    """The backend answered with a server error or an unreadable reply (502)."""

    status = 502
    code = "backend_error"
