"""Faults for distill.py: non-finite losses and gradients, a crash between two students' checkpoints, and, with two
processes (torchrun, gloo), one rank killed or hung: the job stops within the configured timeout and resumes from
the last checkpoint every student has, ending bitwise as an uninterrupted job."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import distill
import objective
import runtime
from models.checkpoint import read_checkpoint_file
from tests.helpers import DISTILL_FLAGS, REPO, STUDENTS, NaNGradient, distill_config, procedural, process_env


def _wrap_student_losses(monkeypatch, on_call) -> None:
    """Calls on_call(index, terms) after each student loss (objective.SSLLosses, the "heads" objective; index counts
    the calls of this run: one per student per step); on_call may return replacement terms."""
    real = objective.SSLLosses.forward
    calls = []

    def forward(self, *args, **kwargs):
        terms = real(self, *args, **kwargs)
        calls.append(None)
        replaced = on_call(len(calls) - 1, terms)
        return terms if replaced is None else replaced

    monkeypatch.setattr(objective.SSLLosses, "forward", forward)


def _finite(payload: dict) -> bool:
    return all(torch.isfinite(v).all() for v in payload["student"].values())


def test_nonfinite_loss_stops_naming_student_and_step_or_is_skipped_and_counted(tmp_path, monkeypatch,
                                                                                 teacher_files):
    flags = ["--students", "vit_tiny", "--optim.iterations", "4", "--data.batch-size", "2",
             "--run.checkpoint-every", "1"]
    _wrap_student_losses(monkeypatch, lambda i, terms: {**terms, "total": terms["total"] * float("nan")}
                         if i == 2 else None)
    with pytest.raises(FloatingPointError, match=r"vit_tiny: loss became nan at step 3\b.*last good checkpoint"):
        distill.distill(distill_config(tmp_path / "stop", teacher_files["heads"], *flags), procedural())
    folder = tmp_path / "stop" / "vit_tiny"
    assert [s for s, _ in runtime.list_checkpoints(folder)] == [1, 2]
    assert _finite(read_checkpoint_file(folder / "checkpoint_00000002.pth"))

    _wrap_student_losses(monkeypatch, lambda i, terms: {**terms, "total": terms["total"] * float("nan")}
                         if i in (1, 3) else None)
    summary = distill.distill(distill_config(tmp_path / "skip", teacher_files["heads"], *flags,
                                             "--run.skip-nonfinite"), procedural())
    history = summary["students"]["vit_tiny"]["history"]
    assert summary["step"] == 4 and [math.isnan(h) for h in history] == [False, True, False, True]  # skipped
    final = read_checkpoint_file(tmp_path / "skip" / "vit_tiny" / "checkpoint_00000004.pth")
    assert final["nonfinite_skips"] == 2 and _finite(final)
    log = (tmp_path / "skip" / "log.txt").read_text()
    assert "step 2: vit_tiny: loss became nan, its update skipped (1 skipped so far" in log
    assert "step 4: vit_tiny: loss became nan, its update skipped (2 skipped so far" in log


def test_nonfinite_gradient_of_a_finite_loss_never_reaches_the_student(tmp_path, monkeypatch,
                                                                       teacher_files):
    _wrap_student_losses(monkeypatch, lambda i, terms: {**terms, "total": NaNGradient.apply(terms["total"])}
                         if i == 1 else None)
    flags = ["--students", "vit_tiny", "--optim.iterations", "3", "--data.batch-size", "2",
             "--run.checkpoint-every", "1"]
    with pytest.raises(FloatingPointError, match=r"vit_tiny: gradient norm became nan at step 2\b"):
        distill.distill(distill_config(tmp_path / "stop", teacher_files["heads"], *flags), procedural())
    folder = tmp_path / "stop" / "vit_tiny"
    assert [s for s, _ in runtime.list_checkpoints(folder)] == [1]
    assert _finite(read_checkpoint_file(folder / "checkpoint_00000001.pth"))


class _SimulatedKill(BaseException):
    pass


def test_a_crash_between_two_students_checkpoints_leaves_a_step_both_have(tmp_path, monkeypatch,
                                                                          teacher_files):
    """keep_last 1, killed after vit_tiny saved step 4 and before convnext_test did: vit_tiny still has step 2
    (old checkpoints go only once every student has the new step), so the job resumes at step 2 and finishes."""
    real_save = distill.save_student

    def save_then_die(step, run, cfg):
        real_save(step, run, cfg)
        if step == 4 and run.spec.name == "vit_tiny":
            raise _SimulatedKill

    monkeypatch.setattr(distill, "save_student", save_then_die)
    flags = ["--students", STUDENTS, "--optim.iterations", "6", "--data.batch-size", "2",
             "--run.checkpoint-every", "2", "--run.keep-last", "1"]
    cfg = distill_config(tmp_path, teacher_files["heads"], *flags)
    with pytest.raises(_SimulatedKill):
        distill.distill(cfg, procedural())
    steps = {name: [s for s, _ in runtime.list_checkpoints(tmp_path / name)] for name in ("vit_tiny", "convnext_test")}
    assert steps == {"vit_tiny": [2, 4], "convnext_test": [2]}

    monkeypatch.setattr(distill, "save_student", real_save)
    summary = distill.distill(cfg, procedural())
    assert summary["step"] == 6 and summary["teacher_images_per_rank"] == [4 * 2]  # steps 3..6
    assert "resumed every student at step 2" in (tmp_path / "log.txt").read_text()
    for name in ("vit_tiny", "convnext_test"):
        assert [s for s, _ in runtime.list_checkpoints(tmp_path / name)] == [6]


# ----------------------------------------------------------------------------------------------------
# Two processes, one of them killed or hung
# ----------------------------------------------------------------------------------------------------

STEPS = 8
TIMEOUT_S = 10  # --run.dist-timeout-s of the hung-rank run: how long a collective waits for a silent peer
TORCHRUN_GRACE_S = 30  # torchrun's wait between SIGTERM and SIGKILL when it stops the remaining workers


def _torchrun(out: Path, data: Path, teacher: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(REPO / "distill.py"), "demo", *DISTILL_FLAGS, "--teacher.checkpoint", str(teacher),
            "--data.path", str(data), "--students", "vit_tiny:1,convnext_test:1", "--optim.iterations", str(STEPS),
            "--data.batch-size", "2", "--run.checkpoint-every", "1", "--run.deterministic", "--run.log-every", "1",
            "--run.output-dir", str(out), *flags]


def _start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(command, cwd=REPO, env=process_env(), stdout=out, stderr=subprocess.STDOUT)


def _common_step(out: Path) -> int:
    steps = [{s for s, _ in runtime.list_checkpoints(out / name)} for name in ("vit_tiny", "convnext_test")]
    return max(set.intersection(*steps), default=0)


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the worker torchrun started for `rank` (its child whose environment says RANK=rank)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under torchrun (pid {launcher.pid})")


def _wait_for_common_step_above(step: int, out: Path, launcher: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while _common_step(out) <= step:
        assert launcher.poll() is None, f"the job ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for a checkpoint"
        time.sleep(0.05)


def _assert_all_checkpoints_readable(out: Path) -> None:
    for name in ("vit_tiny", "convnext_test"):
        for step, path in runtime.list_checkpoints(out / name):
            assert read_checkpoint_file(path)["step"] == step, path


@pytest.mark.slow
def test_one_rank_killed_or_hung_stops_the_job_in_time_and_it_resumes_exactly(tmp_path, teacher_files):
    data = tmp_path / "data"
    data.mkdir()
    images = procedural(n=24)
    for i in range(len(images)):
        images[i][0].save(data / f"{i:03d}.png")
    teacher = teacher_files["heads"]
    straight = tmp_path / "straight"
    launcher = _start(_torchrun(straight, data, teacher), tmp_path / "straight.log")
    assert launcher.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-5000:]

    out = tmp_path / "interrupted"
    # kill -9 of rank 1: rank 0's next collective fails at once (connection closed) and torchrun stops.
    log = tmp_path / "killed.log"
    launcher = _start(_torchrun(out, data, teacher), log)
    _wait_for_common_step_above(1, out, launcher, log)
    os.kill(_rank_pid(launcher, 1), signal.SIGKILL)
    killed = time.monotonic()
    assert launcher.wait(timeout=120) != 0
    assert time.monotonic() - killed < 30, "the job did not stop after a rank died"
    _assert_all_checkpoints_readable(out)
    reached = _common_step(out)
    assert 2 <= reached < STEPS

    # Rank 1 hangs (SIGSTOP): rank 0 gives up after --run.dist-timeout-s, then torchrun kills rank 1.
    log = tmp_path / "hung.log"
    launcher = _start(_torchrun(out, data, teacher, "--run.dist-timeout-s", str(TIMEOUT_S)), log)
    _wait_for_common_step_above(reached, out, launcher, log)
    hung_pid = _rank_pid(launcher, 1)
    os.kill(hung_pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        assert launcher.wait(timeout=TIMEOUT_S + TORCHRUN_GRACE_S + 90) != 0
    finally:
        try:
            os.kill(hung_pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    waited = time.monotonic() - stopped
    assert TIMEOUT_S <= waited < TIMEOUT_S + TORCHRUN_GRACE_S + 30, waited
    assert "timed out" in log.read_text().lower()
    assert f"resumed every student at step {reached}" in log.read_text()
    _assert_all_checkpoints_readable(out)
    reached = _common_step(out)
    assert reached < STEPS

    log = tmp_path / "resumed.log"
    launcher = _start(_torchrun(out, data, teacher), log)
    assert launcher.wait(timeout=600) == 0, log.read_text()[-5000:]
    assert f"resumed every student at step {reached}" in log.read_text()
    for name in ("vit_tiny", "convnext_test"):
        a = torch.load(straight / name / f"checkpoint_{STEPS:08d}.pth", weights_only=True)
        b = torch.load(out / name / f"checkpoint_{STEPS:08d}.pth", weights_only=True)
        for key, value in a["student"].items():
            assert torch.equal(value, b["student"][key]), f"{name}.{key}"
        for index, moments in a["optimizer"]["state"].items():
            for moment, value in moments.items():
                assert torch.equal(value, b["optimizer"]["state"][index][moment]), f"{name} optimizer {index}"
