"""Gram loss: loss and gradient against a float64 run of the official formula, for the Triton tiles (under
TRITON_INTERPRET=1), the PyTorch slabs and the d-space identity; the d-space accuracy guard; the dispatch of impl
(the reference is gram_loss_reference itself); dtypes, strides, gradient routing and input checks."""

import pytest
import torch

import dino_kernels.gram
from dino_kernels.gram import (
    DSPACE_MAX_REL_ERROR,
    dspace_loss_sum,
    gram_loss,
    gram_loss_reference,
    sum_and_difference,
)

# float32 paths land at 1e-8..5e-7 of float64 on these shapes; 1e-5 leaves room without hiding a real bug.
FP32_TOL = 1e-5


def features(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def float64_reference(student: torch.Tensor, teacher: torch.Tensor, **options) -> tuple[float, torch.Tensor]:
    """Loss and student gradient of the official formula computed in float64 from the same input values."""
    s = student.detach().double().requires_grad_(True)
    loss = gram_loss_reference(s, teacher.double(), **options)
    loss.backward()
    return loss.item(), s.grad


def ours(student: torch.Tensor, teacher: torch.Tensor, **kwargs) -> tuple[float, torch.Tensor]:
    s = student.detach().clone().requires_grad_(True)
    loss = gram_loss(s, teacher, **kwargs)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    assert s.grad.dtype == student.dtype and s.grad.shape == student.shape
    assert torch.isfinite(s.grad).all(), "an unwritten (NaN-poisoned) or overflowing gradient element"
    return loss.item(), s.grad


def impl_for(backend: str, monkeypatch) -> str:
    """gram_loss's impl for a backend under test: "triton" (the Triton tiles, interpreted here) or "torch" (the
    PyTorch slabs: impl="auto" as on a CPU without TRITON_INTERPRET)."""
    if backend == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        return "auto"
    return backend


@pytest.fixture
def without_interpreter(monkeypatch):
    """As on a CPU without TRITON_INTERPRET: impl="auto" runs the PyTorch slabs and the d-space matmuls."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def rel(value, reference) -> float:
    if isinstance(value, float):
        return abs(value - reference) / abs(reference)
    return ((value.double() - reference).norm() / reference.norm()).item()


def rotated_pair(B: int, P: int, d: int, delta: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher = student features rotated in d-space plus delta-noise: equal Gram matrices up to delta, distant
    features, the case where the d-space identity cancels."""
    student = features(B, P, d, seed=seed)
    rotation, _ = torch.linalg.qr(features(d, d, seed=seed + 1, dtype=torch.float64))
    teacher = (student.double() @ rotation).float() + delta * features(B, P, d, seed=seed + 2)
    return student, teacher


# ----------------------------------------------------------------------------------------------------------------
# Triton tiles (interpreter): P not a multiple of the 64-row interpreter tile, d spanning several 32-wide chunks
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("remove_neg", [False, True])
@pytest.mark.parametrize("P,img_level", [(257, True), (130, False)])  # one Gram over 260 tokens when not img_level
def test_triton_tiles_match_float64_reference(P, img_level, remove_neg):
    student, teacher = features(2, P, 64, seed=1), features(2, P, 64, seed=2)
    options = dict(remove_neg=remove_neg, img_level=img_level)
    want_loss, want_grad = float64_reference(student, teacher, **options)
    loss, grad = ours(student, teacher, **options, impl="triton", algorithm="tiled")
    assert rel(loss, want_loss) < FP32_TOL
    assert rel(grad, want_grad) < FP32_TOL


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,remove_neg,d", [(torch.bfloat16, True, 64), (torch.float16, False, 40)])
def test_16bit_inputs(dtype, remove_neg, d, backend, monkeypatch):
    student, teacher = features(2, 257, d, seed=3, dtype=dtype), features(2, 257, d, seed=4, dtype=dtype)
    want_loss, want_grad = float64_reference(student, teacher, remove_neg=remove_neg)
    algorithm = "tiled" if backend == "triton" else "auto"  # the PyTorch run takes d-space without remove_neg
    loss, grad = ours(student, teacher, remove_neg=remove_neg, impl=impl_for(backend, monkeypatch),
                      algorithm=algorithm)
    assert rel(loss, want_loss) < FP32_TOL  # the 16-bit values are exact in float32: no extra loss error
    # The gradient comes back in the input dtype: as close as rounding the exact one to that dtype gets.
    rounding = rel(want_grad.to(dtype), want_grad)
    assert rel(grad, want_grad) <= 1.5 * rounding + FP32_TOL


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("remove_neg", [False, True])
def test_loss_without_gradient_visits_half_the_tiles_correctly(backend, remove_neg, monkeypatch):
    student, teacher = features(2, 257, 64, seed=5), features(2, 257, 64, seed=6)
    want_loss, _ = float64_reference(student, teacher, remove_neg=remove_neg)
    with torch.no_grad():
        loss = gram_loss(student, teacher, remove_neg=remove_neg, impl=impl_for(backend, monkeypatch),
                         algorithm="tiled")
    assert rel(loss.item(), want_loss) < FP32_TOL
    assert not loss.requires_grad


# ----------------------------------------------------------------------------------------------------------------
# PyTorch (impl="auto" without the interpreter): every algorithm on P = 257 / 1029, d = 64 / 384
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("img_level", [True, False])
@pytest.mark.parametrize("remove_neg", [False, True])
@pytest.mark.parametrize("P,d", [(257, 64), (257, 384), (1029, 64), (1029, 384)])
def test_torch_algorithms_match_float64_reference(P, d, remove_neg, img_level, without_interpreter):
    student, teacher = features(2, P, d, seed=7), features(2, P, d, seed=8)
    options = dict(remove_neg=remove_neg, img_level=img_level)
    want_loss, want_grad = float64_reference(student, teacher, **options)
    for algorithm in ("auto", "tiled") if remove_neg else ("auto", "tiled", "dspace"):
        loss, grad = ours(student, teacher, **options, algorithm=algorithm)
        assert rel(loss, want_loss) < FP32_TOL, algorithm
        assert rel(grad, want_grad) < FP32_TOL, algorithm


def test_unnormalized_features_and_rows_below_the_norm_eps(without_interpreter):
    student, teacher = features(2, 257, 64, seed=9), features(2, 257, 64, seed=10)
    want_loss, want_grad = float64_reference(student, teacher, normalize=False)
    for algorithm in ("tiled", "dspace"):
        loss, grad = ours(student, teacher, normalize=False, algorithm=algorithm)
        assert rel(loss, want_loss) < FP32_TOL and rel(grad, want_grad) < FP32_TOL
    # F.normalize divides rows with norm < 1e-12 by 1e-12 (no projection in the gradient): a zero and a tiny row.
    student[0, 3] = 0.0
    student[1, 100] *= 1e-14
    want_loss, want_grad = float64_reference(student, teacher)
    loss, grad = ours(student, teacher, algorithm="tiled")
    assert rel(loss, want_loss) < FP32_TOL and rel(grad, want_grad) < FP32_TOL


# ----------------------------------------------------------------------------------------------------------------
# The d-space identity and its accuracy guard
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-1, 1e-2, 1e-3])
def test_dspace_stays_accurate_when_student_is_close_to_teacher(eps, without_interpreter):
    teacher = features(2, 1029, 384, seed=11)
    student = teacher + eps * features(2, 1029, 384, seed=12)
    want_loss, want_grad = float64_reference(student, teacher)
    u, v, _ = sum_and_difference(student, teacher, normalize=True)
    _, _, estimate = dspace_loss_sum(u, v, want_grad=False)
    assert estimate <= DSPACE_MAX_REL_ERROR  # so algorithm="auto" keeps the d-space result here (P > d)
    for algorithm in ("auto", "dspace", "tiled"):
        loss, grad = ours(student, teacher, algorithm=algorithm)
        assert rel(loss, want_loss) < FP32_TOL, algorithm
        assert rel(grad, want_grad) < FP32_TOL, algorithm


@pytest.mark.parametrize("delta", [1e-1, 1e-2, 1e-3])
def test_guard_estimate_bounds_the_dspace_error_on_rotated_features(delta, without_interpreter):
    student, teacher = rotated_pair(2, 513, 64, delta, seed=13)
    want_loss, _ = float64_reference(student, teacher)
    u, v, _ = sum_and_difference(student, teacher, normalize=True)
    _, _, estimate = dspace_loss_sum(u, v, want_grad=False)
    dspace_loss, _ = ours(student, teacher, algorithm="dspace")
    assert rel(dspace_loss, want_loss) <= estimate
    auto_loss, _ = ours(student, teacher)
    assert rel(auto_loss, want_loss) < DSPACE_MAX_REL_ERROR


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_guard_sends_cancelling_identity_to_the_tiles(backend, monkeypatch):
    student, teacher = rotated_pair(2, 513, 64, 1e-3, seed=14)
    want_loss, want_grad = float64_reference(student, teacher)
    u, v, _ = sum_and_difference(student, teacher, normalize=True)
    _, _, estimate = dspace_loss_sum(u, v, want_grad=False)
    assert estimate > DSPACE_MAX_REL_ERROR
    dspace_loss, _ = ours(student, teacher, algorithm="dspace")
    assert rel(dspace_loss, want_loss) > DSPACE_MAX_REL_ERROR  # what the guard protects against
    loss, grad = ours(student, teacher, impl=impl_for(backend, monkeypatch), algorithm="auto")
    assert rel(loss, want_loss) < FP32_TOL
    # The gradient is ill-conditioned here on every algorithm (feature rounding / delta): loose bound only.
    assert rel(grad, want_grad) < 1e-3


@pytest.mark.parametrize("backend,algorithm", [("torch", "dspace"), ("torch", "tiled"), ("triton", "tiled"),
                                               ("reference", "auto")])
def test_identical_features_give_exactly_zero(backend, algorithm, monkeypatch):
    student = features(2, 257, 64, seed=15)
    loss, grad = ours(student, student.clone(), impl=impl_for(backend, monkeypatch), algorithm=algorithm)
    assert loss == 0.0 and not grad.any()


# ----------------------------------------------------------------------------------------------------------------
# Layouts, gradient routing, input checks
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_student_may_be_a_non_contiguous_view(backend, monkeypatch):
    base = features(2, 40, 257, seed=16)  # [B, d, P] storage read as [B, P, d]
    student, teacher = base.transpose(1, 2), features(2, 257, 40, seed=17)
    assert not student.is_contiguous()
    impl = impl_for(backend, monkeypatch)
    want_loss, want_grad = ours(student.contiguous(), teacher, remove_neg=True, impl=impl, algorithm="tiled")
    loss, grad = ours(student, teacher, remove_neg=True, impl=impl, algorithm="tiled")
    assert rel(loss, want_loss) < 1e-6 and rel(grad, want_grad.double()) < 1e-6


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_float64_inputs_are_left_untouched(backend, monkeypatch):
    student, teacher = features(2, 257, 64, seed=20, dtype=torch.float64), features(2, 257, 64, seed=21,
                                                                                   dtype=torch.float64)
    student_before, teacher_before = student.clone(), teacher.clone()
    want_loss, want_grad = float64_reference(student, teacher)
    impl = impl_for(backend, monkeypatch)
    for algorithm in ("tiled", "dspace"):
        assert rel(gram_loss(student, teacher, impl=impl, algorithm=algorithm).item(), want_loss) < FP32_TOL
        loss, grad = ours(student, teacher, impl=impl, algorithm=algorithm)
        assert rel(loss, want_loss) < FP32_TOL and rel(grad, want_grad) < FP32_TOL
        assert torch.equal(student, student_before) and torch.equal(teacher, teacher_before)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_gradient_reaches_the_student_only_and_follows_the_upstream_gradient(impl, without_interpreter):
    student = features(2, 257, 64, seed=18).requires_grad_(True)
    teacher = features(2, 257, 64, seed=19).requires_grad_(True)
    loss = gram_loss(student, teacher, impl=impl)
    (2.5 * loss).backward()
    assert teacher.grad is None
    _, want_grad = float64_reference(student, teacher)
    assert rel(student.grad, 2.5 * want_grad) < FP32_TOL
    assert not gram_loss(student.detach(), teacher, impl=impl).requires_grad


# ----------------------------------------------------------------------------------------------------------------
# Dispatch: impl picks who computes, algorithm what; "reference" is gram_loss_reference itself
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("options", [{}, {"remove_neg": True}, {"img_level": False}, {"normalize": False}], ids=str)
def test_reference_impl_is_the_specification_with_its_autograd_gradient(options, dtype):
    student, teacher = features(2, 37, 24, seed=22, dtype=dtype), features(2, 37, 24, seed=23, dtype=dtype)
    s = student.clone().requires_grad_(True)
    want = gram_loss_reference(s, teacher, **options)
    want.backward()
    loss, grad = ours(student, teacher, impl="reference", **options)
    assert loss == want.to(torch.float32).item()
    assert torch.equal(grad, s.grad)


@pytest.mark.parametrize("interpreted", [True, False])
@pytest.mark.parametrize("impl", ["auto", "triton", "reference"])
def test_each_impl_runs_its_own_code(impl, interpreted, monkeypatch):
    """Tiled algorithm forced (P < d sends "auto" there as well): which function computes it."""
    if not interpreted:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls = []
    for name in ("tiled_loss_sum_triton", "tiled_loss_sum_torch", "dspace_loss_sum", "gram_loss_reference"):

        def counted(*args, _name=name, _original=getattr(dino_kernels.gram, name), **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(dino_kernels.gram, name, counted)
    student, teacher = features(2, 20, 40, seed=24), features(2, 20, 40, seed=25)
    if impl == "triton" and not interpreted:
        with pytest.raises(RuntimeError, match="impl='triton' was forced"):
            gram_loss(student, teacher, impl=impl)
        return
    gram_loss(student, teacher, impl=impl)
    expected = {"reference": "gram_loss_reference", "triton": "tiled_loss_sum_triton",
                "auto": "tiled_loss_sum_triton" if interpreted else "tiled_loss_sum_torch"}[impl]
    assert calls == [expected]


@pytest.mark.parametrize(
    "student,teacher,kwargs,message",
    [
        (torch.randn(8, 16), torch.randn(8, 16), {}, "3-D tensor"),
        (torch.randn(2, 8, 16), torch.randn(2, 9, 16), {}, "same shape"),
        (torch.ones(2, 8, 16, dtype=torch.int32), torch.ones(2, 8, 16, dtype=torch.int32), {}, "floating point"),
        (torch.randn(2, 0, 16), torch.randn(2, 0, 16), {}, "at least 1"),
        (torch.randn(2, 8, 16), torch.randn(2, 8, 16), {"algorithm": "dspace", "remove_neg": True}, "no form"),
        (torch.randn(2, 8, 16), torch.randn(2, 8, 16), {"algorithm": "fast"}, "algorithm must be"),
        (torch.randn(2, 8, 16), torch.randn(2, 8, 16), {"impl": "cuda"}, "impl must be"),
        (torch.randn(2, 8, 16), torch.randn(2, 8, 16), {"impl": "reference", "algorithm": "tiled"},
         "no algorithm choice"),
    ],
)
def test_bad_inputs_raise_clear_errors(student, teacher, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gram_loss(student, teacher, **kwargs)
