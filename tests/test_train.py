"""train.py end to end on the CPU: one step, loss decrease, learning signal, resume, validation, bad data."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from data.datasets import ImageFolderDataset, ProceduralDataset
from models.checkpoint import checkpoint_path_or_error, read_weights
from probes import knn_eval, load_eval_images
from tests.helpers import REPO, TINY_FLAGS, procedural, process_env, tiny_config


def test_one_step_runs_every_loss_and_all_are_finite(tmp_path):
    cfg = tiny_config(tmp_path, "--optim.iterations", "1", "--data.batch-size", "4")
    summary = train.train(cfg, procedural())
    assert summary["step"] == 1
    for name in ("total", "dino", "dino_global", "dino_local", "ibot", "koleo"):
        assert torch.isfinite(torch.tensor(summary["losses"][name])), name
    assert summary["losses"]["ibot"] > 0 and summary["losses"]["dino_local"] > 0
    assert Path(summary["checkpoint"]).is_file() and Path(summary["pca_png"]).is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["arch"] == "vit_tiny"


def test_thirty_steps_reduce_the_loss(tmp_path):
    """The recipe's LayerScale (1e-5; the demo uses 1.0): measured 7.93 -> 7.34 (first vs last 5 steps)."""
    cfg = tiny_config(tmp_path, "--optim.iterations", "30", "--data.batch-size", "8", "--optim.lr.peak", "2e-3",
                      "--model.layerscale-init", "1e-5", "--run.checkpoint-every", "1000")
    history = train.train(cfg, procedural())["history"]
    assert len(history) == 30
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < first - 0.05, (first, last)


def test_resume_continues_bitwise_identically(tmp_path):
    data = procedural(n=40)
    flags = ["--data.batch-size", "4", "--run.checkpoint-every", "3", "--optim.lr.peak", "1e-3"]
    straight = tiny_config(tmp_path / "straight", "--optim.iterations", "6", *flags)
    train.train(straight, data)
    interrupted = tiny_config(tmp_path / "resumed", "--optim.iterations", "3", *flags)
    train.train(interrupted, data)
    resumed = tiny_config(tmp_path / "resumed", "--optim.iterations", "6", *flags)
    assert train.train(resumed, data)["step"] == 6
    a = torch.load(tmp_path / "straight" / "checkpoint_00000006.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint_00000006.pth", weights_only=True)
    for part in ("student", "teacher"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"


def test_init_continues_run_takes_the_step_and_state_of_another_run(tmp_path):
    """--init-continues-run (the official Gram-anchoring config is the pretraining run's steps 1M-1.2M): a new
    output folder continues another run's step count, optimizer and data stream exactly like a resume."""
    data = procedural(n=40)
    flags = ["--data.batch-size", "4", "--run.checkpoint-every", "3", "--optim.lr.peak", "1e-3"]
    train.train(tiny_config(tmp_path / "straight", "--optim.iterations", "6", *flags), data)
    train.train(tiny_config(tmp_path / "first", "--optim.iterations", "3", *flags), data)
    continued = tiny_config(tmp_path / "second", "--optim.iterations", "6", "--init-from", str(tmp_path / "first"),
                            "--init-continues-run", *flags)
    assert train.train(continued, data)["step"] == 6
    assert not (tmp_path / "second" / "checkpoint_00000003.pth").exists()
    a = torch.load(tmp_path / "straight" / "checkpoint_00000006.pth", weights_only=True)
    b = torch.load(tmp_path / "second" / "checkpoint_00000006.pth", weights_only=True)
    for key in a["teacher"]:
        assert torch.equal(a["teacher"][key], b["teacher"][key]), key
    with pytest.raises(ValueError, match="init_continues_run needs --init-from"):
        train.validate_config(tiny_config(tmp_path / "x", "--init-continues-run"), world_size=1)
    done = tiny_config(tmp_path / "third", "--optim.iterations", "3", "--init-from", str(tmp_path / "first"),
                       "--init-continues-run", *flags)
    with pytest.raises(train.CheckpointError, match="nothing left to run"):
        train.train(done, data)


def test_rope_box_is_drawn_per_block_and_crop_group_and_the_teacher_draws_none(tmp_path):
    cfg = tiny_config(tmp_path)
    student, teacher = train.build_student_teacher(cfg.model)
    assert student.training and not teacher.training
    draws = []
    rope_forward = student.backbone.rope_embed.forward
    student.backbone.rope_embed.forward = lambda h, w: draws.append((h, w)) or rope_forward(h, w)
    crops = [torch.randn(2, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    student.backbone(crops, [None, None])
    assert draws == [(2, 2), (1, 1)] * len(student.backbone.blocks)  # every block, each crop group
    draws.clear()
    student.backbone.cfg = dataclasses.replace(student.backbone.cfg, rope_jitter_per="forward")
    student.backbone(crops, [None, None])
    assert draws == [(2, 2), (1, 1)]
    # Same seed, two draws of the box per forward differ from one draw for all blocks; the teacher (eval) is
    # deterministic whatever its generator says.
    images = torch.randn(2, 3, 32, 32)
    outputs = []
    for per in ("block", "forward"):
        student.backbone.cfg = dataclasses.replace(student.backbone.cfg, rope_jitter_per=per)
        student.backbone.rope_embed.seed(3)
        outputs.append(student.backbone(images)["x_norm_clstoken"])
    assert not torch.allclose(outputs[0], outputs[1])
    teacher.backbone.rope_embed.seed(1)
    first = teacher.backbone(images)["x_norm_clstoken"]
    teacher.backbone.rope_embed.seed(2)
    assert torch.equal(first, teacher.backbone(images)["x_norm_clstoken"])


def test_config_validation_rejects_bad_combinations(tmp_path):
    with pytest.raises(ValueError, match="not a positive multiple of the patch size"):
        train.validate_config(tiny_config(tmp_path, "--data.global-size", "40"), world_size=1)
    with pytest.raises(ValueError, match="mask_probability"):
        train.validate_config(tiny_config(tmp_path, "--data.mask-probability", "1.5"), world_size=1)
    with pytest.raises(SystemExit, match="unknown preset"):
        train.parse_config(["vit-enormous"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.train(tiny_config(tmp_path, "--data.path", str(tmp_path / "missing")))
    assert not list(tmp_path.glob("checkpoint_*"))


def test_incompatible_checkpoint_in_output_dir_is_refused(tmp_path):
    train.train(tiny_config(tmp_path, "--optim.iterations", "1", "--data.batch-size", "2"), procedural())
    from models.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="model.dino_prototypes=256"):
        train.train(tiny_config(tmp_path, "--optim.iterations", "2", "--data.batch-size", "2",
                                "--model.dino-prototypes", "128"), procedural())


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (64, 48), (40 * i, 100, 200 - 30 * i)).save(folder / f"ok_{i}.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    good = folder / "ok_0.png"
    (folder / "truncated.png").write_bytes(good.read_bytes()[:40])
    cfg = tiny_config(tmp_path / "run", "--optim.iterations", "3", "--data.batch-size", "6")
    summary = train.train(cfg, ImageFolderDataset(folder))
    assert summary["step"] == 3
    assert summary["stats"]["images_skipped"] > 0


@pytest.mark.slow
def test_learning_signal_knn_beats_initialization(tmp_path):
    """A short CPU run on the procedural set raises the k-NN accuracy of the teacher's class token.

    Run: vit_tiny (LayerScale 1.0, as the demo), 48 px global / 32 px local crops (4 local), batch 32, 150 steps,
    lr 1e-3, teacher temperature 0.04, seed 0 (~75 s on an idle 2-core CPU). k-NN (k=20, T=0.07) of 200
    held-out images against 400 reference images, 4 classes (chance 25%). Measured here: 0.31 -> 0.375 and,
    over 300 steps, 0.245 -> 0.34; the assertion asks for +5 points over the same network at initialization.
    """
    import runtime

    data = ProceduralDataset(n=400, size=48, n_classes=4, seed=0)
    held_out = ProceduralDataset(n=600, size=48, n_classes=4, seed=0)
    ref_x, ref_y = load_eval_images(data, range(400), 48)
    test_x, test_y = load_eval_images(held_out, range(400, 600), 48)
    cfg = tiny_config(tmp_path, "--optim.iterations", "150", "--data.batch-size", "32", "--data.global-size", "48",
                      "--data.local-size", "32", "--augment.n-local-crops", "4", "--optim.lr.peak", "1e-3",
                      "--optim.lr.warmup-iterations", "15", "--model.layerscale-init", "1.0", "--teacher.temp.peak",
                      "0.04", "--run.checkpoint-every", "1000", "--run.seed", "0")
    runtime.seed_everything(cfg.run.seed)  # the network train() starts from
    _, initial_teacher = train.build_student_teacher(cfg.model)
    before = knn_eval(initial_teacher.backbone, ref_x, ref_y, test_x, test_y, ks=(20,))["top1_k20"]
    train.train(cfg, data)
    payload = torch.load(tmp_path / "checkpoint_00000150.pth", weights_only=True)
    initial_teacher.load_state_dict(payload["teacher"])
    after = knn_eval(initial_teacher.backbone, ref_x, ref_y, test_x, test_y, ks=(20,))["top1_k20"]
    print(f"k-NN accuracy: init {before:.3f} -> trained {after:.3f}")
    assert after >= before + 0.05, (before, after)


def _run_torchrun(nproc: int, out: Path, *flags: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "train.py"), "demo", *TINY_FLAGS, "--run.output-dir", str(out), *flags]
    if nproc == 1:
        command = [sys.executable, str(REPO / "train.py"), "demo", *TINY_FLAGS, "--run.output-dir", str(out), *flags]
    result = subprocess.run(command, cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.mark.slow
@pytest.mark.parametrize("parallel, gram", [("ddp", False), ("fsdp", False), ("fsdp", True)],
                         ids=["ddp", "fsdp", "fsdp-gram"])
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, parallel, gram):
    """torchrun 2 x batch 4 (gloo) == 1 process x batch 8 after 3 steps, parameters within 1e-5. With Gram
    anchoring (Gram teacher sharded like the teacher, created at step 1 and refreshed at step 2 on 2x crops) too.

    LayerScale starts at 1.0 here: at the recipe's 1e-5 the first gradients of most block weights are tiny
    sums of cancelling terms, and Adam turns their last-bit differences (another summation order across
    ranks) into +-lr steps, which says nothing about the distributed code. With well-scaled gradients the
    runs agree to ~1e-7 (a wrong shard, mask, KoLeo group or loss normalization gives >1e-4).
    KoLeo in groups across ranks (16 > the global batch: one group): with the released configs' default, each
    rank's own batch, two ranks of 4 have other neighbour sets than one process of 8, by design.
    """
    common = ["--optim.iterations", "3", "--optim.lr.peak", "1e-3", "--data.path", str(tmp_path / "data"),
              "--run.parallel", parallel, "--model.layerscale-init", "1.0", "--loss.koleo-group-size", "16"]
    if gram:
        common += ["--gram.enabled", "--gram.start-iteration", "1", "--gram.update-frequency", "1",
                   "--gram.max-updates", "1", "--data.gram-teacher-size", "64"]

    (tmp_path / "data").mkdir()
    data = procedural(n=24)
    for i in range(len(data)):
        data[i][0].save(tmp_path / "data" / f"{i:03d}.png")
    _run_torchrun(2, tmp_path / "two", *common, "--data.batch-size", "4")
    _run_torchrun(1, tmp_path / "one", *common, "--data.batch-size", "8")
    # FSDP over 2 processes writes a sharded checkpoint folder, the others a file: read_weights reads both.
    a = read_weights(checkpoint_path_or_error(tmp_path / "two"))
    b = read_weights(checkpoint_path_or_error(tmp_path / "one"))
    assert a["step"] == b["step"] == 3
    worst = 0.0
    for part in ("student", "teacher") + (("gram_teacher",) if gram else ()):
        for key in b[part]:
            worst = max(worst, (a[part][key].float() - b[part][key].float()).abs().max().item())
    assert worst <= 1e-5, worst


def test_small_batch_preset_is_vits16_with_the_measured_small_batch_settings():
    """The settings docs/ablations.md measured at <= 64 images per step, on top of the vits16 schedule."""
    small, base = train.PRESETS["vits16-small-batch"][1], train.PRESETS["vits16"][1]
    assert small.data.batch_size <= 64
    assert (small.optim.lr.peak, small.model.layerscale_init) == (1e-4, 1.0)
    assert small.loss.centering == "sinkhorn_knopp" and small.loss.koleo_weight > 0
    assert small.model.dino_prototypes == small.model.ibot_prototypes == 4096
    assert small.optim.iterations == base.optim.iterations
    assert small.optim.lr.warmup_iterations == base.optim.lr.warmup_iterations
    train.validate_config(small, world_size=1)
