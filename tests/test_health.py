"""health.py: each metric on constructed inputs with known answers and against a float64 reference on random ones;
the panel's scalars and verdicts; the shuffled-targets control; a short run logs `health/` and a verdict."""

import math

import pytest
import torch

from health import (
    TARGET_EPS,
    HealthPanel,
    effective_rank,
    target_cross_entropy,
    target_entropy,
    token_spread,
    view_agreement,
)
from objective import shuffled_rows

K = 64


def random_targets(rows: int, k: int = K, temp: float = 0.3) -> torch.Tensor:
    return torch.softmax(torch.randn(rows, k, dtype=torch.float64) / temp, dim=-1)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return abs(value.double().item() - reference.item()) / abs(reference.item())


def test_target_entropy_of_uniform_one_hot_and_random_rows():
    assert target_entropy(torch.full((5, K), 1.0 / K)).item() == pytest.approx(math.log(K), rel=1e-6)
    assert target_entropy(torch.eye(K)[:7]).item() == pytest.approx(0.0, abs=1e-9)
    p = random_targets(9)
    reference = -(p * p.log()).sum(dim=-1).mean()
    assert relative_error(target_entropy(p.float()), reference) < 1e-5


def test_view_agreement_identical_one_hot_and_uniform_rows():
    # Identical rows everywhere: an image's two crops and two images' crops are equally alike, CE = H.
    row = random_targets(1)
    same, other = view_agreement(row.expand(8, K).float())
    reference = -(row * row.log()).sum()
    assert relative_error(same, reference) < 1e-5 and relative_error(other, reference) < 1e-5
    # One-hot: image b's two crops both on prototype b (CE 0), another image's crop on another one (CE -ln eps).
    one_hot = torch.eye(K)[:4]
    same, other = view_agreement(torch.cat([one_hot, one_hot]))
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    assert other.item() == pytest.approx(-math.log(TARGET_EPS), rel=1e-5)
    # Uniform targets: both ln K, no gap.
    same, other = view_agreement(torch.full((6, K), 1.0 / K))
    assert same.item() == pytest.approx(math.log(K), rel=1e-6) and other.item() == pytest.approx(math.log(K), rel=1e-6)


def test_view_agreement_pairs_crops_and_images_as_documented():
    first, second = random_targets(5), random_targets(5)
    same, other = view_agreement(torch.cat([first, second]).float())
    assert relative_error(same, -(first * second.log()).sum(-1).mean()) < 1e-5
    assert relative_error(other, -(first * second.roll(-1, 0).log()).sum(-1).mean()) < 1e-5
    assert relative_error(target_cross_entropy(first.float(), second.float()),
                          -(first * second.log()).sum(-1).mean()) < 1e-5
    with pytest.raises(ValueError, match="at least 2 images"):
        view_agreement(torch.rand(2, K))  # one image, two crops: no other image to compare with


def test_token_spread_identical_orthogonal_and_random_rows():
    assert token_spread(torch.randn(1, 32).expand(10, 32) * 3).item() == pytest.approx(0.0, abs=1e-6)
    d = 32
    # Orthogonal unit rows (the identity): each dimension holds one 1 and d - 1 zeros: std sqrt((1/d)(1 - 1/d)).
    assert token_spread(torch.eye(d) * 5).item() == pytest.approx(math.sqrt((1 / d) * (1 - 1 / d)), rel=1e-6)
    x = torch.randn(50, d, dtype=torch.float64)
    unit = x / x.norm(dim=-1, keepdim=True)
    reference = (unit - unit.mean(0)).pow(2).mean(0).sqrt().mean()
    assert relative_error(token_spread(x.float()), reference) < 1e-5


def test_effective_rank_identical_orthogonal_and_random_rows():
    assert effective_rank(torch.randn(1, 16).expand(20, 16)).item() == pytest.approx(1.0, rel=1e-4)
    assert effective_rank(torch.eye(16) * 2).item() == pytest.approx(16.0, rel=1e-5)
    assert effective_rank(torch.eye(16)[:5]).item() == pytest.approx(5.0, rel=1e-5)  # 5 orthogonal rows: rank 5
    x = torch.randn(40, 16, dtype=torch.float64)
    s = torch.linalg.svdvals(x)
    p = s / s.sum()
    assert relative_error(effective_rank(x.float()), torch.exp(-(p * p.log()).sum())) < 1e-5


def test_panel_scalars_window_and_console():
    panel = HealthPanel(dino_prototypes=K, ibot_prototypes=16, window_batches=2)
    for _ in range(3):  # the window keeps the last 2 batches: 2 x 8 orthogonal rows of 32 dimensions
        panel.observe_class_tokens(torch.eye(32)[:8])
    panel.observe_targets(torch.full((8, K), 1.0 / K), torch.full((3, 16), 1.0 / 16), n_global=2)
    values = panel.scalars(5, {"dino": math.log(K), "ibot": 0.5 * math.log(16)})
    assert values["dino_entropy_over_ln_k"] == pytest.approx(1.0, rel=1e-6)
    assert values["ibot_entropy"] == pytest.approx(math.log(16), rel=1e-6)
    assert values["view_gap"] == pytest.approx(0.0, abs=1e-5)
    assert values["dino_term_over_ln_k"] == pytest.approx(1.0) and values["ibot_term_over_ln_k"] == pytest.approx(0.5)
    assert values["rankme"] == pytest.approx(8.0, rel=1e-4)  # the same 8 directions twice
    assert values["cls_std_sqrt_d"] == pytest.approx(math.sqrt(32) * token_spread(torch.eye(32)[:8]).item())
    assert panel.history == [(5, values)]
    assert "view gap 0.00" in panel.console(values) and "rank 8.0" in panel.console(values)
    assert panel.scalars(6, {"dino": 1.0, "ibot": 1.0}).keys() >= {"rankme", "dino_term_over_ln_k"}  # no targets


def panel_with(values: dict, step: int = 300) -> HealthPanel:
    panel = HealthPanel(dino_prototypes=1024, ibot_prototypes=1024)
    panel.history = [(step, values)]
    return panel


def test_verdicts():
    ln_k = math.log(1024)
    starved = {"cls_std_sqrt_d": 0.8, "rankme": 40.0, "dino_term_over_ln_k": 0.99, "view_ce_same": 6.93,
               "view_ce_other": 7.13, "view_gap": 0.2}
    assert panel_with(starved).verdict().startswith("the DINO objective has not started: two views' targets are no "
                                                    "more alike than two images'")
    assert "after 300 steps" in panel_with(starved).verdict()
    learning = {**starved, "dino_term_over_ln_k": 0.85, "view_ce_same": 5.0, "view_ce_other": 5.0 + 0.3 * ln_k,
                "view_gap": 0.3 * ln_k}
    assert panel_with(learning).verdict().startswith("the DINO objective is learning")
    assert panel_with({**learning, "dino_term_over_ln_k": 0.99}).verdict().startswith("the DINO objective is starting")
    assert panel_with({**starved, "cls_std_sqrt_d": 0.01, "rankme": 1.1}).verdict().startswith("collapsed")
    assert HealthPanel(4, 4).verdict() == "no step logged"


def test_shuffled_rows_is_a_permutation_of_the_rows():
    targets = torch.arange(12.0).view(6, 2)
    torch.manual_seed(0)
    shuffled = shuffled_rows(targets)
    assert not torch.equal(shuffled, targets)
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, targets.tolist()))


def test_a_run_logs_the_health_panel_and_its_verdict(tmp_path):
    import train
    from tests.helpers import procedural, tensorboard_scalars, tiny_config

    cfg = tiny_config(tmp_path, "--optim.iterations", "3", "--data.batch-size", "4", "--run.log-every", "2",
                      "--loss.shuffle-targets")
    summary = train.train(cfg, procedural(n=16))
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    for name in ("dino_entropy", "ibot_entropy", "view_gap", "cls_std", "rankme", "dino_term_over_ln_k"):
        assert [step for step, _ in scalars[f"health/{name}"]] == [1, 2, 3], name  # first, every 2nd and last step
    assert summary["health"]["verdict"].endswith("after 3 steps")
    assert 0 < summary["health"]["overhead"] < 1
    log = (tmp_path / "log.txt").read_text()
    assert "health: H(t)" in log and summary["health"]["verdict"] in log
