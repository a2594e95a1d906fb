"""Transport security: server credentials from PEM files named in the config.

``tls_cert`` + ``tls_key`` turn TLS on; ``tls_client_ca`` additionally
requires every client to present a certificate signed by that CA (mutual
TLS). gRPC's own TLS stack does the work; this module only reads the files
and says clearly which one is missing.
"""
from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror}") from None


def read_pems(tls_cert: str, tls_key: str, tls_client_ca: str = "") -> tuple[bytes, bytes, bytes | None] | None:
    """Certificate chain, key and client CA bundle as configured (None: TLS off); a clear error if incomplete."""
    if not tls_cert and not tls_key:
        if tls_client_ca:
            raise ValueError("tls_client_ca needs tls_cert and tls_key: client certificates are checked over TLS")
        return None
    if not (tls_cert and tls_key):
        raise ValueError("TLS needs both tls_cert and tls_key")
    ca = _read(tls_client_ca, "client CA bundle (tls_client_ca)") if tls_client_ca else None
    return _read(tls_cert, "TLS certificate (tls_cert)"), _read(tls_key, "TLS key (tls_key)"), ca


def server_credentials(tls_cert: str, tls_key: str, tls_client_ca: str = "") -> grpc.ServerCredentials | None:
    """The credentials for a secure port, or None when TLS is off (no certificate configured)."""
    pems = read_pems(tls_cert, tls_key, tls_client_ca)
    if pems is None:
        return None
    cert, key, ca = pems
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
