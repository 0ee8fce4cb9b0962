"""Triton kernels for the hot path, each with a plain torch reference twin.

Modules (imported on demand, so that ``TRITON_INTERPRET=1`` can be set before any kernel is decorated):

* :mod:`kvrecall.kernels.rans_decode` — rANS bitstream decode + dequantize into the cache layout.
* :mod:`kvrecall.kernels.score_topk` — LUT code scoring, top-k, GQA union, sinks and window.
* :mod:`kvrecall.kernels.sparse_attention` — gather + dequantize + RoPE + sparse decode attention.
* :mod:`kvrecall.kernels.fetch` — selected K/V rows from pinned host memory to the GPU on a side stream.
* :mod:`kvrecall.kernels.kivi`, :mod:`kvrecall.kernels.rope` — KIVI int8/int4 layout and RoPE description.
* :mod:`kvrecall.kernels.common` — input validation and the ``Kernel*Error`` exceptions.
* :mod:`kvrecall.kernels.compile_check` — compile every kernel for a CUDA target without a GPU.

See ``docs/kernels.md``.
"""
