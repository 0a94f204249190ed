"""Faults and bad input for train.py: kill -9 and SIGTERM at any moment, NaN losses and gradients, broken images,
broken or foreign checkpoints, a full disk; exact resume, determinism, and a longer run that must not leak.

The fast tests drive `train.train` in this process and inject faults by wrapping `train.forward_losses`; the slow
ones (`pytest -m slow`, run by `make test`) start `train.py` as a subprocess and kill it. distill.py's faults are in
tests/test_reliability_distill.py.
"""

import errno
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import runtime
import train
from data.augment import AugmentConfig, CropSizes
from data.datasets import ImageFolderDataset, ProceduralDataset, build_loader
from models.checkpoint import CheckpointError, load_backbone, read_checkpoint_file
from tests.helpers import REPO, TINY_FLAGS, NaNGradient, procedural, process_env, tiny_config


@pytest.fixture(autouse=True)
def _restore_deterministic_mode():
    """--run.deterministic switches torch.use_deterministic_algorithms on for the whole process: switch it back."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _find_batch(args, kwargs) -> dict:
    """The batch among forward_losses' arguments, whatever their order."""
    return next(a for a in (*args, *kwargs.values()) if isinstance(a, dict) and "positions" in a)


def _wrap_forward_losses(monkeypatch, on_call):
    """Calls on_call(index, batch, terms) after each train.forward_losses (index 0 = the run's first step in this
    process); on_call may return replacement terms. A second wrap replaces the first."""
    real = getattr(train.forward_losses, "unwrapped", train.forward_losses)
    calls = []

    def wrapped(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls.append(None)
        replaced = on_call(len(calls) - 1, _find_batch(args, kwargs), terms)
        return terms if replaced is None else replaced

    wrapped.unwrapped = real
    monkeypatch.setattr(train, "forward_losses", wrapped)


def _poison(terms: dict) -> dict:
    """The same terms with a NaN total that still backpropagates (as a real overflow would)."""
    return {**terms, "total": terms["total"] * float("nan")}


def _tensors(payload: dict, parts=("student", "teacher")) -> dict[str, torch.Tensor]:
    return {f"{part}.{key}": value for part in parts for key, value in payload[part].items()}


def _assert_same_training_state(a: dict, b: dict) -> None:
    """Bitwise the same weights (student, EMA teacher) and AdamW moments."""
    for key, value in _tensors(a).items():
        assert torch.equal(value, _tensors(b)[key]), key
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for param, moments in state_a.items():
        for name, value in moments.items():
            assert torch.equal(value, state_b[param][name]), f"optimizer.{param}.{name}"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------
# Determinism and exact resume (in this process)
# ----------------------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_loss_curve_and_another_seed_does_not(tmp_path):
    flags = ["--optim.iterations", "6", "--data.batch-size", "4", "--optim.lr.peak", "1e-3", "--deterministic",
             "--run.checkpoint-every", "1000"]
    data = procedural(n=24)
    first = train.train(tiny_config(tmp_path / "a", *flags), data)["history"]
    again = train.train(tiny_config(tmp_path / "b", *flags), data)["history"]
    other = train.train(tiny_config(tmp_path / "c", *flags, "--run.seed", "1"), data)["history"]
    assert len(first) == 6 and first == again  # exactly, not approximately
    assert torch.are_deterministic_algorithms_enabled()  # --deterministic is --run.deterministic
    assert other != first


def test_sigterm_checkpoints_and_the_resumed_run_sees_every_image_once(tmp_path, monkeypatch):
    """SIGTERM during step 3 of 7: the run finishes that step, saves checkpoint 3 (not a multiple of
    checkpoint_every) and returns; the resumed run continues the sampler's stream exactly: together they train on
    stream positions 0..27 once each, in order, every epoch a permutation of the 10 images, and end with bitwise
    the weights of an uninterrupted run. The stop falls while the prototypes are still frozen (AdamW has no state
    for them yet)."""
    data = procedural(n=10)
    flags = ["--data.batch-size", "4", "--run.checkpoint-every", "5", "--optim.lr.peak", "1e-3", "--run.deterministic",
             "--optim.freeze-last-layer-iterations", "4"]
    traces: dict[str, list] = {"straight": [], "stopped": [], "resumed": []}

    def tracer(name, sigterm_at=None):
        def on_call(index, batch, terms):
            traces[name].append((batch["positions"].tolist(), batch["indices"].tolist()))
            if index == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
        return on_call

    handler = signal.getsignal(signal.SIGTERM)
    _wrap_forward_losses(monkeypatch, tracer("straight"))
    train.train(tiny_config(tmp_path / "straight", "--optim.iterations", "7", *flags), data)
    _wrap_forward_losses(monkeypatch, tracer("stopped", sigterm_at=2))
    stopped = train.train(tiny_config(tmp_path / "run", "--optim.iterations", "7", *flags), data)
    assert stopped["step"] == 3 and [s for s, _ in runtime.list_checkpoints(tmp_path / "run")] == [3]
    assert "received SIGTERM: checkpoint saved at step 3" in (tmp_path / "run" / "log.txt").read_text()
    assert signal.getsignal(signal.SIGTERM) == handler  # the run gives the handler back

    _wrap_forward_losses(monkeypatch, tracer("resumed"))
    assert train.train(tiny_config(tmp_path / "run", "--optim.iterations", "7", *flags), data)["step"] == 7
    assert traces["stopped"] + traces["resumed"] == traces["straight"]
    positions = [p for step_positions, _ in traces["straight"] for p in step_positions]
    indices = [i for _, step_indices in traces["straight"] for i in step_indices]
    assert positions == list(range(28))
    for epoch in range(2):
        assert sorted(indices[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    _assert_same_training_state(_load(tmp_path / "straight" / "checkpoint_00000007.pth"),
                                _load(tmp_path / "run" / "checkpoint_00000007.pth"))


# ----------------------------------------------------------------------------------------------------
# Non-finite losses and gradients
# ----------------------------------------------------------------------------------------------------


def test_nan_loss_stops_naming_the_step_and_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    _wrap_forward_losses(monkeypatch, lambda index, batch, terms: _poison(terms) if index == 3 else None)
    cfg = tiny_config(tmp_path, "--optim.iterations", "8", "--data.batch-size", "4", "--run.checkpoint-every", "1")
    # Step 4 (the 4th; the log's and the checkpoints' numbering) fails: checkpoint 3 is the last good one.
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 4\b.*last good checkpoint"):
        train.train(cfg, procedural())
    assert [s for s, _ in runtime.list_checkpoints(tmp_path)] == [1, 2, 3]
    last = read_checkpoint_file(tmp_path / "checkpoint_00000003.pth")
    assert last["step"] == 3
    assert all(torch.isfinite(v).all() for v in _tensors(last).values())
    assert not list(tmp_path.glob("*.tmp"))


def test_skipped_nonfinite_steps_are_logged_counted_and_checkpointed(tmp_path, monkeypatch):
    """--run.skip-nonfinite: the 2nd and the last step are skipped (no update), each logged with the running
    count; the run still ends with its final checkpoint, which records the count; one more than
    --run.max-nonfinite-skips stops the run."""
    def poison_2nd_and_5th(index, batch, terms):
        return _poison(terms) if index in (1, 4) else None

    _wrap_forward_losses(monkeypatch, poison_2nd_and_5th)
    cfg = tiny_config(tmp_path / "skip", "--optim.iterations", "5", "--data.batch-size", "4",
                      "--run.checkpoint-every", "2", "--run.skip-nonfinite")
    summary = train.train(cfg, procedural())
    assert summary["step"] == 5 and summary["stats"]["nonfinite_skips"] == 2
    assert len(summary["history"]) == 3  # the trained steps
    log = (tmp_path / "skip" / "log.txt").read_text()
    assert "step 2: loss became nan, its update skipped (1 skipped so far" in log
    assert "step 5: loss became nan, its update skipped (2 skipped so far" in log
    final = read_checkpoint_file(tmp_path / "skip" / "checkpoint_00000005.pth")
    assert final["stats"]["nonfinite_skips"] == 2
    assert all(torch.isfinite(v).all() for v in _tensors(final).values())

    _wrap_forward_losses(monkeypatch, poison_2nd_and_5th)  # counts this run's steps from 0 again
    cfg = tiny_config(tmp_path / "limit", "--optim.iterations", "5", "--data.batch-size", "4",
                      "--run.skip-nonfinite", "--run.max-nonfinite-skips", "1")
    with pytest.raises(FloatingPointError, match=r"at step 5\b"):
        train.train(cfg, procedural())


def test_nonfinite_gradient_of_a_finite_loss_never_reaches_the_weights(tmp_path, monkeypatch):
    """An overflow in backward (finite loss, NaN gradients) at step 3 stops the run before the optimizer step:
    checkpoint 2 is the last, and it is finite; skipping instead keeps the weights finite to the end."""
    def nan_gradient(index, batch, terms):
        return {**terms, "total": NaNGradient.apply(terms["total"])} if index == 2 else None

    _wrap_forward_losses(monkeypatch, nan_gradient)
    cfg = tiny_config(tmp_path / "stop", "--optim.iterations", "4", "--data.batch-size", "4",
                      "--run.checkpoint-every", "1")
    with pytest.raises(FloatingPointError, match=r"gradient norm became nan at step 3\b"):
        train.train(cfg, procedural())
    assert [s for s, _ in runtime.list_checkpoints(tmp_path / "stop")] == [1, 2]

    _wrap_forward_losses(monkeypatch, nan_gradient)
    cfg = tiny_config(tmp_path / "skip", "--optim.iterations", "4", "--data.batch-size", "4", "--run.skip-nonfinite")
    summary = train.train(cfg, procedural())
    assert summary["stats"]["nonfinite_skips"] == 1
    final = read_checkpoint_file(tmp_path / "skip" / "checkpoint_00000004.pth")
    assert all(torch.isfinite(v).all() for v in _tensors(final).values())


# ----------------------------------------------------------------------------------------------------
# Broken images
# ----------------------------------------------------------------------------------------------------


@contextmanager
def _unprivileged():
    """File permissions apply inside (root ignores them: it reads as `nobody` here, effective uid only)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def _write_broken_images(folder: Path) -> tuple[list[str], list[str]]:
    """Good images (also odd-but-valid modes and shapes) and one of each kind of broken file; returns the names
    of the good and of the broken files."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
    photo.save(folder / "photo.jpg", quality=90)
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    photo.convert("P").save(folder / "palette_transparent.png", transparency=0)
    photo.convert("LA").save(folder / "gray_alpha.png")
    Image.fromarray(rng.integers(0, 65535, (48, 48)).astype(np.uint16)).save(folder / "gray16.png")
    Image.new("1", (48, 48)).save(folder / "bilevel.bmp")
    Image.new("RGB", (16, 900), (10, 20, 30)).save(folder / "tall_strip.png")
    good = sorted(p.name for p in folder.iterdir())

    jpeg = (folder / "photo.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "zero_bytes.jpg").write_bytes(b"")
    (folder / "not_an_image.png").write_text("a text file with an image extension\n")
    shutil.copy(folder / "photo.jpg", folder / "unreadable.jpg")
    (folder / "unreadable.jpg").chmod(0)
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "one_pixel.png")
    # 20000 x 20000: 400M pixels (1.2 GB as RGB) in a 50 kB file; it must be refused before it is decoded.
    Image.new("1", (20000, 20000)).save(folder / "huge_20000x20000.png")
    shutil.copy(folder / "photo.jpg", folder / "deleted_after_listing.jpg")
    broken = sorted({p.name for p in folder.iterdir()} - set(good))
    return good, broken


def test_broken_images_are_skipped_counted_and_logged(caplog):
    """One epoch of a folder with 7 usable and 7 broken files: every sample is a usable image, each broken file
    is skipped (and logged once, with why), the skips are counted, and nothing is decoded at 20000 x 20000."""
    with tempfile.TemporaryDirectory(prefix="reliability-images-") as name:
        folder = Path(name)
        folder.chmod(0o755)  # readable by `nobody`
        good, broken = _write_broken_images(folder)
        dataset = ImageFolderDataset(folder)
        (folder / "deleted_after_listing.jpg").unlink()
        assert len(dataset) == 14
        names = [Path(dataset.describe(i)).name for i in range(len(dataset))]
        # The whole epoch in one batch: stream positions 0..13 are each image once.
        loader = build_loader(dataset, AugmentConfig(n_local_crops=2), CropSizes(32, 16), batch_size=len(dataset),
                              seed=0)
        caplog.set_level(logging.WARNING, logger="data.datasets")
        with _unprivileged():
            batch = next(iter(loader))
    assert batch["global_crops"].shape == (2 * 14, 3, 32, 32) and torch.isfinite(batch["global_crops"]).all()
    used = {names[i] for i in batch["indices"].tolist()}
    assert used <= set(good)
    assert int(batch["n_skipped"]) >= len(broken)  # replacements drawn at random can be broken again
    warnings = [r.getMessage() for r in caplog.records if "skipping unusable image" in r.getMessage()]
    for name in broken:
        assert sum(name in w for w in warnings) == 1, (name, warnings)
    why = {name: next(w for w in warnings if name in w) for name in broken}
    assert "DecompressionBombError" in why["huge_20000x20000.png"]
    assert "smaller than one 16px patch" in why["one_pixel.png"]
    assert "Permission denied" in why["unreadable.jpg"]
    assert "No such file" in why["deleted_after_listing.jpg"]


def test_training_on_broken_images_counts_the_skips_in_the_log(tmp_path):
    """train.py on that folder: 3 steps of 7 images cover the first epoch (13 files), so every broken file is met;
    the run trains, and the log and the checkpoint count the skipped images."""
    folder = tmp_path / "images"
    folder.mkdir()
    _, broken = _write_broken_images(folder)
    (folder / "deleted_after_listing.jpg").unlink()  # (train lists the folder itself)
    unusable = len(broken) - 1 - (os.geteuid() == 0)  # root reads `unreadable.jpg`
    cfg = tiny_config(tmp_path / "run", "--optim.iterations", "3", "--data.batch-size", "7", "--data.path",
                      str(folder), "--run.log-every", "1")
    summary = train.train(cfg)
    skipped = summary["stats"]["images_skipped"]
    assert summary["step"] == 3 and skipped >= unusable
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"{skipped} unusable images skipped" in log
    assert "skipping unusable image" in log and "huge_20000x20000.png" in log
    assert read_checkpoint_file(tmp_path / "run" / "checkpoint_00000003.pth")["stats"]["images_skipped"] == skipped


def test_a_dataset_without_a_usable_image_fails_with_a_clear_message(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"empty_{i}.jpg").write_bytes(b"")
    loader = build_loader(ImageFolderDataset(folder), AugmentConfig(n_local_crops=2), CropSizes(32, 16),
                          batch_size=2, seed=0)
    with pytest.raises(RuntimeError, match="images in a row could not be used.*readable images"):
        next(iter(loader))


# ----------------------------------------------------------------------------------------------------
# Broken and foreign checkpoints, full disk
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory) -> Path:
    """A finished 1-step run: checkpoint_00000001.pth and teacher_backbone.pth."""
    folder = tmp_path_factory.mktemp("one_step")
    train.train(tiny_config(folder, "--optim.iterations", "1", "--data.batch-size", "2"), procedural())
    return folder


def _output_dir_with(tmp_path: Path, name: str, data: bytes) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "checkpoint_00000001.pth").write_bytes(data)
    return folder


def test_broken_or_foreign_checkpoints_give_errors_that_say_what_the_file_is(tmp_path, one_step_run):
    checkpoint = (one_step_run / "checkpoint_00000001.pth").read_bytes()
    flags = ["--optim.iterations", "2", "--data.batch-size", "2"]

    truncated = _output_dir_with(tmp_path, "truncated", checkpoint[: len(checkpoint) // 2])
    with pytest.raises(CheckpointError, match=r"truncated/checkpoint_00000001.pth is not a readable PyTorch "
                                              r"checkpoint \(truncated or corrupt"):
        read_checkpoint_file(truncated / "checkpoint_00000001.pth")
    # Resuming from it: never (tests/test_run_folder.py); as the folder's only checkpoint, the run refuses.
    with pytest.raises(CheckpointError, match=r"truncated holds no complete checkpoint to resume from: "
                                              r"checkpoint_00000001.pth is incomplete or damaged"):
        train.train(tiny_config(truncated, *flags), procedural())

    released = _output_dir_with(tmp_path, "released", (one_step_run / "teacher_backbone.pth").read_bytes())
    with pytest.raises(CheckpointError, match=r"is a released-format (ViT )?backbone.*expects a full training "
                                              r"checkpoint"):
        train.train(tiny_config(released, *flags), procedural())

    other_size = _output_dir_with(tmp_path, "other_size", checkpoint)
    with pytest.raises(CheckpointError, match=r"trained with model.arch='vit_tiny' but this run has 'vit_small'"):
        train.train(tiny_config(other_size, *flags, "--model.arch", "vit_small"), procedural())

    # The other way round: a full training checkpoint, or another size, where a backbone is expected.
    with pytest.raises(CheckpointError, match=r"expected a ViT backbone.*it is a train.py training checkpoint "
                                              r"\(vit_tiny, step 1\).*teacher_backbone.pth"):
        load_backbone(one_step_run / "checkpoint_00000001.pth")
    with pytest.raises(CheckpointError, match=r"released-format ViT backbone \(weights only; embed dim 192, 4 blocks\)"
                                              r" was given where vit_small \(embed dim 384, 12 blocks\) was expected"):
        load_backbone(one_step_run / "teacher_backbone.pth", arch="vit_small")


def test_half_written_temp_files_are_ignored_on_resume(tmp_path, one_step_run):
    run = tmp_path / "run"
    shutil.copytree(one_step_run, run)
    data = (run / "checkpoint_00000001.pth").read_bytes()
    (run / "checkpoint_00000002.pth.tmp").write_bytes(data[: len(data) // 3])  # killed while writing step 2
    (run / "teacher_backbone.pth.tmp").write_bytes(b"")
    summary = train.train(tiny_config(run, "--optim.iterations", "3", "--data.batch-size", "2"), procedural())
    assert summary["step"] == 3 and len(summary["history"]) == 2  # resumed at step 1
    assert "resumed from" in (run / "log.txt").read_text()
    assert not list(run.glob("*.tmp"))  # removed with the next save


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    """The write of checkpoint 2 fails in the kernel (file size limit: EFBIG, as ENOSPC would on a full disk):
    the error names the file and the reason, checkpoint 1 and the previous exported backbone are untouched, no
    temp file is left, and the run resumes from checkpoint 1."""
    real_save = runtime.atomic_save
    limit_bytes = 1 << 20  # far below a checkpoint (~30 MB)

    def save_on_a_full_disk(obj, path):
        if Path(path).name != "checkpoint_00000002.pth":
            return real_save(obj, path)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))  # Python ignores SIGXFSZ: writes fail
        try:
            return real_save(obj, path)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    monkeypatch.setattr(runtime, "atomic_save", save_on_a_full_disk)
    cfg = tiny_config(tmp_path, "--optim.iterations", "3", "--data.batch-size", "2", "--run.checkpoint-every", "1")
    with pytest.raises(OSError, match=r"could not write checkpoint .*checkpoint_00000002.pth \(File too large\); "
                                      r"the previous checkpoint is intact") as error:
        train.train(cfg, procedural())
    assert error.value.errno == errno.EFBIG
    assert [s for s, _ in runtime.list_checkpoints(tmp_path)] == [1]
    assert read_checkpoint_file(tmp_path / "checkpoint_00000001.pth")["step"] == 1
    backbone_before = (tmp_path / "teacher_backbone.pth").read_bytes()
    assert load_backbone(tmp_path / "teacher_backbone.pth").cfg.embed_dim == 192
    assert not list(tmp_path.glob("*.tmp"))

    monkeypatch.setattr(runtime, "atomic_save", real_save)  # space again
    summary = train.train(cfg, procedural())
    assert summary["step"] == 3 and len(summary["history"]) == 2
    assert (tmp_path / "teacher_backbone.pth").read_bytes() != backbone_before


# ----------------------------------------------------------------------------------------------------
# train.py as a process: kill -9, SIGTERM, a long run
# ----------------------------------------------------------------------------------------------------

KILL_STEPS = 24
KILL_FLAGS = ["--optim.iterations", str(KILL_STEPS), "--data.batch-size", "4", "--optim.lr.peak", "1e-3",
              "--run.checkpoint-every", "1", "--run.deterministic", "--run.log-every", "1"]


def _train_command(out: Path, *flags: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "demo", *TINY_FLAGS, "--run.output-dir", str(out), *flags]


def _start(command: list[str], log: Path, **kwargs) -> subprocess.Popen:
    with open(log, "wb") as out:  # a file, not a pipe: a full pipe would stall the run
        return subprocess.Popen(command, cwd=REPO, env=process_env(), stdout=out, stderr=subprocess.STDOUT, **kwargs)


def _run_to_completion(command: list[str], log: Path) -> None:
    process = _start(command, log)
    assert process.wait(timeout=300) == 0, log.read_text()[-5000:]


def _newest_step(folder: Path) -> int:
    found = runtime.list_checkpoints(folder)
    return found[-1][0] if found else 0


def _wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 120.0, poll: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(poll)


def _assert_every_checkpoint_readable(folder: Path) -> None:
    for step, path in runtime.list_checkpoints(folder):
        assert read_checkpoint_file(path)["step"] == step, path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, image_folder) -> dict:
    """The final checkpoint of a train.py process that ran KILL_STEPS steps without interruption."""
    out = tmp_path_factory.mktemp("uninterrupted")
    _run_to_completion(_train_command(out, *KILL_FLAGS, "--data.path", str(image_folder)), out.parent / "straight.log")
    return _load(out / f"checkpoint_{KILL_STEPS:08d}.pth")


@pytest.mark.slow
def test_kill_9_at_random_moments_and_resume_ends_bitwise_as_an_uninterrupted_run(tmp_path, image_folder,
                                                                                  uninterrupted):
    """Five kill -9: during start-up, at random moments after a new checkpoint, and twice as soon as a checkpoint
    temp file appears (mid-write). After each: every checkpoint file is complete. Then the run resumes to the end,
    and its weights and optimizer state equal the uninterrupted run's, bit for bit."""
    out = tmp_path / "run"
    command = _train_command(out, *KILL_FLAGS, "--data.path", str(image_folder))
    _kill_at(["start-up", "random", "mid-write", "random", "mid-write"], command, out, tmp_path, random.Random(9))
    _run_to_completion(command, tmp_path / "final.log")
    assert not list(out.glob("*.tmp"))
    _assert_same_training_state(uninterrupted, _load(out / f"checkpoint_{KILL_STEPS:08d}.pth"))


def _kill_at(moments: list[str], command: list[str], out: Path, tmp_path: Path, rng: random.Random) -> None:
    """Starts `command` once per moment and kill -9s it then: during start-up, at a random moment after a new
    checkpoint, or as soon as a checkpoint temp file appears (mid-write). After each: every checkpoint file is
    complete and the run had resumed from the newest; at least one kill landed mid-write."""
    temp_files_left = 0
    for attempt, moment in enumerate(moments):
        log = tmp_path / f"attempt_{attempt}.log"
        before = _newest_step(out)
        process = _start(command, log)
        if moment == "start-up":
            time.sleep(rng.uniform(0.3, 2.0))
        else:
            _wait_for(lambda before=before: _newest_step(out) > before, process, log)
            if moment == "random":
                time.sleep(rng.uniform(0.0, 0.6))
            else:
                _wait_for(lambda: any(out.glob("checkpoint_*.pth.tmp")), process, log)
        process.kill()
        process.wait(timeout=60)
        temp_files_left += bool(list(out.glob("checkpoint_*.pth.tmp")))
        _assert_every_checkpoint_readable(out)
        if before:
            assert f"at step {before}" in log.read_text()  # "resumed from ... at step N": the newest checkpoint
        assert _newest_step(out) < KILL_STEPS, "the run finished before it could be killed: give it more steps"
    assert temp_files_left >= 1  # a kill did land in the middle of a checkpoint write


@pytest.mark.slow
def test_kill_9_of_a_two_part_mixture_run_resumes_its_part_choices_and_positions_bitwise(tmp_path, image_folder):
    """The same on a mixture of two image folders (ratios 0.7 / 0.3, homogeneous steps of part 1 with p = 0.3): the
    steps' part choices and each part's position survive kill -9 -- the resumed run ends with the uninterrupted
    run's part counts, weights and optimizer state, bit for bit."""
    second = tmp_path / "part1"
    second.mkdir()
    data = ProceduralDataset(n=10, size=48, n_classes=4, seed=11)  # other images than image_folder's
    for i in range(len(data)):
        data[i][0].save(second / f"{i:03d}.png")
    mixture = ["--data.path", "None", "--data.parts", str(image_folder), str(second), "--data.ratios", "0.7", "0.3",
               "--data.homogeneous-part", "1", "--data.homogeneous-p", "0.3"]
    _run_to_completion(_train_command(tmp_path / "straight", *KILL_FLAGS, *mixture), tmp_path / "straight.log")
    out = tmp_path / "run"
    command = _train_command(out, *KILL_FLAGS, *mixture)
    _kill_at(["random", "mid-write", "random"], command, out, tmp_path, random.Random(28))
    _run_to_completion(command, tmp_path / "final.log")
    straight = _load(tmp_path / "straight" / f"checkpoint_{KILL_STEPS:08d}.pth")
    resumed = _load(out / f"checkpoint_{KILL_STEPS:08d}.pth")
    counts = straight["stats"]["part_counts"]
    assert resumed["stats"]["part_counts"] == counts and sum(counts) == KILL_STEPS * 4 and min(counts) > 0
    _assert_same_training_state(straight, resumed)


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_exits_cleanly_then_resumes_exactly(tmp_path, image_folder,
                                                                                    uninterrupted):
    """SIGTERM to the run's whole process group, as a scheduler sends it (DataLoader workers included): the run
    finishes its step, writes a checkpoint and exits with status 0 within a few seconds; resumed (without
    workers) it ends bitwise as the uninterrupted run."""
    out = tmp_path / "run"
    log = tmp_path / "stopped.log"
    process = _start(_train_command(out, *KILL_FLAGS, "--data.path", str(image_folder), "--data.num-workers", "2"),
                     log, start_new_session=True)
    _wait_for(lambda: _newest_step(out) >= 3, process, log)
    os.killpg(process.pid, signal.SIGTERM)
    sent = time.monotonic()
    assert process.wait(timeout=60) == 0, log.read_text()[-5000:]
    assert time.monotonic() - sent < 30  # one step and one checkpoint
    text = log.read_text()
    assert "received SIGTERM: checkpoint saved at step" in text
    stopped_at = int(text.split("received SIGTERM: checkpoint saved at step ")[1].split(",")[0])
    assert stopped_at < KILL_STEPS and _newest_step(out) == stopped_at
    _assert_every_checkpoint_readable(out)
    _run_to_completion(_train_command(out, *KILL_FLAGS, "--data.path", str(image_folder)), tmp_path / "resumed.log")
    assert f"at step {stopped_at}" in (tmp_path / "resumed.log").read_text()
    _assert_same_training_state(uninterrupted, _load(out / f"checkpoint_{KILL_STEPS:08d}.pth"))


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
def test_200_steps_do_not_grow_memory_or_leak_file_handles(tmp_path, monkeypatch):
    """vit_tiny, 200 steps with 2 DataLoader workers, a checkpoint every 25 steps and TensorBoard logging: the
    main process's resident memory at step 200 is within 16 MiB of step 50, and it holds as many open files."""
    samples = {}

    def measure(index, batch, terms):
        if index + 1 in (50, 200):
            samples[index + 1] = (_rss_bytes(), _open_files())

    _wrap_forward_losses(monkeypatch, measure)
    cfg = tiny_config(tmp_path, "--optim.iterations", "200", "--data.batch-size", "4", "--data.num-workers", "2",
                      "--run.checkpoint-every", "25", "--run.log-every", "10")
    assert train.train(cfg, procedural(n=64))["step"] == 200
    (rss_50, files_50), (rss_200, files_200) = samples[50], samples[200]
    print(f"RSS step 50 {rss_50 / 2**20:.1f} MiB, step 200 {rss_200 / 2**20:.1f} MiB; "
          f"open files {files_50} -> {files_200}")
    assert rss_200 - rss_50 < 16 * 2**20
    assert files_200 == files_50
