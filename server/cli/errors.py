"""How the ``chainrule`` command fails: one line on stderr, the next step, an exit code; no traceback.

Every subcommand lets its failures propagate; :func:`report` (called by
``main``) is the one place that turns them into a message and an exit code:

* 0: done.
* 1: the work failed: a server or client error (the typed ChainruleRpcError,
  whose message names the address and the next step), a file that cannot be
  read (graph, ``@file.npy``, token, certificate, ``.npz``), a graph file that
  is not a chainrule graph, a diagram that cannot be drawn.
* 2: the command line is wrong (argparse's usage errors, printed with the
  subcommand's usage; flags that do not go together; a bad CHAINRULE_* variable).
* 130: interrupted (Ctrl-C).
* 141 (128 + SIGPIPE, what a shell reports for a program killed by a closed
  pipe): stdout was closed before everything was written, as in
  ``chainrule ops --json | head -1``; nothing is printed about it.
"""
from __future__ import annotations

import os
import re
import sys

from chainrule.client.errors import ChainruleRpcError
from chainrule.client.render import RenderError
from chainrule.core.errors import PluginError

from .. import config as config_module

#: Exit codes (see the module docstring).
OK, FAILED, USAGE, INTERRUPTED, BROKEN_PIPE = 0, 1, 2, 130, 141


class CommandError(Exception):
    """A failure the command explains itself: ``message`` (with the next step) and ``exit_code``."""

    def __init__(self, message: str, exit_code: int = FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


#: What to do on the command line where a client error's message speaks of the Python API.
_CLI_HINTS = {
    "TLS_HANDSHAKE": "On the command line: --tls-ca names the CA, --tls-server-name the certificate's name, "
                     "--tls-cert/--tls-key a client certificate.",
    "CONNECTION_CLOSED": "On the command line: --tls (or --tls-ca) for a server with TLS, --tls-cert/--tls-key "
                         "for one that asks for a client certificate.",
}


def rpc_message(exc: ChainruleRpcError) -> str:
    """A client error's message, with the flags to use where it names the Python API."""
    message = exc.message.replace("(or use chainrule.server.LocalClient in-process)",
                                  "(`make run` in the repository), or work without a server: --local (ops: "
                                  "leave out --server)")
    cause = exc.metadata.get("cause", "")
    if cause == "CONNECT_FAILED" and re.search(r"verif|certificate|SSL|TLS", exc.metadata.get("grpc_message", "")):
        cause = "TLS_HANDSHAKE"  # a certificate gRPC refused (a name that does not match...)
    hint = _CLI_HINTS.get(cause)
    if hint:
        message = f"{message}. {hint}"
    if exc.reason == "SEED_REQUIRED" or (exc.field == "seed" and exc.reason == "SHAPE_MISMATCH"):
        message = (f"{message}. On the command line: --seed VALUE, a JSON list or @file.npy of the output's shape "
                   "(--seed '[1, 0, 0]' for the first element's gradient)")
    if exc.code.name == "UNAUTHENTICATED" and "--token-file" not in message:
        message = f"{message} (give the server's bearer token with --token-file PATH)"
    return message


def report(exc: BaseException) -> int:
    """Print ``exc`` as ``chainrule: error: ...`` and return its exit code; re-raise what is not ours
    (a bug keeps its traceback)."""
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(exc, BrokenPipeError):
        return broken_pipe()
    if isinstance(exc, CommandError):
        message, code = exc.message, exc.exit_code
    elif isinstance(exc, ChainruleRpcError):
        message, code = rpc_message(exc), FAILED
    elif isinstance(exc, RenderError):
        message, code = str(exc), FAILED
    elif isinstance(exc, PluginError):  # a plugin that cannot load, or a name conflict: say which
        message, code = exc.message, FAILED
    elif isinstance(exc, config_module.ConfigError):  # a bad CHAINRULE_* variable: like a usage error
        message, code = str(exc), USAGE
    else:
        raise exc
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())  # one line
    try:
        print(f"chainrule: error: {message}", file=sys.stderr)
    except BrokenPipeError:  # stderr closed too: nothing more to say
        pass
    return code


def broken_pipe() -> int:
    """stdout's reader went away: point stdout at devnull so that Python's own flush at exit cannot
    fail again (https://docs.python.org/3/library/signal.html#note-on-sigpipe), and exit 141."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (captured)
        pass
    return BROKEN_PIPE
