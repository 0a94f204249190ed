"""bench/bench_learning.py end to end at toy size: the curve's rows, CSV and plot (the full run is slow)."""

import csv

import pytest

from bench.bench_learning import labeled_pretraining_images, learning_config, pixel_features, run

TOY = ["--data.global-size", "32", "--data.local-size", "16", "--augment.n-local-crops", "2", "--data.batch-size", "4",
       "--data.num-workers", "0", "--model.kernel-impl", "reference", "--model.attn-impl", "sdpa",
       "--run.device", "cpu"]


def test_learning_curve_rows_csv_and_plot(tmp_path):
    rows = run("demo", steps=4, eval_every=2, out=tmp_path / "out", overrides=TOY, supervised=True)
    assert [r["curve"] for r in rows] == ["pixels", "initialization", "demo", "demo", "supervised", "supervised"]
    assert [r["step"] for r in rows[1:]] == [0, 2, 4, 2, 4]
    for row in rows:
        for key in ("knn_top1_k10", "knn_top1_k20", "knn_top5_k20", "linear_top1"):
            assert 0 <= row[key] <= 100, (row["curve"], key)
    assert rows[3]["minutes"] >= rows[2]["minutes"] > 0
    assert rows[5]["minutes"] >= rows[4]["minutes"] > 0
    assert all(r["loss_supervised"] > 0 for r in rows[4:])
    with (tmp_path / "out" / "learning_curve.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6
    png = (tmp_path / "out" / "learning_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_pixel_baseline_is_pooled_and_centered():
    import torch

    images = torch.rand(6, 3, 32, 32) + 5.0
    features = pixel_features(images)
    assert features.shape == (6, 3 * 8 * 8)
    torch.testing.assert_close(features.mean(dim=0), torch.zeros(3 * 8 * 8), atol=1e-5, rtol=0)


def test_supervised_reference_needs_the_procedural_labels(tmp_path):
    cfg = learning_config("demo", 4, 2, tmp_path, [*TOY, "--data.path", str(tmp_path)])
    with pytest.raises(ValueError, match="procedural"):
        labeled_pretraining_images(cfg)
    with pytest.raises(ValueError, match="procedural"):  # before any training: the folder holds no image
        run("demo", 4, 2, tmp_path / "out", [*TOY, "--data.path", str(tmp_path)], supervised=True)


def test_controls_run_with_the_same_options_and_are_compared(tmp_path, capsys):
    rows = run("demo", steps=2, eval_every=2, out=tmp_path / "out", overrides=TOY, controls=("koleo-only",))
    assert [r["curve"] for r in rows] == ["pixels", "initialization", "demo", "koleo-only"]
    config = (tmp_path / "out" / "train-koleo-only" / "config.json").read_text()
    assert '"dino_weight": 0.0' in config and '"ibot_weight": 0.0' in config
    assert rows[3]["loss_dino"] > 0  # the term is still computed and reported, only its weight is 0
    assert all(0 < r["dino_over_ln_k"] < 1.5 for r in rows[2:])
    out = capsys.readouterr().out
    assert "targets: working >= koleo-only + 5 points:" in out and "DINO term <= 0.9 ln K:" in out
    assert rows[2]["health"] in out


def test_coding_rate_runs_report_their_alignment_and_koleo_only_zeroes_the_rate(tmp_path, capsys):
    overrides = [*TOY, "--loss.objective", "coding_rate"]
    rows = run("demo", steps=2, eval_every=2, out=tmp_path / "out", overrides=overrides, controls=("koleo-only",))
    config = (tmp_path / "out" / "train-koleo-only" / "config.json").read_text()
    assert '"coding_rate_weight": 0.0' in config and '"objective": "coding_rate"' in config
    assert all("dino_over_ln_k" not in r and 0 <= r["alignment"] <= 2 for r in rows[2:])
    out = capsys.readouterr().out
    assert "class alignment" in out and "DINO term <= 0.9 ln K" not in out
