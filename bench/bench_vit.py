"""Backbone forward and forward+backward throughput, with achieved GFLOP/s and MFU.

FLOPs are counted analytically (multiply-adds x 2) for the matmuls that dominate a ViT: per block and
token, qkv 6C^2, output projection 2C^2, FFN 4CF (MLP) or 6CF' (SwiGLU), and attention 4NC (QK^T and
AV over N tokens); plus the patch embedding 2*C*3*p^2 per patch. Backward costs twice the forward, so
forward+backward is 3x. MFU divides the achieved rate by the best measured dense float32 matmul rate of
the same device (bench.common.matmul_peak_gflops), i.e. against what this machine can actually do.

CPU case (the issue's): vit_small, batch 8, 224 px. GPU cases add bf16 autocast and bigger batches and
skip without a GPU.
"""

import pytest
import torch

from bench.common import matmul_peak_gflops, report, requires_cuda
from models.vit import ViTConfig, build_vit


def vit_forward_flops(cfg: ViTConfig, batch: int, height: int, width: int) -> float:
    C, F = cfg.embed_dim, cfg.ffn_hidden
    n_patch = (height // cfg.patch_size) * (width // cfg.patch_size)
    N = n_patch + 1 + cfg.n_storage_tokens
    ffn = (6 if cfg.ffn == "swiglu" else 4) * C * F
    per_token_block = 6 * C * C + 2 * C * C + ffn + 4 * N * C
    patch_embed = 2 * C * cfg.in_chans * cfg.patch_size**2 * n_patch
    return batch * (cfg.depth * N * per_token_block + patch_embed)


CASES = [
    pytest.param("cpu", "vit_small", 8, 224, torch.float32, id="cpu-vits16-b8-224"),
    pytest.param("cuda", "vit_small", 64, 224, torch.bfloat16, id="cuda-vits16-b64-224-bf16", marks=requires_cuda),
    pytest.param("cuda", "vit_large", 32, 256, torch.bfloat16, id="cuda-vitl16-b32-256-bf16", marks=requires_cuda),
]


def _step(model, x, backward: bool, dtype: torch.dtype, device: str):
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        out = model(x)["x_prenorm"]
    if backward:
        out.float().pow(2).mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("device, arch, batch, size, dtype", CASES)
def test_backbone_throughput(benchmark, device, arch, batch, size, dtype, backward):
    torch.manual_seed(0)
    model = build_vit(arch).to(device)
    model.train(backward)
    x = torch.randn(batch, 3, size, size, device=device)
    grad_ctx = torch.enable_grad() if backward else torch.no_grad()
    with grad_ctx:
        benchmark.pedantic(_step, args=(model, x, backward, dtype, device), rounds=3, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.min
    flops = vit_forward_flops(model.cfg, batch, size, size) * (3 if backward else 1)
    achieved = flops / seconds / 1e9
    peak = matmul_peak_gflops(device, dtype=torch.float32 if device == "cpu" else dtype)
    report(
        f"{arch} {'fwd+bwd' if backward else 'fwd'} {device} b{batch} {size}px {dtype}",
        seconds=seconds, images_per_s=batch / seconds, gflop=flops / 1e9, gflops=achieved,
        peak_gflops=peak, mfu=achieved / peak, threads=torch.get_num_threads(),
    )
