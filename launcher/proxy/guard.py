"""Who may reach the proxy at all, decided from the request headers before a byte of the body
is read: the API key, and without keys, the Host header.

- **The key first.** The key comes as `Authorization: Bearer KEY` (OpenAI's clients) or
  `x-api-key: KEY` (Anthropic's), on any route. A request without a configured key gets
  401 before its body is read, let alone parsed or validated, so an anonymous caller cannot
  make the proxy parse a deeply nested body or learn from a 400 what it would accept. Only
  `/health` and the chat page's static files (`/`, `/web/*`: the same bytes for everyone,
  no data) are open.
- **The Host check (keyless mode only).** Without keys, any web page the user visits could
  make the browser talk to `127.0.0.1:8000` through DNS rebinding: a name of the attacker's
  that first resolves to their server, then to 127.0.0.1. The browser then sends that name
  as `Host`. So without keys a request must be addressed to a name that cannot be rebound:
  `localhost` (and `*.localhost`, RFC 6761), an IP address (a page is only same-origin with an
  address if it came from there), this machine's own host name, or a name the user allows
  (`--allowed-host`, `LLMUP_PROXY__ALLOWED_HOSTS`; `*` allows any). Anything else is a 400
  `invalid_host`, the status Starlette's and Django's host checks answer. With keys no check
  is needed: a rebinding page cannot send the key (Ollama checks the Host header the same way
  for a loopback bind; Starlette's TrustedHostMiddleware cannot be used here: it takes no IP
  literals and cuts IPv6 addresses at their first colon).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any

from launcher.asgi import Scope, header, send_error
from launcher.errors import BadRequestError, InvalidApiKeyError
from launcher.proxy.auth import KeyRing

OWNER_STATE = "llmup_owner"  # where the caller's owner id waits for the routes
OPEN_PATHS = frozenset({"/", "/health"})
OPEN_PREFIX = "/web/"
ANY_HOST = "*"


def is_open(path: str) -> bool:
    """Routes that need no key: the health probe and the page's static files."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIX)


def host_name(value: str) -> str:
    """The name part of a Host header value, lower-case: no port, no IPv6 brackets, no
    trailing dot (`LOCALHOST.:8000` is `localhost`)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


class HostPolicy:
    """Which Host values a keyless proxy answers (see the module's docstring)."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self.allowed = {host_name(name) for name in allowed if name.strip()}
        self.allowed.add(host_name(socket.gethostname()))

    def allows(self, value: str | None) -> bool:
        if value is None:
            return True  # HTTP/1.0 without Host: no browser sends that
        name = host_name(value)
        if ANY_HOST in self.allowed or name in self.allowed:
            return True
        if name == "localhost" or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    def refusal(self, value: str) -> BadRequestError:
        shown = value if len(value) <= 100 else value[:100] + "..."
        return BadRequestError(
            f"the Host header {shown!r} is not a name of this server. Without API keys llmup "
            "answers only requests addressed to localhost, an IP address or this machine's "
            "name, so that other web sites cannot reach it through DNS rebinding; allow the "
            "name with `llmup serve --allowed-host NAME` (LLMUP_PROXY__ALLOWED_HOSTS), or set "
            "an API key",
            code="invalid_host",
        )


class AccessGuard:
    """ASGI middleware: the Host check (when `hosts` is given), then the key (when `keys`
    are configured) for every route that is not open; the owner id goes into the scope's
    state for the routes."""

    def __init__(
        self,
        app: Any,
        *,
        keys: KeyRing,
        hosts: HostPolicy | None,
        needs_key: Callable[[str], bool] = lambda path: not is_open(path),
    ) -> None:
        self.app, self.keys, self.hosts, self.needs_key = app, keys, hosts, needs_key

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = header(scope, b"host")
        if self.hosts is not None and not self.hosts.allows(host):
            await send_error(send, self.hosts.refusal(host or ""))
            return
        if self.keys.enabled and self.needs_key(scope["path"]):
            try:
                owner = self.keys.owner(authorization(scope))
            except InvalidApiKeyError as exc:
                await send_error(send, exc)
                return
            scope.setdefault("state", {})[OWNER_STATE] = owner
        await self.app(scope, receive, send)


def authorization(scope: Scope) -> str | None:
    """The caller's key as an `Authorization` value: that header, else Anthropic's
    `x-api-key` (what the Anthropic SDKs and Claude Code send), on every route."""
    value = header(scope, b"authorization")
    if value is None and header(scope, b"x-api-key"):
        value = f"Bearer {header(scope, b'x-api-key')}"
    return value


def host_policy(keys: KeyRing, allowed: Iterable[str]) -> HostPolicy | None:
    """The Host check a proxy with these keys needs: none with keys, else the policy."""
    return None if keys.enabled else HostPolicy(allowed)
