"""What every kernel's public function needs to decide between its Triton kernel and its PyTorch reference."""

from __future__ import annotations

import os
from typing import Literal

import torch

KernelImpl = Literal["auto", "triton", "reference"]


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor, impl: KernelImpl, op: str) -> bool:
    """The dispatch rule: Triton on CUDA tensors or under the interpreter, the reference otherwise.

    `impl` forces a path; a forced Triton path that cannot run raises instead of silently falling back.
    """
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"{op}: impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if impl == "reference":
        return False
    runnable = (x.is_cuda or interpreting()) and triton_importable()
    if impl == "triton" and not runnable:
        why = "Triton is not importable" if not triton_importable() else f"the tensors are on {x.device}"
        raise RuntimeError(
            f"{op}: impl='triton' was forced but {why}; run on a CUDA device, set TRITON_INTERPRET=1 "
            "before importing Triton to use its CPU interpreter, or use impl='reference'"
        )
    return runnable
