"""Triton kernels for the hot path, each with a plain torch reference twin."""
