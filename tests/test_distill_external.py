"""timm and torchvision students (models/external.py) in distill.py: building them small, the adapters' shapes, two
distillation steps, exact resume, the spec errors, and eval.py / export.py on the saved student."""

import shutil

import pytest
import torch

import distill
import eval as eval_cli
from models.checkpoint import load_any_backbone
from probes import load_procedural_sets, procedural_splits, reestimate_batchnorm
from models.external import ExternalBackbone, build_external, export_external, load_pretrained, spec_problem
from tests.helpers import distill_config, procedural

pytest.importorskip("timm")

TIMM, TORCHVISION = "timm:resnet10t", "torchvision:mobilenet_v3_small"
STUDENTS = f"{TIMM},{TORCHVISION}"
FLAGS = ["--students", STUDENTS, "--teacher.objective", "features", "--features.adapter", "linear",
         "--data.batch-size", "2", "--optim.lr.peak", "1e-3"]


@pytest.mark.parametrize("spec, width", [(TIMM, 512), (TORCHVISION, 576)])
def test_each_library_builds_a_backbone_with_the_vit_outputs(spec, width):
    backbone = build_external(spec).eval()
    assert isinstance(backbone, ExternalBackbone) and backbone.embed_dim == width
    out = backbone([torch.randn(2, 3, 64, 48), torch.randn(3, 3, 32, 32)], [None, None])
    assert out[0]["x_norm_clstoken"].shape == (2, width)
    assert out[0]["x_norm_patchtokens"].shape == (2, 4 * 3, width)  # the 16-px grid of a 64x48 image
    assert out[1]["x_norm_patchtokens"].shape == (3, 2 * 2, width)
    levels = backbone.get_intermediate_layers(torch.randn(1, 3, 64, 64), n=1, reshape=True)
    assert levels[0].shape == (1, width, 4, 4)


@pytest.mark.parametrize("spec", [TIMM, TORCHVISION])
def test_a_new_student_trains_with_batch_statistics(spec):
    """Built in training mode (a torchvision extractor keeps the mode its model had when it was traced), so a
    training forward updates the BatchNorm running statistics that the eval-mode network then uses."""
    backbone = build_external(spec)
    assert all(m.training for m in backbone.modules())
    norm = next(m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = norm.running_var.clone()
    backbone(torch.randn(2, 3, 32, 32) * 3)
    assert not torch.equal(norm.running_var, before)


def test_spec_errors_name_the_problem():
    assert spec_problem(TIMM, [32, 64]) is None
    assert "timm has no model 'resnet_nonexistent'" in spec_problem("timm:resnet_nonexistent", [64])
    assert "torchvision has no classification model" in spec_problem("torchvision:resnet_nonexistent", [64])
    assert "no spatial feature map" in spec_problem("torchvision:vit_b_16", [224])
    assert "cannot take 16x16 px crops" in spec_problem("torchvision:alexnet", [16, 64])


def test_bad_student_specs_stop_before_the_teacher_is_read(tmp_path):
    missing_teacher = tmp_path / "teacher_not_read.pth"  # never opened: every case fails before that
    missing_teacher.write_bytes(b"")
    cases = [
        (["--students", "timm:resnet_nonexistent"], "timm has no model"),
        (["--students", "torchvision:vit_b_16"], "no spatial feature map"),
        (["--students", "torchvision:alexnet", "--data.local-size", "16"], "cannot take 16x16 px crops"),
        (["--students", TIMM, "--student.pretrained", f"{TORCHVISION}=x.pth"], "SPEC=PATH"),
    ]
    for flags, match in cases:
        with pytest.raises(ValueError, match=match):
            distill.distill(distill_config(tmp_path / "run", missing_teacher, *flags), procedural())
    assert distill.parse_students(f"{TIMM}:1,vit_tiny:1", world_size=2, global_batch=4)[0].arch == TIMM


def test_adapters_map_student_tokens_to_the_teacher_tokens(teacher_files):
    cfg = distill_config(teacher_files["backbone"].parent, teacher_files["backbone"], *FLAGS)
    teacher = distill.load_teacher(cfg.teacher)
    spec = distill.parse_students(TORCHVISION, 1, 2)[0]
    student = distill.build_student(spec, teacher, cfg)
    assert isinstance(student.class_head, torch.nn.Linear)
    norms = [m for m in student.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.1 for m in norms)  # torchvision's MobileNetV3 has 0.01
    assert (student.class_head.in_features, student.class_head.out_features) == (576, teacher.embed_dim)
    out = student(torch.randn(4, 3, 64, 64), torch.randn(4, 3, 32, 32), torch.zeros(4, 16, dtype=torch.bool))
    # class tokens of the 2 global + 2 local crops of 2 images, every patch of the global crops, teacher's width
    assert out.dino.shape == (8, teacher.embed_dim) and out.ibot.shape == (4, 16, teacher.embed_dim)


def test_two_steps_then_an_exact_resume_and_the_saved_student_reads_back(tmp_path, teacher_files):
    flags = [*FLAGS, "--optim.iterations", "2", "--run.checkpoint-every", "1", "--data.global-size", "48",
             "--augment.n-local-crops", "1"]
    straight = distill.distill(distill_config(tmp_path / "straight", teacher_files["backbone"], *flags), procedural())
    for name in (TIMM, TORCHVISION):
        history = straight["students"][name]["history"]
        assert len(history) == 2 and all(torch.isfinite(torch.tensor(history))), history
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "straight", crashed)
    for folder in ("timm-resnet10t", "torchvision-mobilenet_v3_small"):
        (crashed / folder / "checkpoint_00000002.pth").unlink()
    resumed = distill.distill(distill_config(crashed, teacher_files["backbone"], *flags), procedural())
    for name in (TIMM, TORCHVISION):
        assert resumed["students"][name]["history"] == straight["students"][name]["history"][1:]
        assert resumed["students"][name]["param_digests"] == straight["students"][name]["param_digests"]

    saved = tmp_path / "straight" / "torchvision-mobilenet_v3_small"
    checkpoint = torch.load(saved / "checkpoint_00000002.pth", weights_only=True)
    images = torch.randn(2, 3, 64, 64)
    for source in (saved / "backbone.pth", saved / "checkpoint_00000002.pth"):
        backbone = load_any_backbone(source).eval()
        assert isinstance(backbone, ExternalBackbone) and backbone.cfg.spec == TORCHVISION
        for key, value in backbone.state_dict().items():
            assert torch.equal(value, checkpoint["student"][f"backbone.{key}"]), key
        assert backbone(images)["x_norm_patchtokens"].shape == (2, 16, 576)


def test_local_pretrained_weights_load_and_wrong_files_are_refused(tmp_path):
    torch.manual_seed(1)
    source = build_external(TIMM)
    path = tmp_path / "resnet10t.pth"
    torch.save({**source.features.state_dict(), "fc.weight": torch.zeros(10, 512)}, path)  # + a classifier key
    torch.manual_seed(2)
    target = build_external(TIMM)
    load_pretrained(target, path)
    for key, value in source.features.state_dict().items():
        assert torch.equal(target.features.state_dict()[key], value), key
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not hold timm:resnet10t's weights"):
        load_pretrained(target, tmp_path / "other.pth")


@pytest.fixture(scope="module")
def saved_student(tmp_path_factory):
    """A torchvision student's backbone.pth as distill.py writes it (random weights)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("student") / "backbone.pth"
    torch.save(export_external(build_external(TORCHVISION)), path)
    return path


def test_eval_knn_and_segmentation_probe_run_on_a_saved_student(saved_student):
    data = ["--size", "64", "--num-workers", "0", "--no-cache"]
    knn = eval_cli.main(["knn", "--checkpoint", str(saved_student), "--data", "procedural", "--procedural-train", "40",
                         "--procedural-val", "20", "--procedural-classes", "4", "--ks", "5", *data])
    assert 0.0 <= knn["top1_k5"] <= 1.0
    segment = eval_cli.main(["segment", "--checkpoint", str(saved_student), "--n-train", "6", "--n-val", "3",
                             "--size", "64", "--epochs", "1", "--knn-images", "0", "--figure-images", "0"])
    assert 0.0 <= segment["checkpoint"]["miou"] <= 1.0 and 0.0 <= segment["same net at init"]["miou"] <= 1.0


def test_batchnorm_statistics_are_recomputed_on_the_train_split():
    """The running mean and variance become those of the split's images (equal batches: the mean of batch means is
    the mean), the network's modes and momentum come back, and a network without BatchNorm is left alone."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3, momentum=0.3)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        net[0].bias.zero_()
    train, _ = procedural_splits(8, 2, 32, 4, seed=0)
    pixels = load_procedural_sets(8, 2, size=32, n_classes=4)[0]
    assert reestimate_batchnorm(net, train, 32, batch_size=4) == 1
    norm = net[1]
    torch.testing.assert_close(norm.running_mean, pixels.mean(dim=(0, 2, 3)))
    per_batch_var = torch.stack([b.var(dim=(0, 2, 3)) for b in pixels.split(4)])  # unbiased, as BatchNorm keeps it
    torch.testing.assert_close(norm.running_var, per_batch_var.mean(dim=0))
    assert not net.training and not norm.training and norm.momentum == 0.3
    assert reestimate_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)), train, 32) == 0


def test_eval_knn_with_batchnorm_statistics_of_the_train_split(saved_student, tmp_path):
    """Other statistics give other features, cached apart from the saved network's; the saved file is untouched."""
    before = torch.load(saved_student, map_location="cpu", weights_only=True)["weights"]
    args = ["knn", "--checkpoint", str(saved_student), "--data", "procedural", "--procedural-train", "40",
            "--procedural-val", "20", "--procedural-classes", "4", "--ks", "5", "--size", "64", "--num-workers", "0",
            "--cache-dir", str(tmp_path)]
    eval_cli.main(args)
    running = {f.name for f in tmp_path.glob("features_*.pt")}
    result = eval_cli.main([*args, "--batchnorm-stats", "train-split"])
    recomputed = {f.name for f in tmp_path.glob("features_*.pt")} - running
    assert 0.0 <= result["top1_k5"] <= 1.0 and len(running) == len(recomputed) == 2
    def cls_by_rows(names: set[str]) -> dict[int, torch.Tensor]:  # 40 rows: the train split, 20: val
        return {t.shape[0]: t for t in (torch.load(tmp_path / n, weights_only=True)["cls"] for n in names)}

    saved_stats, split_stats = cls_by_rows(running), cls_by_rows(recomputed)
    assert sorted(saved_stats) == sorted(split_stats) == [20, 40]
    assert all(not torch.allclose(saved_stats[n], split_stats[n]) for n in (20, 40))
    after = torch.load(saved_student, map_location="cpu", weights_only=True)["weights"]
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow  # torch.onnx (dynamo) tracing alone takes tens of seconds
def test_onnx_export_of_a_saved_student_takes_any_input_size(saved_student, tmp_path):
    pytest.importorskip("onnxruntime")
    import export

    rows = export.main(["onnx", "--checkpoint", str(saved_student), "--out", str(tmp_path / "student.onnx"),
                        "--verify-sizes", "64", "64", "96", "128"])
    assert {size for size, _, _ in rows} == {(64, 64), (96, 128)}  # one graph, two input sizes
    assert all(error < export.ONNX_TOLERANCE for _, _, error in rows)
    with pytest.raises(ValueError, match="export it with `export.py onnx`"):
        export.main(["hf", "--checkpoint", str(saved_student), "--out", str(tmp_path / "hf")])


def test_smooth_l1_feature_objective_against_a_float64_reference():
    torch.manual_seed(0)
    n_images, n_local, patches, width = 3, 2, 5, 8
    features = distill.FeaturesConfig(distance="smooth_l1", smooth_l1_beta=0.5, cls_weight=0.7, patch_weight=1.3,
                                      koleo_weight=0.0)
    losses = distill.FeatureLosses(distill.LossConfig(), features, group=None)
    cls = torch.randn((2 + n_local) * n_images, width)
    student_patches = torch.randn(2 * n_images, patches, width)
    teacher = {"teacher_cls": torch.randn(2 * n_images, width),
               "teacher_patches": torch.randn(2 * n_images, patches, width)}
    out = losses(distill.StudentOutputs(cls, student_patches, torch.randn(2 * n_images, width)), teacher)

    def smooth_l1(a, b):
        d = (a.double() - b.double()).abs()
        return torch.where(d < 0.5, 0.5 * d**2 / 0.5, d - 0.25).mean(dim=-1)

    student_cls, teacher_cls = cls.view(-1, n_images, width), teacher["teacher_cls"].view(2, n_images, width)
    pairs = [smooth_l1(student_cls[i], teacher_cls[i]).mean() for i in range(2)]
    pairs += [smooth_l1(student_cls[i], teacher_cls[j]).mean() for i in range(2, 2 + n_local) for j in range(2)]
    cls_ref = torch.stack(pairs).mean()
    patch_ref = smooth_l1(student_patches, teacher["teacher_patches"]).mean()
    for got, ref in [(out["cls"], cls_ref), (out["patch"], patch_ref), (out["total"], 0.7 * cls_ref + 1.3 * patch_ref)]:
        assert abs(got.double() - ref) / ref.abs() < 1e-6
