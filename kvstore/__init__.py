"""gRPC KV store for encoded KV chunks, with RAM, disk and Redis tiers.

Public names: :func:`serve`, :class:`KVStoreServer`, :class:`ServerConfig`, :class:`BackgroundServer`,
:class:`KVStoreClient`, :class:`AsyncKVStoreClient`, :func:`chunk_keys`, :class:`Limits`, :class:`KVStoreError`.
Submodules are imported lazily so ``import kvrecall.kvstore`` stays light.
"""

from __future__ import annotations

import importlib

__all__ = [
    "serve", "KVStoreServer", "ServerConfig", "BackgroundServer", "default_disk_dir",
    "KVStoreClient", "AsyncKVStoreClient", "ClientOptions", "ExistsResult", "LookupResult", "KVStoreError",
    "ChecksumError",
    "chunk_keys", "chunk_key", "validate_key", "KeyValidationError", "Limits",
]

_WHERE = {
    "serve": "server", "KVStoreServer": "server", "ServerConfig": "server", "BackgroundServer": "server",
    "default_disk_dir": "server",
    "KVStoreClient": "client", "AsyncKVStoreClient": "aio_client", "ClientOptions": "client_common",
    "ExistsResult": "client_common", "LookupResult": "client_common", "KVStoreError": "client_common",
    "ChecksumError": "client_common",
    "chunk_keys": "keys", "chunk_key": "keys", "validate_key": "keys", "KeyValidationError": "keys",
    "Limits": "limits",
}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'kvrecall.kvstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kvrecall.kvstore.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
