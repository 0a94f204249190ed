"""DINO/iBOT heads and the DINO and iBOT losses, against float64 references written from their definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data.masking import ibot_mask_weights
from dino_kernels.sinkhorn import sinkhorn_knopp_reference
from losses.dino import DINOLoss
from losses.ibot import IBOTLoss
from models.heads import DINOHead


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def random_probs(rows: int, n_protos: int, generator: torch.Generator) -> torch.Tensor:
    return torch.softmax(torch.randn(rows, n_protos, generator=generator) * 2, dim=-1)


# ------------------------------------------------------------------------------------------------------------
# Heads
# ------------------------------------------------------------------------------------------------------------


def test_head_keys_shapes_and_init():
    head = DINOHead(in_dim=24, out_dim=50, hidden_dim=40, bottleneck_dim=12)
    shapes = {name: tuple(t.shape) for name, t in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (40, 24), "mlp.0.bias": (40,),
        "mlp.2.weight": (40, 40), "mlp.2.bias": (40,),
        "mlp.4.weight": (12, 40), "mlp.4.bias": (12,),
        "last_layer.weight": (50, 12),
    }
    assert head.last_layer.bias is None
    assert isinstance(head.mlp[1], torch.nn.GELU) and isinstance(head.mlp[3], torch.nn.GELU)
    for name, tensor in head.state_dict().items():
        if name.endswith("bias"):
            assert torch.count_nonzero(tensor) == 0, name
    big = DINOHead(in_dim=256, out_dim=512, hidden_dim=256, bottleneck_dim=256)
    weights = torch.cat([big.mlp[0].weight.flatten(), big.last_layer.weight.flatten()])
    assert abs(weights.std().item() - 0.02) < 0.002  # not PyTorch's default Linear init (std ~0.036 here)
    assert tuple(head(torch.randn(7, 24)).shape) == (7, 50)
    assert tuple(head(torch.randn(2, 3, 24)).shape) == (2, 3, 50)


def test_normalized_prototypes_score_cosine_similarities_with_the_same_weights():
    torch.manual_seed(0)
    raw = DINOHead(in_dim=16, out_dim=30, hidden_dim=32, bottleneck_dim=8)
    cosine = DINOHead(in_dim=16, out_dim=30, hidden_dim=32, bottleneck_dim=8, normalize_prototypes=True)
    cosine.load_state_dict(raw.state_dict())  # same keys: checkpoints move between the two
    tokens = torch.randn(9, 16)
    embedding = raw.bottleneck(tokens).double()
    prototypes = raw.last_layer.weight.double()
    expected = embedding @ (prototypes / prototypes.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(cosine(tokens).double(), expected, rtol=1e-5, atol=1e-6)
    assert cosine(tokens).abs().max() <= 1 + 1e-5
    # The raw layer's scores are ~0.02 * sqrt(8) times smaller at this init: the reason the option exists.
    assert raw(tokens).std() < 0.5 * cosine(tokens).std()


def test_head_matches_float64_definition_and_normalizes_the_bottleneck():
    torch.manual_seed(0)
    head = DINOHead(in_dim=16, out_dim=30, hidden_dim=32, bottleneck_dim=8)
    for param in head.parameters():  # larger weights than the init, so that the normalization matters
        torch.nn.init.normal_(param, std=0.5)
    tokens = torch.randn(9, 16)
    embedding = head.bottleneck(tokens)
    torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(9))

    p = {name: t.double() for name, t in head.state_dict().items()}
    h = F.gelu(tokens.double() @ p["mlp.0.weight"].T + p["mlp.0.bias"])
    h = F.gelu(h @ p["mlp.2.weight"].T + p["mlp.2.bias"])
    z = h @ p["mlp.4.weight"].T + p["mlp.4.bias"]
    expected = (z / z.norm(dim=-1, keepdim=True)) @ p["last_layer.weight"].T
    assert rel_err(head(tokens), expected) < 1e-5


def test_head_other_depths_and_bad_input():
    assert [type(m).__name__ for m in DINOHead(8, 10, 16, 4, nlayers=1).mlp] == ["Linear"]
    assert len(DINOHead(8, 10, 16, 4, nlayers=4).mlp) == 7
    with pytest.raises(ValueError, match="in_dim=8"):
        DINOHead(8, 10, 16, 4)(torch.randn(3, 9))
    with pytest.raises(ValueError, match="out_dim"):
        DINOHead(8, 0)


# ------------------------------------------------------------------------------------------------------------
# DINO loss
# ------------------------------------------------------------------------------------------------------------


def dino_reference(student: torch.Tensor, teacher: torch.Tensor, n_global: int, student_temp: float):
    """Explicit loop over the crop pairs in float64: (loss, global mean, local mean)."""
    n_images = teacher.shape[0] // n_global
    student_crops = student.double().split(n_images)
    teacher_crops = teacher.double().split(n_images)
    global_terms, local_terms = [], []
    for s, logits in enumerate(student_crops):
        log_probs = torch.log_softmax(logits / student_temp, dim=-1)
        for t, probs in enumerate(teacher_crops):
            if s == t:
                continue
            ce = -(probs * log_probs).sum(dim=-1).mean()
            (global_terms if s < n_global else local_terms).append(ce)
    every = global_terms + local_terms
    mean = lambda terms: sum(terms) / len(terms) if terms else torch.zeros((), dtype=torch.float64)  # noqa: E731
    return mean(every), mean(global_terms), mean(local_terms)


@pytest.mark.parametrize("n_global,n_local,n_images,n_protos", [(2, 3, 4, 33), (2, 0, 5, 17), (3, 2, 2, 64)])
def test_dino_loss_matches_float64_reference(n_global, n_local, n_images, n_protos):
    generator = torch.Generator().manual_seed(n_global * 100 + n_local * 10 + n_images)
    student = torch.randn((n_global + n_local) * n_images, n_protos, generator=generator) * 3
    teacher = random_probs(n_global * n_images, n_protos, generator)
    loss_fn = DINOLoss(n_protos, student_temp=0.1)
    out = loss_fn(student, teacher, n_global_crops=n_global)
    expected = dino_reference(student, teacher, n_global, 0.1)
    for got, want in zip(out, expected):
        if want.abs() > 0:
            assert rel_err(got, want) < 1e-5
        else:
            assert got.item() == 0.0
    # The DINOv3 recombination of the two logged parts (weights proportional to the pair counts).
    n_global_pairs, n_local_pairs = n_global * (n_global - 1), n_local * n_global
    recombined = (n_global_pairs * out.global_loss + n_local_pairs * out.local_loss) / (n_global_pairs + n_local_pairs)
    assert rel_err(out.loss, recombined) < 1e-6


def test_dino_loss_pair_counts():
    # One-hot targets on prototype 0 make every pair's CE equal -log p_s[0], a number per student crop: the loss
    # then weighs each global crop once (one other global crop) and each local crop twice (both global crops).
    n_images, n_protos, n_local = 3, 5, 4
    student = torch.randn((2 + n_local) * n_images, n_protos)
    teacher = torch.zeros(2 * n_images, n_protos)
    teacher[:, 0] = 1.0
    crop_ce = -torch.log_softmax(student.double() / 0.1, dim=-1)[:, 0].view(2 + n_local, n_images).mean(dim=1)
    expected = (crop_ce[:2].sum() + 2 * crop_ce[2:].sum()) / (2 + 2 * n_local)
    assert rel_err(DINOLoss(n_protos)(student, teacher).loss, expected) < 1e-6


def test_dino_loss_skips_same_crop_pairs():
    """The gradient reaching student global crop 0 depends on teacher crop 1 only, and vice versa."""
    generator = torch.Generator().manual_seed(1)
    n_images, n_protos = 4, 16
    student = torch.randn(5 * n_images, n_protos, generator=generator, requires_grad=True)
    teacher = random_probs(2 * n_images, n_protos, generator)
    changed = teacher.clone()
    changed[:n_images] = random_probs(n_images, n_protos, generator)  # teacher crop 0 only
    loss_fn = DINOLoss(n_protos)
    (grad_before,) = torch.autograd.grad(loss_fn(student, teacher).loss, student)
    (grad_after,) = torch.autograd.grad(loss_fn(student, changed).loss, student)
    crop = lambda grad, i: grad[i * n_images:(i + 1) * n_images]  # noqa: E731
    assert torch.equal(crop(grad_before, 0), crop(grad_after, 0))
    assert not torch.allclose(crop(grad_before, 1), crop(grad_after, 1))
    assert not torch.allclose(crop(grad_before, 2), crop(grad_after, 2))
    assert torch.isfinite(grad_before).all()


def test_dino_loss_low_precision_student_and_gradients():
    generator = torch.Generator().manual_seed(2)
    student = (torch.randn(6 * 4, 32, generator=generator) * 3).bfloat16().requires_grad_()
    teacher = random_probs(2 * 4, 32, generator)
    out = DINOLoss(32)(student, teacher)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    assert torch.isfinite(student.grad.float()).all()
    assert rel_err(out.loss, dino_reference(student.detach(), teacher, 2, 0.1)[0]) < 1e-5


def test_dino_loss_stays_float32_under_autocast():
    generator = torch.Generator().manual_seed(6)
    student = torch.randn(4 * 8, 64, generator=generator) * 3
    teacher = random_probs(2 * 8, 64, generator)
    expected = DINOLoss(64)(student, teacher).loss
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = DINOLoss(64)(student, teacher).loss
    assert rel_err(got, expected) < 1e-6


def test_dino_loss_rejects_bad_input():
    loss_fn = DINOLoss(8)
    with pytest.raises(ValueError, match="requires grad"):
        loss_fn(torch.randn(12, 8), torch.rand(4, 8, requires_grad=True))
    with pytest.raises(ValueError, match="multiple of n_global_crops"):
        loss_fn(torch.randn(12, 8), torch.rand(5, 8))
    with pytest.raises(ValueError, match="global crops first"):
        loss_fn(torch.randn(7, 8), torch.rand(4, 8))
    with pytest.raises(ValueError, match=r"\[crops \* B, 8\]"):
        loss_fn(torch.randn(12, 9), torch.rand(4, 9))


def test_sinkhorn_centering_is_the_kernel():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 24, generator=generator) * 4
    for loss_fn in (DINOLoss(24, sinkhorn_impl="reference"), IBOTLoss(24, sinkhorn_impl="reference")):
        probs = loss_fn.teacher_probs(logits, teacher_temp=0.05, n_valid=8)
        torch.testing.assert_close(probs, sinkhorn_knopp_reference(logits, 0.05, 3, 8))
        torch.testing.assert_close(probs[:8].sum(dim=-1), torch.ones(8))
        assert torch.count_nonzero(probs[8:]) == 0
        assert "center" not in loss_fn.state_dict()
        with pytest.raises(ValueError, match="softmax"):
            loss_fn.update_center(logits)
        with pytest.raises(ValueError, match="teacher_temp"):
            loss_fn.teacher_probs(logits, teacher_temp=0.0)


def test_sinkhorn_queue_balances_this_step_with_the_queued_rows():
    """--loss.sinkhorn-queue: this step's targets are the first rows of Sinkhorn-Knopp over [this step; queue],
    newest rows first, the queue fills then drops its oldest rows, and it is saved with the module's state."""
    generator = torch.Generator().manual_seed(5)
    steps = [torch.randn(n, 24, generator=generator).double() * 3 for n in (6, 5, 7)]
    loss_fn = DINOLoss(24, queue_size=9, sinkhorn_impl="reference")
    seen = []
    for step, logits in enumerate(steps):
        padded = torch.cat([logits.float(), torch.full((2, 24), 1e4)])  # padding rows must not enter the queue
        probs = loss_fn.teacher_probs(padded, teacher_temp=0.05, n_valid=len(logits))
        queued = torch.cat(seen[::-1])[:9] if seen else logits[:0]
        expected = sinkhorn_knopp_reference(torch.cat([logits, queued]), 0.05, 3)[: len(logits)]
        assert rel_err(probs[: len(logits)], expected) < 1e-5, step
        assert torch.count_nonzero(probs[len(logits):]) == 0
        loss_fn.update_queue(padded, n_valid=len(logits))
        seen.append(logits)
        assert int(loss_fn.queue_rows) == min(9, sum(len(s) for s in seen))
    # Newest first: the last step's 7 rows, then the first 2 of the step before; the first step's rows are gone.
    assert rel_err(loss_fn.queue, torch.cat([steps[2], steps[1][:2]])) < 1e-6
    # A queue changes the targets: without it the same logits give other (less sharp) rows.
    alone = DINOLoss(24, sinkhorn_impl="reference").teacher_probs(steps[2].float(), 0.05)
    assert rel_err(loss_fn.teacher_probs(steps[2].float(), 0.05), alone) > 1e-2
    restored = DINOLoss(24, queue_size=9)
    restored.load_state_dict(loss_fn.state_dict())
    assert torch.equal(restored.queue, loss_fn.queue) and int(restored.queue_rows) == 9
    with pytest.raises(ValueError, match="queue_size"):
        DINOLoss(24, queue_size=-1)
    with pytest.raises(ValueError, match="sinkhorn_knopp"):
        DINOLoss(24, queue_size=8, centering="softmax")
    with pytest.raises(ValueError, match="queue_size > 0"):
        DINOLoss(24).update_queue(steps[0].float())


@pytest.mark.parametrize("loss_class", [DINOLoss, IBOTLoss])
def test_softmax_centering_with_ema_center(loss_class):
    generator = torch.Generator().manual_seed(4)
    n_protos, temp = 12, 0.07
    loss_fn = loss_class(n_protos, centering="softmax", center_momentum=0.9)
    assert torch.count_nonzero(loss_fn.state_dict()["center"]) == 0
    first = torch.randn(6, n_protos, generator=generator).double()
    second = torch.randn(9, n_protos, generator=generator).double()

    probs = loss_fn.teacher_probs(first.float(), temp)
    assert rel_err(probs, torch.softmax(first / temp, dim=-1)) < 1e-6  # center starts at 0
    loss_fn.update_center(first.float())
    center = 0.1 * first.mean(dim=0)
    assert rel_err(loss_fn.center, center) < 1e-6

    probs = loss_fn.teacher_probs(second.float(), temp, n_valid=7)
    assert rel_err(probs[:7], torch.softmax((second[:7] - center) / temp, dim=-1)) < 1e-5
    assert torch.count_nonzero(probs[7:]) == 0
    loss_fn.update_center(second.float(), n_valid=7)  # padding rows stay out of the mean
    center = 0.9 * center + 0.1 * second[:7].mean(dim=0)
    assert rel_err(loss_fn.center, center) < 1e-6

    loss_fn.update_center(second[:0].float())  # nothing seen: the center stays
    assert rel_err(loss_fn.center, center) < 1e-6
    restored = loss_class(n_protos, centering="softmax")
    restored.load_state_dict(loss_fn.state_dict())
    torch.testing.assert_close(restored.center, loss_fn.center)


# ------------------------------------------------------------------------------------------------------------
# iBOT loss
# ------------------------------------------------------------------------------------------------------------


def ibot_reference(student, teacher, masks, student_temp):
    """Per masked image, the mean CE of its masked tokens; summed and divided by all images, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    first = 0
    for image_mask in masks:
        count = int(image_mask.sum())
        if count == 0:
            continue
        s, t = student[first:first + count].double(), teacher[first:first + count].double()
        total = total - (t * torch.log_softmax(s / student_temp, dim=-1)).sum(dim=-1).mean()
        first += count
    return total / masks.shape[0]


def test_ibot_mask_weights():
    masks = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(ibot_mask_weights(masks), torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))
    with pytest.raises(ValueError, match="bool"):
        ibot_mask_weights(masks.float())


def test_ibot_loss_matches_float64_reference():
    generator = torch.Generator().manual_seed(5)
    n_images, n_patches, n_protos = 6, 20, 40
    masks = torch.rand(n_images, n_patches, generator=generator) < 0.3
    masks[1] = False  # an unmasked image still counts in the denominator
    masks[4, :3] = True
    n_masked = int(masks.sum())
    student = (torch.randn(n_masked, n_protos, generator=generator) * 3).requires_grad_()
    teacher = random_probs(n_masked, n_protos, generator)
    loss = IBOTLoss(n_protos)(student, teacher, ibot_mask_weights(masks), n_images=n_images)
    assert rel_err(loss, ibot_reference(student.detach(), teacher, masks, 0.1)) < 1e-5
    loss.backward()
    assert torch.isfinite(student.grad).all()

    # Padding rows with weight 0 change nothing.
    padded_loss = IBOTLoss(n_protos)(
        torch.cat([student.detach(), torch.randn(3, n_protos)]),
        torch.cat([teacher, torch.zeros(3, n_protos)]),
        torch.cat([ibot_mask_weights(masks), torch.zeros(3)]),
        n_images=n_images,
    )
    assert rel_err(padded_loss, loss.detach()) < 1e-6


def test_ibot_loss_without_masked_tokens_is_a_connected_zero():
    head = DINOHead(8, 16, 32, 4)
    student = head(torch.randn(0, 8))
    loss = IBOTLoss(16)(student, torch.zeros(0, 16), torch.zeros(0), n_images=4)
    assert loss.item() == 0.0
    loss.backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and torch.count_nonzero(param.grad) == 0, name


def test_ibot_loss_rejects_bad_input():
    loss_fn = IBOTLoss(8)
    student, teacher, weights = torch.randn(5, 8), torch.rand(5, 8), torch.ones(5)
    with pytest.raises(ValueError, match="same masked positions"):
        loss_fn(student, teacher[:4], weights, 2)
    with pytest.raises(ValueError, match="mask_weights"):
        loss_fn(student, teacher, weights[:4], 2)
    with pytest.raises(ValueError, match="n_images"):
        loss_fn(student, teacher, weights, 0)
    with pytest.raises(ValueError, match="requires grad"):
        loss_fn(student, teacher.requires_grad_(), weights, 2)
