"""distill.py on the CPU: student layouts, shared teacher inference, both objectives, exports, resume, and the
multi-process runs (2 ranks, gloo) against one process with the same global batch."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distill
import runtime
from data.augment import AugmentConfig, CropSizes
from data.datasets import build_loader
from models.checkpoint import CheckpointError, load_backbone
from models.convnext import load_convnext
from tests.helpers import (
    DISTILL_FLAGS,
    REPO,
    STUDENTS,
    distill_config,
    make_hf_model,
    procedural,
    process_env,
    tensorboard_scalars,
)

# ----------------------------------------------------------------------------------------------------
# Layouts and validation (no training)
# ----------------------------------------------------------------------------------------------------


def test_student_specs_give_each_student_its_ranks():
    split = distill.parse_students("vit_small:2, vit_base:1,convnext_tiny:1", world_size=4, global_batch=8)
    assert [(s.arch, s.ranks) for s in split] == [("vit_small", (0, 1)), ("vit_base", (2,)), ("convnext_tiny", (3,))]
    shared = distill.parse_students("vit_small,convnext_tiny", world_size=2, global_batch=8)
    assert [s.ranks for s in shared] == [(0, 1), (0, 1)]  # no counts: every rank trains every student in turn
    alone = distill.parse_students("vit_small:2,vit_base:2", world_size=1, global_batch=8)
    assert [s.ranks for s in alone] == [(0,), (0,)]  # one process ignores the counts: students in turn
    for spec, match in [("vit_small:2,vit_base:1", "sum to 3"), ("vit_small:3,vit_base:1", "do not divide"),
                        ("vit_small:2,vit_base", "to every student .arch:ranks. or to none"),
                        ("resnet50", "unknown architecture"),
                        ("vit_small,vit_small", "listed twice"), ("vit_small:0,vit_base:4", "positive integer"),
                        ("", "at least one student")]:
        with pytest.raises(ValueError, match=match):
            distill.parse_students(spec, world_size=4, global_batch=8)


def test_suggested_rank_counts_equalize_step_times():
    # Per-image costs 1 : 2 : 5 on 8 ranks: 1 + 2 + 5 ranks give each group the same B/w * c.
    assert distill.suggest_rank_counts([1.0, 2.0, 5.0], 8) == [1, 2, 5]
    assert distill.suggest_rank_counts([1.0, 1.0], 2) == [1, 1]
    assert sum(distill.suggest_rank_counts([0.3, 0.1, 0.9], 7)) == 7
    with pytest.raises(ValueError, match="at least as many ranks"):
        distill.suggest_rank_counts([1.0, 1.0, 1.0], 2)


def test_bad_settings_are_refused_before_anything_is_loaded(tmp_path, teacher_files):
    out = tmp_path / "run"
    cases = [
        (["--students", "vit_tiny,convnext_test", "--data.local-size", "16"], "at least 32 px"),
        (["--run.parallel", "fsdp"], "must be 'ddp'"),
        (["--phases.high-res-iterations", "2", "--phases.high-res-sizes", "64", "32", "0.5", "96", "40", "0.5"],
         "not a multiple of the 16-pixel patch"),
        (["--phases.high-res-iterations", "2", "--phases.high-res-sizes", "64", "32", "0.5", "96", "48", "0.2"],
         "sum to 1"),
        (["--students", "vit_gigantic"], "unknown architecture"),
    ]
    for flags, match in cases:
        with pytest.raises(ValueError, match=match):
            distill.distill(distill_config(out, teacher_files["heads"], *flags), procedural())
    with pytest.raises(ValueError, match="does not exist"):
        distill.distill(distill_config(out, tmp_path / "missing.pth"), procedural())
    assert not (out / "vit_tiny").exists() and not (out / "summary.json").exists()


def test_parts_of_the_gathered_batch_equal_the_loader_batches_of_that_layout():
    """Two ranks' shards, concatenated as the all-gather does, then cut for a group of 2 or of 1: each part is
    exactly the batch a loader gives a rank of that layout (crops, masks, iBOT indices and weights)."""
    data, augment, sizes = procedural(n=16), AugmentConfig(n_local_crops=2), CropSizes(32, 16)

    def first_batch(rank: int, world_size: int, batch_size: int) -> dict:
        loader = build_loader(data, augment, sizes, batch_size=batch_size, rank=rank, world_size=world_size,
                              seed=3, start_step=1)
        return next(iter(loader))

    shards = [first_batch(rank, 2, 4) for rank in range(2)]
    whole = first_batch(0, 1, 8)
    one_process = runtime.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    keys = ("global_crops", "local_crops", "masks", "mask_indices", "mask_weights")
    for name, n_crops in (("global_crops", 2), ("local_crops", 2), ("masks", 2)):
        gathered = torch.cat([distill.gather_crop_major(s[name], n_crops, 4, one_process) for s in shards], dim=1)
        assert torch.equal(distill.part_of(gathered, 0, 1), whole[name]), name
        for rank in range(2):
            assert torch.equal(distill.part_of(gathered, rank, 2), shards[rank][name]), name
    teacher_out = {"cls": whole["global_crops"].mean(dim=(2, 3)), "patches": whole["global_crops"][:, :, 0]}
    mine = distill.share_batch(whole, teacher_out, 0, 1, one_process)
    for key in keys:
        assert torch.equal(mine[key], whole[key]), key
    assert mine["teacher_cls"] is teacher_out["cls"]


# ----------------------------------------------------------------------------------------------------
# Runs in one process
# ----------------------------------------------------------------------------------------------------


def test_two_students_learn_from_the_teacher_and_export_loadable_backbones(tmp_path, teacher_files):
    steps, batch = 16, 8
    cfg = distill_config(tmp_path, teacher_files["heads"], "--students", STUDENTS, "--optim.iterations", str(steps),
                         "--data.batch-size", str(batch), "--optim.lr.peak", "2e-3", "--run.checkpoint-every", "8")
    summary = distill.distill(cfg, procedural())
    assert summary["objective"] == "heads"
    assert summary["teacher_images_per_rank"] == [steps * batch]  # each image once per step
    for name in ("vit_tiny", "convnext_test"):
        result = summary["students"][name]
        history = result["history"]
        assert len(history) == steps and all(torch.isfinite(torch.tensor(history)))
        assert all(torch.isfinite(torch.tensor(v)) for v in result["losses"].values())
        first, last = sum(history[:4]) / 4, sum(history[-4:]) / 4
        assert last < first - 0.05, (name, first, last)
        folder = tmp_path / name
        assert [s for s, _ in runtime.list_checkpoints(folder)] == [8, 16]
        assert (folder / "pca_features.png").is_file()
    # summary.json holds the per-step totals TensorBoard logged as the run went (stored there as float32).
    written = json.loads((tmp_path / "summary.json").read_text())
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    for name in ("vit_tiny", "convnext_test"):
        logged = scalars[f"loss/{name}/total"]
        assert [step for step, _ in logged] == list(range(1, steps + 1))
        assert written["students"][name]["history"] == pytest.approx([value for _, value in logged], rel=1e-6)

    checkpoint = torch.load(tmp_path / "vit_tiny" / "checkpoint_00000016.pth", weights_only=True)
    vit = load_backbone(tmp_path / "vit_tiny" / "backbone.pth", attn_impl="sdpa").eval()
    assert vit.cfg.embed_dim == 192 and vit.cfg.depth == 4
    for key, value in vit.state_dict().items():
        assert torch.equal(value, checkpoint["student"][f"backbone.{key}"]), key
    convnext = load_convnext(tmp_path / "convnext_test" / "backbone.pth").eval()
    checkpoint = torch.load(tmp_path / "convnext_test" / "checkpoint_00000016.pth", weights_only=True)
    for key, value in convnext.state_dict().items():
        assert torch.equal(value, checkpoint["student"][f"backbone.{key}"]), key
    images = torch.randn(2, 3, 64, 64)
    assert vit(images)["x_norm_patchtokens"].shape == convnext(images)["x_norm_patchtokens"].shape[:2] + (192,)


def test_resume_after_a_crash_continues_identically_across_phases(tmp_path, teacher_files):
    """main (3 steps) -> cooldown (1) -> high-res (2, crop sizes drawn per step): a run that lost its last
    checkpoints resumes at the newest step both students have and ends with bitwise the same students."""
    flags = ["--students", STUDENTS, "--optim.iterations", "3", "--phases.cooldown-iterations", "1",
             "--phases.high-res-iterations", "2", "--phases.high-res-sizes", "64", "32", "0.5", "96", "32", "0.5",
             "--data.batch-size", "4", "--run.checkpoint-every", "2", "--optim.lr.peak", "1e-3"]
    straight = distill.distill(distill_config(tmp_path / "straight", teacher_files["heads"], *flags), procedural())
    assert straight["step"] == 6
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "straight", crashed)
    (crashed / "vit_tiny" / "checkpoint_00000006.pth").unlink()  # the crash hit during the last save:
    for step in (4, 6):  # vit_tiny lacks step 6 and convnext_test lacks 4 and 6, so both restart from step 2
        (crashed / "convnext_test" / f"checkpoint_{step:08d}.pth").unlink()
    resumed = distill.distill(distill_config(crashed, teacher_files["heads"], *flags), procedural())
    assert resumed["step"] == 6 and resumed["teacher_images_per_rank"] == [4 * 4]
    for name in ("vit_tiny", "convnext_test"):
        a = torch.load(tmp_path / "straight" / name / "checkpoint_00000006.pth", weights_only=True)
        b = torch.load(crashed / name / "checkpoint_00000006.pth", weights_only=True)
        for key in a["student"]:
            assert torch.equal(a["student"][key], b["student"][key]), f"{name}.{key}"


def test_feature_objective_from_a_released_backbone_and_from_hugging_face_weights(tmp_path, teacher_files):
    steps = 12
    cfg = distill_config(tmp_path / "released", teacher_files["backbone"], "--students", STUDENTS,
                         "--optim.iterations", str(steps), "--data.batch-size", "8", "--optim.lr.peak", "2e-3")
    summary = distill.distill(cfg, procedural())
    assert summary["objective"] == "features"
    for name, result in summary["students"].items():
        history = result["history"]
        assert all(torch.isfinite(torch.tensor(history)))
        assert sum(history[-3:]) / 3 < sum(history[:3]) / 3 - 0.02, (name, history)
        assert set(result["losses"]) == set(distill.FEATURE_TERMS)

    from safetensors.torch import save_file

    hf_folder = tmp_path / "hf_model"
    hf_folder.mkdir()
    save_file(make_hf_model(gated=False, seed=0).state_dict(), str(hf_folder / "model.safetensors"))
    cfg = distill_config(tmp_path / "hf", hf_folder, "--students", "vit_tiny", "--optim.iterations", "1",
                         "--data.batch-size", "2")
    summary = distill.distill(cfg, procedural())
    assert summary["objective"] == "features" and summary["teacher_images_per_rank"] == [2]
    with pytest.raises(CheckpointError, match="holds no DINO/iBOT heads"):
        distill.load_teacher(distill.TeacherConfig(checkpoint=str(teacher_files["backbone"]), objective="heads"))


# ----------------------------------------------------------------------------------------------------
# Several processes (gloo) against one
# ----------------------------------------------------------------------------------------------------


def _run_distill_torchrun(nproc: int, *args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "distill.py"), "demo", *args]
    result = subprocess.run(command, cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def _image_folder(folder: Path, n: int = 24) -> Path:
    folder.mkdir()
    images = procedural(n=n)
    for i in range(len(images)):
        images[i][0].save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.slow
def test_two_processes_two_students_learn(tmp_path, teacher_files):
    """torchrun 2 ranks, one student each, 16 steps: every loss finite, both students' losses go down, the teacher
    saw each image once per step."""
    data = _image_folder(tmp_path / "data", n=64)
    _run_distill_torchrun(2, *DISTILL_FLAGS, "--teacher.checkpoint", str(teacher_files["heads"]), "--data.path",
                          str(data), "--students", "vit_tiny:1,convnext_test:1", "--optim.iterations", "16",
                          "--data.batch-size", "4", "--optim.lr.peak", "2e-3", "--run.output-dir", str(tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["teacher_images_per_rank"] == [4 * 16, 4 * 16]
    assert set(summary["suggested_students"].split(",")) <= {f"{a}:1" for a in ("vit_tiny", "convnext_test")}
    for name, result in summary["students"].items():
        history = result["history"]
        assert len(history) == 16 and all(torch.isfinite(torch.tensor(history))), (name, history)
        assert sum(history[-4:]) / 4 < sum(history[:4]) / 4 - 0.05, (name, history)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, students", [(2, "vit_tiny:1,convnext_test:1"), (2, "vit_tiny,convnext_test"),
                                             (3, "vit_tiny:2,convnext_test:1")],
                         ids=["2-ranks-one-per-student", "2-ranks-both-train-both", "3-ranks-groups-of-2-and-1"])
def test_several_processes_equal_one_process_with_the_same_global_batch(tmp_path, teacher_files, nproc, students):
    """torchrun N x batch 4 == 1 process x batch 4N after 3 steps, student parameters within 1e-5.

    One rank per student: each trains on the whole gathered batch. Both ranks train both: each student is
    data-parallel over the two ranks. Groups of 2 and 1: vit_tiny on ranks 0-1 (6 images each), convnext_test on
    rank 2 (12 images). The replicas of a group must stay bitwise equal. LayerScale starts at 1.0 for the reason
    given in test_train's multi-process test, and KoLeo runs in groups across ranks for the reason given there.
    """
    data = _image_folder(tmp_path / "data")
    common = [*DISTILL_FLAGS, "--teacher.checkpoint", str(teacher_files["heads"]), "--optim.iterations", "3",
              "--optim.lr.peak", "1e-3", "--data.path", str(data), "--student.layerscale-init", "1.0",
              "--loss.koleo-group-size", "16"]
    _run_distill_torchrun(nproc, *common, "--students", students, "--data.batch-size", "4",
                          "--run.output-dir", str(tmp_path / "several"))
    one = distill.distill(distill.parse_config(["demo", *common, "--students", STUDENTS, "--data.batch-size",
                                                str(4 * nproc), "--run.output-dir", str(tmp_path / "one")]))
    several = json.loads((tmp_path / "several" / "summary.json").read_text())
    assert several["teacher_images_per_rank"] == [4 * 3] * nproc  # every image once per step, over all ranks
    assert one["teacher_images_per_rank"] == [4 * nproc * 3]
    for name in ("vit_tiny", "convnext_test"):
        digests = several["students"][name]["param_digests"]
        assert list(digests) == [str(r) for r in several["students"][name]["ranks"]]
        assert len(set(digests.values())) == 1, digests  # the replicas of a group are bitwise equal
        a = torch.load(tmp_path / "several" / name / "checkpoint_00000003.pth", weights_only=True)["student"]
        b = torch.load(tmp_path / "one" / name / "checkpoint_00000003.pth", weights_only=True)["student"]
        worst = max((a[key].float() - b[key].float()).abs().max().item() for key in b)
        print(f"{nproc} ranks, {students}: {name} worst parameter difference {worst:.2e}")
        assert worst <= 1e-5, (name, worst)
