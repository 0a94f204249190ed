"""One run per output folder, workers that die with their launcher, checkpoints that are complete or never read,
and the entry points' one-line errors (issue 26).

- A second run on a folder whose lock is held stops before building anything, with one line naming the holder.
- Every configuration error of train.py and distill.py (one table): one line on stderr, exit status 2, no
  traceback, raised before any process group, model or loader exists; `--debug` shows the traceback.
- A finished run (train.py or distill.py) started again exits 0 with one line (a SLURM requeue).
- `--run.checkpoint-every 0`: checkpoints only at the end.
- A truncated newest checkpoint file, and sharded folders half-written in every way, are never resumed: the run
  falls back to the newest complete one, naming the damaged one, which is kept as `<name>.damaged`; with nothing
  complete left the run refuses with the command that moves it aside.
- kill -9 of the torchrun launcher alone: its workers are gone within seconds and nothing partial is resumable
  (slow).
- A torchrun worker that finished leaves before the interpreter's finalization, with exit status 0, its exit
  handlers run and its output written (slow).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import distill
import runtime
import train
from models.checkpoint import CheckpointError, read_checkpoint_file, read_weights
from tests.helpers import (
    DISTILL_FLAGS,
    REPO,
    TINY_FLAGS,
    distill_config,
    procedural,
    process_env,
    tiny_config,
)

ONE_STEP = ("--optim.iterations", "1", "--data.batch-size", "2")


def _train_argv(out: Path, *flags: str) -> list[str]:
    return ["demo", *TINY_FLAGS, "--run.output-dir", str(out), *flags]


def _distill_argv(out: Path, teacher: Path, *flags: str) -> list[str]:
    return ["demo", *DISTILL_FLAGS, "--students", "vit_tiny", "--teacher.checkpoint", str(teacher),
            "--run.output-dir", str(out), *flags]


def _subprocess(script: str, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = process_env()
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    return subprocess.run([sys.executable, str(REPO / script), *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _refuse_building(monkeypatch) -> None:
    """Fail the test if a process group, a model, a teacher or a loader is built."""
    def refuse(*args, **kwargs):
        raise AssertionError("built something before the checks")

    monkeypatch.setattr(runtime, "setup_distributed", refuse)
    for module, names in ((train, ("build_state", "build_train_loader")),
                          (distill, ("setup_teacher", "setup_students", "build_phase_loader"))):
        for name in names:
            monkeypatch.setattr(module, name, refuse)


@pytest.fixture
def nothing_may_be_built(monkeypatch):
    _refuse_building(monkeypatch)


def _run_cli(monkeypatch, capsys, module, argv: list[str]) -> tuple[int, str, str]:
    """module.main under runtime.run_cli as `python module.py argv` runs it: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    with pytest.raises(SystemExit) as ended:
        runtime.run_cli(module.main, one_line=(CheckpointError,))
    captured = capsys.readouterr()
    return ended.value.code, captured.out, captured.err


# ----------------------------------------------------------------------------------------------------
# One run per output folder
# ----------------------------------------------------------------------------------------------------


def test_a_second_run_on_a_locked_folder_stops_with_one_line_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = runtime.RunFolderLock(out)
    holder.acquire()
    try:
        with pytest.raises(runtime.RunFolderBusy, match=re.escape(f"pid {os.getpid()} on host {socket.gethostname()}")):
            train.train(tiny_config(out, *ONE_STEP), procedural(n=8))
        result = _subprocess("train.py", _train_argv(out, *ONE_STEP))
    finally:
        holder.release()
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"error: {out} is in use by another run (pid {os.getpid()} on host "
                               f"{socket.gethostname()}, started ")
    assert not runtime.list_checkpoints(out) and not (out / "tensorboard").exists()

    # The holder gone, the folder is free; the run holds the lock while it runs and drops it at the end.
    seen = []
    real_run = train.run_training

    def run_and_probe(*args, **kwargs):
        with pytest.raises(runtime.RunFolderBusy):
            runtime.RunFolderLock(out).acquire()
        seen.append(True)
        return real_run(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "run_training", run_and_probe)
        assert train.train(tiny_config(out, *ONE_STEP), procedural(n=8))["step"] == 1
    assert seen == [True]
    free = runtime.RunFolderLock(out)
    free.acquire()
    free.release()


# ----------------------------------------------------------------------------------------------------
# Configuration errors: one table
# ----------------------------------------------------------------------------------------------------


def _empty_folder(tmp_path: Path) -> str:
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty")


def _text_folder(tmp_path: Path) -> str:
    (tmp_path / "texts").mkdir()
    for i in range(3):
        (tmp_path / "texts" / f"notes_{i}.txt").write_text("not an image\n")
    return str(tmp_path / "texts")


# (entry point, flags (a function of tmp_path where they name files), fragment of the one-line message)
CASES = [
    ("train", ["--optim.lr.peak", "-1e-3"], "optim.lr.peak=-0.001 must be >= 0"),
    ("train", ["--optim.lr.start", "-1"], "optim.lr.start=-1 must be >= 0"),
    ("train", ["--optim.weight-decay.peak", "-0.04"], "optim.weight_decay.peak=-0.04 must be >= 0"),
    ("train", ["--teacher.momentum.peak", "1.5"], "teacher.momentum.peak=1.5 must be >= 0 and <= 1"),
    ("train", ["--teacher.momentum.end", "-0.1"], "teacher.momentum.end=-0.1 must be >= 0 and <= 1"),
    ("train", ["--teacher.temp.peak", "0"], "teacher.temp.peak=0 must be > 0"),
    ("train", ["--data.local-size", "48"], "data.local_size=48 is larger than data.global_size=32"),
    ("train", ["--run.checkpoint-every", "-1"], "run.checkpoint_every=-1 must be >= 0"),
    ("train", ["--run.log-every", "0"], "run.log_every=0 must be >= 1"),
    ("train", ["--data.batch-size", "0"], "data.batch_size=0 must be at least 1"),
    ("train", ["--loss.sinkhorn-queue", "-2"], "loss.sinkhorn_queue=-2 must be >= 0"),
    ("train", ["--loss.sinkhorn-queue", "64", "--loss.centering", "softmax"], "loss.sinkhorn_queue needs"),
    *([("train", ["--run.device", "cuda"], "run.device='cuda' but no CUDA device is visible")]
      if not torch.cuda.is_available() else []),
    ("train", ["--data.batch-size", "-3"], "data.batch_size=-3 must be at least 1"),
    ("train", lambda tmp: ["--data.path", str(tmp / "missing")], "missing' does not exist"),
    ("train", lambda tmp: ["--data.path", _empty_folder(tmp)], "no images found in folder"),
    ("train", lambda tmp: ["--data.path", _text_folder(tmp)], "no images found in folder"),
    ("train", lambda tmp: ["--init-from", str(tmp / "missing.pth")], "missing.pth does not exist"),
    ("distill", ["--optim.lr.peak", "-1e-3"], "optim.lr.peak=-0.001 must be >= 0"),
    ("distill", ["--optim.weight-decay.peak", "-1"], "optim.weight_decay.peak=-1 must be >= 0"),
    ("distill", ["--data.local-size", "80"], "data.local_size=80 is larger than data.global_size=64"),
    ("distill", ["--run.checkpoint-every", "-5"], "run.checkpoint_every=-5 must be >= 0"),
    ("distill", ["--data.batch-size", "0"], "data.batch_size=0 must be at least 1"),
    ("distill", lambda tmp: ["--data.path", _text_folder(tmp)], "no images found in folder"),
    ("distill", lambda tmp: ["--teacher.checkpoint", str(tmp / "none.pth")], "none.pth does not exist"),
]


@pytest.mark.parametrize("entry, flags, message", CASES,
                         ids=[f"{e}-{i}-{m.split('=')[0].split()[0]}" for i, (e, _, m) in enumerate(CASES)])
def test_configuration_errors_are_one_line_exit_2_before_anything_is_built(tmp_path, monkeypatch, capsys,
                                                                           nothing_may_be_built, entry, flags, message):
    flags = flags(tmp_path) if callable(flags) else flags
    teacher = tmp_path / "teacher.pth"
    teacher.write_bytes(b"")  # distill.py checks that it exists; nothing may read it before the failing check
    out = tmp_path / "run"
    argv = _train_argv(out, *flags) if entry == "train" else _distill_argv(out, teacher, *flags)
    code, stdout, stderr = _run_cli(monkeypatch, capsys, train if entry == "train" else distill, argv)
    assert code == 2, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr, stderr
    assert "Traceback" not in stderr + stdout
    assert not runtime.list_checkpoints(out)


def test_a_configuration_error_in_a_real_process_is_one_line_and_debug_shows_the_traceback(tmp_path):
    plain = _subprocess("train.py", _train_argv(tmp_path / "run", "--optim.lr.peak", "-1e-3"))
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [
        "error: invalid training config: optim.lr.peak=-0.001 must be >= 0 (--optim.lr.peak)"]
    debug = _subprocess("train.py", _train_argv(tmp_path / "run", "--optim.lr.peak", "-1e-3", "--debug"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "optim.lr.peak=-0.001" in debug.stderr


# ----------------------------------------------------------------------------------------------------
# Requeue, checkpoint_every 0, damaged and half-written checkpoints
# ----------------------------------------------------------------------------------------------------


def test_a_finished_run_started_again_exits_0_with_one_line(tmp_path, monkeypatch, capsys):
    train.train(tiny_config(tmp_path, *ONE_STEP), procedural(n=8))
    capsys.readouterr()  # the first run's log
    _refuse_building(monkeypatch)
    code, stdout, stderr = _run_cli(monkeypatch, capsys, train, _train_argv(tmp_path, *ONE_STEP))
    assert code == 0 and stderr == ""
    assert stdout == (f"{tmp_path} is finished: checkpoint_00000001.pth is at step 1 of optim.iterations=1; nothing "
                      "to run (raise --optim.iterations to train further)\n")


def test_a_finished_distillation_started_again_exits_0_with_one_line(tmp_path, monkeypatch, capsys, teacher_files):
    flags = ["--optim.iterations", "1", "--data.batch-size", "2", "--run.checkpoint-every", "0"]
    distill.distill(distill_config(tmp_path, teacher_files["heads"], "--students", "vit_tiny", *flags), procedural())
    capsys.readouterr()
    _refuse_building(monkeypatch)
    code, stdout, stderr = _run_cli(monkeypatch, capsys, distill,
                                    _distill_argv(tmp_path, teacher_files["heads"], *flags))
    assert code == 0 and stderr == ""
    assert stdout == (f"{tmp_path} is finished: every student has its checkpoint of step 1 of 1; nothing to run "
                      "(raise --optim.iterations or the phases' iterations to train further)\n")


def test_checkpoint_every_0_means_only_at_the_end(tmp_path):
    summary = train.train(tiny_config(tmp_path, "--optim.iterations", "3", "--data.batch-size", "2",
                                      "--run.checkpoint-every", "0"), procedural(n=8))
    assert summary["step"] == 3 and [s for s, _ in runtime.list_checkpoints(tmp_path)] == [3]


def test_a_truncated_newest_checkpoint_is_kept_aside_and_the_run_resumes_from_the_one_before(tmp_path, caplog):
    cfg = tiny_config(tmp_path, "--optim.iterations", "2", "--data.batch-size", "2", "--run.checkpoint-every", "1")
    train.train(cfg, procedural(n=8))
    newest = tmp_path / "checkpoint_00000002.pth"
    cut = newest.read_bytes()[: newest.stat().st_size // 2]
    newest.write_bytes(cut)
    assert [s for s, _ in runtime.list_checkpoints(tmp_path)] == [1]

    summary = train.train(tiny_config(tmp_path, "--optim.iterations", "3", "--data.batch-size", "2",
                                      "--run.checkpoint-every", "1"), procedural(n=8))
    assert summary["step"] == 3 and len(summary["history"]) == 2  # steps 2 and 3 again, from checkpoint 1
    log = (tmp_path / "log.txt").read_text()
    assert f"{newest} is incomplete or damaged (not a complete checkpoint file" in log
    assert "moved to checkpoint_00000002.pth.damaged (kept, never read)" in log
    assert f"resumed from {tmp_path / 'checkpoint_00000001.pth'} at step 1" in log
    assert (tmp_path / "checkpoint_00000002.pth.damaged").read_bytes() == cut  # never deleted, never overwritten
    assert read_checkpoint_file(newest)["step"] == 2  # the step saved again by the resumed run


def test_with_no_complete_checkpoint_left_the_run_refuses_with_the_command_to_move_it_aside(tmp_path, monkeypatch,
                                                                                           capsys):
    (tmp_path / "checkpoint_00000004.pth").write_bytes(b"PK\x03\x04 cut short")
    code, _, stderr = _run_cli(monkeypatch, capsys, train, _train_argv(tmp_path, *ONE_STEP))
    damaged = tmp_path / "checkpoint_00000004.pth"
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert f"holds no complete checkpoint to resume from: checkpoint_00000004.pth is incomplete or damaged" in stderr
    assert f"(mv {damaged} {damaged}.damaged)" in stderr
    assert damaged.exists()  # untouched: the user decides


@pytest.fixture(scope="module")
def sharded_steps(tmp_path_factory) -> Path:
    """A one-process run with sharded checkpoint folders at steps 1 and 2."""
    folder = tmp_path_factory.mktemp("sharded")
    train.train(tiny_config(folder, "--optim.iterations", "2", "--data.batch-size", "2", "--run.checkpoint-every",
                            "1", "--run.checkpoint-format", "sharded"), procedural(n=8))
    return folder


def _half_written(run: Path, step: int, damage) -> Path:
    folder = run / f"checkpoint_{step:08d}"
    shutil.copytree(run / "checkpoint_00000002", folder)
    damage(folder)
    return folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _emptied_while_written(folder: Path) -> None:
    """The held-out case: a folder whose rng file was gone before rank 0 wrote meta.json (so its list lacks it)."""
    (folder / "rng_0.pt").unlink()
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"].pop("rng_0.pt")
    (folder / "meta.json").write_text(json.dumps(meta))


HALF_WRITTEN = {
    "rng file missing before meta.json was written": _emptied_while_written,
    "rng file missing (meta.json there)": lambda f: (f / "rng_0.pt").unlink(),
    "shard missing": lambda f: (f / "__0_0.distcp").unlink(),
    "shard cut short": lambda f: _truncate(f / "__0_0.distcp"),
    "DCP .metadata missing": lambda f: (f / ".metadata").unlink(),
    "rng file cut short": lambda f: _truncate(f / "rng_0.pt"),
    "meta.json missing": lambda f: (f / "meta.json").unlink(),
    "meta.json cut short": lambda f: _truncate(f / "meta.json"),
}


def test_half_written_sharded_folders_are_never_resumed(tmp_path, sharded_steps):
    run = tmp_path / "run"
    shutil.copytree(sharded_steps, run)
    assert runtime.checkpoint_problem(run / "checkpoint_00000002") is None
    folders = {what: _half_written(run, 3 + i, damage) for i, (what, damage) in enumerate(HALF_WRITTEN.items())}
    for what, folder in folders.items():
        assert runtime.checkpoint_problem(folder) is not None, what
        with pytest.raises(CheckpointError, match="did not finish|is damaged"):
            read_weights(folder)
    assert [s for s, _ in runtime.list_checkpoints(run)] == [1, 2]

    summary = train.train(tiny_config(run, "--optim.iterations", "3", "--data.batch-size", "2",
                                      "--run.checkpoint-format", "sharded"), procedural(n=8))
    assert summary["step"] == 3 and len(summary["history"]) == 1
    assert f"resumed from {run / 'checkpoint_00000002'} at step 2" in (run / "log.txt").read_text()
    assert sorted(p.name for p in run.glob("*.damaged")) == sorted(f.name + ".damaged" for f in folders.values())


# ----------------------------------------------------------------------------------------------------
# kill -9 of the torchrun launcher alone
# ----------------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return children


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_the_launcher_alone_ends_its_workers_and_leaves_nothing_partial(tmp_path, image_folder):
    """torchrun starts its workers in sessions of their own: a kill -9 of the launcher (not of its group) used to
    leave them training and writing checkpoints. Now they die within seconds, the folder's lock is free, and every
    checkpoint left in the folder is complete and readable."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train.py"), *_train_argv(out, "--data.path", str(image_folder), "--data.batch-size", "2",
                                                     "--optim.iterations", "100000", "--run.checkpoint-every", "1",
                                                     "--run.dist-timeout-s", "60")]
    env = process_env()
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    log = tmp_path / "torchrun.log"
    with open(log, "wb") as sink:
        launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while len(runtime.list_checkpoints(out)) < 2:  # training, and saving every step
            assert launcher.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s:\n" + log.read_text()[-3000:]
            time.sleep(0.05)
        workers = [pid for pid in _children(launcher.pid)
                   if "train.py" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
        assert len(workers) == 2
        assert all(os.getsid(w) != os.getsid(launcher.pid) for w in workers)  # why a group kill missed them

        os.kill(launcher.pid, signal.SIGKILL)  # the launcher alone
        launcher.wait()
        gone_by = time.monotonic() + 5
        while any(_alive(w) for w in workers) and time.monotonic() < gone_by:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), "workers outlived their launcher by 5 s"
    finally:
        for pid in [*workers, launcher.pid]:  # only the processes this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.wait()

    entries = [p for p in out.iterdir() if p.name.startswith("checkpoint_") and not p.name.endswith(".tmp")]
    assert entries and all(runtime.checkpoint_problem(p) is None for p in entries), entries
    for step, path in runtime.list_checkpoints(out):
        assert read_checkpoint_file(path)["step"] == step
    # Released by the kernel with rank 0's files, which go when its last thread has exited: a thread still in a
    # checkpoint's fsync can outlive the main thread (already a zombie) by a moment, so allow a few seconds.
    free = runtime.RunFolderLock(out)
    free_by = time.monotonic() + 10
    while True:
        try:
            free.acquire()
            break
        except runtime.RunFolderBusy:
            assert time.monotonic() < free_by, "the folder's lock is still held 10 s after the workers died"
            time.sleep(0.05)
    free.release()


WORKER_THAT_FINISHES = """
import atexit, os, sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import runtime

def main():
    dist.init_process_group("gloo")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    fully_shard(model[0]); fully_shard(model)
    model(torch.randn(3, 4)).sum().backward()
    rank = dist.get_rank()
    atexit.register(lambda: open(os.path.join(sys.argv[2], f"atexit_{rank}"), "w").close())
    runtime.teardown_distributed()
    gloo = [t for t in os.listdir("/proc/self/task") if "gloo" in open(f"/proc/self/task/{t}/comm").read()]
    print(f"rank {rank} finished; gloo threads alive after teardown: {len(gloo)}", end="")  # in stdout's buffer

runtime.run_cli(main)
raise SystemExit(3)  # a worker that reached this line went on into the interpreter's finalization
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_finished_torchrun_worker_leaves_before_finalization_with_its_output_and_exit_handlers(tmp_path):
    """An FSDP worker's Gloo group outlives destroy_process_group (DTensor's caches hold its mesh) and used to die
    in the interpreter's finalization, which once aborted a finished run in CI. run_cli now ends a torchrun worker
    right after its main(): exit status 0, the exit handlers run, and buffered output is written."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER_THAT_FINISHES)
    env = process_env()
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(REPO), str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} finished" in done.stdout, done.stdout
        assert (tmp_path / f"atexit_{rank}").exists()
    # A plain `python` run is left to end the usual way (run_cli returns).
    plain = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import runtime; "
                            "runtime.run_cli(lambda: None); raise SystemExit(3)", str(REPO)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 3, plain.stderr
