"""Sharded checkpoints (torch.distributed.checkpoint folders, `--run.checkpoint-format sharded`, the default of FSDP
runs over several processes): exact resume in one process and over two, resharding 2 -> 3 and 4 -> 2 processes,
kill -9 during a synchronous or asynchronous save, partial and damaged folders, and the entry points that read a
folder (eval's backbone loader, --init-from, distill.py's --teacher.checkpoint).

The fast tests run train.train in this process (one process: DCP without a process group); the slow ones
(`pytest -m slow`) launch torchrun on the CPU with gloo.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import runtime
import train
from models.checkpoint import (
    CheckpointError,
    checkpoint_path_or_error,
    load_any_backbone,
    read_sharded_checkpoint,
    read_weights,
)
from tests.helpers import REPO, TINY_FLAGS, procedural, process_env, tiny_config

SHARDED = ("--run.checkpoint-format", "sharded")


def _optimizer_moments(payload: dict) -> dict[str, torch.Tensor]:
    """{"<fqn>.<name>": tensor} of a file checkpoint's or a full optimizer state dict's AdamW state."""
    return {f"{fqn}.{name}": value for fqn, moments in payload["state"].items() for name, value in moments.items()}


def _sharded_moments(folder: Path) -> dict[str, torch.Tensor]:
    saved = read_sharded_checkpoint(folder, parts=("optimizer",))["optimizer"]
    return {key.removeprefix("state."): value for key, value in saved.items() if key.startswith("state.")}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:5]}"


# ----------------------------------------------------------------------------------------------------
# One process
# ----------------------------------------------------------------------------------------------------

FLAGS = ["--optim.iterations", "4", "--data.batch-size", "4", "--run.checkpoint-every", "2", "--run.deterministic"]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """A finished 4-step one-process run with sharded checkpoints at steps 2 and 4."""
    folder = tmp_path_factory.mktemp("sharded_run")
    train.train(tiny_config(folder, *FLAGS, *SHARDED), procedural(n=24))
    return folder


def test_one_process_sharded_resume_ends_bitwise_as_the_file_run(tmp_path, sharded_run):
    """Resumed from the folder of step 2, the sharded run ends with bitwise the weights and AdamW moments of an
    uninterrupted run that wrote single files."""
    train.train(tiny_config(tmp_path / "file", *FLAGS), procedural(n=24))
    run = tmp_path / "sharded"
    shutil.copytree(sharded_run, run)
    assert [s for s, _ in runtime.list_checkpoints(run)] == [2, 4]
    assert sorted(p.name for p in (run / "checkpoint_00000004").iterdir()) == [
        ".metadata", "__0_0.distcp", "meta.json", "rng_0.pt"]
    shutil.rmtree(run / "checkpoint_00000004")
    summary = train.train(tiny_config(run, *FLAGS, *SHARDED), procedural(n=24))
    assert summary["step"] == 4 and len(summary["history"]) == 2
    assert f"resumed from {run / 'checkpoint_00000002'} at step 2" in (run / "log.txt").read_text()
    assert summary["checkpoint"] == str(run / "checkpoint_00000004")

    file = torch.load(tmp_path / "file" / "checkpoint_00000004.pth", weights_only=True)
    folder = read_weights(run / "checkpoint_00000004")
    assert folder["step"] == 4 and folder["config"]["model"]["arch"] == "vit_tiny" and "optimizer" not in folder
    for part in ("student", "teacher"):
        _assert_equal(file[part], folder[part], part)
    _assert_equal(_optimizer_moments(file["optimizer"]), _sharded_moments(run / "checkpoint_00000004"), "AdamW")


def test_partial_and_damaged_folders_are_ignored_or_named(tmp_path, sharded_run, caplog):
    """A folder without meta.json (a save that did not finish) is not a checkpoint: resuming ignores it (and says
    so once), naming it is a clear error; a folder with a missing shard file is not resumed either, and an error
    names the file; .tmp folders are removed at the next save."""
    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    partial = run / "checkpoint_00000006"
    shutil.copytree(run / "checkpoint_00000004", partial)
    (partial / "meta.json").unlink()
    shutil.copytree(run / "checkpoint_00000004", run / "checkpoint_00000005.tmp")
    caplog.set_level(logging.WARNING, logger="dinov3")
    assert [s for s, _ in runtime.list_checkpoints(run)] == [2, 4]
    assert [s for s, _ in runtime.list_checkpoints(run)] == [2, 4]
    assert sum("without meta.json" in r.getMessage() for r in caplog.records) == 1
    assert checkpoint_path_or_error(run) == run / "checkpoint_00000004"
    for named in (partial, run / "checkpoint_00000005.tmp"):
        with pytest.raises(CheckpointError, match=r"sharded checkpoint folder without its meta.json .*did not finish"):
            load_any_backbone(named)

    summary = train.train(tiny_config(run, *SHARDED, *FLAGS[2:], "--optim.iterations", "5"), procedural(n=24))
    assert summary["step"] == 5 and len(summary["history"]) == 1  # from step 4, not the partial 6
    assert not list(run.glob("*.tmp"))

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    shutil.copytree(sharded_run / "checkpoint_00000004", damaged / "checkpoint_00000004")
    (damaged / "checkpoint_00000004" / "__0_0.distcp").unlink()
    # Its only checkpoint damaged, the run refuses (it does not start over from step 0 by itself).
    with pytest.raises(CheckpointError, match=r"no complete checkpoint to resume from: checkpoint_00000004 is "
                                              r"incomplete or damaged \(__0_0.distcp is missing\)"):
        train.train(tiny_config(damaged, *SHARDED, *FLAGS[2:], "--optim.iterations", "5"), procedural(n=24))
    with pytest.raises(CheckpointError, match=r"is damaged: __0_0.distcp is missing"):
        read_weights(damaged / "checkpoint_00000004")


def test_entry_points_read_a_sharded_folder(tmp_path, sharded_run):
    """eval.py's backbone loader (and its feature-cache key), export's load_any_backbone, --init-from and distill.py's
    --teacher.checkpoint take the folder (or the run folder); the backbone is the released-format file's."""
    import distill
    from probes import checkpoint_fingerprint, load_eval_backbone

    folder = sharded_run / "checkpoint_00000004"
    released = torch.load(sharded_run / "teacher_backbone.pth", weights_only=True)
    for source in (folder, sharded_run):
        _assert_equal(released, load_eval_backbone(source).state_dict(), str(source))
    assert checkpoint_fingerprint(folder) == checkpoint_fingerprint(sharded_run)

    teacher = distill.load_teacher(distill.TeacherConfig(checkpoint=str(folder), attn_impl="sdpa"))
    assert teacher.objective == "heads"
    _assert_equal(read_weights(folder)["teacher"], teacher.net.state_dict(), "distill teacher")

    init = tmp_path / "init"
    summary = train.train(tiny_config(init, "--optim.iterations", "1", "--data.batch-size", "2", "--init-from",
                                      str(folder)), procedural(n=8))
    assert summary["step"] == 1
    assert f"initialized from {folder} (step 4)" in (init / "log.txt").read_text()


def test_checkpoint_format_checks():
    with pytest.raises(ValueError, match="async_checkpoint needs sharded checkpoints"):
        train.validate_config(train.parse_config(["demo", "--run.async-checkpoint"]), world_size=1)
    with pytest.raises(ValueError, match="nothing to shard"):
        train.validate_config(train.parse_config(["demo", *SHARDED]), world_size=2)
    train.validate_config(train.parse_config(["demo", *SHARDED]), world_size=1)  # one process: allowed


# ----------------------------------------------------------------------------------------------------
# Several processes (torchrun, gloo on the CPU)
# ----------------------------------------------------------------------------------------------------

MULTI_FLAGS = ["--optim.lr.peak", "1e-3", "--run.parallel", "fsdp", "--loss.koleo-group-size", "16",
               "--run.log-every", "1", "--run.dist-timeout-s", "120", "--model.layerscale-init", "1.0"]
LOSS_LINE = re.compile(r"step (\d+)/\d+\s+loss (\S+) \(dino (\S+) ibot (\S+) koleo (\S+)\)")

# Rank 0 of a resumed run writes the full state right after loading (then training goes on as usual).
DUMP_AFTER_LOAD = """
import sys
import torch
sys.path.insert(0, {repo!r})
import runtime, train
real = train.restore_or_initialize
def restore_and_dump(state, cfg, start):
    real(state, cfg, start)
    student, optimizer = runtime.full_state(state.student, state.optimizer)
    teacher = runtime.full_state(state.teacher)
    if torch.distributed.get_rank() == 0:
        torch.save({{"step": state.step, "student": student, "teacher": teacher, "optimizer": optimizer}}, sys.argv[1])
train.restore_or_initialize = restore_and_dump
train.main(sys.argv[2:])
runtime.leave_torchrun_worker()  # as train.py's run_cli ends a worker
"""


def _env() -> dict[str, str]:
    env = process_env()
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def _command(nproc: int, out: Path, data: Path, batch: int, steps: int, *flags: str, script: list[str] | None = None):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *(script or [str(REPO / "train.py")]), "demo", *TINY_FLAGS, *MULTI_FLAGS, "--data.path", str(data),
            "--run.output-dir", str(out), "--data.batch-size", str(batch), "--optim.iterations", str(steps), *flags]


def _start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as sink:  # a file, not a pipe: a full pipe would stall the run
        return subprocess.Popen(command, cwd=REPO, env=_env(), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _run(command: list[str], log: Path, timeout: float = 240) -> None:
    process = _start(command, log)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the group of the launcher this test started
        process.wait()
        pytest.fail(f"{command[5:7]} did not finish within {timeout} s:\n{log.read_text()[-3000:]}")
    assert code == 0, log.read_text()[-5000:]


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return children + [d for c in children for d in _descendants(c)]


def _kill_job(process: subprocess.Popen) -> None:
    """SIGKILL to the launcher's process group and to every process below it (torchrun's workers may run in
    groups of their own), then wait until none of them runs any more."""
    pids = _descendants(process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _losses(out: Path) -> dict[int, tuple[str, ...]]:
    return {int(m.group(1)): m.groups()[1:] for m in LOSS_LINE.finditer((out / "log.txt").read_text())}


@pytest.mark.slow
def test_two_processes_resume_a_sharded_checkpoint_exactly(tmp_path, image_folder):
    """2 FSDP processes: 3 steps with asynchronous sharded saves, resumed (synchronous) to 5, equal an
    uninterrupted 5-step run bitwise (student, EMA teacher, AdamW moments) and log the same losses."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    _run(_command(2, straight, image_folder, 4, 5, "--run.checkpoint-every", "3"), tmp_path / "straight.log")
    _run(_command(2, split, image_folder, 4, 3, "--run.checkpoint-every", "1", "--run.async-checkpoint"),
         tmp_path / "first.log")
    assert [s for s, _ in runtime.list_checkpoints(split)] == [1, 2, 3]
    assert sorted(p.name for p in (split / "checkpoint_00000003").glob("*.distcp")) == ["__0_0.distcp",
                                                                                     "__1_0.distcp"]
    _run(_command(2, split, image_folder, 4, 5, "--run.checkpoint-every", "3"), tmp_path / "second.log")
    assert f"resumed from {split / 'checkpoint_00000003'} at step 3" in (tmp_path / "second.log").read_text()
    a, b = read_weights(straight / "checkpoint_00000005"), read_weights(split / "checkpoint_00000005")
    for part in ("student", "teacher"):
        _assert_equal(a[part], b[part], part)
    _assert_equal(_sharded_moments(straight / "checkpoint_00000005"), _sharded_moments(split / "checkpoint_00000005"),
                  "AdamW")
    assert _losses(split) == _losses(straight) and sorted(_losses(straight)) == [1, 2, 3, 4, 5]
    # The released-format backbone of the last save is the teacher of the last checkpoint.
    _assert_equal({f"backbone.{k}": v for k, v in torch.load(split / "teacher_backbone.pth").items()},
                  {k: v for k, v in b["teacher"].items() if k.startswith("backbone.")}, "teacher_backbone.pth")


@pytest.mark.slow
@pytest.mark.parametrize("saved_by, resumed_by", [(2, 3), (4, 2)], ids=["2-to-3", "4-to-2"])
def test_resharding_restores_weights_and_optimizer_exactly(tmp_path, image_folder, saved_by, resumed_by):
    """A checkpoint of N processes resumed by M: right after loading, the gathered student, EMA teacher and AdamW
    state equal the saved ones bitwise; the run then trains on (global batch 12 or 8 either way: the same data
    stream) and writes an M-process checkpoint."""
    global_batch = 12 if 3 in (saved_by, resumed_by) else 8
    out = tmp_path / "run"
    _run(_command(saved_by, out, image_folder, global_batch // saved_by, 2, "--run.checkpoint-every", "2"),
         tmp_path / "saved.log")
    script = tmp_path / "dump_after_load.py"
    script.write_text(DUMP_AFTER_LOAD.format(repo=str(REPO)))
    dump = tmp_path / "after_load.pt"
    _run(_command(resumed_by, out, image_folder, global_batch // resumed_by, 3, script=[str(script), str(dump)]),
         tmp_path / "resumed.log")
    log = (tmp_path / "resumed.log").read_text()
    assert f"written by {saved_by} processes, this run has {resumed_by}" in log and "global batch changes" not in log

    saved, loaded = read_weights(out / "checkpoint_00000002"), torch.load(dump, weights_only=True)
    assert loaded["step"] == 2
    for part in ("student", "teacher"):
        _assert_equal(saved[part], loaded[part], part)
    _assert_equal(_sharded_moments(out / "checkpoint_00000002"), _optimizer_moments(loaded["optimizer"]), "AdamW")
    assert [s for s, _ in runtime.list_checkpoints(out)] == [2, 3]
    assert len(list((out / "checkpoint_00000003").glob("*.distcp"))) == resumed_by
    assert sorted(_losses(out)) == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_9_during_a_sharded_save_keeps_the_previous_checkpoint(tmp_path, image_folder, mode):
    """SIGKILL to the whole job while a checkpoint folder is being written: the committed checkpoints stay
    readable, the partial `.tmp` folder is ignored, and the restarted run resumes from the newest committed one."""
    out = tmp_path / "run"
    flags = ["--run.checkpoint-every", "1", *(["--run.async-checkpoint"] if mode == "async" else [])]
    for attempt in range(3):  # a kill that misses the write (the save finished first) is tried again
        log = tmp_path / f"killed_{attempt}.log"
        process = _start(_command(2, out, image_folder, 4, 40, *flags), log)
        deadline = time.monotonic() + 180
        before = len(runtime.list_checkpoints(out))
        while not (len(runtime.list_checkpoints(out)) > before and list(out.glob("checkpoint_*.tmp"))):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "timed out waiting for a save"
            time.sleep(0.002)
        _kill_job(process)
        partial = list(out.glob("checkpoint_*.tmp"))
        if partial:
            break
    assert partial, "no kill landed during a save"
    committed = runtime.list_checkpoints(out)
    newest = committed[-1][0]
    assert newest < 40
    for step, path in committed:
        assert read_weights(path)["step"] == step
    with pytest.raises(CheckpointError, match="did not finish"):
        read_weights(checkpoint_path_or_error(partial[0]))

    _run(_command(2, out, image_folder, 4, newest + 1, *flags), tmp_path / "resumed.log")
    assert f"resumed from {out / f'checkpoint_{newest:08d}'} at step {newest}" in (tmp_path / "resumed.log").read_text()
    assert runtime.list_checkpoints(out)[-1][0] == newest + 1 and not list(out.glob("*.tmp"))
