"""API keys: who may call the proxy, and which sessions are whose.

Keys are compared as SHA-256 digests with `hmac.compare_digest` against every configured
key, so neither the length nor the position of a match shows in the timing. A session's
owner is a digest of the key too: the store never holds a key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Iterable
from pathlib import Path

from launcher.errors import InsecureBindError, InvalidApiKeyError, UsageError
from launcher.settings import ProxySettings

log = logging.getLogger(__name__)

ANONYMOUS = ""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def owner_of(key: str) -> str:
    """The owner id stored with a session: a hash of the key, never the key itself."""
    return hashlib.sha256(b"llmup-session-owner:" + key.encode("utf-8")).hexdigest()[:32]


KEYS_FILE_SETTING = "--api-key-file, LLMUP_API_KEYS_FILE or LLMUP_PROXY__API_KEYS_FILE"


def read_keys_file(path: Path) -> list[str]:
    """One key per line; blank lines and `#` comments are skipped. A file that cannot be
    read stops serve: starting without the keys someone meant to require would fail open."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(
            f"cannot read the API keys file {path}: {why}; fix the path in {KEYS_FILE_SETTING}"
        ) from exc
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def configured_keys(settings: ProxySettings) -> list[str]:
    """Every key the settings name: the list, then the file's. A keys file is a promise that
    keys are required, so one with no key in it (and no key given otherwise) is an error,
    not keyless mode."""
    keys = list(settings.api_keys)
    if settings.api_keys_file is not None:
        keys += read_keys_file(settings.api_keys_file)
        if not any(keys):
            raise UsageError(
                f"the API keys file {settings.api_keys_file} holds no key (one per line) and "
                "no other key is set; put a key in it, or set LLMUP_API_KEY"
            )
    return list(dict.fromkeys(k for k in keys if k))


class KeyRing:
    """The configured keys; with none, every caller is the same anonymous owner."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def owner(self, authorization: str | None) -> str:
        """The caller's owner id from an `Authorization: Bearer KEY` header, or 401."""
        if not self.enabled:
            return ANONYMOUS
        key = _bearer(authorization)
        if key is None:
            raise InvalidApiKeyError(
                "no API key: send it as `Authorization: Bearer KEY` (the openai client's "
                "api_key) or `x-api-key: KEY` (the anthropic client's)"
            )
        digest = _digest(key)
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise InvalidApiKeyError("invalid API key")
        return owner_of(key)

    def may_see(self, authorization: str | None) -> bool:
        """Whether the caller may see what only key holders see (always, without keys)."""
        try:
            self.owner(authorization)
        except InvalidApiKeyError:
            return False
        return True


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything: treat it as public


def check_bind(host: str, keys: Iterable[str], insecure_no_auth: bool = False) -> None:
    """Refuse to listen beyond this machine without an API key.

    `serve` calls this before binding: anyone who can reach the port could otherwise use
    the model and read every stored conversation.
    """
    if is_loopback(host) or any(keys):
        return
    if insecure_no_auth:
        log.warning("listening on %s without an API key: anyone who can reach it may use it", host)
        return
    raise InsecureBindError(
        f"refusing to listen on {host} without an API key: set one with "
        "LLMUP_API_KEY, LLMUP_API_KEYS or --api-key-file FILE, bind 127.0.0.1, "
        "or pass --insecure-no-auth if the network is trusted"
    )
