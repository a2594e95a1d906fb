"""A busy port is refused at start, with one line that names it and the way out.

gRPC binds its listening sockets with SO_REUSEPORT unless told otherwise
(``grpc.so_reuseport``), so a second ``chainrule serve`` on a port already in
use would start silently and take half the connections. A single-process
server binds without it; ``--workers`` needs it to share its port among its
own workers, so its parent first checks that nobody else holds the port.
"""
from __future__ import annotations

import errno
import socket


class PortInUse(OSError):
    """Another process listens on (or holds) the address a server was asked to serve on."""


def check_port_free(host: str, port: int) -> None:
    """Raise PortInUse when ``host:port`` is held by another socket (port 0 is always free).

    The probe binds as gRPC does (SO_REUSEADDR, so connections of a server that just stopped,
    left in TIME_WAIT, are no conflict) but without SO_REUSEPORT, so any socket bound there,
    listening or reserved, shared or not, is one. Other errors (an unknown host) are left to
    the bind that follows, which names them.
    """
    if port == 0:
        return
    try:
        found = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError:
        return
    for family, kind, proto, _, address in dict.fromkeys(found):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(busy_message(host, port)) from None


def busy_message(host: str, port: int) -> str:
    return (f"port {port} on {host} is already in use by another process (another chainrule serve still "
            f"running?); stop it, or serve on another port with --port (CHAINRULE_PORT)")
