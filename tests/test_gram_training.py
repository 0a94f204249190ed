"""Gram anchoring and high-resolution adaptation in train.py: the Gram teacher's schedule, crop alignment, per-step
size triples, --init-from, a stable refinement run through the fused kernel, and exact resume mid-refinement."""

import collections
import math

import numpy as np
import pytest
import torch
from PIL import Image

import dino_kernels.gram
import train
from config import LossConfig
from data.augment import AugmentConfig, CropSizes, CropSizeSchedule
from data.datasets import ImageDataset, build_loader
from losses.dino import DINOLoss
from losses.gram import GramAnchoringLoss, resample_patch_grid
from models.checkpoint import CheckpointError, save_official
from schedules import Schedule
from tests.helpers import procedural, tensorboard_scalars, tiny_config

GRAM_FLAGS = ["--gram.enabled", "--data.gram-teacher-size", "64", "--data.batch-size", "4"]


def gram_config(tmp_path, *flags: str) -> train.TrainConfig:
    return tiny_config(tmp_path, *GRAM_FLAGS, *flags)


def _fingerprint(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


# ----------------------------------------------------------------------------------------------------------------
# The loss module and the schedules
# ----------------------------------------------------------------------------------------------------------------


def test_gram_module_equals_the_materializing_formula_and_never_trains_the_teacher():
    torch.manual_seed(0)
    student = torch.randn(6, 35, 24, dtype=torch.float64, requires_grad=True)  # 5 x 7 grid
    teacher = torch.randn(6, 35, 24, dtype=torch.float64, requires_grad=True)
    loss = GramAnchoringLoss(impl="reference")(student, teacher, (5, 7), (5, 7))
    expected = dino_kernels.gram.gram_loss_reference(student, teacher)
    assert abs(loss.item() - expected.item()) / expected.item() < 1e-6
    loss.backward()
    assert teacher.grad is None and student.grad is not None

    masks = torch.rand(6, 35) < 0.4
    for tokens, keep in (("masked", masks), ("unmasked", ~masks)):
        module = GramAnchoringLoss(tokens_used=tokens, img_level=False, impl="reference")
        value = module(student, teacher, (5, 7), (5, 7), masks)
        reference = dino_kernels.gram.gram_loss_reference(student[keep][None], teacher[keep][None])
        assert abs(value.item() - reference.item()) / reference.item() < 1e-6
    with pytest.raises(ValueError, match="img_level=False"):
        GramAnchoringLoss(tokens_used="masked")


def test_teacher_patch_map_is_resampled_to_the_student_grid():
    """A feature map that is linear in the patch position: the 2x-finer teacher grid resampled to the student's
    grid gives the same linear function at the student's patch centers (exact for bicubic away from the edge)."""
    h, w, dim = 6, 5, 3
    coefficients = torch.randn(2, dim, dtype=torch.float64)

    def linear_map(rows: int, cols: int) -> torch.Tensor:  # value at patch centers in image units [0, 1]
        y = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows
        x = (torch.arange(cols, dtype=torch.float64) + 0.5) / cols
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        return (torch.stack([yy, xx], -1) @ coefficients).reshape(1, rows * cols, dim)

    resampled = resample_patch_grid(linear_map(2 * h, 2 * w), (2 * h, 2 * w), (h, w)).reshape(h, w, dim)
    expected = linear_map(h, w).reshape(h, w, dim)
    interior = (slice(1, h - 1), slice(1, w - 1))
    assert torch.allclose(resampled[interior], expected[interior], atol=1e-12)
    same = linear_map(h, w)
    assert torch.equal(resample_patch_grid(same, (h, w), (h, w)), same)
    with pytest.raises(ValueError, match="grid"):
        resample_patch_grid(linear_map(h, w), (h + 1, w), (h, w))


def test_gram_weight_is_zero_before_its_start_and_dino_local_weight_follows_its_schedule():
    cfg = train.TrainConfig(loss=LossConfig(dino_local_weight=Schedule(peak=1.0, end=0.5)),
                            gram=train.GramConfig(enabled=True, start_iteration=10))
    cfg.optim.iterations = 101
    begin, before, start, end = (train.schedules_at(s, cfg.optim, cfg.teacher, cfg.loss, cfg.gram)
                                 for s in (0, 9, 10, 100))
    assert (begin.dino_local_weight, end.dino_local_weight) == (1.0, 0.5)
    assert (begin.gram_weight, before.gram_weight, start.gram_weight, end.gram_weight) == (0.0, 0.0, 2.0, 2.0)

    # local_weight scales only the local-crop terms inside the pair-count-weighted mean
    torch.manual_seed(0)
    loss = DINOLoss(16, centering="softmax")
    student, teacher = torch.randn(8 * 2, 16), torch.softmax(torch.randn(2 * 2, 16), -1)
    plain, half = loss(student, teacher), loss(student, teacher, local_weight=0.5)
    n_global_terms, n_local_terms = 2, 6 * 2
    expected = (n_global_terms * plain.global_loss + 0.5 * n_local_terms * plain.local_loss) / (n_global_terms + n_local_terms)
    assert torch.allclose(half.loss, expected) and torch.equal(half.local_loss, plain.local_loss)


def test_gram_teacher_event_schedule():
    gram = train.GramConfig(enabled=True, start_iteration=5, update_frequency=3, max_updates=2)
    events = {step: train.gram_teacher_event(step, gram) for step in range(30)}
    assert {s: e for s, e in events.items() if e} == {5: "create", 8: "update", 11: "update"}
    loaded = train.GramConfig(enabled=True, start_iteration=0, init_from="x.pth", update_frequency=4, max_updates=3)
    assert [s for s in range(30) if train.gram_teacher_event(s, loaded)] == [4, 8, 12]
    assert not any(train.gram_teacher_event(s, train.GramConfig(enabled=True, update_frequency=0)) for s in range(1, 50))


# ----------------------------------------------------------------------------------------------------------------
# Data: the Gram teacher's crops and the per-step sizes
# ----------------------------------------------------------------------------------------------------------------


class _Synthetic(ImageDataset):
    """Smooth images with known content: a color ramp plus a low-frequency pattern, different per index."""

    def __init__(self, n: int = 8, size: int = 200) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def load(self, index: int, min_side: int | None = None):
        y, x = np.mgrid[0 : self.size, 0 : self.size] / self.size
        phase = index * 0.7
        channels = [
            0.5 + 0.4 * np.sin(2 * np.pi * (x + phase)),
            0.5 + 0.4 * np.cos(2 * np.pi * (y * 1.5 + phase)),
            x * (1 - y),
        ]
        pixels = (np.stack(channels, -1) * 255).round().astype(np.uint8)
        return Image.fromarray(pixels), index % 2


def test_gram_teacher_crops_show_the_student_crop_region_through_the_loader():
    """The loader's 2x Gram-teacher crops, downsampled back, equal the global crops (same box, flip and color
    ops) up to resampling error; each is far from the other global crop of its image."""
    loader = build_loader(_Synthetic(), AugmentConfig(n_local_crops=1), CropSizes(48, 16, 96), batch_size=4,
                          patch_size=16)
    batch = next(iter(loader))
    global_crops, gram_crops = batch["global_crops"], batch["gram_teacher_crops"]
    assert gram_crops.shape == (8, 3, 96, 96)
    down = torch.nn.functional.interpolate(gram_crops, size=(48, 48), mode="bicubic", antialias=True)
    same = (down - global_crops).abs().mean(dim=(1, 2, 3))
    other = (down - global_crops.view(2, 4, 3, 48, 48).flip(0).reshape(8, 3, 48, 48)).abs().mean(dim=(1, 2, 3))
    assert same.max() < 0.06, same
    assert (other > 3 * same).all(), (same, other)


def test_size_triples_follow_the_configured_probabilities_and_ranks_agree():
    cfg = train.PRESETS["hrft"][1]
    schedule = train.crop_size_schedule(cfg)
    counts = collections.Counter(schedule(step) for step in range(20_000))
    for (global_size, local_size, gram_size), p in zip(train.OFFICIAL_HRFT_SIZES, train.OFFICIAL_HRFT_PROBABILITIES):
        frequency = counts[CropSizes(global_size, local_size, gram_size)] / 20_000
        assert abs(frequency - p) < 4 * math.sqrt(p * (1 - p) / 20_000), (global_size, local_size, p, frequency)
    # Without the Gram loss no Gram-teacher crops are made.
    no_gram = train.crop_size_schedule(train.TrainConfig(data=cfg.data))
    assert all(c.gram_teacher_size is None for c in no_gram.choices)

    # Two ranks (and a resumed loader) see the same triple at every step.
    sizes = CropSizeSchedule.weighted(((CropSizes(32, 16, 64), 0.5), (CropSizes(48, 32, 96), 0.5)), seed=3)
    loaders = [build_loader(_Synthetic(), AugmentConfig(n_local_crops=1), sizes, batch_size=2, seed=3, rank=r,
                            world_size=2, patch_size=16) for r in (0, 1)]
    resumed = build_loader(_Synthetic(), AugmentConfig(n_local_crops=1), sizes, batch_size=2, seed=3, rank=0,
                           world_size=2, start_step=3, patch_size=16)
    iterators = [iter(loader) for loader in loaders]
    def triple(batch: dict) -> tuple[int, int, int]:
        return tuple(batch[k].shape[-1] for k in ("global_crops", "local_crops", "gram_teacher_crops"))

    shapes = []
    for step in range(6):
        rank0, rank1 = (next(it) for it in iterators)
        assert triple(rank0) == triple(rank1)
        assert triple(rank0) == (sizes(step).global_size, sizes(step).local_size, sizes(step).gram_teacher_size)
        shapes.append(triple(rank0))
    assert len(set(shapes)) == 2  # both triples occur in these 6 steps
    for step, batch in zip(range(3, 6), iter(resumed)):
        assert triple(batch) == shapes[step]


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def test_config_errors_for_gram_and_high_resolution_settings(tmp_path):
    for preset in ("gram-anchor", "hrft", "demo-gram", "demo-hrft"):  # valid once told where to start from
        train.validate_config(train.parse_config([preset, "--init-from", str(tmp_path)]), world_size=8)
    with pytest.raises(ValueError, match="randomly initialized teacher"):
        train.validate_config(gram_config(tmp_path), world_size=1)
    with pytest.raises(ValueError, match="no-img-level"):
        train.validate_config(gram_config(tmp_path, "--gram.start-iteration", "2", "--gram.tokens-used", "masked"), 1)
    with pytest.raises(ValueError, match="one probability per triple"):
        train.validate_config(tiny_config(tmp_path, "--data.size-schedule", "32", "16", "64"), 1)
    with pytest.raises(ValueError, match="sum to 1"):
        train.validate_config(tiny_config(tmp_path, "--data.size-schedule", "32", "16", "64", "48", "16", "96",
                                          "--data.size-probabilities", "0.5", "0.6"), 1)
    with pytest.raises(ValueError, match="patch size"):
        train.validate_config(gram_config(tmp_path, "--gram.start-iteration", "1", "--data.gram-teacher-size", "40"), 1)
    with pytest.raises(ValueError, match="needs --init-from"):
        train.validate_config(tiny_config(tmp_path, "--init-student-from", "teacher"), 1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.train(gram_config(tmp_path / "run", "--init-from", str(tmp_path / "missing.pth")), procedural())
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        (tmp_path / "empty_run").mkdir()
        train.train(gram_config(tmp_path / "run", "--init-from", str(tmp_path / "empty_run")), procedural())
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("checkpoint_*"))


def test_gram_teacher_changes_only_on_schedule_and_never_gets_gradients(tmp_path, monkeypatch):
    """Gram teacher created from the EMA teacher at step 2, refreshed at 4 and 6 (max_updates 2): a copy of the
    EMA teacher at exactly those steps and unchanged in between; it never requires or receives gradients."""
    seen = []
    forward_losses = train.forward_losses

    def spy(state, batch, sched, *args, **kwargs):
        gram_teacher = state.gram_teacher
        seen.append({"gram": _fingerprint(gram_teacher), "ema": _fingerprint(state.teacher.backbone),
                     "weight": sched.gram_weight,
                     "grad": any(p.requires_grad or p.grad is not None for p in gram_teacher.parameters())})
        return forward_losses(state, batch, sched, *args, **kwargs)

    monkeypatch.setattr(train, "forward_losses", spy)
    cfg = gram_config(tmp_path, "--optim.iterations", "9", "--gram.start-iteration", "2",
                      "--gram.update-frequency", "2", "--gram.max-updates", "2", "--run.checkpoint-every", "100")
    summary = train.train(cfg, procedural(n=40))
    assert len(seen) == 9
    changed = [step for step in range(1, 9) if not torch.equal(seen[step]["gram"], seen[step - 1]["gram"])]
    assert changed == [2, 4, 6]
    for step in changed:
        assert torch.equal(seen[step]["gram"], seen[step]["ema"])
    assert not torch.equal(seen[8]["gram"], seen[8]["ema"])  # no update after max_updates
    assert [s["weight"] for s in seen] == [0.0, 0.0] + [2.0] * 7
    assert not any(s["grad"] for s in seen)
    assert len(summary["term_history"]["gram"]) == 7  # the Gram loss runs from its start on


def test_refinement_and_high_resolution_run_is_stable_through_the_fused_kernel(tmp_path, monkeypatch):
    """Gram teacher on 2x crops (the size triple drawn per step), loss from dino_kernels/gram.py's Triton tiles (run by
    the interpreter here), never the materializing formula; every term finite and logged."""
    calls = collections.Counter()
    for name in ("tiled_loss_sum_triton", "gram_loss_reference"):
        original = getattr(dino_kernels.gram, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(dino_kernels.gram, name, counted)
    init = tiny_config(tmp_path / "pretrain", "--optim.iterations", "2", "--data.batch-size", "4")
    train.train(init, procedural(n=40))
    cfg = gram_config(
        tmp_path / "hrft", "--init-from", str(tmp_path / "pretrain"), "--init-student-from", "teacher",
        "--optim.iterations", "6", "--model.kernel-impl", "auto", "--gram.update-frequency", "3",
        "--data.size-schedule", "32", "16", "64", "48", "16", "96", "--data.size-probabilities", "0.5", "0.5",
    )
    summary = train.train(cfg, procedural(n=40))
    assert summary["step"] == 6
    grams = summary["term_history"]["gram"]
    assert len(grams) == 6 and all(math.isfinite(g) and g >= 0 for g in grams)
    assert all(math.isfinite(v) for values in summary["term_history"].values() for v in values)
    assert calls["tiled_loss_sum_triton"] >= 6 and calls["gram_loss_reference"] == 0
    scalars = tensorboard_scalars(tmp_path / "hrft" / "tensorboard")
    assert len(scalars["loss/gram"]) == 6 and len(scalars["schedule/gram_weight"]) == 6


def test_resume_in_the_middle_of_refinement_continues_identically(tmp_path):
    data = procedural(n=40)
    flags = ["--run.checkpoint-every", "3", "--gram.start-iteration", "1", "--gram.update-frequency", "2",
             "--gram.max-updates", "3", "--optim.lr.peak", "1e-3"]
    straight = train.train(gram_config(tmp_path / "straight", "--optim.iterations", "7", *flags), data)
    first = train.train(gram_config(tmp_path / "resumed", "--optim.iterations", "4", *flags), data)
    # a run stopped at step 4 checkpointed at 3 and 4; drop the last to resume from step 3, between two updates
    (tmp_path / "resumed" / "checkpoint_00000004.pth").unlink()
    resumed = train.train(gram_config(tmp_path / "resumed", "--optim.iterations", "7", *flags), data)
    assert first["step"] == 4 and resumed["step"] == 7
    # the Gram loss runs from step 1 on: the straight run's entries 2.. are steps 3..6
    assert resumed["term_history"]["gram"] == straight["term_history"]["gram"][2:]
    a = torch.load(tmp_path / "straight" / "checkpoint_00000007.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint_00000007.pth", weights_only=True)
    for part in ("student", "teacher", "gram_teacher"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"


def test_init_from_a_training_checkpoint_or_a_released_backbone(tmp_path):
    train.train(tiny_config(tmp_path / "pretrain", "--optim.iterations", "2", "--data.batch-size", "2"), procedural())
    checkpoint = torch.load(tmp_path / "pretrain" / "checkpoint_00000002.pth", weights_only=True)
    for start_from in ("student", "teacher"):
        cfg = tiny_config(tmp_path / start_from, "--init-from", str(tmp_path / "pretrain"),
                          "--init-student-from", start_from)
        student, teacher = train.build_student_teacher(cfg.model)
        train.initialize_from(train.resolve_checkpoint_source(cfg.init_from, "--init-from"), cfg, student, teacher)
        for key, value in student.state_dict().items():
            assert torch.equal(value, checkpoint[start_from][key]), key
        for key, value in teacher.state_dict().items():
            assert torch.equal(value, checkpoint["teacher"][key]), key

    released = tmp_path / "released.pth"
    cfg = tiny_config(tmp_path / "released_run", "--init-from", str(released))
    source, _ = train.build_student_teacher(cfg.model)
    save_official(source.backbone, released)
    student, teacher = train.build_student_teacher(cfg.model)
    train.initialize_from(released, cfg, student, teacher)
    for net in (student, teacher):
        for key, value in net.backbone.state_dict().items():
            assert torch.equal(value, source.backbone.state_dict()[key]), key

    gram_teacher = train.build_gram_teacher(gram_config(tmp_path / "g", "--gram.init-from", str(released)))
    train.load_gram_teacher(released, cfg, gram_teacher)
    assert torch.equal(_fingerprint(gram_teacher), _fingerprint(source.backbone))

    wrong = tiny_config(tmp_path / "wrong", "--model.arch", "vit_small", "--init-from", str(released))
    small_student, small_teacher = train.build_student_teacher(wrong.model)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        train.initialize_from(released, wrong, small_student, small_teacher)
    with pytest.raises(CheckpointError, match="model.arch='vit_tiny'"):
        train.initialize_from(tmp_path / "pretrain" / "checkpoint_00000002.pth", wrong, small_student, small_teacher)


@pytest.mark.slow
def test_demo_presets_chain_demo_to_gram_to_high_resolution(tmp_path):
    """The README's CPU chain with the real presets (bundled photos, demo sizes), a few steps per phase."""
    # PyTorch paths: under the tests' TRITON_INTERPRET=1 the kernels would run interpreted at demo sizes
    short = ["--optim.iterations", "3", "--run.knn-every", "0", "--data.num-workers", "0", "--model.attn-impl", "sdpa",
             "--model.kernel-impl", "reference"]
    demo = train.train(train.parse_config(["demo", *short, "--run.output-dir", str(tmp_path / "demo")]))
    gram = train.train(train.parse_config(["demo-gram", *short, "--run.output-dir", str(tmp_path / "gram"),
                                           "--init-from", str(tmp_path / "demo")]))
    hrft = train.train(train.parse_config(["demo-hrft", *short, "--run.output-dir", str(tmp_path / "hrft"),
                                           "--init-from", str(tmp_path / "gram")]))
    assert demo["step"] == gram["step"] == hrft["step"] == 3
    assert "gram" not in demo["term_history"]
    for summary in (gram, hrft):
        assert len(summary["term_history"]["gram"]) == 3
        assert all(math.isfinite(v) for v in summary["term_history"]["gram"])
    saved = torch.load(tmp_path / "hrft" / "checkpoint_00000003.pth", weights_only=True)
    assert saved["config"]["init_from"] == str(tmp_path / "gram") and "gram_teacher" in saved
