"""Input validation and launch helpers shared by the kernel host wrappers.

Every host wrapper validates its inputs with these helpers before launching, so bad input raises a typed
exception (a subclass of :class:`KernelInputError`) instead of crashing inside a kernel or reading out of bounds.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import triton

__all__ = [
    "KernelInputError",
    "KernelDTypeError",
    "KernelShapeError",
    "KernelDeviceError",
    "KernelIndexError",
    "FLOAT_DTYPES",
    "check_tensor",
    "check_same_device",
    "check_launchable",
    "is_interpreted",
    "next_power_of_2",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelInputError(ValueError):
    """A kernel's inputs are invalid (base class of every kernel input error)."""


class KernelDTypeError(KernelInputError, TypeError):
    """A tensor has a dtype the kernel does not accept."""


class KernelShapeError(KernelInputError):
    """A tensor has the wrong number of dimensions, a wrong size, or an unsupported memory layout."""


class KernelDeviceError(KernelInputError):
    """Tensors are on different devices, or on a device the kernel cannot run on in this process."""


class KernelIndexError(KernelInputError, IndexError):
    """An index or count points outside the tensor it addresses."""


def check_tensor(
    name: str,
    tensor: object,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    ndim: int | None = None,
    shape: tuple[int | None, ...] | None = None,
    last_dim_contiguous: bool = False,
) -> torch.Tensor:
    """Check type, dtype, rank and sizes of one tensor argument.

    Parameters
    ----------
    name : str
        Argument name used in error messages.
    tensor : object
        The value to check.
    dtypes : iterable of torch.dtype, optional
        Accepted dtypes.
    ndim : int, optional
        Required rank.
    shape : tuple of (int or None), optional
        Required sizes; ``None`` entries are free. Implies ``ndim``.
    last_dim_contiguous : bool
        Require stride 1 along the last dimension (kernels address rows with strides, channels contiguously).

    Returns
    -------
    torch.Tensor
        ``tensor`` itself.
    """
    if not isinstance(tensor, torch.Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if tensor.dtype not in dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise KernelDTypeError(f"{name} has dtype {tensor.dtype}; expected one of {allowed}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and tensor.dim() != ndim:
        raise KernelShapeError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if shape is not None:
        for axis, (got, want) in enumerate(zip(tensor.shape, shape)):
            if want is not None and got != want:
                raise KernelShapeError(
                    f"{name} has size {got} along dimension {axis}, expected {want} (shape {tuple(tensor.shape)})"
                )
    if last_dim_contiguous and tensor.dim() > 0 and tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise KernelShapeError(f"{name} must be contiguous along its last dimension (stride {tensor.stride(-1)})")
    return tensor


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors (``None`` entries skipped) share one device; return it."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    unique = set(devices.values())
    if len(unique) != 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise KernelDeviceError(f"all tensors must be on one device: {listing}")
    return unique.pop()


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` was decorated while ``TRITON_INTERPRET=1`` (runs on CPU tensors through numpy)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def check_launchable(kernel: object, device: torch.device) -> None:
    """Raise :class:`KernelDeviceError` if ``kernel`` cannot run on ``device`` in this process."""
    if device.type == "cuda" or is_interpreted(kernel):
        return
    raise KernelDeviceError(
        f"Triton kernels need CUDA tensors (got {device}); to run them on CPU set TRITON_INTERPRET=1 before "
        "importing kvrecall.kernels, or call the *_reference twin"
    )


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return triton.next_power_of_2(max(int(n), 1))
