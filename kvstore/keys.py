"""Keys: validation of opaque byte-string keys and deterministic prefix-chain keys for token chunks."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence

from kvrecall import defaults

__all__ = ["DEFAULT_MAX_KEY_BYTES", "KeyValidationError", "validate_key", "chunk_key", "chunk_keys", "key_digest"]

DEFAULT_MAX_KEY_BYTES = 1024
_CHAIN_DOMAIN = b"kvrecall.chunk.v1\x00"


class KeyValidationError(ValueError):
    """A key is not a non-empty byte string within the length limit."""


def validate_key(key: object, max_key_bytes: int = DEFAULT_MAX_KEY_BYTES) -> bytes:
    """Check that ``key`` is a usable store key and return it as ``bytes``.

    Parameters
    ----------
    key : bytes-like
        Opaque key; any byte values are allowed (keys never become file names, see :func:`key_digest`).
    max_key_bytes : int
        Largest accepted key length.

    Raises
    ------
    KeyValidationError
        If the key is not bytes-like, is empty, or is longer than ``max_key_bytes``.
    """
    if isinstance(key, str) or not isinstance(key, (bytes, bytearray, memoryview)):
        raise KeyValidationError(f"key must be bytes, got {type(key).__name__}")
    key = bytes(key)
    if not key:
        raise KeyValidationError("key must not be empty")
    if len(key) > max_key_bytes:
        raise KeyValidationError(f"key is {len(key)} bytes; the limit is {max_key_bytes}")
    return key


def key_digest(key: bytes) -> str:
    """Hex SHA-256 of a key: the only form in which a key names a file or a Redis key (never a path)."""
    return hashlib.sha256(key).hexdigest()


def _pack_text(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return struct.pack("<I", len(raw)) + raw


def chunk_key(parent: bytes, token_ids: Sequence[int], model_id: str | bytes, profile_id: str | bytes) -> bytes:
    """SHA-256 key of one chunk given its parent's key (32 bytes, or ``b""`` for the first chunk).

    The hash covers a domain tag, the parent key, the model id, the codec profile id and the token ids as
    little-endian unsigned 64-bit integers, each length-prefixed, so it is identical across processes, machines
    and Python versions (unlike ``hash``).
    """
    ids = list(token_ids)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) and not hasattr(t, "__index__"):
            raise TypeError(f"token ids must be integers, got {type(t).__name__}")
    try:
        packed = struct.pack(f"<{len(ids)}Q", *(int(t) for t in ids))
    except struct.error as exc:
        raise ValueError(f"token ids must be in [0, 2**64): {exc}") from exc
    h = hashlib.sha256(_CHAIN_DOMAIN)
    h.update(_pack_text(parent))
    h.update(_pack_text(model_id))
    h.update(_pack_text(profile_id))
    h.update(struct.pack("<Q", len(ids)))
    h.update(packed)
    return h.digest()


def chunk_keys(
    token_ids: Iterable[int],
    model_id: str | bytes,
    profile_id: str | bytes,
    chunk_tokens: int = defaults.CHUNK_TOKENS,
    parent: bytes = b"",
) -> list[bytes]:
    """Prefix-chain keys for the full chunks of a token sequence.

    Key ``i`` hashes key ``i - 1`` (or ``parent`` for the first) with chunk ``i``'s tokens, so a key identifies
    the whole prefix up to the end of its chunk. A trailing partial chunk gets no key (it is not stored).

    Parameters
    ----------
    token_ids : iterable of int
        Token ids, shape ``[T]`` (a list, tuple, numpy array or 1-D tensor converted with ``tolist``).
    model_id, profile_id : str or bytes
        Identify the model weights and the codec profile; different values give unrelated keys.
    chunk_tokens : int
        Tokens per chunk (``>= 1``).
    parent : bytes
        Key of the chunk before ``token_ids[0]``, or ``b""`` at the start of a context.

    Returns
    -------
    list of bytes
        ``T // chunk_tokens`` keys of 32 bytes each.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    if not isinstance(parent, (bytes, bytearray)):
        raise TypeError(f"parent must be bytes, got {type(parent).__name__}")
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
    ids = list(token_ids)
    keys: list[bytes] = []
    prev = bytes(parent)
    for start in range(0, len(ids) - chunk_tokens + 1, chunk_tokens):
        prev = chunk_key(prev, ids[start : start + chunk_tokens], model_id, profile_id)
        keys.append(prev)
    return keys
