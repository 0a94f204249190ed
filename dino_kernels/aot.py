"""Ahead-of-time compilation of this package's Triton kernels for a chosen GPU architecture, with no GPU present.

Inside `compile_only(arch)`, Triton's active driver is replaced by one that reports `arch` as the current target
and every `dino_kernels.common.launch` compiles instead of running: an autotuned kernel compiles each config its
prune keeps (or all of them with `all_configs=True`), so calling a public op (forward and backward) on small CPU
tensors compiles exactly what the op would dispatch on that GPU. Each compiled variant is recorded with its shared
memory (Triton's metadata), registers and stack bytes per thread (the cubin's resource usage, read with the
cuobjdump that ships with Triton; these kernels have no local arrays or calls, so a stack frame means spills).

Must run without TRITON_INTERPRET (interpreted kernels cannot be compiled); the compile checks run it in a
subprocess for that reason. Host code around the launches still runs on the CPU tensors (values are garbage).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import subprocess
import tempfile
from typing import Iterator

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

from dino_kernels import common


@dataclasses.dataclass
class Variant:
    """One compiled kernel variant."""

    kernel: str
    arch: int
    meta: dict  # the constexprs that distinguish it (tile sizes, dtypes, flags), as strings
    num_warps: int
    num_stages: int
    shared: int | None = None  # bytes of shared memory per program
    registers: int | None = None  # per thread
    spill_bytes: int | None = None  # stack frame per thread: register spills
    error: str | None = None  # the compile error, if it failed

    @property
    def fits(self) -> bool:
        return self.error is None and self.shared is not None and self.shared <= common.SHARED_MEMORY_LIMITS[self.arch]


class _CompileOnlyDriver:
    """Just enough of a Triton driver to compile for `arch`: target, a device id per arch, no stream."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return 1000 + self.arch  # a device id per arch keeps Triton's per-device kernel caches apart

    def get_current_stream(self, device=None) -> int:
        return 0

    def is_active(self) -> bool:
        return True


_RESOURCE_USAGE = re.compile(r"REG:(\d+) STACK:(\d+)")


@functools.cache
def _cuobjdump() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path}: the Triton wheel ships it; reinstall triton")
    return path


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread of the one kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([_cuobjdump(), "--dump-resource-usage", file.name], capture_output=True, text=True,
                                check=True).stdout
    found = _RESOURCE_USAGE.search(report)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{report}")
    return int(found.group(1)), int(found.group(2))


class _Recorder:
    def __init__(self, arch: int, all_configs: bool):
        self.arch = arch
        self.all_configs = all_configs
        self.variants: list[Variant] = []
        self._usage: dict[str, tuple[int, int]] = {}  # kernel hash -> (registers, stack bytes)

    def __call__(self, kernel, args: tuple, constexprs: dict) -> None:
        if hasattr(kernel, "configs"):  # triton.autotune
            kernel.nargs = dict(zip(kernel.arg_names, args))
            configs = kernel.configs if self.all_configs else kernel.prune_configs(constexprs)
            kernel.nargs = None
            for config in configs:
                self._compile(kernel.fn, args, {**constexprs, **config.all_kwargs()})
        else:
            self._compile(kernel, args, constexprs)

    def _compile(self, fn, args: tuple, kwargs: dict) -> None:
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        meta = {k: str(v) for k, v in kwargs.items() if k not in options and k not in ("num_ctas", "maxnreg")}
        variant = Variant(fn.__name__, self.arch, meta, options.get("num_warps", 4), options.get("num_stages", 3))
        try:
            compiled = fn.warmup(*args, grid=(1,), **kwargs)
        except Exception as error:  # a compile failure is a finding, not a crash of the sweep
            variant.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
            self.variants.append(variant)
            return
        if compiled.hash not in self._usage:
            try:
                self._usage[compiled.hash] = resource_usage(compiled.asm["cubin"])
            except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
                variant.error = f"resource usage unreadable: {error}"
                self._usage[compiled.hash] = (None, None)
        variant.registers, variant.spill_bytes = self._usage[compiled.hash]
        variant.shared = compiled.metadata.shared
        variant.num_warps, variant.num_stages = compiled.metadata.num_warps, compiled.metadata.num_stages
        self.variants.append(variant)


@contextlib.contextmanager
def compile_only(arch: int, all_configs: bool = False) -> Iterator[list[Variant]]:
    """Within the block, kernel launches compile for sm_`arch` (e.g. 90, 80) and append Variants to the list."""
    if arch not in common.SHARED_MEMORY_LIMITS:
        raise ValueError(f"compile_only: no shared-memory limit known for sm_{arch}; add it to SHARED_MEMORY_LIMITS")
    if common.interpreting():
        raise RuntimeError("compile_only: TRITON_INTERPRET is set; interpreted kernels cannot be compiled. "
                           "Run in a process started without it")
    recorder = _Recorder(arch, all_configs)
    saved = (common._compile_only_hook, common._compile_only_arch, driver._active)
    common._compile_only_hook, common._compile_only_arch = recorder, arch
    driver.set_active(_CompileOnlyDriver(arch))
    try:
        yield recorder.variants
    finally:
        # put back whatever was active (nothing, on a machine without a GPU: reset_active() would raise there)
        common._compile_only_hook, common._compile_only_arch, driver._active = saved
