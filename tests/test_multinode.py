"""Multi-node launch, tested on one machine over loopback: two torchrun "nodes" of one process each train and
resume exactly like one torchrun node of two processes (`pytest -m slow tests/test_multinode.py`).

Three runs of train.py (tiny ViT, gloo on the CPU, FSDP2, 2 ranks, 4 images per rank):
- the reference: `torchrun --standalone --nproc_per_node=2`, 5 steps, checkpoints at steps 3 and 5;
- the same run as two nodes, `torchrun --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d
  --rdzv-endpoint=127.0.0.1:PORT` twice (elastic rendezvous: the ranks go by arrival), stopped after step 3;
- its resumption to step 5, launched the other way the README shows, `--rdzv-backend=static --node-rank=0|1`
  (the node rank decides the rank; the endpoint is the master address).
Checkpoints 3 and 5 of the two-node run equal the reference's bitwise (student, EMA teacher, AdamW state), and so
do the logged losses. Both "nodes" share one output folder here, as nodes share a file system in a real job:
rank 0 writes the checkpoint and every rank reads it when the run resumes.

Every launch has a deadline (a rendezvous or collective that hangs fails the test instead of blocking it) and
takes a fresh free port; a launch that lost its port to another process in the meantime is retried.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_train import REPO, TINY_FLAGS, procedural

STEPS, FIRST_LEG = 5, 3
RUN_TIMEOUT_S = 240  # one launch (both nodes); a hang fails here
FLAGS = ["--data.batch-size", "4", "--optim.lr.peak", "1e-3", "--run.parallel", "fsdp",
         "--loss.koleo-group-size", "16", "--run.checkpoint-every", str(FIRST_LEG), "--run.log-every", "1",
         "--run.dist-timeout-s", "120", "--run.checkpoint-format", "file"]  # single files: compared whole
PORT_TAKEN = ("address already in use", "eaddrinuse", "errno 98")


def free_port() -> int:
    """A port the kernel just handed out and nobody listens on (it can still be taken before torchrun binds it:
    `_launch` retries then)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"  # the same summation order in every process
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):  # a torchrun around pytest
        env.pop(name, None)
    return env


def _train_args(out: Path, data: Path, steps: int) -> list[str]:
    return [str(REPO / "train.py"), "demo", *TINY_FLAGS, *FLAGS, "--data.path", str(data), "--run.output-dir", str(out),
            "--optim.iterations", str(steps)]


def _torchrun(*launch: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch]


def _node_commands(rendezvous: str, port: int, out: Path, data: Path, steps: int) -> list[list[str]]:
    """The two "nodes" of one job: the command lines the README gives, with 127.0.0.1 as the first host."""
    common = ["--nnodes=2", "--nproc_per_node=1", f"--rdzv-endpoint=127.0.0.1:{port}", "--max-restarts=0"]
    if rendezvous == "c10d":
        # join timeout: how long a node waits for the other one before giving up (default 600 s)
        return [_torchrun(*common, "--rdzv-backend=c10d", "--rdzv-id=multinode-test", "--rdzv-conf=join_timeout=90",
                          *_train_args(out, data, steps))] * 2
    return [_torchrun(*common, "--rdzv-backend=static", f"--node-rank={node}", *_train_args(out, data, steps))
            for node in (0, 1)]


def _run_all(commands: list[list[str]], logs: list[Path]) -> list[int]:
    """Start every command (each in its own process group), wait for all with one deadline; on timeout kill the
    groups this test started and fail."""
    processes = []
    for command, log in zip(commands, logs, strict=True):
        with open(log, "wb") as sink:  # a file, not a pipe: a full pipe would stall the run
            processes.append(subprocess.Popen(command, cwd=REPO, env=_env(), stdout=sink, stderr=subprocess.STDOUT,
                                              start_new_session=True))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        tails = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in logs)
        pytest.fail(f"a launch did not finish within {RUN_TIMEOUT_S} s (hung rendezvous or collective):\n{tails}")
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # the group of a launcher this test started
                process.wait()
    return [process.returncode for process in processes]


def _launch(kind: str, out: Path, data: Path, steps: int, logs: Path) -> float:
    """Run one job to completion ("single": one node of 2 processes; "c10d" / "static": two nodes of 1), on a
    fresh port, retried when the port was taken meanwhile. Returns its wall time."""
    for attempt in range(3):
        port = free_port()
        if kind == "single":
            commands = [_torchrun("--standalone", "--nproc_per_node=2", *_train_args(out, data, steps))]
        else:
            commands = _node_commands(kind, port, out, data, steps)
        names = [logs / f"{kind}-{steps}-{attempt}-node{i}.log" for i in range(len(commands))]
        start = time.monotonic()
        codes = _run_all(commands, names)
        seconds = time.monotonic() - start
        text = "\n".join(name.read_text() for name in names)
        if all(code == 0 for code in codes):
            return seconds
        if not any(marker in text.lower() for marker in PORT_TAKEN):
            pytest.fail(f"{kind} launch failed with exit codes {codes}:\n{text[-6000:]}")
    pytest.fail(f"{kind} launch: no free port after 3 attempts")


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _differences(a: dict, b: dict) -> tuple[list[str], float]:
    """Names of the tensors that differ (weights of student and teacher, AdamW moments), and the largest gap."""
    pairs = [(f"{part}.{key}", a[part][key], b[part][key]) for part in ("student", "teacher") for key in a[part]]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    pairs += [(f"optimizer.{param}.{name}", value, b["optimizer"]["state"][param][name])
              for param, moments in a["optimizer"]["state"].items() for name, value in moments.items()]
    different = [name for name, x, y in pairs if not torch.equal(x, y)]
    worst = max(((x.double() - y.double()).abs().max().item() for _, x, y in pairs if x.numel()), default=0.0)
    return different, worst


LOSS_LINE = re.compile(r"step (\d+)/\d+\s+loss (\S+) \(dino (\S+) ibot (\S+) koleo (\S+)\)")


def _logged_losses(out: Path) -> dict[int, tuple[str, ...]]:
    """step -> the loss terms rank 0 logged (log.txt is appended to, so a resumed run adds its steps)."""
    return {int(m.group(1)): m.groups()[1:] for m in LOSS_LINE.finditer((out / "log.txt").read_text())}


@pytest.mark.slow
def test_two_nodes_train_and_resume_like_one_node_of_two_processes(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    images = procedural(n=24)
    for i in range(len(images)):
        images[i][0].save(data / f"{i:03d}.png")
    logs = tmp_path / "logs"
    logs.mkdir()

    single, nodes = tmp_path / "single", tmp_path / "nodes"
    timings = {"one node x 2 processes, 5 steps": _launch("single", single, data, STEPS, logs),
               "two nodes (c10d), steps 1-3": _launch("c10d", nodes, data, FIRST_LEG, logs),
               "two nodes (static, --node-rank), resumed, steps 4-5": _launch("static", nodes, data, STEPS, logs)}
    for name, seconds in timings.items():
        print(f"{name}: {seconds:.1f} s")

    resumed_log = "".join(log.read_text() for log in sorted(logs.glob(f"static-{STEPS}-*-node*.log")))
    assert f"resumed from {nodes / f'checkpoint_{FIRST_LEG:08d}.pth'} at step {FIRST_LEG}" in resumed_log
    for step in (FIRST_LEG, STEPS):
        different, worst = _differences(_load(single / f"checkpoint_{step:08d}.pth"),
                                        _load(nodes / f"checkpoint_{step:08d}.pth"))
        print(f"step {step}: {len(different)} tensors differ, largest difference {worst:.3g}")
        assert not different, f"step {step}: two nodes differ from one node in {different[:5]} (max {worst:.3g})"
    expected, got = _logged_losses(single), _logged_losses(nodes)
    assert sorted(expected) == list(range(1, STEPS + 1)), expected
    assert got == expected
