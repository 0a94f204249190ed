"""What train.py and distill.py share: process-group setup, crash-safe checkpoint files, logging.

Checkpoints are single files written atomically: torch.save to `<name>.tmp` in the same folder, fsync,
then os.replace — so a crash or a full disk at any moment leaves either the previous checkpoint or the new
one, never a torn file; leftover `.tmp` files are never taken for checkpoints (and are removed at the next save).

Sharded checkpoints (train.py with FSDP over several processes) are folders `checkpoint_<step>/` written by
torch.distributed.checkpoint (every rank its own shards) into `checkpoint_<step>.tmp/`; once every rank has
written, rank 0 adds `meta.json` last and renames the folder (`commit_sharded`). Only a folder with its
meta.json is a checkpoint; `.tmp` folders are never read and are removed at the next save.

Complete means more than "exists": meta.json lists every other file of the folder with its size, and a single
file must end with the zip directory torch.save writes last. `list_checkpoints` returns only complete ones; rank 0
moves an incomplete or damaged one aside (`<name>.damaged`, never read, never deleted) before a run resumes, so a
resumed run neither reads it nor overwrites it.

One run per output folder: rank 0 holds an OS lock on `<output_dir>/run.lock` for the run's life (`RunFolderLock`);
the kernel releases it when the process dies, however it dies. Workers started by torchrun die with their launcher
(`die_with_launcher`), and leave without the interpreter's finalization once their entry point has returned
(`leave_torchrun_worker`).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime
import errno
import fcntl
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger("dinov3")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d{8})\.pth$")
SHARDED_PATTERN = re.compile(r"^checkpoint_(\d{8})$")
SHARDED_MARKER = "meta.json"  # written last, by rank 0: a sharded checkpoint folder without it is not one
MANIFEST_KEY = "files"  # meta.json's {file name: size in bytes} of every other file of the folder
DAMAGED_SUFFIX = ".damaged"  # an incomplete checkpoint moved aside: kept for inspection, never read
LOCK_FILE = "run.lock"


# ----------------------------------------------------------------------------------------------------
# Processes and devices
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto", timeout_s: float = 600.0) -> Dist:
    """Join the torchrun process group if there is one: NCCL on CUDA, gloo on the CPU.

    Plain `python train.py` runs as a single process without a process group.
    """
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but no CUDA device is visible; use --run.device cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if want_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if want_cuda else None,
        )
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def launch_rank_and_world() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them, known before any process group exists (plain python: 0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def mean_over_ranks(values: dict[str, torch.Tensor], dist_info: Dist) -> dict[str, float]:
    """The mean over all ranks of each scalar (every rank must call it): one all-reduce of a small float64 vector,
    so that logged losses do not depend on which rank logs them or on the number of ranks."""
    stacked = torch.stack([v.detach().double().reshape(()) for v in values.values()])
    if dist_info.enabled:
        stacked = stacked.to(dist_info.device)
        dist.all_reduce(stacked)
        stacked /= dist_info.world_size
    return dict(zip(values, stacked.tolist()))


def is_due(step: int, every: int) -> bool:
    """Whether a periodic action (checkpoint, log) falls on `step`; every = 0: never periodically."""
    return every > 0 and step % every == 0


# ----------------------------------------------------------------------------------------------------
# Launcher and output folder: workers die with torchrun, one run per folder
# ----------------------------------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_launcher() -> None:
    """Under torchrun: this worker is killed when its launcher dies, even by kill -9.

    torchrun starts each worker in a session of its own, so killing the launcher's process group leaves the workers
    running; such orphans would go on training and write checkpoints next to a restarted run. On Linux the kernel
    sends SIGKILL (prctl PR_SET_PDEATHSIG) -- not SIGTERM, whose handler would save a checkpoint of a run that has no
    launcher any more; a kill leaves at worst a `.tmp` that is never read. Elsewhere a daemon thread watches the
    parent pid once a second. Plain `python train.py` is left alone: a run started with nohup must outlive its shell."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            logger.warning(f"prctl(PR_SET_PDEATHSIG) failed ({os.strerror(ctypes.get_errno())}): this worker will not "
                           "notice the death of its launcher")
    else:
        threading.Thread(target=_exit_when_orphaned, args=(launcher,), daemon=True, name="launcher-watch").start()
    if os.getppid() != launcher:  # the launcher died before the signal was armed
        os._exit(1)


def _exit_when_orphaned(launcher: int, poll_s: float = 1.0) -> None:
    while os.getppid() == launcher:
        time.sleep(poll_s)
    os._exit(1)  # no handler, no checkpoint: the run's launcher is gone


class RunFolderLock:
    """An exclusive flock on `<folder>/run.lock`, held for the run's life by rank 0; the kernel releases it when the
    process exits or dies (no stale lock to guess about). The file, which stays, names the last holder (host, pid,
    start time) for the message a second run gets."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text().strip() or "another process"
            os.close(fd)
            raise RunFolderBusy(f"{self.path.parent} is in use by another run ({holder}); wait for it to end or stop "
                                "it, or pass another --run.output-dir") from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            logger.warning(f"the file system of {self.path.parent} does not support locks ({err.strerror}): nothing "
                           "stops a second run from writing into this folder")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started "
                     f"{datetime.datetime.now().isoformat(timespec='seconds')}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the lock; the file stays (removing it would race with the next run's open)
            self.fd = None


@contextlib.contextmanager
def run_folder_lock(folder: Path, is_main: bool) -> Iterator[None]:
    """Rank 0 holds the output folder's lock inside the block; the other ranks write only where rank 0 tells them."""
    lock = RunFolderLock(folder)
    if is_main:
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------------------
# Errors a user can fix, and how the entry points end
# ----------------------------------------------------------------------------------------------------


class UsageError(Exception):
    """Something the user has to change (config, paths, the output folder), found before anything was built."""


class RunFolderBusy(UsageError):
    """The output folder's lock is held by another run."""


class RunFinished(Exception):
    """The output folder holds the run's last checkpoint already: nothing to do (a rerun or SLURM requeue)."""


USER_ERROR = "_user_error"  # set on an exception raised by a check before anything was built


@contextlib.contextmanager
def checks_before_building() -> Iterator[None]:
    """Marks the ValueErrors and OSErrors raised inside -- config checks, missing files and folders, empty or unusable
    datasets, checkpoints that cannot be used -- as the user's, so that `run_cli` prints them as one line. The
    exception itself passes unchanged (callers and tests see its own type)."""
    try:
        yield
    except (ValueError, OSError) as err:
        setattr(err, USER_ERROR, True)
        raise


def run_cli(main: Callable[[], None], one_line: tuple[type[BaseException], ...] = ()) -> None:
    """Run an entry point's main() the way a shell or a scheduler wants it to end.

    A user's error (UsageError, an error marked by `checks_before_building`, or one of `one_line` anywhere) prints
    `error: <message>` as one line on stderr, from rank 0 only, and exits with status 2, without a traceback
    (`--debug` shows it). A run that is already finished prints one line and exits 0, so a requeued job ends cleanly.
    Under torchrun the worker is also tied to its launcher (`die_with_launcher`), and leaves without the
    interpreter's finalization once main() has returned (`leave_torchrun_worker`)."""
    debug = "--debug" in sys.argv[1:]
    sys.argv = [arg for arg in sys.argv if arg != "--debug"]
    die_with_launcher()
    rank, _ = launch_rank_and_world()
    try:
        main()
        leave_torchrun_worker()
    except RunFinished as done:
        if rank == 0:
            print(done)
        raise SystemExit(0) from None
    except (UsageError, ValueError, OSError) + one_line as err:
        if debug or not (isinstance(err, (UsageError, *one_line)) or getattr(err, USER_ERROR, False)):
            raise
        if rank == 0:
            print("error: " + " ".join(str(err).split()), file=sys.stderr)
        raise SystemExit(2) from None


def leave_torchrun_worker() -> None:
    """End a torchrun worker whose entry point has returned: run the exit handlers, flush, and leave without the
    interpreter's finalization (plain `python` runs are left alone).

    Why: destroy_process_group does not free the Gloo process group of an FSDP run, because DTensor's caches keep
    its device mesh, so the group and its threads used to die in finalization, while the interpreter was half torn
    down. Once in CI that aborted a worker after its run had finished and saved ("terminate called without an
    active exception", SIGABRT), and torchrun reported the whole job failed."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    atexit._run_exitfuncs()  # logging, multiprocessing's children, tempfiles: what a normal exit would run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def all_reduce_max(value: float, dist_info: Dist) -> float:
    """The largest `value` over all ranks (every rank must call it): used to agree on stop/NaN flags."""
    if not dist_info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=dist_info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def barrier(dist_info: Dist) -> None:
    if dist_info.enabled:
        dist.barrier()


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_deterministic() -> None:
    """--run.deterministic: PyTorch's deterministic kernels (a warning where an op has none), a fixed cuBLAS
    workspace and no cuDNN autotuning. With the per-step seeds, two runs with the same seed and the same layout
    then compute the same numbers (on the CPU: tested; on GPUs Triton's autotuner may still pick other blocks)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of its integer parts (seed, step, rank, stream...)."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def rng_states() -> dict:
    """Global RNG states as tensors and plain containers (loadable with torch.load(weights_only=True))."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    version, mt_state, gauss = states["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ----------------------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------------------


class _KeepWriteError:
    """A file for torch.save that remembers why a write failed: torch's zip writer swallows the OSError of a
    full disk and raises an opaque RuntimeError ("unexpected pos ...") in its place."""

    def __init__(self, file) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def atomic_save(obj: object, path: Path) -> None:
    """torch.save that never leaves a torn file at `path` (temp file, fsync, rename).

    A failed write (full disk, quota, file size limit) removes the temp file and raises an OSError that names
    the file and says that the previous checkpoint is intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            writer = _KeepWriteError(f)
            try:
                torch.save(obj, writer)
            except RuntimeError as err:
                if writer.error is None:
                    raise
                raise writer.error from err
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(
                err.errno, f"could not write checkpoint {path} ({err.strerror}); the previous checkpoint is intact"
            ) from err
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


def checkpoint_path(folder: Path, step: int, sharded: bool = False) -> Path:
    """`checkpoint_<step>.pth`, or the folder `checkpoint_<step>` of a sharded checkpoint."""
    return Path(folder) / (f"checkpoint_{step:08d}" if sharded else f"checkpoint_{step:08d}.pth")


def is_sharded_checkpoint(path: Path) -> bool:
    """A committed sharded checkpoint folder (it holds its marker, written last)."""
    return Path(path).is_dir() and (Path(path) / SHARDED_MARKER).is_file()


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint file or folder at `path` is incomplete or damaged, or None when it is complete.

    A file: torch.save's zip archive ends with its central directory, written last, so a file cut short at any point
    (a copy that stopped, a disk that filled up under another writer) lacks it. A folder: meta.json, written last,
    must be there, readable, and list every other file with its size, and DCP's .metadata and the random state of
    every rank that wrote the folder must be among them."""
    try:
        return _checkpoint_problem(Path(path))
    except OSError as err:  # e.g. moved aside by rank 0 while another rank looks at it
        return f"cannot be read ({err})"


def _checkpoint_problem(path: Path) -> str | None:
    if path.is_file():
        if path.stat().st_size == 0:
            return "empty file"
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            return f"not a complete checkpoint file (truncated?): {err}"
        return None
    marker = path / SHARDED_MARKER
    if not marker.is_file():
        return f"a sharded checkpoint folder without {SHARDED_MARKER} (its save did not finish)"
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        return f"its {SHARDED_MARKER} cannot be read ({type(err).__name__}: {err})"
    # DCP's index and every writer's random state must be there even if the manifest missed them (a folder that
    # another process emptied while it was written); folders of older versions have no manifest.
    required = {".metadata": None, **{f"rng_{r}.pt": None for r in range(int(meta.get("world_size", 1)))}}
    for name, size in {**required, **meta.get(MANIFEST_KEY, {})}.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if size is not None and file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


_reported_partial: set[Path] = set()


def _checkpoint_entries(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of everything in `folder` named like a checkpoint file or folder, complete or not."""
    found = []
    for path in Path(folder).iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
        elif (match := SHARDED_PATTERN.match(path.name)) and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in `folder` -- files and committed sharded folders -- oldest
    first; temp files and folders are not checkpoints, and an incomplete or damaged one (`checkpoint_problem`) is
    ignored (and reported once)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for step, path in _checkpoint_entries(folder):
        problem = checkpoint_problem(path)
        if problem is None:
            found.append((step, path))
        elif path not in _reported_partial:
            _reported_partial.add(path)
            logger.warning(f"ignoring {path}: {problem}")
    return found


def set_aside_incomplete(folder: Path) -> list[Path]:
    """Rank 0, holding the folder's lock, before a run resumes: rename every incomplete or damaged checkpoint in
    `folder` to `<name>.damaged` (never read, never deleted: it is there to be looked at), so that the run resumes
    from the newest complete one and never writes over the damaged one when it saves that step again. Returns the
    new paths. When no complete checkpoint would remain, nothing is moved and a CheckpointError says what to do: a
    run does not start over from step 0 by itself."""
    from models.checkpoint import CheckpointError  # (models/ is below this module; imported where needed)

    folder = Path(folder)
    entries = _checkpoint_entries(folder) if folder.is_dir() else []
    damaged = [(path, problem) for _, path in entries if (problem := checkpoint_problem(path)) is not None]
    if damaged and len(damaged) == len(entries):
        path, problem = damaged[-1]
        moves = " && ".join(f"mv {p} {p}{DAMAGED_SUFFIX}" for p, _ in damaged)
        raise CheckpointError(
            f"{folder} holds no complete checkpoint to resume from: {path.name} is incomplete or damaged ({problem}); "
            f"to start afresh, move {'it' if len(damaged) == 1 else 'them'} aside ({moves}) or pass another "
            "--run.output-dir")
    moved = []
    for path, problem in damaged:
        target = path.with_name(path.name + DAMAGED_SUFFIX)
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}-{n}")
        os.rename(path, target)
        logger.warning(f"{path} is incomplete or damaged ({problem}): moved to {target.name} (kept, never read); "
                       "resuming from the newest complete checkpoint")
        moved.append(target)
    return moved


def remove_path(path: Path) -> None:
    """Remove a checkpoint file or folder (missing is fine)."""
    if Path(path).is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        Path(path).unlink(missing_ok=True)


def prune_checkpoints(folder: Path, keep_last: int) -> None:
    for _, path in list_checkpoints(folder)[:-keep_last] if keep_last > 0 else []:
        remove_path(path)
    for tmp in Path(folder).glob("*.tmp"):
        remove_path(tmp)


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sharded_temp_path(final: Path) -> Path:
    return final.with_name(final.name + ".tmp")


def commit_sharded(final: Path, meta: dict) -> None:
    """Rank 0, once every rank's shards are in `<final>.tmp/`: write the marker (meta.json with the size of every
    other file, fsync'ed) last, then rename the folder to `final` -- the moment the checkpoint starts to exist."""
    tmp = sharded_temp_path(final)
    marker = tmp / SHARDED_MARKER
    # The manifest: what `checkpoint_problem` checks, so that a folder with a missing or cut file is never resumed.
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file() and p.name != SHARDED_MARKER}
    with open(marker, "w") as f:
        json.dump({**meta, MANIFEST_KEY: files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (a copied-in or older folder): replace it
        remove_path(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


# ----------------------------------------------------------------------------------------------------
# Signals and logging
# ----------------------------------------------------------------------------------------------------


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps, saves a checkpoint and exits cleanly."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = signal.Signals(signum).name

    @property
    def is_set(self) -> bool:
        return self.signal_name is not None


def setup_logging(output_dir: Path | None, is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if output_dir is not None and is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(output_dir / "log.txt"))
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", handlers=handlers, force=True)


class Progress:
    """Console progress line: step, losses, images/s and ETA from a running mean of step times."""

    def __init__(self, total_steps: int, start_step: int):
        self.total, self.start = total_steps, start_step
        self.t0 = time.perf_counter()

    def eta_seconds(self, step: int) -> float:
        done = step + 1 - self.start
        elapsed = time.perf_counter() - self.t0
        return elapsed / max(done, 1) * (self.total - step - 1)

    @staticmethod
    def format_seconds(seconds: float) -> str:
        return str(datetime.timedelta(seconds=int(seconds)))


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """A plain or FSDP2-sharded module's full state dict on the CPU (every rank takes part; with FSDP2 only rank 0
    gets the tensors), with the optimizer's when one is given."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(module, options=options)
    if optimizer is None:
        return model_state
    return model_state, get_optimizer_state_dict(module, optimizer, options=options)


def set_full_state(module: nn.Module, state: dict) -> None:
    """Load a full (unsharded) state dict into a plain or FSDP2-sharded module, strictly."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (the other entries as they are)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def skip_or_stop(what: str, step: int, skips: int, skip_allowed: bool, max_skips: int, checkpoint_dir: Path,
                 detail: str = "") -> int:
    """A step whose loss or gradient is not finite (`what`, e.g. "loss became nan"; `step` as the log numbers it):
    stop with FloatingPointError, the last checkpoint intact, or -- when skipping is allowed and fewer than
    `max_skips` steps were skipped -- log the skip and return the new count (the caller leaves the weights alone)."""
    if not skip_allowed or skips >= max_skips:
        limit = f" (the limit of {max_skips} skipped steps is reached)" if skip_allowed else ""
        raise FloatingPointError(
            f"{what} at step {step}{detail}{limit}; stopping. The last good checkpoint in {checkpoint_dir} is intact; "
            "lower optim.lr or use --run.skip-nonfinite to skip such steps")
    logger.warning(f"step {step}: {what}, its update skipped ({skips + 1} skipped so far, at most {max_skips})")
    return skips + 1
