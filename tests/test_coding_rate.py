"""The coding-rate objective (`--loss.objective coding_rate`, losses/coding_rate.py): its terms against float64
definitions and known answers, its wiring into the objective, the health panel and train.py (one process and
torchrun DDP, where the unused prototype layers must not stop the step); and the patch-size override."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import train
from config import LossConfig, ModelConfig
from health import HealthPanel, embedding_view_distance
from losses.coding_rate import CodingRateLoss, coding_rate
from objective import SSLLosses, StudentOutputs
from probes import load_eval_backbone
from tests.helpers import procedural, tiny_config


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def unit_rows(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("n, d", [(13, 40), (50, 24)], ids=["n<d", "n>d"])
def test_coding_rate_matches_the_float64_definition(n, d):
    z, eps = unit_rows(n, d, seed=n), 0.5
    expected = 0.5 * torch.logdet(torch.eye(d, dtype=torch.float64) + d / (n * eps**2) * z.T @ z)
    assert relative_error(coding_rate(z.float(), eps), expected) < 1e-5


def test_coding_rate_known_answers_orthogonal_high_identical_low():
    n, d, eps = 8, 32, 0.5
    orthogonal = torch.eye(d)[:n]
    assert coding_rate(orthogonal, eps).item() == pytest.approx(0.5 * n * math.log(1 + d / (n * eps**2)), rel=1e-5)
    identical = torch.eye(d)[:1].expand(n, d)
    assert coding_rate(identical, eps).item() == pytest.approx(0.5 * math.log(1 + d / eps**2), rel=1e-5)
    with pytest.raises(ValueError, match="eps"):
        CodingRateLoss(eps=0.0)


def test_class_alignment_is_the_mean_cosine_distance_over_dinos_crop_pairs():
    n_global, n_local, b, d = 2, 3, 5, 16
    student, teacher = unit_rows((n_global + n_local) * b, d, seed=1), unit_rows(n_global * b, d, seed=2)
    out = CodingRateLoss().class_alignment(student.float(), teacher.float(), n_global, local_weight=0.5)
    s, t = student.view(-1, b, d), teacher.view(n_global, b, d)
    pairs = [(i, j, 1.0) for i in range(n_global) for j in range(n_global) if i != j]
    pairs += [(i, j, 0.5) for i in range(n_global, n_global + n_local) for j in range(n_global)]
    expected = sum(w * (1 - (s[i] * t[j]).sum(-1)).mean() for i, j, w in pairs) / len(pairs)
    assert relative_error(out.loss, expected) < 1e-6
    # A student that reproduces the teacher's other crop exactly has zero global alignment.
    swapped = torch.cat([teacher[b:], teacher[:b]]).float()
    assert CodingRateLoss().class_alignment(swapped, teacher.float(), n_global).global_loss.abs().item() < 1e-6


def test_patch_alignment_uses_ibots_weights():
    student, teacher = unit_rows(7, 8, seed=3), unit_rows(7, 8, seed=4)
    weights = torch.tensor([0.5, 0.5, 1 / 3, 1 / 3, 1 / 3, 1.0, 0.0])
    expected = ((1 - (student * teacher).sum(-1)) * weights.double()).sum() / 4
    assert relative_error(CodingRateLoss().patch_alignment(student.float(), teacher.float(), weights, 4), expected) < 1e-6


def test_objective_total_is_the_weighted_alignments_minus_the_rate_and_the_control_shuffles():
    model = ModelConfig(dino_prototypes=8, ibot_prototypes=8)
    loss_cfg = LossConfig(objective="coding_rate", coding_rate_weight=0.3, koleo_weight=0.1, dino_weight=1.0,
                          ibot_weight=0.5)
    losses = SSLLosses(model, loss_cfg)
    b, d = 6, 16
    student = StudentOutputs(unit_rows(4 * b, d, seed=5).float().requires_grad_(), unit_rows(9, d, seed=6).float(),
                             torch.randn(2 * b, 12, generator=torch.Generator().manual_seed(7)))
    teacher = (unit_rows(2 * b, d, seed=8).float(), unit_rows(9, d, seed=9).float())
    batch = {"mask_weights": torch.full((9,), 1 / 3), "global_crops": torch.zeros(2 * b, 3, 8, 8)}
    panel = HealthPanel(8, 8, objective="coding_rate")
    terms = losses(student, teacher, batch, teacher_temp=0.04, n_global=2, health=panel)
    rate = CodingRateLoss().rate(student.dino[: 2 * b], 2)
    assert terms["coding_rate"].item() == pytest.approx(rate.item(), rel=1e-6)
    expected = terms["dino"] + 0.5 * terms["ibot"] + 0.1 * terms["koleo"] - 0.3 * rate
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    terms["total"].backward()
    assert torch.isfinite(student.dino.grad).all() and student.dino.grad.abs().sum() > 0
    values = panel.scalars(1, {name: value.item() for name, value in terms.items()})
    assert {"view_dist_same", "view_dist_other", "view_gap"} <= values.keys()
    assert "dino_term_over_ln_k" not in values  # a distance, not nats
    torch.manual_seed(0)
    shuffled = SSLLosses(model, LossConfig(objective="coding_rate", shuffle_targets=True))(
        student, teacher, batch, teacher_temp=0.04, n_global=2)
    assert shuffled["dino"].item() != pytest.approx(terms["dino"].item(), rel=1e-3)


def test_embedding_view_distance_and_verdicts():
    views = unit_rows(4, 8, seed=10).float()
    same, other = embedding_view_distance(torch.cat([views, views]), n_global=2)
    assert same.item() == pytest.approx(0.0, abs=1e-6) and other.item() > 0.1
    orthogonal = torch.eye(8)
    same, other = embedding_view_distance(torch.cat([orthogonal[:4], orthogonal[4:]]), n_global=2)
    assert same.item() == pytest.approx(1.0) and other.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two global crops"):
        embedding_view_distance(views[:2], n_global=2)
    panel = HealthPanel(8, 8, objective="coding_rate")
    start = (1, {"cls_std_sqrt_d": 0.8, "view_dist_same": 0.5, "view_dist_other": 0.87, "view_gap": 0.37})
    # The demo's coding-rate run: the gap fell from 0.37 to 0.23, which is not a start, though it is above 0.1.
    panel.history = [start, (1000, {"cls_std_sqrt_d": 0.95, "view_dist_same": 0.6, "view_dist_other": 0.83,
                                    "view_gap": 0.23})]
    assert panel.verdict(last_n=1).startswith("the coding-rate objective has not started")
    assert "against 0.370 at the first logged step" in panel.verdict(last_n=1)
    panel.history = [start, (1000, {"cls_std_sqrt_d": 0.9, "view_dist_same": 0.3, "view_dist_other": 0.9,
                                    "view_gap": 0.6})]
    assert panel.verdict(last_n=1).startswith("the coding-rate objective is learning")


def test_train_with_the_coding_rate_objective_runs_and_resumes_bitwise(tmp_path):
    data = procedural(n=40)
    flags = ["--loss.objective", "coding_rate", "--data.batch-size", "4", "--run.checkpoint-every", "2",
             "--run.log-every", "1"]
    straight = train.train(tiny_config(tmp_path / "straight", "--optim.iterations", "4", *flags), data)
    assert straight["step"] == 4 and all(math.isfinite(v) for v in straight["history"])
    assert "coding_rate" in straight["losses"] and straight["health"]["verdict"].startswith("the coding-rate")
    train.train(tiny_config(tmp_path / "resumed", "--optim.iterations", "2", *flags), data)
    train.train(tiny_config(tmp_path / "resumed", "--optim.iterations", "4", *flags), data)
    a = torch.load(tmp_path / "straight" / "checkpoint_00000004.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint_00000004.pth", weights_only=True)
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), key


@pytest.mark.slow
def test_coding_rate_objective_under_torchrun_ddp(tmp_path):
    """DDP must be told that the prototype layers get no gradient (find_unused_parameters), or the step fails."""
    from tests.test_train import _run_torchrun

    (tmp_path / "data").mkdir()
    data = procedural(n=16)
    for i in range(len(data)):
        data[i][0].save(tmp_path / "data" / f"{i:03d}.png")
    _run_torchrun(2, tmp_path / "run", "--optim.iterations", "2", "--data.path", str(tmp_path / "data"),
                  "--data.batch-size", "4", "--loss.objective", "coding_rate")
    assert (tmp_path / "run" / "checkpoint_00000002.pth").is_file()


def test_patch_size_override_trains_and_its_checkpoint_loads_with_that_patch(tmp_path):
    cfg = tiny_config(tmp_path, "--model.patch-size", "8", "--optim.iterations", "1", "--data.batch-size", "2")
    summary = train.train(cfg, procedural(n=8))
    backbone = load_eval_backbone(summary["checkpoint"])
    assert backbone.patch_size == 8
    assert backbone(torch.randn(1, 3, 32, 32))["x_norm_patchtokens"].shape[1] == 16  # (32 / 8)^2
    with pytest.raises(ValueError, match="model.patch_size=0"):
        train.validate_config(tiny_config(tmp_path, "--model.patch-size", "0"), world_size=1)
