"""The connection flags of every subcommand that talks to a server, and the client they make.

One meaning per flag, whichever subcommand takes it:

``--server ADDR``         the server's address ("host:port", a ``dns:///`` target, or ``ipv4:a:p,b:p``)
``--local``               run in-process, without a server (eval, render, train)
``--token-file PATH``     a file holding the bearer token the server expects (its first line)
``--tls``                 TLS, checking the server against the system's roots
``--tls-ca PATH``         TLS, checking the server against this CA bundle (PEM)
``--tls-cert PATH``       with ``--tls-key``: a client certificate for mutual TLS (PEM)
``--tls-key PATH``        the client certificate's private key (PEM)
``--tls-server-name NAME`` the name the server's certificate is checked against (default: the address's host)

Any ``--tls-*`` flag implies ``--tls``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from chainrule.client import Client
from chainrule.client.channel import TLS

from ..local import LocalClient
from .errors import USAGE, CommandError

DEFAULT_SERVER = "127.0.0.1:50051"
_TLS_FILES = ("tls_ca", "tls_cert", "tls_key")


def add_connection_arguments(parser: argparse.ArgumentParser, *, local: str | None = "run in-process, without a server",
                             default_server: str | None = DEFAULT_SERVER) -> None:
    """Add --server (and --local, unless ``local`` is None), --token-file and the --tls flags to ``parser``."""
    parser.set_defaults(connection=True)  # check_connection_arguments applies (serve has a --token-file of its own)
    group = parser.add_argument_group("connection")
    where = group.add_mutually_exclusive_group()
    default = f" (default {default_server})" if default_server else ""
    where.add_argument("--server", default=None, metavar="ADDR", help=f"address of a chainrule server{default}")
    if local is not None:
        where.add_argument("--local", action="store_true", help=local)
    group.add_argument("--token-file", type=Path, default=None, metavar="PATH",
                       help="file holding the bearer token the server expects (sent on every call)")
    group.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CA roots")
    group.add_argument("--tls-ca", type=Path, default=None, metavar="PATH",
                       help="CA bundle (PEM) that signed the server's certificate; implies --tls")
    group.add_argument("--tls-cert", type=Path, default=None, metavar="PATH",
                       help="client certificate (PEM) for a server that requires mutual TLS; needs --tls-key")
    group.add_argument("--tls-key", type=Path, default=None, metavar="PATH",
                       help="the client certificate's private key (PEM); needs --tls-cert")
    group.add_argument("--tls-server-name", default=None, metavar="NAME",
                       help="name to check the server's certificate against (default: the address's host)")


def uses_tls(args: argparse.Namespace) -> bool:
    return bool(args.tls or args.tls_server_name or any(getattr(args, name) for name in _TLS_FILES))


def check_connection_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Usage errors (exit 2, with ``parser``'s usage) for connection flags that do not go together."""
    if not getattr(args, "connection", False):
        return
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together: a client certificate needs its private key")
    if getattr(args, "local", False) and (uses_tls(args) or args.token_file):
        parser.error("--local runs in-process: --token-file and the --tls flags are for --server")
    if not hasattr(args, "local") and args.server is None and (uses_tls(args) or args.token_file):
        parser.error("--token-file and the --tls flags are for --server ADDR (without it, the local plugins are listed)")


def read_file(path: Path, flag: str, what: str) -> bytes:
    """The bytes of a file a flag names, or a CommandError saying which flag and why."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CommandError(f"{flag} {path}: cannot read it ({exc.strerror or exc}); give {what}") from None


def read_token(path: Path) -> str:
    text = read_file(path, "--token-file", "a readable file holding the bearer token").decode("utf-8", "replace")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise CommandError(f"--token-file {path}: the file is empty; put the server's bearer token on its first line")
    return lines[0]


def tls_for(args: argparse.Namespace) -> TLS | None:
    if not uses_tls(args):
        return None
    ca, cert, key = (read_file(getattr(args, name), "--" + name.replace("_", "-"), "a readable PEM file")
                     if getattr(args, name) else None for name in _TLS_FILES)
    return TLS(ca=ca, cert=cert, key=key, server_name=args.tls_server_name)


def remote_client(args: argparse.Namespace) -> Client:
    """A Client for --server with the token and TLS the flags give."""
    token = read_token(args.token_file) if args.token_file else None
    try:
        return Client(args.server or DEFAULT_SERVER, tls=tls_for(args), token=token)
    except ValueError as exc:  # an address gRPC cannot use
        raise CommandError(f"--server {args.server}: {exc}", USAGE) from None


def client_for(args: argparse.Namespace) -> Client | LocalClient:
    """The client --local or --server (with its token and TLS) asks for; a server on 127.0.0.1:50051 by default."""
    return LocalClient() if getattr(args, "local", False) else remote_client(args)
