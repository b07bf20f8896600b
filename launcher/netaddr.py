"""Sockets and addresses: bind as uvicorn does, find a free port, write an HTTP URL.

Both the public listener (`launcher.listen`) and the backend launch (a private port on the
loopback address) use these; they know nothing of either.
"""

from __future__ import annotations

import errno
import socket

LOOPBACK = "127.0.0.1"


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, IPv4 or IPv6 as the address says, with SO_REUSEADDR
    as uvicorn sets it (so a port in TIME_WAIT after a crash binds, a listening one does not).

    Raises OSError (socket.gaierror for a name that does not resolve); the caller words it.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on right now (the kernel's pick); racy by nature, so the
    supervisor checks it again just before it starts the backend."""
    with bind_socket(host, 0) as sock:
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could bind host:port now; other bind errors are raised."""
    try:
        bind_socket(host, port).close()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return False
        raise
    return True


def accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port now (a connect and a close:
    microseconds, where an HTTP request costs a client and a server their parsing)."""
    try:
        socket.create_connection((host.strip("[]"), port), timeout=timeout).close()
    except OSError:
        return False
    return True


def http_url(host: str, port: int) -> str:
    """`http://host:port`, with an IPv6 address in brackets."""
    host = host.strip("[]")
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
