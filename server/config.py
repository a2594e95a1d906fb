"""Server settings: one dataclass, filled from defaults, environment and flags.

Every setting has a safe default, an environment variable ``CHAINRULE_<NAME>``
and a ``--<name>`` flag (flags win over the environment).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Mapping, Sequence

from chainrule.core import Limits
from chainrule.wire.shared_memory import directory_problem

MiB = 1 << 20
#: gRPC takes message limits as C ints, and protobuf refuses messages of 2 GiB.
MAX_GRPC_MESSAGE_BYTES = (1 << 31) - 1


@dataclass
class ServerConfig:
    """Everything ``create_server`` needs to know. Defaults are safe for a shared host."""

    host: str = "127.0.0.1"
    port: int = 50051
    #: Largest request or response message. 0 (the default): as large as the memory budget
    #: (``max_memory_bytes``), at most 2 GiB - 1, gRPC's ceiling: a call that fits the budget is
    #: never refused for its size on the wire (see :attr:`message_limit`).
    max_message_bytes: int = 0
    max_nodes: int = 1_000_000
    max_tensor_elements: int = 1 << 27
    #: Bytes the values, gradients, workspace and response of one request may take, and of all the
    #: requests in progress together (checked from shape inference, before work).
    max_memory_bytes: int = 2 << 30
    #: Calls served at once; more get RESOURCE_EXHAUSTED at once instead of queueing.
    max_concurrent: int = 16
    #: Compute time cap per request, applied even when the client sets no deadline.
    max_compute_seconds: float = 60.0
    #: The same cap for one Optimize call (a whole training run).
    max_training_seconds: float = 3600.0
    #: How long one EvaluateStream call may stay open.
    max_stream_seconds: float = 600.0
    #: EvaluateStream calls open at once; more are refused at once (RESOURCE_EXHAUSTED). An open
    #: stream holds a thread, and an admission slot only while it computes an input set, so
    #: streams that wait for their client's next message never keep other calls from running.
    max_streams: int = 128
    #: How long an EvaluateStream call may wait for the client's next message (its first one
    #: included) before it is ended: a stream that sends nothing gives its thread back.
    stream_idle_seconds: float = 30.0
    #: Seconds in-flight calls get to finish on SIGTERM/SIGINT.
    grace_seconds: float = 10.0
    graph_cache_size: int = 256
    reflection: bool = True
    #: Plugins to load (None: all installed), to leave out, and to prefer on a name conflict.
    plugins: list[str] | None = None
    disable_plugins: list[str] = field(default_factory=list)
    prefer: list[str] = field(default_factory=list)
    #: Compare the vjp of every operator of a third-party plugin with finite differences at
    #: start-up and refuse those that fail (built-ins are checked by chainrule's test suite, not here).
    check_operators: bool = True
    #: Where verdicts are kept per (distribution, version, operator), so a restart checks nothing
    #: again. Empty: ``$XDG_CACHE_HOME/chainrule/checks.json`` (``~/.cache/chainrule/checks.json``);
    #: ``off``: no cache.
    check_cache_file: str = ""
    log_level: str = "INFO"
    #: Keep freed large blocks in the heap for the next request, in one arena for all threads
    #: (glibc only; see memory.py).
    tune_malloc: bool = True
    #: Worker processes sharing the port through SO_REUSEPORT (see workers.py); 1 serves in-process.
    workers: int = 1
    #: Port of the Prometheus metrics endpoint (on ``host``); 0 turns metrics off.
    metrics_port: int = 0
    #: Close each client connection after this many seconds (0: never), so that clients
    #: balancing over DNS re-resolve and find new replicas (see docs/deploy.md).
    max_connection_age_seconds: float = 0.0
    #: PEM certificate chain and private key of the server: both set turns TLS on.
    tls_cert: str = ""
    tls_key: str = ""
    #: PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS).
    tls_client_ca: str = ""
    #: File of accepted bearer tokens, one per line; when set, every call needs
    #: ``authorization: Bearer <token>`` metadata, else UNAUTHENTICATED.
    token_file: str = ""
    #: With a token file: health checks and reflection still answer without a token
    #: (load-balancer and Kubernetes probes cannot send one). False guards them too.
    open_health_and_reflection: bool = True
    #: Let clients on this host, running as this user, exchange large tensors through files of a
    #: shared-memory directory instead of sending them (see chainrule.wire.shared_memory); the
    #: directory is advertised in ServerInfo. False (``--no-shared-memory``): every tensor travels
    #: in the messages.
    shared_memory: bool = True
    #: That directory. Empty (the default): a private one the server makes at start (randomly
    #: named, mode 0700, under /dev/shm when it is writable, else the temp dir) and removes with
    #: its files when it stops (see grpc_server.PrivateDirectory). A path (``/dev/shm/chainrule``,
    #: say): that directory, created (mode 0700) if missing and left in place at stop; it must be
    #: this user's and closed to others.
    shared_memory_dir: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def message_limit(self) -> int:
        """The largest message this server receives or sends, in bytes."""
        if self.max_message_bytes:
            return self.max_message_bytes
        return min(self.max_memory_bytes, MAX_GRPC_MESSAGE_BYTES)

    def validate(self) -> "ServerConfig":
        """Raise ConfigError for settings no server can run with (a zero limit, a bad port...)."""
        problems = [
            f"{name} must be at least {low} (got {getattr(self, name)})"
            for name, low in (("max_concurrent", 1), ("max_streams", 1), ("graph_cache_size", 1), ("max_nodes", 1),
                              ("workers", 1), ("max_tensor_elements", 1), ("max_memory_bytes", 1))
            if getattr(self, name) < low
        ]
        if self.max_message_bytes != 0 and not 1024 <= self.max_message_bytes <= MAX_GRPC_MESSAGE_BYTES:
            problems.append(f"max_message_bytes must be 0 (derived from max_memory_bytes) or from 1024 to "
                            f"{MAX_GRPC_MESSAGE_BYTES} (got {self.max_message_bytes})")
        problems += [f"{name} must be positive (got {getattr(self, name)})"
                     for name in ("max_compute_seconds", "max_training_seconds", "max_stream_seconds",
                                  "stream_idle_seconds")
                     if not getattr(self, name) > 0]
        problems += [f"{name} must be a port number from 0 to 65535 (got {getattr(self, name)})"
                     for name in ("port", "metrics_port") if not 0 <= getattr(self, name) <= 65535]
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            problems.append(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL (got {self.log_level!r})")
        if self.shared_memory_dir and not self.shared_memory:
            problems.append(f"shared_memory_dir {self.shared_memory_dir!r} is set, but shared_memory is off; leave "
                            "one out (--no-shared-memory alone turns shared memory off)")
        elif self.shared_memory_dir:
            problem = directory_problem(self.shared_memory_dir)
            if problem:
                problems.append(problem)
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def limits(self) -> Limits:
        return Limits(max_nodes=self.max_nodes, max_tensor_elements=self.max_tensor_elements,
                      max_memory_bytes=self.max_memory_bytes)


_LISTS = {"plugins", "disable_plugins", "prefer"}


class ConfigError(ValueError):
    """A setting from the environment that cannot be read; names the variable."""


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse(name: str, text: str, kind: type) -> object:
    if name in _LISTS:
        return [part.strip() for part in text.split(",") if part.strip()]
    variable = "CHAINRULE_" + name.upper()
    if kind is bool:
        word = text.strip().lower()
        if word not in _TRUE + _FALSE:
            raise ConfigError(f"{variable}={text!r}: expected one of {', '.join(_TRUE + _FALSE)}")
        return word in _TRUE
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{variable}={text!r}: expected {'a whole number' if kind is int else 'a number'}") from None


#: ``chainrule serve --help``: each setting's group and description, in the order shown. Every field
#: of ServerConfig has one (tests/test_command_line.py checks it); docs/deploy.md tells the whole story.
SETTINGS_HELP: dict[str, tuple[str, str]] = {
    "host": ("listening", "address to listen on; 0.0.0.0 for every interface"),
    "port": ("listening", "port to listen on; 0 picks a free one (printed at start)"),
    "workers": ("listening", "worker processes sharing the port (SO_REUSEPORT), about one per core; "
                             "1 serves in this process"),
    "max_connection_age_seconds": ("listening", "close each client connection after this many seconds (0: never), "
                                                "so that clients balancing over DNS find new replicas"),
    "grace_seconds": ("listening", "seconds in-flight calls get to finish on SIGTERM or SIGINT"),
    "max_message_bytes": ("limits", "largest request or response message; 0: the memory budget "
                                    "(--max-memory-bytes), at most 2 GiB - 1"),
    "max_nodes": ("limits", "most operator nodes in one graph"),
    "max_tensor_elements": ("limits", "most elements in one tensor"),
    "max_memory_bytes": ("limits", "bytes the values, gradients, temporaries and response of one request may "
                                   "take, and of all requests in progress together; checked before work"),
    "max_concurrent": ("limits", "calls served at once; more are refused at once (RESOURCE_EXHAUSTED), not queued"),
    "max_compute_seconds": ("limits", "compute time of one Evaluate call, or of one input set of a stream"),
    "max_training_seconds": ("limits", "time of one Optimize call (a whole training run)"),
    "max_stream_seconds": ("limits", "how long one EvaluateStream call may stay open"),
    "max_streams": ("limits", "EvaluateStream calls open at once; more are refused at once (RESOURCE_EXHAUSTED); "
                              "a stream takes an admission slot only while it computes"),
    "stream_idle_seconds": ("limits", "how long an EvaluateStream call may wait for the client's next message "
                                      "before it is ended (DEADLINE_EXCEEDED)"),
    "graph_cache_size": ("limits", "compiled graphs kept for graph_id requests (least recently used go first)"),
    "plugins": ("plugins", "load only these plugins (default: every installed one)"),
    "disable_plugins": ("plugins", "leave these plugins out"),
    "prefer": ("plugins", "plugins that win when two provide the same operator name"),
    "check_operators": ("plugins", "check each third-party operator's gradient against finite differences at "
                                   "start and refuse those that fail"),
    "check_cache_file": ("plugins", "where gradient-check verdicts are kept across restarts; empty: "
                                    "~/.cache/chainrule/checks.json; off: no cache"),
    "tls_cert": ("security", "the server's PEM certificate chain; with --tls-key, serve TLS"),
    "tls_key": ("security", "the server's PEM private key"),
    "tls_client_ca": ("security", "PEM CA bundle: clients must present a certificate it signed (mutual TLS)"),
    "token_file": ("security", "file of accepted bearer tokens, one per line: every call then needs one"),
    "open_health_and_reflection": ("security", "with --token-file, health checks and reflection still answer "
                                               "without a token (for probes that cannot send one)"),
    "shared_memory": ("shared memory", "let clients on this host that run as this user exchange large tensors "
                                       "through files instead of the messages"),
    "shared_memory_dir": ("shared memory", "the directory for it (created with mode 0700 if missing, kept at "
                                           "stop); default: a private one made at start (in /dev/shm when "
                                           "writable) and removed at stop"),
    "reflection": ("operations", "serve gRPC reflection (grpcurl, grpcui)"),
    "metrics_port": ("operations", "port of the Prometheus /metrics endpoint on --host; 0: off"),
    "log_level": ("operations", "DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    "tune_malloc": ("operations", "keep freed large blocks for the next request, in one malloc arena (glibc); faster large tensors"),
}
_METAVARS = {"host": "ADDR", "log_level": "LEVEL", "port": "PORT", "metrics_port": "PORT"}
_GROUP_TITLES = {"listening": "listening and processes", "limits": "limits (per request unless said)",
                 "plugins": "plugins and gradient checks", "security": "transport security and authentication",
                 "shared memory": "same-host clients", "operations": "operations"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per setting, described and grouped (defaults come from the environment,
    then the dataclass)."""
    defaults = ServerConfig()
    groups = {key: parser.add_argument_group(title) for key, title in _GROUP_TITLES.items()}
    described = {f.name: f for f in fields(ServerConfig)}
    names = [name for name in SETTINGS_HELP if name in described]
    names += [name for name in described if name not in SETTINGS_HELP]  # (a new setting not described yet)
    for name in names:
        group_key, text = SETTINGS_HELP.get(name, ("operations", ""))
        group = groups[group_key]
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        env = "CHAINRULE_" + name.upper()
        if name in _METAVARS:
            metavar = _METAVARS[name]
        elif name.endswith(("_file", "_dir", "_cert", "_key", "_ca")):
            metavar = "PATH"
        else:
            metavar = {int: "N", float: "SECONDS" if name.endswith("_seconds") else "N"}.get(type(default), "TEXT")
        if name in _LISTS:
            group.add_argument(flag, default=None, metavar="NAMES", help=f"{text}; comma-separated (env {env})")
        elif isinstance(default, bool):
            group.add_argument(flag, default=None, action=argparse.BooleanOptionalAction,
                               help=f"{text} (env {env}; default {'on' if default else 'off'})")
        else:
            shown = f"; default {default}" if default not in ("", None) else ""
            group.add_argument(flag, default=None, type=type(default), metavar=metavar,
                               help=f"{text} (env {env}{shown})")


def from_sources(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> ServerConfig:
    """Build a config from the dataclass defaults, then the environment, then flags."""
    env = os.environ if env is None else env
    config = ServerConfig()
    hints = {f.name: type(getattr(config, f.name)) for f in fields(ServerConfig)}
    for name, kind in hints.items():
        text = env.get("CHAINRULE_" + name.upper())
        if text:
            setattr(config, name, _parse(name, text, kind))
        flag_value = getattr(args, name, None) if args is not None else None
        if flag_value is not None:
            setattr(config, name, _parse(name, flag_value, kind) if name in _LISTS else flag_value)
    return config.validate()


def plugin_filters(config: ServerConfig) -> dict[str, Sequence[str] | None]:
    return {"only": config.plugins, "disable": config.disable_plugins or None, "prefer": config.prefer}
