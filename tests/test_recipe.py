"""The presets against the official DINOv3 configs, value by value.

Expected values are written out from the official configs (dinov3/configs/train/*.yaml) and the two official
schedule formulas, not computed with this codebase's `Schedule`:
- `schedules:` entries (7B pretraining, Gram anchoring, high resolution): linear warmup start -> peak over W steps
  with the endpoint excluded (step s < W: start + (peak - start) s / W), then a cosine over C steps with both ends
  included (step W + i: end + (peak - end) (1 + cos(pi i / (C - 1))) / 2), then `end`;
- the older `optim:`/`teacher:` entries (ViT-L ImageNet-1k): warmups include their endpoint (start + (peak -
  start) s / (W - 1)) and the cosine is end + (peak - end) (1 + cos(pi i / N)) / 2 over the N = T - W remaining
  steps; these are matched within 1e-4 (relative), the largest endpoint difference being 1 / (W - 1).
Base learning rates are scaled by 4 sqrt(global batch / 1024): x8 at 4096 images, x4 sqrt(2) at 2048.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import objective
import train
from data.augment import AugmentConfig, MultiCropAugmentation, sample_rng
from losses.koleo import KoLeoLoss
from schedules import Schedule

PI = math.pi
SQRT2 = math.sqrt(2)


def preset(name: str) -> train.TrainConfig:
    return train.PRESETS[name][1]


def sched(name: str, step: int) -> train.Schedules:
    cfg = preset(name)
    return train.schedules_at(step, cfg.optim, cfg.teacher, cfg.loss, cfg.gram)


def v2_cosine(peak: float, end: float, i: int, c: int) -> float:
    return end + (peak - end) * (1 + math.cos(PI * i / (c - 1))) / 2


VIT7B_LR = 8 * 5e-5
GRAM_LR = 8 * 3e-5
HRFT_LR = 4 * SQRT2 * 1.25e-5
IM1K_LR = 4 * SQRT2 * 1e-3

# (preset, step, field, official value). Steps: 0, warmup/2, warmup, end/2, end for each schedule that moves.
EXACT = [
    # dinov3_vit7b16_pretrain.yaml: lr 5e-5 base, 100 warmup epochs; teacher temp 0.04 -> 0.07 over 100 epochs.
    ("vit7b16", 0, "lr", 0.0), ("vit7b16", 50_000, "lr", VIT7B_LR / 2), ("vit7b16", 100_000, "lr", VIT7B_LR),
    ("vit7b16", 500_000, "lr", VIT7B_LR), ("vit7b16", 999_999, "lr", VIT7B_LR),
    ("vit7b16", 0, "teacher_temp", 0.04), ("vit7b16", 50_000, "teacher_temp", 0.055),
    ("vit7b16", 100_000, "teacher_temp", 0.07), ("vit7b16", 999_999, "teacher_temp", 0.07),
    ("vit7b16", 0, "momentum", 0.994), ("vit7b16", 999_999, "momentum", 0.994),
    ("vit7b16", 0, "weight_decay", 0.04), ("vit7b16", 999_999, "weight_decay", 0.04),
    ("vit7b16", 4_999, "last_layer_frozen", True), ("vit7b16", 5_000, "last_layer_frozen", False),
    ("vit7b16", 500_000, "dino_local_weight", 1.0), ("vit7b16", 500_000, "gram_weight", 0.0),
    # dinov3_vit7b16_gram_anchor.yaml: 1200 epochs; lr 3e-5 base; momentum 0.999; Gram weight 0 -> 2 and DINO
    # local weight 1 -> 0.5, each by a 1-epoch cosine after 1000 warmup epochs.
    ("gram-anchor", 50_000, "lr", GRAM_LR / 2), ("gram-anchor", 1_000_000, "lr", GRAM_LR),
    ("gram-anchor", 1_199_999, "lr", GRAM_LR), ("gram-anchor", 1_000_000, "momentum", 0.999),
    ("gram-anchor", 1_000_000, "teacher_temp", 0.07),
    ("gram-anchor", 999_999, "gram_weight", 0.0), ("gram-anchor", 1_000_000, "gram_weight", 0.0),
    ("gram-anchor", 1_000_500, "gram_weight", v2_cosine(0.0, 2.0, 500, 1000)),
    ("gram-anchor", 1_000_999, "gram_weight", 2.0), ("gram-anchor", 1_100_000, "gram_weight", 2.0),
    ("gram-anchor", 999_999, "dino_local_weight", 1.0), ("gram-anchor", 1_000_000, "dino_local_weight", 1.0),
    ("gram-anchor", 1_000_500, "dino_local_weight", v2_cosine(1.0, 0.5, 500, 1000)),
    ("gram-anchor", 1_000_999, "dino_local_weight", 0.5), ("gram-anchor", 1_199_999, "dino_local_weight", 0.5),
    # dinov3_vit7b16_high_res_adapt.yaml: 30 epochs; lr start 0, peak 0, end 1.25e-5 base over 10 cosine epochs;
    # no freeze; Gram weight 1.5; DINO local weight 0.5; teacher temp 0.07; momentum 0.999.
    ("hrft", 0, "lr", 0.0), ("hrft", 5_000, "lr", v2_cosine(0.0, HRFT_LR, 5_000, 10_000)),
    ("hrft", 9_999, "lr", HRFT_LR), ("hrft", 15_000, "lr", HRFT_LR), ("hrft", 29_999, "lr", HRFT_LR),
    ("hrft", 0, "last_layer_frozen", False), ("hrft", 0, "gram_weight", 1.5), ("hrft", 29_999, "gram_weight", 1.5),
    ("hrft", 0, "dino_local_weight", 0.5), ("hrft", 0, "teacher_temp", 0.07), ("hrft", 0, "momentum", 0.999),
]

IM1K_T, IM1K_W = 125_000, 12_500
IM1K_N = IM1K_T - IM1K_W


def v1_cosine(base: float, final: float, i: int, n: int) -> float:
    return final + 0.5 * (base - final) * (1 + math.cos(PI * i / n))


# vitl_im1k_lin834.yaml: 100 epochs of 1250; lr 1e-3 base, 10 warmup epochs, cosine to 1e-6; wd 0.04 -> 0.4;
# momentum 0.992 -> 1; teacher temp 0.04 -> 0.07 over 30 epochs; last layer frozen 1 epoch.
CLOSE = [
    ("vitl16-im1k", 0, "lr", 0.0), ("vitl16-im1k", 6_250, "lr", IM1K_LR * 6_250 / (IM1K_W - 1)),
    ("vitl16-im1k", IM1K_W, "lr", IM1K_LR), ("vitl16-im1k", 62_500, "lr", v1_cosine(IM1K_LR, 1e-6, 50_000, IM1K_N)),
    ("vitl16-im1k", IM1K_T - 1, "lr", v1_cosine(IM1K_LR, 1e-6, IM1K_N - 1, IM1K_N)),
    ("vitl16-im1k", 0, "weight_decay", 0.04), ("vitl16-im1k", 62_500, "weight_decay", v1_cosine(0.04, 0.4, 62_500, IM1K_T)),
    ("vitl16-im1k", IM1K_T - 1, "weight_decay", v1_cosine(0.04, 0.4, IM1K_T - 1, IM1K_T)),
    ("vitl16-im1k", 0, "momentum", 0.992), ("vitl16-im1k", 62_500, "momentum", v1_cosine(0.992, 1.0, 62_500, IM1K_T)),
    ("vitl16-im1k", IM1K_T - 1, "momentum", v1_cosine(0.992, 1.0, IM1K_T - 1, IM1K_T)),
    ("vitl16-im1k", 0, "teacher_temp", 0.04), ("vitl16-im1k", 18_750, "teacher_temp", 0.04 + 0.03 * 18_750 / 37_499),
    ("vitl16-im1k", 37_500, "teacher_temp", 0.07), ("vitl16-im1k", IM1K_T - 1, "teacher_temp", 0.07),
    ("vitl16-im1k", 1_249, "last_layer_frozen", True), ("vitl16-im1k", 1_250, "last_layer_frozen", False),
]


@pytest.mark.parametrize("name, step, field, expected", EXACT)
def test_schedules_equal_the_official_configs(name, step, field, expected):
    assert getattr(sched(name, step), field) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name, step, field, expected", CLOSE)
def test_vitl_im1k_schedules_match_the_older_official_scheduler(name, step, field, expected):
    assert getattr(sched(name, step), field) == pytest.approx(expected, rel=1e-4, abs=1e-12)


def test_resolved_presets_hold_the_official_numbers():
    vit7b, gram, hrft, im1k = (preset(n) for n in ("vit7b16", "gram-anchor", "hrft", "vitl16-im1k"))
    # Global batches: 16 x 256, 16 x 256, 8 x 256 (the high-resolution config gives the per-GPU batch only),
    # 64 x 32.
    assert (vit7b.data.batch_size, gram.data.batch_size, hrft.data.batch_size, im1k.data.batch_size) == (16, 16, 8, 64)
    assert (vit7b.optim.iterations, gram.optim.iterations, hrft.optim.iterations, im1k.optim.iterations) == (
        1_000_000, 1_200_000, 30_000, 125_000)
    for cfg in (vit7b, gram, hrft):
        assert cfg.augment.flip_p == 0.0  # horizontal_flips: false
        assert (cfg.model.drop_path_rate, cfg.optim.clip_grad, cfg.optim.layerwise_decay, cfg.optim.beta2) == (
            0.4, 30.0, 0.98, 0.99)
        assert (cfg.model.dino_prototypes, cfg.model.dino_hidden, cfg.model.dino_bottleneck) == (262144, 8192, 512)
        assert (cfg.model.ibot_prototypes, cfg.model.ibot_hidden, cfg.model.ibot_bottleneck) == (98304, 4096, 384)
    assert (vit7b.loss.koleo_group_size, gram.loss.koleo_group_size, hrft.loss.koleo_group_size) == (None, None, 16)
    assert (gram.data.gram_teacher_size, gram.augment.gram_teacher_photometric) == (512, False)
    assert (gram.gram.start_iteration, gram.gram.update_frequency, gram.gram.max_updates) == (1_000_000, 10_000, 3)
    assert gram.init_continues_run
    assert hrft.data.size_schedule == ((512, 112, 768), (768, 112, 1152), (768, 168, 1152), (768, 224, 1152),
                                       (768, 336, 1152))
    assert hrft.data.size_probabilities == (0.3, 0.3, 0.3, 0.05, 0.05)
    assert (hrft.augment.gram_teacher_photometric, hrft.init_student_from, hrft.run.checkpoint_every) == (
        False, "teacher", 250)
    arch = train.VIT_ARCHS[im1k.model.arch]
    assert (arch.embed_dim, arch.depth, arch.n_storage_tokens, arch.mask_k_bias, arch.norm_eps, arch.rope_rescale,
            arch.qkv_bias) == (1024, 24, 0, False, 1e-6, None, True)
    assert (im1k.data.global_size, im1k.data.local_size, im1k.model.drop_path_rate, im1k.augment.flip_p) == (
        224, 96, 0.3, 0.5)
    assert (im1k.optim.clip_grad, im1k.optim.layerwise_decay, im1k.optim.beta2) == (3.0, 0.9, 0.999)
    assert (im1k.model.dino_prototypes, im1k.model.dino_hidden, im1k.model.dino_bottleneck) == (65536, 2048, 256)


def test_gram_teacher_refreshes_at_the_official_iterations():
    gram = preset("gram-anchor").gram
    events = {step: train.gram_teacher_event(step, gram) for step in
              (999_999, 1_000_000, 1_009_999, 1_010_000, 1_020_000, 1_030_000, 1_040_000)}
    assert events == {999_999: None, 1_000_000: "create", 1_009_999: None, 1_010_000: "update",
                      1_020_000: "update", 1_030_000: "update", 1_040_000: None}


def test_print_config_prints_the_resolved_preset(capsys):
    train.main(["gram-anchor", "--print-config", "--optim.lr.peak", "1e-4"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["optim"]["lr"]["peak"] == 1e-4
    assert printed["gram"]["weight"] == {"peak": 0.0, "start": 0.0, "end": 2.0, "warmup_iterations": 1_000_000,
                                         "cosine_iterations": 1000}
    assert printed["teacher"]["momentum"]["peak"] == 0.999


def test_schedule_rejects_impossible_lengths():
    assert Schedule(peak=1.0, warmup_iterations=-1).problems("optim.lr")
    with pytest.raises(ValueError, match="optim.lr.warmup_iterations"):
        train.validate_config(train.parse_config(["demo", "--optim.lr.warmup-iterations", "-5"]), 1)


# ----------------------------------------------------------------------------------------------------------
# Parameter groups and the EMA update
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, decay", [("vit7b16", 0.98), ("gram-anchor", 0.98), ("hrft", 0.98),
                                         ("vitl16-im1k", 0.9)])
def test_param_groups_follow_the_official_rules(name, decay):
    """Each preset's optimizer settings on a small ViT (the rules depend on names and depth, not on width)."""
    cfg = train.parse_config(["demo"])
    student, _ = train.build_student_teacher(cfg.model)
    groups = train.param_groups(student, preset(name).optim)
    of = {id(p): g for g in groups for p in g["params"]}
    depth = 4
    named = dict(student.named_parameters())

    def group(name):
        return of[id(named[name])]

    expected = {  # name: (lr multiplier, weight decay multiplier, prototype layer)
        "backbone.cls_token": (decay ** (depth + 1), 1.0, False),  # learned tokens are decayed (official)
        "backbone.storage_tokens": (decay ** (depth + 1), 1.0, False),
        "backbone.mask_token": (decay ** (depth + 1), 1.0, False),
        "backbone.patch_embed.proj.weight": (0.2 * decay ** (depth + 1), 1.0, False),
        "backbone.patch_embed.proj.bias": (0.2 * decay ** (depth + 1), 0.0, False),
        "backbone.blocks.0.attn.qkv.weight": (decay**depth, 1.0, False),
        "backbone.blocks.0.attn.qkv.bias": (decay**depth, 0.0, False),
        "backbone.blocks.0.ls1.gamma": (decay**depth, 0.0, False),
        "backbone.blocks.3.norm2.weight": (decay, 0.0, False),
        "backbone.blocks.3.mlp.fc2.weight": (decay, 1.0, False),
        "backbone.norm.weight": (1.0, 0.0, False),
        "dino_head.mlp.0.weight": (1.0, 1.0, False),
        "dino_head.mlp.0.bias": (1.0, 0.0, False),
        "dino_head.last_layer.weight": (1.0, 1.0, True),
        "ibot_head.last_layer.weight": (1.0, 1.0, True),
    }
    for name, (lr_mult, wd_mult, last) in expected.items():
        g = group(name)
        assert (g["lr_mult"], g["wd_mult"], g["last_layer"]) == (pytest.approx(lr_mult), wd_mult, last), name
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_frozen_prototypes_get_lr_zero_and_stay_put_while_the_rest_moves():
    cfg = train.parse_config(["demo", "--optim.freeze-last-layer-iterations", "2"])
    student, _ = train.build_student_teacher(cfg.model)
    optimizer = torch.optim.AdamW(train.param_groups(student, cfg.optim), lr=0.0)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    for step, frozen in ((0, True), (1, True), (2, False)):
        sched = train.schedules_at(step + 5, cfg.optim, cfg.teacher)  # past the lr warmup's zero
        sched = dataclasses.replace(sched, last_layer_frozen=frozen)
        train.apply_schedules(optimizer, sched)
        optimizer.zero_grad()
        sum(p.square().sum() for p in student.parameters()).backward()
        optimizer.step()
        last = student.dino_head.last_layer.weight
        assert torch.equal(last, before["dino_head.last_layer.weight"]) == frozen
    assert not torch.equal(student.backbone.blocks[0].attn.qkv.weight, before["backbone.blocks.0.attn.qkv.weight"])


def test_ema_update_is_the_plain_formula():
    cfg = train.parse_config(["demo"])
    torch.manual_seed(0)
    student, teacher = train.build_student_teacher(cfg.model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    old = [p.detach().clone() for p in teacher.parameters()]
    train.ema_update(teacher, student, 0.9)
    for t, t0, s in zip(teacher.parameters(), old, student.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# KoLeo as the official objective applies it, and the paper's form
# ----------------------------------------------------------------------------------------------------------


def koleo_formula(tokens: torch.Tensor) -> torch.Tensor:
    """-mean log(distance to the nearest other token), tokens L2-normalized, in float64."""
    x = torch.nn.functional.normalize(tokens.double(), dim=-1)
    distances = torch.cdist(x, x) + torch.diag(torch.full((len(x),), float("inf"), dtype=x.dtype))
    return -torch.log(distances.min(dim=1).values + 1e-8).mean()


@pytest.mark.parametrize("crops, group_size", [("both", None), ("first", None), ("both", 4), ("first", 16)])
def test_koleo_term_matches_its_formula(crops, group_size):
    cfg = train.parse_config(["demo", "--loss.koleo-crops", crops, "--loss.koleo-group-size",
                              "None" if group_size is None else str(group_size)])
    torch.manual_seed(1)
    batch = 12
    cls_global = torch.randn(2 * batch, 32)  # crop-major: crop 1's 12 images, then crop 2's
    term = objective.koleo_of_crops(objective.build_koleo(cfg.loss), cls_global, 2, cfg.loss.koleo_crops)
    per_crop = cls_global.view(2, batch, 32)[: 1 if crops == "first" else 2]
    size = batch if group_size is None else group_size
    expected = 0.0
    for tokens in per_crop:
        groups = [g for g in tokens.split(size) if len(g) >= 2]
        expected += sum(koleo_formula(g) * len(g) for g in groups) / sum(len(g) for g in groups)
    torch.testing.assert_close(term.double(), torch.as_tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert isinstance(objective.build_koleo(cfg.loss), KoLeoLoss) == (group_size is None)


# ----------------------------------------------------------------------------------------------------------
# Augmentation numbers
# ----------------------------------------------------------------------------------------------------------


def blur_and_flip_rates(config: AugmentConfig, n: int = 2000) -> tuple[list[float], float]:
    augment = MultiCropAugmentation(config)
    blurred, flips, crops = [0, 0, 0], 0, 0
    for i in range(n):
        global_params, local_params = augment.draw(sample_rng(0, i), (300, 400))
        for slot, params in ((0, [global_params[0]]), (1, [global_params[1]]), (2, local_params)):
            blurred[slot] += sum(p.blur_sigma is not None for p in params) / len(params)
        flips += sum(p.flip for p in global_params + local_params)
        crops += len(global_params) + len(local_params)
    return [b / n for b in blurred], flips / crops


def test_blur_probabilities_are_the_ones_the_official_code_applies_and_flips_follow_the_config():
    (first, second, local), flips = blur_and_flip_rates(AugmentConfig(n_local_crops=2))
    assert first == 0.0 and abs(second - 0.9) < 0.03 and abs(local - 0.5) < 0.04
    assert flips == 0.0  # the 7B configs: horizontal_flips false
    nominal = AugmentConfig(n_local_crops=2, first_global_blur_p=1.0, second_global_blur_p=0.1, flip_p=0.5)
    (first, second, local), flips = blur_and_flip_rates(nominal)
    assert first == 1.0 and abs(second - 0.1) < 0.03 and abs(local - 0.5) < 0.04
    assert abs(flips - 0.5) < 0.03


def test_every_recipe_number_is_reachable_from_the_command_line():
    cfg = train.parse_config([
        "vit7b16", "--augment.flip-p", "0.5", "--augment.brightness", "0.3", "--augment.aspect-range", "0.5", "2.0",
        "--augment.no-gram-teacher-photometric", "--loss.sinkhorn-iterations", "5", "--loss.center-momentum", "0.8",
        "--teacher.temp.peak", "0.06", "--teacher.momentum.peak", "0.99", "--model.rope-jitter-per", "forward",
    ])
    assert (cfg.augment.flip_p, cfg.augment.brightness, cfg.augment.aspect_range) == (0.5, 0.3, (0.5, 2.0))
    assert not cfg.augment.gram_teacher_photometric
    assert (cfg.loss.sinkhorn_iterations, cfg.loss.center_momentum) == (5, 0.8)
    assert (cfg.teacher.temp.peak, cfg.teacher.momentum.peak, cfg.model.rope_jitter_per) == (0.06, 0.99, "forward")
    losses = train.SSLLosses(cfg.model, cfg.loss, cfg.gram)
    assert (losses.dino.sinkhorn_iterations, losses.dino.center_momentum) == (5, 0.8)
