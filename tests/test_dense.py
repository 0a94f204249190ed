"""dense.py: the segmentation and tracking metrics against values worked out by hand, the ridge probe on features
of known structure, label propagation of a mask that moves by one patch, and the training-time dense metric."""

import math

import pytest
import torch

import dense
from data.dense_sets import IGNORE_INDEX
from models.vit import build_vit
from tests.helpers import blocky_masks


def square(size: int = 10, top: int = 2, left: int = 2, side: int = 4) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top : top + side, left : left + side] = True
    return mask


# ----------------------------------------------------------------------------------------------------
# Segmentation metrics
# ----------------------------------------------------------------------------------------------------


def test_miou_and_pixel_accuracy_with_an_ignore_label_match_the_hand_computed_values():
    target = torch.tensor([[0, 0, 1], [1, IGNORE_INDEX, 2]])
    predicted = torch.tensor([[0, 1, 1], [1, 2, 0]])
    confusion = dense.confusion_matrix(predicted, target, n_classes=3)
    # Counted pixels (the 255 one is not): label 0 -> 0 and 1; label 1 -> 1 twice; label 2 -> 0.
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    scores = dense.segmentation_scores(confusion)
    # IoU_0 = 1 / (2 + 2 - 1), IoU_1 = 2 / (2 + 3 - 2), IoU_2 = 0 / (1 + 0 - 0).
    assert scores["iou"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert scores["miou"] == pytest.approx(1 / 3)
    assert scores["pixel_accuracy"] == pytest.approx(3 / 5)
    # A class neither labeled nor predicted has no IoU and does not count in the mean.
    with_absent_class = dense.segmentation_scores(dense.confusion_matrix(predicted, target, n_classes=4))
    assert math.isnan(with_absent_class["iou"][3]) and with_absent_class["miou"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="label 2 found, but there are 2 classes"):
        dense.confusion_matrix(predicted, target, n_classes=2)


def test_region_iou_and_boundary_f_measure_of_squares():
    truth = square()
    moved = square(left=3)  # the same square one column to the right
    assert dense.region_iou(moved, truth).item() == pytest.approx(12 / 20)  # 4x3 shared of 4x5 covered
    assert dense.boundary_map(truth).sum().item() == 15  # left and top edges outside, right and bottom inside
    # Exact matching (tolerance 0): of the 15 outline pixels of each, 7 coincide: 3 in the row above the squares,
    # 3 in their bottom row, and (5, 2), the original's bottom-left pixel, which is the moved one's left neighbor.
    assert dense.boundary_f_measure(moved, truth, tolerance=0).item() == pytest.approx(7 / 15)
    assert dense.boundary_f_measure(moved, truth, tolerance=1).item() == pytest.approx(1.0)
    assert dense.boundary_f_measure(truth, truth).item() == 1.0
    empty = torch.zeros_like(truth)
    assert dense.boundary_f_measure(empty, truth).item() == 0.0 and dense.region_iou(empty, truth).item() == 0.0
    assert dense.boundary_f_measure(empty, empty).item() == 1.0 and dense.region_iou(empty, empty).item() == 1.0
    # A square 3 columns off, tolerance 2: each outline's left (or right) edge lies 1 pixel from the other's right
    # (left) one (4 matches), 3 of its top and 3 of its bottom pixels are within 2 of the other's: 10 of 15 each way.
    far = square(left=5)
    assert dense.boundary_f_measure(far, truth, tolerance=2).item() == pytest.approx(10 / 15)
    assert dense.boundary_f_measure(far, truth, tolerance=3).item() == pytest.approx(1.0)
    assert dense.boundary_tolerance(480, 854) == 8  # DAVIS 480p: 0.8 % of the 980-pixel diagonal, rounded up


def test_dilate_reaches_exactly_the_disk():
    point = torch.zeros(9, 9, dtype=torch.bool)
    point[4, 4] = True
    disk = dense.dilate(point, 2)
    rows, cols = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    assert torch.equal(disk, (rows - 4) ** 2 + (cols - 4) ** 2 <= 4)
    corner = torch.zeros(4, 4, dtype=torch.bool)
    corner[0, 0] = True
    assert dense.dilate(corner, 1).sum().item() == 3  # clipped at the image edges


# ----------------------------------------------------------------------------------------------------
# Ridge probe
# ----------------------------------------------------------------------------------------------------


def test_patch_class_fractions_leave_out_ignored_pixels():
    masks = torch.tensor([[[0, 0, 1, 1],
                           [0, 1, 1, IGNORE_INDEX],
                           [2, 2, IGNORE_INDEX, IGNORE_INDEX],
                           [2, 0, IGNORE_INDEX, IGNORE_INDEX]]], dtype=torch.uint8)
    fractions = dense.patch_class_fractions(masks, (2, 2), n_classes=3)[0]
    assert fractions[0, 0].tolist() == pytest.approx([0.75, 0.25, 0.0])
    assert fractions[0, 1].tolist() == pytest.approx([0.0, 1.0, 0.0])  # 3 labeled pixels, all class 1
    assert fractions[1, 0].tolist() == pytest.approx([0.25, 0.0, 0.75])
    assert fractions[1, 1].tolist() == [0.0, 0.0, 0.0]  # nothing labeled


def test_fit_ridge_solves_the_penalized_normal_equations():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=generator) * torch.tensor([1.0, 2, 3, 0.5, 1, 4]) + 3
    y = torch.randn(50, 3, generator=generator)
    alpha = 0.1
    weight, bias = dense.fit_ridge(x, y, [alpha])[0]
    # The same problem written out: standardized features z, penalty alpha * M on the weights of z.
    mean, std = x.double().mean(0), x.double().std(0)
    z = (x.double() - mean) / std
    expected = torch.linalg.solve(z.T @ z + alpha * 50 * torch.eye(6, dtype=torch.float64),
                                  z.T @ (y.double() - y.double().mean(0)))
    assert torch.allclose(weight.double() * std[:, None], expected, atol=1e-5)
    assert torch.allclose(x @ weight + bias, (z @ expected + y.double().mean(0)).float(), atol=1e-4)


def test_ridge_probe_reads_classes_from_features_that_hold_them_and_not_from_noise():
    n_classes, grid, patch = 4, 4, 8
    train_masks, val_masks = blocky_masks(12, grid, patch, n_classes, 0), blocky_masks(6, grid, patch, n_classes, 1)
    generator = torch.Generator().manual_seed(2)

    def informative(masks):  # a noisy one-hot code of each patch's class, in a 16-d random basis
        one_hot = torch.nn.functional.one_hot(masks[:, ::patch, ::patch].long(), n_classes).float()
        basis = torch.randn(n_classes, 16, generator=torch.Generator().manual_seed(3))
        return (one_hot @ basis + 0.1 * torch.randn(*one_hot.shape[:3], 16, generator=generator)).permute(0, 3, 1, 2)

    good = dense.ridge_probe(informative(train_masks), train_masks, informative(val_masks), val_masks, n_classes)
    # Not 1: bilinear upsampling of the logits rounds the corners of the blocks where three classes meet.
    assert good["miou"] > 0.85 and good["pixel_accuracy"] > 0.9
    noise = dense.ridge_probe(torch.randn(12, 16, grid, grid, generator=generator), train_masks,
                              torch.randn(6, 16, grid, grid, generator=generator), val_masks, n_classes)
    assert noise["miou"] < 0.5


# ----------------------------------------------------------------------------------------------------
# Label propagation
# ----------------------------------------------------------------------------------------------------


def moving_features(n_frames: int, grid: int = 8, dim: int = 64, shift: int = 1) -> torch.Tensor:
    """Frame t's features are frame 0's rolled `t * shift` patches to the right (the content moves, wrapping)."""
    first = torch.randn(dim, grid, grid, generator=torch.Generator().manual_seed(0))
    return torch.stack([first.roll(t * shift, dims=-1) for t in range(n_frames)])


@pytest.mark.parametrize("temperature", [0.1, 0.2])
def test_a_mask_that_moves_by_one_patch_is_recovered_exactly(temperature):
    features = moving_features(4)
    mask = torch.zeros(8, 8, dtype=torch.long)
    mask[2:5, 1:4] = 1
    mask[6:8, 5:7] = 2
    first = torch.nn.functional.one_hot(mask, 3).permute(2, 0, 1).float()
    soft = dense.propagate_labels(features, first, temperature=temperature)
    for t in range(4):
        assert torch.equal(soft[t].argmax(dim=0), mask.roll(t, dims=-1)), t
    # Upsampled to pixels they are what the exact one-hot masks of the moved patches upsample to (wherever that is
    # not nearly a tie between two classes: around corners where interpolated one-hot labels come near 0.5 / 0.5).
    moved = torch.nn.functional.one_hot(mask.roll(3, dims=-1), 3).permute(2, 0, 1).float()[None]
    exact = torch.nn.functional.interpolate(moved, size=(128, 128), mode="bilinear", align_corners=False)[0]
    top2 = exact.topk(2, dim=0).values
    clear = top2[0] - top2[1] > 0.1
    assert clear.float().mean() > 0.95
    assert torch.equal(dense.upsample_labels(soft, (128, 128))[3][clear], exact.argmax(dim=0)[clear])


def test_propagation_only_looks_within_the_radius():
    # Frame 1's content moves 3 patches: with a radius of 2 patches the true match is out of reach.
    features = moving_features(2, shift=3)
    mask = torch.zeros(8, 8, dtype=torch.long)
    mask[:, 0:2] = 1
    first = torch.nn.functional.one_hot(mask, 2).permute(2, 0, 1).float()
    near = dense.propagate_labels(features, first, radius=2)
    far = dense.propagate_labels(features, first, radius=3)
    # Columns 3-7 come from columns 0-4 of frame 0, 3 patches away (columns 0-2 wrap around from 5-7: farther).
    expected = mask.roll(3, dims=-1)[:, 3:]
    assert torch.equal(far[1].argmax(dim=0)[:, 3:], expected)
    assert not torch.equal(near[1].argmax(dim=0)[:, 3:], expected)


def test_track_scores_skip_the_first_and_last_frames():
    truth = [square(12).long() for _ in range(4)]
    predicted = torch.stack(truth).clone()
    predicted[0] = 0  # the given frame and the last one are not scored (DAVIS-2017)
    predicted[3] = 0
    predicted[2] = square(12, left=3).long()  # frame 2: one column off
    scores = dense.track_scores(predicted, truth, object_ids=[1], tolerance=0)
    j, f = scores[1]
    assert j == pytest.approx((1.0 + 12 / 20) / 2) and f == pytest.approx((1.0 + 7 / 15) / 2)
    unannotated = dense.track_scores(predicted, [truth[0], None, truth[2], truth[3]], object_ids=[1], tolerance=0)
    assert unannotated[1] == pytest.approx((12 / 20, 7 / 15))


# ----------------------------------------------------------------------------------------------------
# Features and the training-time metric
# ----------------------------------------------------------------------------------------------------


def test_feature_maps_have_the_patch_grid_and_the_pixel_baseline_holds_each_patchs_pixels():
    torch.manual_seed(0)
    backbone = build_vit("vit_tiny", layerscale_init=1.0, attn_impl="sdpa").eval()
    images = torch.randn(3, 3, 48, 32)
    maps = dense.patch_feature_maps(backbone, images, batch_size=2)
    _, tokens = dense.forward_tokens(backbone, images)
    assert maps.shape == (3, 192, 3, 2)
    assert torch.allclose(maps[1, :, 2, 1], tokens[1, 2 * 2 + 1], atol=1e-5)
    assert dense.patch_feature_maps(backbone, images, n_layers=2).shape == (3, 384, 3, 2)
    pixels = dense.pixel_feature_maps(images, 16)
    assert pixels.shape == (3, 3 * 256, 3, 2)
    assert torch.equal(pixels[2, :, 1, 0].reshape(3, 16, 16), images[2, :, 16:32, 0:16])


def test_dense_metric_on_the_fast_set_is_a_fraction_and_deterministic():
    torch.manual_seed(0)
    backbone = build_vit("vit_tiny", layerscale_init=1.0, attn_impl="sdpa").eval()
    dense_set = dense.fast_dense_set(32, n_train=8, n_val=4)
    assert dense_set.train_images.shape == (8, 3, 32, 32) and dense_set.val_masks.shape == (4, 32, 32)
    first = dense.dense_metric(backbone, dense_set)
    assert 0 < first["miou"] <= 1 and 0 < first["pixel_accuracy"] <= 1
    assert dense.dense_metric(backbone, dense_set) == first
