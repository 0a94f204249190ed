"""--run.dense-every in train.py and distill.py: the dense metric (ridge-probe mIoU on generated scenes) reaches
the summary, TensorBoard and the progress log."""

from pathlib import Path

import pytest

import distill
import train
from tests.test_distill import DISTILL_FLAGS, teacher_files  # noqa: F401  (teacher_files is a fixture)
from tests.test_train import procedural, tiny_config


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


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
