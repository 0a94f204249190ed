"""What every kernel's public function needs: the Triton-or-reference decision, one launch helper, device limits."""

from __future__ import annotations

import os
from typing import Callable, Literal

import torch
import torch.distributed as dist

KernelImpl = Literal["auto", "triton", "reference"]

# Shared memory one program may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), by compute capability major*10+minor.
SHARED_MEMORY_LIMITS = {90: 232448, 80: 166912, 86: 101376, 87: 166912, 89: 101376}

# Set by dino_kernels.aot.compile_only(): launches compile for that architecture instead of running (no GPU needed).
_compile_only_hook: Callable | None = None
_compile_only_arch: int | None = None


def reduction_group(group=None, owner: str = "reduction"):
    """The process group to all-reduce over (None given: the default group), or None when this process is alone
    (torch.distributed not initialized, or a group of one)."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError(f"{owner}: a process group was given but torch.distributed is not initialized")
        return None
    group = dist.group.WORLD if group is None else group
    return group if dist.get_world_size(group) > 1 else None


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
    runnable = (x.is_cuda or interpreting() or _compile_only_hook is not None) and triton_importable()
    if impl == "triton" and not runnable:
        why = "Triton is not importable" if not triton_importable() else f"the tensors are on {x.device}"
        raise RuntimeError(
            f"{op}: impl='triton' was forced but {why}; run on a CUDA device, set TRITON_INTERPRET=1 "
            "before importing Triton to use its CPU interpreter, or use impl='reference'"
        )
    return runnable


def compute_capability(device: torch.device | None = None) -> int:
    """major*10 + minor of the GPU the kernels are launched (or, under dino_kernels.aot, compiled) for."""
    if _compile_only_arch is not None:
        return _compile_only_arch
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def shared_memory_limit() -> int:
    """Bytes of shared memory one program may use on the target GPU: what the autotune prunes check against."""
    if _compile_only_arch is not None:
        return SHARED_MEMORY_LIMITS[_compile_only_arch]
    return torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin


def quick_benchmark(kernel_call: Callable[[], object], quantiles):
    """The autotuners' timer: 5 ms of warm-up and 20 ms of repetitions per config (Triton's default, 25 + 100 ms,
    makes a cold start with a dozen tuning keys take minutes); enough repetitions for kernels of 0.01-5 ms."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def new_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Kernel output storage; NaN-filled under the interpreter (the tests) so an element no kernel wrote shows up."""
    if interpreting():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def launch(kernel, grid, *args, interpreter_blocks: dict | None = None, **constexprs) -> None:
    """Launch a Triton kernel (plain or `triton.autotune`d) over `grid` (a tuple, or a function of the meta-params).

    Under the interpreter an autotuned kernel runs bare with `interpreter_blocks` (its tile sizes there: small and
    fixed); under dino_kernels.aot.compile_only() every config the autotune prune keeps is compiled, nothing runs.
    """
    if interpreting():
        bare = getattr(kernel, "fn", kernel) if hasattr(kernel, "configs") else kernel
        meta = {**constexprs, **(interpreter_blocks or {})}
        bare[grid(meta) if callable(grid) else grid](*args, **meta)
    elif _compile_only_hook is not None:
        _compile_only_hook(kernel, args, constexprs)
    else:
        kernel[grid](*args, **constexprs)
