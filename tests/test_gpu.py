"""The three Triton kernels compiled and run on a real GPU, against float64 references, at DINOv3's shapes.

Run with `TRITON_INTERPRET=0 pytest -m gpu tests/test_gpu.py` on a CUDA machine (bench/gpu_check.sh does); without
CUDA every test here skips. bf16 and fp16 attention (fp32 on GPUs runs the reference: FP32_TRITON_ON_GPU),
bf16 / fp16 / fp32 Sinkhorn and Gram, forward and backward, shapes that are not multiples of
the tiles (N = 54, 261, 1029 tokens; 65536 and 262144 prototypes; 1029 and 4096 patches). Outputs are allocated
uninitialized on the GPU, so these tests also catch an element a kernel never writes (garbage fails the bound).
"""

from __future__ import annotations

import pytest
import torch

from dino_kernels.common import interpreting

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU tests need one"),
    pytest.mark.skipif(interpreting(), reason="TRITON_INTERPRET is set: run with TRITON_INTERPRET=0 on the GPU"),
]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Relative errors against float64: operand rounding (bf16 ~4e-3 per element, averaged down by the sums).
ATTENTION_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


# ------------------------------------------------------------------------------------------------------------
# RoPE attention
# ------------------------------------------------------------------------------------------------------------

# (name, batch, heads, grid side, head dim): a 112 px local crop (N = 54), a 256 px global crop (N = 261) and a
# 512 px crop (N = 1029) of ViT-S/B/L heads, and the 7B's head dim 128.
ATTENTION_CASES = [
    ("local_112px_D64", 4, 6, 7, 64),
    ("global_256px_D64", 2, 16, 16, 64),
    ("hires_512px_D64", 1, 4, 32, 64),
    ("global_256px_D128", 2, 4, 16, 128),
]


@pytest.mark.parametrize("rope_mode", ["inline", "prerotate"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name,batch,heads,side,head_dim", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_rope_attention_matches_float64(name, batch, heads, side, head_dim, dtype, rope_mode):
    from dino_kernels.rope_attention import rope_attention, rope_attention_reference
    from models.rope import augment_coords, patch_coords, rope_periods

    n_prefix = 5
    n_tokens = n_prefix + side * side
    gen = _generator(side * 10 + head_dim)
    coords = augment_coords(patch_coords(side, side), shift=0.1, jitter=1.5, rescale=2.0,
                            generator=torch.Generator().manual_seed(side)).cuda()
    periods = rope_periods(head_dim).float().cuda()
    qkv64 = torch.randn(batch, n_tokens, 3, heads, head_dim, generator=gen, device="cuda", dtype=torch.float64)
    grad64 = torch.randn(batch, n_tokens, heads, head_dim, generator=gen, device="cuda", dtype=torch.float64)

    qkv = qkv64.to(dtype).requires_grad_()
    out = rope_attention(*qkv.unbind(2), coords, periods, n_prefix, impl="triton", rope_mode=rope_mode)
    out.backward(grad64.to(dtype))

    ref_in = qkv.detach().double().requires_grad_()
    ref = rope_attention_reference(*ref_in.unbind(2), coords.double(), periods.double(), n_prefix)
    ref.backward(grad64)
    errors = {"out": rel_err(out, ref)}
    errors.update({g: rel_err(qkv.grad[:, :, i], ref_in.grad[:, :, i]) for i, g in enumerate(("dq", "dk", "dv"))})
    assert all(e <= ATTENTION_TOL[dtype] for e in errors.values()), f"{name} {dtype} {rope_mode}: {errors}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d).removeprefix("torch."))
def test_wide_attention_on_gpu(dtype):
    """fp32/fp64 on CUDA: while FP32_TRITON_ON_GPU is off, "auto" runs the reference and a forced Triton call
    refuses clearly; once it is on, the forced Triton call must match float64."""
    from dino_kernels import rope_attention as module
    from models.rope import patch_coords, rope_periods

    coords, periods = patch_coords(16, 16).cuda(), rope_periods(64).float().cuda()
    q, k, v = torch.randn(2, 261, 3, 4, 64, generator=_generator(5), device="cuda", dtype=dtype).unbind(2)
    ref = module.rope_attention_reference(q.double(), k.double(), v.double(), coords.double(), periods.double(), 5)
    assert rel_err(module.rope_attention(q, k, v, coords, periods, 5), ref) <= 1e-4
    if module.runs_on_gpu(dtype):
        assert rel_err(module.rope_attention(q, k, v, coords, periods, 5, impl="triton"), ref) <= 1e-4
    else:
        with pytest.raises(RuntimeError, match="disabled"):
            module.rope_attention(q, k, v, coords, periods, 5, impl="triton")


def test_vit_triton_attention_matches_sdpa_on_gpu():
    """vit_small under bf16 autocast on 224 px images: Triton attention against PyTorch SDPA."""
    from models.vit import build_vit

    torch.manual_seed(0)
    model = build_vit("vit_small", attn_impl="sdpa").cuda().train()
    images = torch.randn(2, 3, 224, 224, device="cuda", generator=_generator(1))
    results = {}
    for impl in ("sdpa", "triton"):
        model.set_attn_impl(impl)
        model.zero_grad(set_to_none=True)
        model.rope_embed.seed(123)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(images)
            loss = out["x_norm_clstoken"].float().square().sum() + out["x_norm_patchtokens"].float().square().mean()
        loss.backward()
        results[impl] = (out["x_norm_patchtokens"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                               if p.grad is not None})
    (out_sdpa, grads_sdpa), (out_triton, grads_triton) = results["sdpa"], results["triton"]
    # both sides round to bf16 in different places (SDPA after a float32 RoPE, the kernel inside its tiles)
    assert rel_err(out_triton, out_sdpa) <= 3e-2
    worst = max(rel_err(grads_triton[n], grads_sdpa[n]) for n in grads_sdpa if grads_sdpa[n].norm() > 0)
    assert worst <= 1e-1


# ------------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(1029, 65536), (16, 262144), (61, 4099)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_sinkhorn_matches_float64(shape, dtype):
    from dino_kernels.sinkhorn import sinkhorn_knopp, sinkhorn_knopp_reference

    logits = (torch.randn(*shape, generator=_generator(shape[1]), device="cuda") * 3.0).to(dtype)
    out = sinkhorn_knopp(logits, 0.07, impl="triton")
    ref = sinkhorn_knopp_reference(logits.double(), 0.07)
    assert out.dtype == torch.float32 and out.shape == logits.shape
    assert rel_err(out, ref) <= 1e-5
    torch.testing.assert_close(out.sum(dim=1), torch.ones(shape[0], device="cuda"), rtol=0, atol=1e-4)


def test_sinkhorn_padding_rows_on_gpu():
    from dino_kernels.sinkhorn import sinkhorn_knopp, sinkhorn_knopp_reference

    logits = torch.randn(300, 65536, generator=_generator(3), device="cuda", dtype=torch.bfloat16)
    out = sinkhorn_knopp(logits, 0.07, n_valid=257, impl="triton")
    ref = sinkhorn_knopp_reference(logits[:257].double(), 0.07)
    assert rel_err(out[:257], ref) <= 1e-5 and torch.equal(out[257:], torch.zeros_like(out[257:]))


# ------------------------------------------------------------------------------------------------------------
# Gram loss
# ------------------------------------------------------------------------------------------------------------


# (algorithm, remove_neg): the d-space identity has no remove_neg form
GRAM_ALGORITHMS = [("tiled", False), ("tiled", True), ("dspace", False), ("auto", False), ("auto", True)]


@pytest.mark.parametrize("algorithm,remove_neg", GRAM_ALGORITHMS, ids=[f"{a}-{r}" for a, r in GRAM_ALGORITHMS])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("P,d", [(1029, 384), (4096, 1024)], ids=lambda v: str(v))
def test_gram_loss_matches_float64(P, d, dtype, algorithm, remove_neg):
    from dino_kernels.gram import gram_loss, gram_loss_reference

    gen = _generator(P + d)
    student = torch.randn(2, P, d, generator=gen, device="cuda").to(dtype)
    teacher = torch.randn(2, P, d, generator=gen, device="cuda").to(dtype)
    s = student.clone().requires_grad_()
    loss = gram_loss(s, teacher, remove_neg=remove_neg, impl="triton", algorithm=algorithm)
    loss.backward()
    s64 = student.double().requires_grad_()
    ref = gram_loss_reference(s64, teacher.double(), remove_neg=remove_neg)
    ref.backward()
    assert abs(loss.item() - ref.item()) / ref.item() <= 1e-5
    assert s.grad.dtype == dtype and rel_err(s.grad, s64.grad) <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("remove_neg", [False, True])
def test_gram_loss_pytorch_tiles_on_gpu(remove_neg):
    """The PyTorch slab version of the tiled algorithm on CUDA tensors (a dispatch candidate on GPUs)."""
    from dino_kernels.gram import gram_loss, gram_loss_reference

    gen = _generator(7)
    student = torch.randn(2, 1029, 384, generator=gen, device="cuda")
    teacher = torch.randn(2, 1029, 384, generator=gen, device="cuda")
    s = student.clone().requires_grad_()
    loss = gram_loss(s, teacher, remove_neg=remove_neg, algorithm="tiled")  # "auto" on CUDA: the slabs
    loss.backward()
    s64 = student.double().requires_grad_()
    ref = gram_loss_reference(s64, teacher.double(), remove_neg=remove_neg)
    ref.backward()
    assert abs(loss.item() - ref.item()) / ref.item() <= 1e-5 and rel_err(s.grad, s64.grad) <= 1e-5
