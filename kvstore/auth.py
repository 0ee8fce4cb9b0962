"""Security: bearer-token interceptor (constant-time compare, health exempt) and TLS credential loading."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import grpc

__all__ = ["AuthError", "BearerTokenInterceptor", "load_token", "server_credentials", "channel_credentials",
           "check_key_pair", "bearer_credentials", "UNAUTHENTICATED_EXEMPT_PREFIXES"]

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


def check_key_pair(cert: str | Path, key: str | Path) -> None:
    """Raise :class:`AuthError` naming the files unless ``key`` is a PEM private key matching PEM ``cert``.

    gRPC itself only fails later, when binding, with a message that does not say why.
    """
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(Path(cert).expanduser()), str(Path(key).expanduser()))
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc).lower():
            raise AuthError(f"TLS key {key} does not match the certificate {cert}") from None
        raise AuthError(f"cannot load TLS certificate {cert} with key {key}: {reason}") from None
    except OSError as exc:
        raise AuthError(f"cannot read TLS certificate {cert} or key {key}: {exc}") from None


def server_credentials(cert: str | Path, key: str | Path, client_ca: str | Path | None = None
                       ) -> grpc.ServerCredentials:
    """TLS server credentials; with ``client_ca`` clients must present a certificate signed by it (mTLS).

    Raises
    ------
    AuthError
        If a file cannot be read, or the key does not match the certificate.
    """
    ca = _read(client_ca, "client CA")
    check_key_pair(cert, key)
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


def bearer_credentials(header: str) -> str | None:
    """The token of an ``authorization`` value using the Bearer scheme, or None.

    The scheme name is case-insensitive (RFC 7235 section 2.1: ``bearer``, ``BEARER`` ...); one or more
    spaces separate it from the token.
    """
    scheme, _, rest = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = rest.strip(" ")
    return token or None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Reject every call except health checks unless it carries ``authorization: Bearer <token>``.

    The scheme is matched case-insensitively (RFC 7235); the token is compared as SHA-256 digests with
    :func:`hmac.compare_digest`, so the time depends on neither the token's content nor its length.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise AuthError("bearer token must not be empty")
        self._expected = _digest(token)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(UNAUTHENTICATED_EXEMPT_PREFIXES):
            return await continuation(handler_call_details)
        presented = ""
        for item in handler_call_details.invocation_metadata or ():
            if item[0] == "authorization":
                presented = item[1]
                break
        token = bearer_credentials(presented)
        if hmac.compare_digest(_digest(token or "\x00"), self._expected) and token is not None:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return grpc.unary_unary_rpc_method_handler(_reject)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_reject)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(_reject)
        return grpc.unary_stream_rpc_method_handler(_reject)
