"""--run.dense-every in train.py and distill.py: the dense metric (ridge-probe mIoU on generated scenes) reaches
the summary, TensorBoard and the progress log; bench/dense_chain.py reads it back from the three demo phases."""

import pytest

import distill
import train
from tests.helpers import DISTILL_FLAGS, procedural, tensorboard_scalars, tiny_config


def test_train_logs_the_dense_metric_at_initialization_every_n_steps_and_at_the_end(tmp_path):
    cfg = tiny_config(tmp_path, "--optim.iterations", "3", "--data.batch-size", "4", "--run.dense-every", "2")
    summary = train.train(cfg, procedural(n=16))
    assert sorted(summary["dense"]) == [0, 2, 3]
    assert all(0 < r["miou"] <= 1 and 0 < r["pixel_accuracy"] <= 1 for r in summary["dense"].values())
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert [step for step, _ in scalars["dense/miou"]] == [0, 2, 3]
    assert scalars["dense/miou"][0][1] == pytest.approx(summary["dense"][0]["miou"], rel=1e-6)  # stored as float32
    assert "step 2: dense: ridge-probe mIoU" in (tmp_path / "log.txt").read_text()


def test_distill_logs_the_dense_metric_of_every_student_and_of_the_teacher(tmp_path, teacher_files):  # noqa: F811
    cfg = distill.parse_config(["demo", *DISTILL_FLAGS, "--teacher.checkpoint", str(teacher_files["heads"]),
                                "--run.output-dir", str(tmp_path), "--students", "vit_tiny,convnext_test",
                                "--optim.iterations", "2", "--data.batch-size", "2", "--run.dense-every", "2"])
    summary = distill.distill(cfg, procedural(n=16, size=64))
    assert sorted(summary["dense"]) == [0, 2]
    assert set(summary["dense"][2]) == {"vit_tiny", "convnext_test"}
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    for tag in ("dense/vit_tiny/miou", "dense/convnext_test/miou"):
        assert [step for step, _ in scalars[tag]] == [0, 2], tag
    assert [step for step, _ in scalars["dense/teacher/miou"]] == [0]


def test_the_dense_chain_benchmark_reads_and_plots_the_three_phases(tmp_path):
    from bench import dense_chain

    flags = ["--model.arch", "vit_tiny", "--model.kernel-impl", "reference", "--model.attn-impl", "sdpa",
             "--data.batch-size", "2", "--augment.n-local-crops", "2", "--data.num-workers", "0", "--run.device", "cpu",
             "--optim.iterations", "2", "--run.log-every", "1000", "--run.knn-every", "0"]
    dense_chain.run_chain(tmp_path, flags)
    rows = dense_chain.read_curve(tmp_path)
    assert [(r["phase"], r["step"]) for r in rows] == [("demo", 0), ("demo", 2), ("demo-gram", 0), ("demo-gram", 2),
                                                       ("demo-hrft", 0), ("demo-hrft", 2)]
    assert [r["chain_step"] for r in rows] == [0, 2, 2, 4, 4, 6]
    # Each phase starts from the teacher the previous one ended with: the same metric.
    assert rows[2]["miou"] == pytest.approx(rows[1]["miou"]) and rows[4]["miou"] == pytest.approx(rows[3]["miou"])
    dense_chain.write_csv(rows, tmp_path / "curve.csv")
    dense_chain.plot(rows, {"raw pixels, same probe": 0.05, "background everywhere": 0.04}, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0 and len((tmp_path / "curve.csv").read_text().splitlines()) == 7
