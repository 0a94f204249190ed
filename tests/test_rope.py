"""RoPE: angles against a float64 hand computation, prefix untouched, jitter ranges and seeding, norms."""

import math

import pytest
import torch

from models.rope import (
    Rope,
    RopeEmbedding,
    augment_coords,
    patch_coords,
    rope_angles,
    rope_periods,
    rope_tokens,
)


def hand_angles(h: int, w: int, head_dim: int, base: float, normalize: str) -> list[list[float]]:
    """Angles of every patch and slot, written out with Python floats (float64) from the definition."""
    den_h, den_w = {"separate": (h, w), "max": (max(h, w),) * 2, "min": (min(h, w),) * 2}[normalize]
    n_freq = head_dim // 4
    periods = [base ** (2 * i / (head_dim / 2)) for i in range(n_freq)]
    rows = []
    for r in range(h):
        for c in range(w):
            coord = (2 * (r + 0.5) / den_h - 1, 2 * (c + 0.5) / den_w - 1)
            half = [2 * math.pi * coord[axis] / periods[i] for axis in range(2) for i in range(n_freq)]
            rows.append(half + half)
    return rows


@pytest.mark.parametrize("normalize", ["separate", "min", "max"])
@pytest.mark.parametrize("h,w,head_dim", [(3, 5, 16), (4, 4, 64), (2, 7, 32)])
def test_angles_match_float64_hand_computation(normalize, h, w, head_dim):
    emb = RopeEmbedding(head_dim, base=100.0, normalize=normalize).eval()
    rope = emb(h, w)
    expected = torch.tensor(hand_angles(h, w, head_dim, 100.0, normalize), dtype=torch.float64)
    assert rope.sin.dtype == torch.float32 and rope.sin.shape == (h * w, head_dim)
    # float32 angles carry an absolute error of ~eps*|angle| (|angle| reaches ~40 rad in "min" mode).
    atol = 1e-6 + 2e-7 * expected.abs().max().item()
    torch.testing.assert_close(rope.sin.double(), expected.sin(), atol=atol, rtol=0)
    torch.testing.assert_close(rope.cos.double(), expected.cos(), atol=atol, rtol=0)


def test_periods_from_base_and_from_min_max():
    p = rope_periods(64, base=100.0)
    assert p.shape == (16,)
    torch.testing.assert_close(p, torch.tensor([100 ** (i / 16) for i in range(16)], dtype=torch.float64))
    q = rope_periods(64, base=None, min_period=0.5, max_period=40.0)
    assert q[0].item() == pytest.approx(0.5) and q[-1].item() == pytest.approx(40.0)
    ratios = q[1:] / q[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, ratios[0].item()))  # log-spaced
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_periods(30)
    with pytest.raises(ValueError, match="not both"):
        rope_periods(64, base=100.0, min_period=1.0, max_period=2.0)


def test_sin_cos_are_float32_whatever_the_model_dtype():
    emb = RopeEmbedding(64).to(torch.bfloat16).eval()
    rope = emb(4, 6)
    assert rope.sin.dtype == rope.cos.dtype == rope.periods.dtype == rope.coords.dtype == torch.float32


@pytest.mark.parametrize("n_prefix", [0, 1, 5])
def test_prefix_tokens_are_not_rotated_and_norms_are_preserved(n_prefix):
    emb = RopeEmbedding(32).eval()
    rope = emb(3, 4)
    x = torch.randn(2, 3, n_prefix + 12, 32)
    y = rope_tokens(x, rope, n_prefix)
    assert torch.equal(y[..., :n_prefix, :], x[..., :n_prefix, :])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    # The patch tokens do move (a non-trivial rotation).
    assert (y[..., n_prefix:, :] - x[..., n_prefix:, :]).abs().max() > 1e-2


def test_rope_tokens_rejects_a_mismatched_sequence():
    rope = RopeEmbedding(32).eval()(3, 4)
    with pytest.raises(ValueError, match="12 patches"):
        rope_tokens(torch.randn(1, 1, 20, 32), rope, 5)


def test_relative_positions_only():
    """q.k after rotation depends on the coordinate difference only: shifting every token changes nothing."""
    periods = rope_periods(32).float()
    coords = patch_coords(3, 5)
    q, k = torch.randn(15, 32, dtype=torch.float64), torch.randn(15, 32, dtype=torch.float64)

    def scores(c):
        a = rope_angles(c.double(), periods.double())
        rope = Rope(coords=c, periods=periods, sin=a.sin(), cos=a.cos())
        return rope_tokens(q[None, None], rope, 0)[0, 0].double() @ rope_tokens(k[None, None], rope, 0)[0, 0].double().T

    shifted = coords + torch.tensor([0.37, -0.21])
    torch.testing.assert_close(scores(coords), scores(shifted), rtol=1e-5, atol=1e-5)


def test_rescale_range_isotropic_and_seeded():
    base = patch_coords(6, 4)
    gen = torch.Generator().manual_seed(0)
    factors = []
    for _ in range(200):
        c = augment_coords(base, rescale=2.0, generator=gen)
        ratio = c / base
        torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0, 0].item()))  # isotropic
        factors.append(ratio[0, 0].item())
    assert 0.5 <= min(factors) < 0.6 and 1.8 < max(factors) <= 2.0
    logs = torch.tensor(factors).log()
    assert abs(logs.mean().item()) < 0.15  # log-uniform around 1


def test_jitter_is_per_axis_and_shift_is_bounded():
    base = patch_coords(4, 6)  # even sides: no coordinate is 0, so ratios are defined
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        c = augment_coords(base, jitter=1.5, generator=gen)
        ratio = c / base
        assert torch.all((ratio >= 1 / 1.5 - 1e-6) & (ratio <= 1.5 + 1e-6))
        torch.testing.assert_close(ratio[:, 0], ratio[:1, 0].expand(24))
        torch.testing.assert_close(ratio[:, 1], ratio[:1, 1].expand(24))
        s = augment_coords(base, shift=0.3, generator=gen) - base
        assert torch.all(s.abs() <= 0.3 + 1e-6)
        torch.testing.assert_close(s, s[:1].expand(24, 2))


def test_seeded_generator_reproduces_the_box_and_eval_has_none():
    a, b = RopeEmbedding(64, rescale=2.0, jitter=1.3, shift=0.1), RopeEmbedding(64, rescale=2.0, jitter=1.3, shift=0.1)
    a.seed(7)
    b.seed(7)
    ra1, ra2 = a(4, 4), a(4, 4)
    rb1 = b(4, 4)
    assert torch.equal(ra1.coords, rb1.coords)
    assert not torch.equal(ra1.coords, ra2.coords)  # a new draw per call
    a.eval()
    assert torch.equal(a(4, 4).coords, patch_coords(4, 4))


def test_unknown_normalization_is_rejected():
    with pytest.raises(ValueError, match="separate, min or max"):
        patch_coords(2, 2, "diag")
