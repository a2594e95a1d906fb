"""The client's gRPC channel: target, load balancing, retries, TLS and bearer token.

Several replicas are reached through gRPC's own machinery, not home-made
code: the target names them all (a list of IP addresses becomes an
``ipv4:``/``ipv6:`` target; a ``dns:///name:port`` target resolves to every
address of a name, such as a Kubernetes headless service), and the service
config asks for the ``round_robin`` policy, which keeps a connection to each
and spreads calls over them. Calls that are safe to repeat (all the unary
ones: evaluation is a pure function of the request, and registration is keyed
by content hash) are retried by gRPC when a replica is unavailable or shutting
down, so a replica going away gracefully costs no failed call. A replica
that crashes mid-call costs none either: gRPC retries a call until the server
has sent response headers, which a chainrule server sends only with a unary
call's answer, and keeps each retryable request for that long
(``grpc.per_rpc_retry_buffer_size``, sized by the Client for its message
limit; gRPC's default of 256 KiB gives up retrying any larger request). The
streaming calls are not retried (an Optimize run is not repeated behind its
caller's back). A lost connection is re-established after 100 ms, not gRPC's
default of 1 s, so that the retries, spread over a few hundred milliseconds,
find a live server. A call whose server died while sending the answer (after
its headers) is past gRPC's retries: the Client sends it once more itself.
"""
from __future__ import annotations

import collections
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import grpc

SERVICE = "chainrule.v1.Chainrule"
#: Methods gRPC may retry: repeating them changes nothing on the server.
IDEMPOTENT_METHODS = ("Evaluate", "RegisterGraph", "ListOperators", "ServerInfo", "Derive")  # pure functions of the request

#: round_robin over every address of the target, and retries of idempotent calls (gRPC takes it
#: as JSON text: open_channel serializes it, so `import chainrule.client` does not load json).
SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": SERVICE, "method": m} for m in IDEMPOTENT_METHODS],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.05s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            # CANCELLED too: a server shutting down answers calls it had received but not yet
            # started with CANCELLED rather than UNAVAILABLE (grpc/grpc#41785). A call the client
            # itself cancels is never retried, so only the server's CANCELLED is.
            "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
        },
    }],
}


#: Reconnect backoff of a lost connection (gRPC's default is 1 s): a replica or worker that died
#: is replaced by a live one (kernel's SO_REUSEPORT, round_robin) within the retries' backoffs.
INITIAL_RECONNECT_BACKOFF_MS = 100
#: What a retried call's request carries besides its message (metadata: path, deadline, token...).
RETRY_METADATA_ALLOWANCE = 64 << 10


def retry_buffer_bytes(max_message_bytes: int) -> int:
    """``grpc.per_rpc_retry_buffer_size`` for a channel that sends messages up to ``max_message_bytes``:
    every request that may be sent may be retried (gRPC counts its metadata too; a C int)."""
    return min(max_message_bytes + RETRY_METADATA_ALLOWANCE, (1 << 31) - 1)


@dataclass(frozen=True)
class TLS:
    """How to check the server, and what to show it. PEM files by path, or PEM bytes.

    ``ca``: the CA bundle that signed the server's certificate (None: the
    system's roots). ``cert``/``key``: a client certificate for servers that
    require one (mutual TLS). ``server_name``: the name to check the server's
    certificate against, when it differs from the target's host.
    """

    ca: str | bytes | None = None
    cert: str | bytes | None = None
    key: str | bytes | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS: a client certificate needs both cert and key")
        return grpc.ssl_channel_credentials(_pem(self.ca), _pem(self.key), _pem(self.cert))


def _pem(source: str | bytes | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def target_for(address: str | Sequence[str]) -> str:
    """One gRPC target for one address, a ready-made target, or a list of IP:port addresses."""
    if isinstance(address, str):
        return address
    addresses = list(address)
    if not addresses:
        raise ValueError("no address given")
    if len(addresses) == 1:
        return addresses[0]
    families = {_family(a) for a in addresses}
    if None in families or len(families) > 1:
        raise ValueError(
            f"several addresses must all be IPv4 'a.b.c.d:port' or all IPv6 '[::1]:port' literals, got {addresses}; "
            "for host names use one 'dns:///name:port' target whose DNS records list the replicas"
        )
    return f"{families.pop()}:{','.join(addresses)}"


def _family(address: str) -> str | None:
    ip = address_ip(address)
    return None if ip is None else "ipv4" if ip.version == 4 else "ipv6"


def address_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of an 'IP:port' address ('127.0.0.1:50051', '[::1]:50051'); None for a host name or
    an address without a port."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return None
    try:
        return ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        return None


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                          "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call, streaming ones included."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [*(details.metadata or ()), self._entry]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def open_channel(
    address: str | Sequence[str],
    *,
    options: Sequence[tuple[str, Any]] = (),
    credentials: grpc.ChannelCredentials | None = None,
    tls: bool | TLS | None = None,
    token: str | None = None,
) -> grpc.Channel:
    """A channel to ``address`` with round_robin and retries (unless ``options`` set a service config).

    ``tls=True`` checks the server against the system's roots; a :class:`TLS`
    says more. ``credentials`` (ready-made gRPC credentials) wins over ``tls``.
    ``token`` is sent as a bearer token on every call; without TLS it travels
    in clear text, so only do that on loopback or inside an encrypted network.
    """
    options = list(options)
    keys = {key for key, _ in options}
    if "grpc.service_config" not in keys:
        import json

        options.append(("grpc.service_config", json.dumps(SERVICE_CONFIG)))
    if "grpc.initial_reconnect_backoff_ms" not in keys:
        options.append(("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS))
    if isinstance(tls, TLS) and tls.server_name and "grpc.ssl_target_name_override" not in keys:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    if credentials is None and tls:
        credentials = (tls if isinstance(tls, TLS) else TLS()).credentials()
    target = target_for(address)
    if credentials is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, credentials, options=options)
    return grpc.intercept_channel(channel, BearerToken(token)) if token else channel
