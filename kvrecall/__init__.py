"""kvrecall: store long-context KV caches once, compressed, and load or retrieve them on demand.

Sub-packages (each installed from its own top-level folder of the repository):

- ``kvrecall.encoder``   CacheGen-style KV codec (quantize, delta-code, rANS-code).
- ``kvrecall.kvstore``   gRPC KV store for encoded chunks (RAM, disk, Redis tiers).
- ``kvrecall.retriever`` A²ATS-style query-aware VQ key codes and top-k token selection.
- ``kvrecall.kernels``   Triton kernels with torch reference twins.

This package itself holds the CLI (:mod:`kvrecall.cli`), configuration helpers
(:mod:`kvrecall.config`) and model utilities (:mod:`kvrecall.models`).
"""

__version__ = "0.1.0"
