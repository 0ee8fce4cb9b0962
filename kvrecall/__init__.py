"""kvrecall: store long-context KV caches once, compressed, and load or retrieve them on demand.

Sub-packages (each installed from its own top-level folder of the repository):

- ``kvrecall.encoder``   CacheGen-style KV codec (quantize, entropy-code).
- ``kvrecall.kvstore``   gRPC KV store for encoded chunks (RAM, disk, Redis tiers).
- ``kvrecall.retriever`` A²ATS-style query-aware VQ key codes and top-k token selection.
- ``kvrecall.kernels``   Triton kernels with torch reference twins.

The bottom layer, which every sub-package may import: :mod:`kvrecall.models` (model adapter: loading, pre-RoPE
Q/K/V capture, RoPE), :mod:`kvrecall.model_store` (named models) and :mod:`kvrecall.defaults`.

The integration layer, exported here and imported only on first use (so importing a sub-package never pulls it
in): :class:`ContextCache`, :class:`Controller`, and the names later modules add to :data:`_EXPORTS`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

__version__ = "0.1.0"

# Imported straight from a source checkout (the repository root on sys.path, as with `python -m pytest` there):
# the sub-packages live in sibling folders (encoder/, kvstore/, ...) that the installed package-dir mapping names
# kvrecall.<folder>; let the root serve as a second search path so the same names resolve. An installed copy
# (wheel, or the strict editable link tree) has no such siblings and is left alone.
_ROOT = Path(__file__).parent.parent
if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "encoder" / "__init__.py").is_file():
    __path__.append(str(_ROOT))  # type: ignore[name-defined]  # noqa: F821

# public name -> module under kvrecall that defines it
_EXPORTS = {
    "ContextCache": "context_cache",
    "LoadResult": "context_cache",
    "LoadReport": "context_cache",
    "Controller": "controller",
    "RetrievalCache": "retrieval_cache",
    "StreamSession": "stream_session",
    "RagPipeline": "rag",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvrecall' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kvrecall.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
