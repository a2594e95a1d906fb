"""Bearer-token authentication: a server interceptor in front of every service.

Each call must carry ``authorization: Bearer <token>`` metadata naming one of
the tokens of the token file; otherwise it is answered UNAUTHENTICATED before
any handler runs. The request message is neither awaited nor read, so a caller
without a token holds no server thread and cannot make the server receive a
large message. Tokens are compared with
``hmac.compare_digest`` against every accepted token, so the time taken says
nothing about how much of a guess was right. Health checks and reflection may
stay open (``open_health_and_reflection``), since load-balancer and Kubernetes
probes cannot send a token.
"""
from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Callable, Iterable

import grpc

log = logging.getLogger("chainrule.server.auth")

METADATA_KEY = "authorization"
SCHEME = "bearer"
#: Method prefixes that answer without a token when health and reflection are open.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


def read_tokens(path: str | Path) -> list[bytes]:
    """The tokens of a token file: one per line; blank lines and ``#`` comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the token file {path}: {exc.strerror}") from None
    tokens = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            tokens.append(line.encode("utf-8"))
    if not tokens:
        raise ValueError(f"token file {path} holds no tokens: every call would be refused")
    return tokens


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    """The token of the first ``authorization: Bearer ...`` entry, or None."""
    for key, value in metadata or ():
        if key.lower() != METADATA_KEY:
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == SCHEME and token.strip():
            return token.strip().encode("utf-8")
        return None
    return None


def accepted(token: bytes | None, tokens: list[bytes]) -> bool:
    """Whether ``token`` is one of ``tokens``, comparing against all of them in constant time each."""
    if token is None:
        return False
    found = False
    for candidate in tokens:
        found |= hmac.compare_digest(token, candidate)
    return found


def _refuse(request: object, context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.UNAUTHENTICATED,
                  "missing or invalid bearer token: send 'authorization: Bearer <token>' metadata")


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler that refuses at once, whatever the method's kind: a request-streaming one with no
    deserializer, so gRPC runs it without waiting for (or reading) the request message. A unary
    handler would first wait for the whole message, holding a server thread: a caller without a
    token could then make the server receive a large message, or hold threads by sending headers only."""
    return grpc.stream_stream_rpc_method_handler(_refuse)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Lets a call through only with an accepted bearer token (or to an open method)."""

    def __init__(self, tokens: list[bytes], *, open_prefixes: tuple[str, ...] = OPEN_PREFIXES) -> None:
        self._tokens = list(tokens)
        self._open = open_prefixes

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._open):
            return handler
        if accepted(bearer_token(handler_call_details.invocation_metadata), self._tokens):
            return handler
        log.warning("refused %s: missing or invalid bearer token", method)
        return _refusal(handler)


def interceptor_for(token_file: str, open_health_and_reflection: bool) -> TokenAuthInterceptor | None:
    """The interceptor a config asks for (None without a token file)."""
    if not token_file:
        return None
    open_prefixes = OPEN_PREFIXES if open_health_and_reflection else ()
    return TokenAuthInterceptor(read_tokens(token_file), open_prefixes=open_prefixes)
