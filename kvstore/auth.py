"""Security: bearer-token interceptor (constant-time compare, health exempt) and TLS credential loading."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import grpc

__all__ = ["AuthError", "BearerTokenInterceptor", "load_token", "server_credentials", "channel_credentials",
           "UNAUTHENTICATED_EXEMPT_PREFIXES"]

# Health checks must work for load balancers and orchestrators that hold no token.
UNAUTHENTICATED_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


class AuthError(ValueError):
    """A token or TLS file is missing, empty or unreadable."""


def load_token(path: str | Path) -> str:
    """Read a bearer token from a file (surrounding whitespace removed)."""
    try:
        token = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthError(f"cannot read token file {path}: {exc}") from exc
    if not token:
        raise AuthError(f"token file {path} is empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise AuthError(f"token in {path} must be printable characters without spaces")
    return token


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise AuthError(f"cannot read {what} {path}: {exc}") from exc


def server_credentials(cert: str | Path, key: str | Path, client_ca: str | Path | None = None
                       ) -> grpc.ServerCredentials:
    """TLS server credentials; with ``client_ca`` clients must present a certificate signed by it (mTLS)."""
    ca = _read(client_ca, "client CA")
    return grpc.ssl_server_credentials(
        [(_read(key, "TLS key"), _read(cert, "TLS certificate"))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def channel_credentials(ca: str | Path | None = None, cert: str | Path | None = None,
                        key: str | Path | None = None) -> grpc.ChannelCredentials:
    """TLS channel credentials: ``ca`` verifies the server (system roots if None); cert/key for mTLS."""
    if (cert is None) != (key is None):
        raise AuthError("a client certificate needs its key and vice versa")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA certificate"),
        private_key=_read(key, "client key"),
        certificate_chain=_read(cert, "client certificate"),
    )


def _digest(value: str | bytes) -> bytes:
    return hashlib.sha256(value.encode("utf-8") if isinstance(value, str) else value).digest()


async def _reject(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Reject every call except health checks unless it carries ``authorization: Bearer <token>``.

    The comparison is between SHA-256 digests of the presented and expected header values with
    :func:`hmac.compare_digest`, so its time depends on neither the token's content nor its length.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise AuthError("bearer token must not be empty")
        self._expected = _digest(f"Bearer {token}")

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(UNAUTHENTICATED_EXEMPT_PREFIXES):
            return await continuation(handler_call_details)
        presented = ""
        for item in handler_call_details.invocation_metadata or ():
            if item[0] == "authorization":
                presented = item[1]
                break
        if hmac.compare_digest(_digest(presented), self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return grpc.unary_unary_rpc_method_handler(_reject)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_reject)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(_reject)
        return grpc.unary_stream_rpc_method_handler(_reject)
