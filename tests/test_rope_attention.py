"""RoPE attention kernel (Triton, run by the interpreter) against a float64 reference, plus the ViT parity check.

Inputs are views of a [B, N, 3, H, D] qkv tensor as the model produces them; coordinates come from the real
RoPE module (non-square grids, with and without box jitter); sequence lengths are not multiples of the
interpreter's blocks (32 and 16). Under the interpreter every output buffer starts as NaN, so an element
the kernels never write makes the error NaN and the test fail.
"""

import pytest
import torch

from dino_kernels.rope_attention import RopeAttentionFunction, rope_attention, rope_attention_reference, uses_triton
from models.rope import augment_coords, patch_coords, rope_periods

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; the absolute error when ref is exactly zero (dq, dk of a single token)."""
    diff = (out.double() - ref.double()).norm()
    ref_norm = ref.double().norm()
    return (diff / ref_norm if ref_norm > 0 else diff).item()


def make_rope(h: int, w: int, head_dim: int, jitter: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    coords = patch_coords(h, w)
    if jitter:
        gen = torch.Generator().manual_seed(seed)
        coords = augment_coords(coords, shift=0.2, jitter=1.5, rescale=2.0, generator=gen)
    return coords, rope_periods(head_dim).float()


def make_qkv(batch: int, n_tokens: int, heads: int, head_dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n_tokens, 3, heads, head_dim, generator=gen, dtype=torch.float64).to(dtype)


def check_against_float64(
    qkv: torch.Tensor, coords, periods, n_prefix: int, seed: int, rope_mode: str = "inline"
) -> dict[str, float]:
    """Run the kernel forward + backward on views of qkv and return the relative errors vs float64."""
    qkv = qkv.detach().requires_grad_()
    q, k, v = qkv.unbind(2)
    out = rope_attention(q, k, v, coords, periods, n_prefix, impl="triton", rope_mode=rope_mode)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    out.backward(grad_out.to(out.dtype))

    qkv64 = qkv.detach().double().requires_grad_()
    q64, k64, v64 = qkv64.unbind(2)
    coords64 = None if coords is None else coords.double()
    periods64 = None if periods is None else periods.double()
    ref = rope_attention_reference(q64, k64, v64, coords64, periods64, n_prefix)
    ref.backward(grad_out)
    errors = {"out": rel_err(out, ref)}
    for i, name in enumerate(("dq", "dk", "dv")):
        errors[name] = rel_err(qkv.grad[:, :, i], qkv64.grad[:, :, i])
    return errors


# (batch, heads, grid rows, grid cols, n_prefix, head_dim, dtype, jitter): covers D 32/64/128, prefix 0/1/5,
# every dtype, jittered and plain coordinates, square and non-square grids, N below, across and above the
# block sizes, without the full cartesian product (the interpreter is slow).
CASES = [
    (2, 2, 5, 7, 5, 32, torch.float32, True),
    (1, 3, 9, 11, 1, 64, torch.float32, False),
    (1, 2, 4, 6, 0, 128, torch.float32, True),
    (2, 2, 6, 5, 1, 32, torch.float16, True),
    (1, 2, 7, 9, 5, 64, torch.float16, False),
    (1, 2, 8, 5, 5, 128, torch.float16, True),
    (2, 1, 3, 9, 0, 32, torch.bfloat16, False),
    (1, 2, 7, 9, 5, 64, torch.bfloat16, True),
    (1, 2, 5, 4, 1, 128, torch.bfloat16, True),
    (1, 2, 14, 14, 5, 64, torch.bfloat16, True),  # 224 px crop: N = 201
    (1, 1, 16, 18, 5, 64, torch.float32, True),  # non-square, N = 293
]


@pytest.mark.parametrize("rope_mode", ["inline", "prerotate"])
@pytest.mark.parametrize("batch,heads,h,w,n_prefix,head_dim,dtype,jitter", CASES)
def test_forward_and_grads_match_float64_reference(batch, heads, h, w, n_prefix, head_dim, dtype, jitter, rope_mode):
    seed = h * 100 + w + head_dim
    coords, periods = make_rope(h, w, head_dim, jitter, seed)
    qkv = make_qkv(batch, n_prefix + h * w, heads, head_dim, dtype, seed)
    errors = check_against_float64(qkv, coords, periods, n_prefix, seed, rope_mode)
    assert all(e <= TOLERANCE[dtype] for e in errors.values()), f"{dtype} relative errors {errors}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_attention_without_rope(dtype):
    qkv = make_qkv(2, 37, 2, 64, dtype, seed=7)
    errors = check_against_float64(qkv, None, None, n_prefix=1, seed=7)
    assert all(e <= TOLERANCE[dtype] for e in errors.values()), f"{dtype} relative errors {errors}"


@pytest.mark.parametrize("rope_mode", ["inline", "prerotate"])
@pytest.mark.parametrize("n_tokens,n_prefix", [(1, 0), (1, 1), (5, 5), (6, 5)])
def test_tiny_sequences(n_tokens, n_prefix, rope_mode):
    """A single token, only prefix tokens, and a single patch: everything lives in one partial block."""
    coords, periods = make_rope(1, n_tokens - n_prefix, 32, jitter=True, seed=n_tokens)
    qkv = make_qkv(2, n_tokens, 2, 32, torch.float32, seed=n_tokens)
    errors = check_against_float64(qkv, coords, periods, n_prefix, seed=n_tokens, rope_mode=rope_mode)
    assert all(e <= TOLERANCE[torch.float32] for e in errors.values()), f"relative errors {errors}"


def test_arbitrary_strides_and_custom_scale():
    """q from a [B, H, N, D] tensor, k with a head-dim stride of 2, v contiguous: the kernel reads strides."""
    batch, n_tokens, heads, head_dim, n_prefix = 2, 41, 2, 64, 5
    coords, periods = make_rope(4, 9, head_dim, jitter=True, seed=3)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(batch, heads, n_tokens, head_dim, generator=gen).transpose(1, 2)
    k = torch.randn(batch, n_tokens, heads, 2 * head_dim, generator=gen)[..., ::2]
    v = torch.randn(batch, n_tokens, heads, head_dim, generator=gen)
    assert not q.is_contiguous() and k.stride(-1) == 2
    ref = rope_attention_reference(q.double(), k.double(), v.double(), coords.double(), periods.double(), n_prefix, 0.3)
    for rope_mode in ("inline", "prerotate"):
        out = rope_attention(q, k, v, coords, periods, n_prefix, scale=0.3, impl="triton", rope_mode=rope_mode)
        assert out.is_contiguous() and rel_err(out, ref) <= 1e-4, rope_mode


@pytest.mark.parametrize("prerotate", [False, True])
@pytest.mark.parametrize("n_prefix,jitter", [(5, True), (0, False)])
def test_gradcheck_float64(n_prefix, jitter, prerotate):
    """The autograd.Function in float64 (kernels accumulate in float64 then) against finite differences."""
    coords, periods = make_rope(2, 3, 32, jitter, seed=11)
    qkv = make_qkv(1, n_prefix + 6, 2, 32, torch.float64, seed=11)
    q, k, v = (t.clone().requires_grad_() for t in qkv.unbind(2))

    def attend(q, k, v):
        return RopeAttentionFunction.apply(q, k, v, coords.double(), periods.double(), n_prefix, 32**-0.5, prerotate)

    assert torch.autograd.gradcheck(attend, (q, k, v), fast_mode=True, atol=1e-7, rtol=1e-5)


def test_auto_runs_the_kernel_under_the_interpreter_and_the_reference_on_cpu_without_it(monkeypatch):
    """Which path "auto" takes on CPU tensors, observed by recording the calls of both."""
    import dino_kernels.rope_attention as module

    calls = []
    reference, kernel = module.rope_attention_reference, module.RopeAttentionFunction.apply
    monkeypatch.setattr(module, "rope_attention_reference",
                        lambda *args, **kwargs: calls.append("reference") or reference(*args, **kwargs))
    monkeypatch.setattr(module.RopeAttentionFunction, "apply", lambda *args: calls.append("triton") or kernel(*args))
    coords, periods = make_rope(3, 4, 32, jitter=True, seed=5)
    q, k, v = make_qkv(1, 13, 2, 32, torch.float32, seed=5).unbind(2)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = rope_attention(q, k, v, coords, periods, 1)
    assert calls == ["triton"]
    assert torch.equal(out, rope_attention(q, k, v, coords, periods, 1, impl="triton"))

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls.clear()
    rope_attention(q, k, v, coords, periods, 1)
    assert calls == ["reference"]
    with pytest.raises(RuntimeError, match="impl='triton' was forced but the tensors are on cpu"):
        rope_attention(q, k, v, coords, periods, 1, impl="triton")
    assert calls == ["reference"]


def test_uses_triton_is_the_common_rule_on_the_cpu(monkeypatch):
    q = torch.randn(1, 4, 1, 32)
    assert uses_triton(q, "auto") and uses_triton(q, "triton") and not uses_triton(q, "reference")  # interpreted
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not uses_triton(q, "auto") and not uses_triton(q, "reference")
    with pytest.raises(RuntimeError, match="impl='triton' was forced"):
        uses_triton(q, "triton")


def test_bad_inputs_raise_clear_errors():
    coords, periods = make_rope(3, 4, 32, jitter=False, seed=0)
    q, k, v = make_qkv(1, 13, 2, 32, torch.float32, seed=0).unbind(2)
    with pytest.raises(ValueError, match="coords must be"):
        rope_attention(q, k, v, coords[:-1], periods, 1)
    with pytest.raises(ValueError, match="periods must be"):
        rope_attention(q, k, v, coords, periods[:-1], 1)
    with pytest.raises(ValueError, match="both coords and periods"):
        rope_attention(q, k, v, coords, None, 1)
    with pytest.raises(ValueError, match="n_prefix"):
        rope_attention(q, k, v, None, None, 14)
    with pytest.raises(ValueError, match="same"):
        rope_attention(q, k[:, :-1], v, None, None, 1)
    q48, k48, v48 = make_qkv(1, 13, 2, 48, torch.float32, seed=0).unbind(2)
    with pytest.raises(ValueError, match="head dims"):
        rope_attention(q48, k48, v48, None, None, 1, impl="triton")
    with pytest.raises(ValueError, match="rope_mode"):
        rope_attention(q, k, v, coords, periods, 1, rope_mode="table")
    with pytest.raises(ValueError, match="impl must be 'auto', 'triton' or 'reference'"):
        rope_attention(q, k, v, coords, periods, 1, impl="sdpa")


@pytest.mark.parametrize("train", [False, True])
def test_vit_triton_attention_matches_sdpa(train):
    """vit_tiny (3 heads of 64, 5 prefix tokens) on a 64x80 image: same outputs and gradients either way."""
    from models.vit import build_vit

    torch.manual_seed(0)
    model = build_vit("vit_tiny", attn_impl="sdpa").train(train)
    images = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    results = {}
    for impl in ("sdpa", "triton"):
        model.set_attn_impl(impl)
        model.zero_grad(set_to_none=True)
        model.rope_embed.seed(123)  # the same RoPE box jitter for both backends in train mode
        out = model(images)
        weights = torch.Generator().manual_seed(2)
        loss = sum((out[key] * torch.randn(out[key].shape, generator=weights)).sum()
                   for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens"))
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[impl] = (out, grads)
    (out_sdpa, grads_sdpa), (out_triton, grads_triton) = results["sdpa"], results["triton"]
    for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
        assert rel_err(out_triton[key], out_sdpa[key]) <= 1e-4, key
    assert grads_sdpa.keys() == grads_triton.keys() and len(grads_sdpa) > 0
    worst = max(rel_err(grads_triton[name], grads_sdpa[name]) for name in grads_sdpa if grads_sdpa[name].norm() > 0)
    assert worst <= 1e-4
