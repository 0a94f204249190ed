"""RoPE attention: the fused Triton kernel against "RoPE in torch + SDPA" (the official approach) and xformers.

Cases are the attention shapes of DINOv3 training: ViT-S/B/L (head dim 64) global crops at 256 px
(N = 256 patches + 5 prefix = 261), 512 px (1029) and 1024 px (4101), and the 7B's head dim 128. Every
benchmark prints its time and achieved TFLOP/s; the GPU fwd+bwd cases also print the peak extra memory.

Roofline (per forward, bf16, B batch, H heads, N tokens, D head dim):
- FLOPs: two N x N x D matmuls per head (Q K^T and P V) = 4 B H N^2 D. The backward does 2.5x that in the
  standard FlashAttention-2 count (Q K^T recomputed, dV, dP, dQ, dK); this kernel's deterministic backward
  (no atomics) recomputes Q K^T and dP once more in its dq pass, 3.5x in all, so at equal speed it reports
  2.5/3.5 of the hardware rate. Figures below use the standard count: 4 B H N^2 D forward, 3.5x that for
  forward + backward.
- Bytes from HBM, at best: q, k, v read once and the output written once, 4 B N H D x 2 bytes, plus the
  float32 log-sum-exp (4 B H N). K and V are re-read by every query block, but one head's K and V
  (4 N D bytes, 1 MiB at N = 4101) stay in L2. Arithmetic intensity is therefore about N/2 FLOP/byte.
- H100 SXM: ~990 TFLOP/s dense bf16 and 3.35 TB/s, a ridge at ~300 FLOP/byte (H200: 4.8 TB/s, ~210).
  N = 261 (~130 FLOP/byte) sits below the ridge: the bound is bandwidth, ~3.35e12 x 130 = ~440 TFLOP/s,
  and in practice launch and tail effects. N = 1029 and 4101 are compute-bound.
- Compute-bound cases are limited by the special-function unit before the tensor cores at D = 64: one
  exp2 per score (16/clk/SM, ~4e12/s on an H100) against 4 D = 256 tensor FLOPs per score (~1e15/s) makes
  both ~1 ps per score. RoPE in registers adds a sine and a cosine per key element for every query block,
  D / BLOCK_M special-function ops per score (0.5 at D = 64, BLOCK_M = 128), hence a ceiling of roughly
  2/3 of the tensor peak for this kernel's forward; what it saves is the torch path's extra memory
  passes (rotating q and k in float32 and writing them back, transposes and the output copy), which
  dominate at N = 261.
- "RoPE in torch + SDPA" runs PyTorch's FlashAttention-2 backend; FlashAttention-2 reaches ~35-50% of the
  H100 peak at these head dims, the level the Triton kernel should beat.

On the CPU the Triton kernel cannot run (the interpreter is a correctness tool, not a timing target), so the
CPU cases time the PyTorch reference and the torch + SDPA path at small batch, in float32. GPU cases are
present and skip with a stated reason on a machine without CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

from bench.common import matmul_peak_gflops, report, requires_cuda
from dino_kernels.rope_attention import rope_attention
from models.rope import Rope, augment_coords, patch_coords, rope_angles, rope_periods
from models.vit import attention

N_PREFIX = 5  # class token + 4 registers

# (name, batch, heads, tokens, head_dim)
GPU_CASES = [
    ("vits_256px", 64, 6, 261, 64),
    ("vitb_256px", 64, 12, 261, 64),
    ("vitl_256px", 64, 16, 261, 64),
    ("vitb_512px", 16, 12, 1029, 64),
    ("vitl_512px", 16, 16, 1029, 64),
    ("vitl_1024px", 4, 16, 4101, 64),
    ("vit7b_256px", 16, 32, 261, 128),
    ("vit7b_512px", 4, 32, 1029, 128),
]
CPU_CASES = [
    ("vits_256px", 2, 6, 261, 64),
    ("vits_512px", 1, 6, 1029, 64),
]
GPU_PROVIDERS = ["triton", "torch_rope_sdpa", "xformers"]
CPU_PROVIDERS = ["reference", "torch_rope_sdpa"]
MODES = ["fwd", "fwd_bwd"]


def forward_flops(batch: int, heads: int, n_tokens: int, head_dim: int) -> float:
    return 4.0 * batch * heads * n_tokens**2 * head_dim


def make_problem(batch: int, heads: int, n_tokens: int, head_dim: int, dtype: torch.dtype, device: str):
    """qkv as the projection leaves it ([B, N, 3, H, D]), a square patch grid and a box-jittered RoPE."""
    side = math.isqrt(n_tokens - N_PREFIX)
    if side * side != n_tokens - N_PREFIX:
        raise ValueError(f"benchmark cases use square grids: {n_tokens} - {N_PREFIX} is not a square")
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, n_tokens, 3, heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    coords = augment_coords(patch_coords(side, side), rescale=2.0, generator=gen).to(device)
    periods = rope_periods(head_dim).float().to(device)
    angles = rope_angles(coords, periods)
    rope = Rope(coords=coords, periods=periods, sin=angles.sin(), cos=angles.cos())
    return qkv.requires_grad_(), rope


def provider_fn(provider: str):
    """attend(q, k, v, rope) -> [B, N, H*D], the tensor the output projection consumes."""
    if provider == "xformers":
        pytest.importorskip("xformers.ops", reason="xformers is not installed (optional GPU extra)")

    def attend(q, k, v, rope):
        if provider in ("triton", "reference"):
            out = rope_attention(q, k, v, rope.coords, rope.periods, N_PREFIX, impl=provider)
        else:
            out = attention(q, k, v, rope, N_PREFIX, "sdpa" if provider == "torch_rope_sdpa" else "xformers")
        return out.reshape(*out.shape[:2], -1)

    return attend


def step_fn(provider: str, mode: str, qkv: torch.Tensor, rope: Rope, device: str):
    attend = provider_fn(provider)
    grad = torch.randn(qkv.shape[0], qkv.shape[1], qkv.shape[3] * qkv.shape[4], device=device, dtype=qkv.dtype)

    def step():
        q, k, v = qkv.unbind(2)
        if mode == "fwd":
            with torch.no_grad():
                attend(q, k, v, rope)
        else:
            torch.autograd.grad(attend(q, k, v, rope), qkv, grad)
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def run_case(benchmark, name, batch, heads, n_tokens, head_dim, provider, mode, dtype, device, rounds):
    qkv, rope = make_problem(batch, heads, n_tokens, head_dim, dtype, device)
    step = step_fn(provider, mode, qkv, rope, device)
    peak_mib = None
    if device == "cuda" and mode == "fwd_bwd":
        step()  # compile / autotune outside the measurement
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median
    flops = forward_flops(batch, heads, n_tokens, head_dim) * (1.0 if mode == "fwd" else 3.5)
    figures = dict(B=batch, H=heads, N=n_tokens, D=head_dim, ms=seconds * 1e3, tflops=flops / seconds / 1e12)
    if device == "cpu":
        figures["of_cpu_matmul_peak"] = flops / seconds / 1e9 / matmul_peak_gflops("cpu")
    if peak_mib is not None:
        figures["peak_extra_mib"] = peak_mib
    report(f"rope_attention {name} {provider} {mode} {device} {str(dtype).removeprefix('torch.')}", **figures)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("name,batch,heads,n_tokens,head_dim", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_rope_attention_gpu(benchmark, name, batch, heads, n_tokens, head_dim, provider, mode):
    run_case(benchmark, name, batch, heads, n_tokens, head_dim, provider, mode, torch.bfloat16, "cuda", rounds=20)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("name,batch,heads,n_tokens,head_dim", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_rope_attention_cpu(benchmark, name, batch, heads, n_tokens, head_dim, provider, mode):
    run_case(benchmark, name, batch, heads, n_tokens, head_dim, provider, mode, torch.float32, "cpu", rounds=3)
