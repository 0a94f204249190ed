"""eval.py: k-NN and linear probe on features of known structure, the CLI on the procedural set (with its feature
cache), PCA / cosine-map PNGs, every checkpoint format, and clear errors for bad inputs."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dense
import eval as ev
import figures
import probes
from models.checkpoint import CheckpointError, load_backbone, save_official
from models.vit import build_vit
from tests.helpers import REPO, process_env


@pytest.fixture(scope="module")
def tiny_backbone():
    torch.manual_seed(0)
    # LayerScale 1.0 instead of the recipe's 1e-5: at init the blocks then shape the features (not only the patch
    # embedding), so maps and k-NN see a non-trivial network.
    return build_vit("vit_tiny", layerscale_init=1.0, attn_impl="sdpa").eval()


@pytest.fixture(scope="module")
def checkpoint(tiny_backbone, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "backbone.pth"
    save_official(tiny_backbone, path)
    return path


def test_knn_on_features_of_known_structure_gives_the_known_accuracy():
    # 10 classes, 5 train copies each of the unit vector e_c. A test feature's similarity ranks the classes by its
    # components, so with all 50 neighbors (k=50) the votes rank the classes in that order.
    train = torch.eye(10).repeat_interleave(5, dim=0)
    train_labels = torch.arange(10).repeat_interleave(5)
    ranking_weights = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])

    def ranked(order):  # a test feature whose similarity to class order[i] is the i-th largest
        x = torch.zeros(10)
        x[torch.tensor(order)] = ranking_weights
        return x

    test = torch.stack([
        ranked([3, 1, 2, 0, 4, 5, 6, 7, 8, 9]),  # label 3: first -> top-1 and top-5 right
        ranked([1, 3, 2, 0, 4, 5, 6, 7, 8, 9]),  # label 3: second -> top-1 wrong, top-5 right
        ranked([1, 2, 0, 4, 5, 6, 3, 7, 8, 9]),  # label 3: seventh -> both wrong
        ranked([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),  # label 0: first -> both right
    ])
    test_labels = torch.tensor([3, 3, 3, 0])
    result = probes.knn_topk_accuracy(train, train_labels, test, test_labels, ks=(5, 50), temperature=0.07)
    assert result["top1_k5"] == 0.5  # k=5 holds only the 5 copies of the most similar class
    assert result["top1_k50"] == 0.5 and result["top5_k50"] == 0.75
    # k above the number of train features uses them all; chunking the test set changes nothing.
    assert probes.knn_topk_accuracy(train, train_labels, test, test_labels, ks=(500,), chunk_size=1) == {
        "top1_k500": 0.5, "top5_k500": 0.75}


def test_knn_votes_are_weighted_by_temperature():
    # One class-0 neighbor at similarity 0.99 against three class-1 neighbors at 0.9 (k=4): weighted by
    # exp(s / 0.07) class 0 wins (e^14.1 > 3 e^12.9); at T=1 the three neighbors outvote it.
    angle_close, angle_far = np.arccos(0.99), np.arccos(0.9)
    train = torch.tensor([[np.cos(angle_close), np.sin(angle_close)]] + [[np.cos(angle_far), -np.sin(angle_far)]] * 3,
                         dtype=torch.float32)
    train_labels = torch.tensor([0, 1, 1, 1])
    test, test_labels = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert probes.knn_topk_accuracy(train, train_labels, test, test_labels, ks=(4,), temperature=0.07)["top1_k4"] == 1.0
    assert probes.knn_topk_accuracy(train, train_labels, test, test_labels, ks=(4,), temperature=1.0)["top1_k4"] == 0.0


def separable_features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes, linearly separable but not by their means: features [onehot(label) + s, s] + 100 with s a large
    random vector shared by both halves. (first half - second half) is the label; the class means differ by 1 in
    a direction where s has std 2, so a nearest-mean rule (what a too small lr gives) is far from perfect."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    shared = 2.0 * torch.randn(n, 4, generator=generator)
    onehot = torch.nn.functional.one_hot(labels, 4).float()
    features = torch.cat([onehot + shared, shared], dim=1) + 0.05 * torch.randn(n, 8, generator=generator) + 100.0
    return features, labels


def test_linear_probe_is_near_perfect_on_linearly_separable_features():
    train_x, train_y = separable_features(400, seed=0)
    val_x, val_y = separable_features(200, seed=1)
    result = probes.linear_probe(train_x, train_y, val_x, val_y, lrs=(1e-5, 1e-2, 1e-1), weight_decays=(0.0, 1e-3),
                             epochs=20, batch_size=64)
    assert result["val_top1"] >= 0.98 and result["val_top5"] == 1.0
    assert len(result["grid"]) == 6
    by_point = {(p["lr"], p["weight_decay"]): p["holdout_top1"] for p in result["grid"]}
    assert by_point[(1e-5, 0.0)] < 0.6  # 140 steps at lr 1e-5 stay near the nearest-mean rule
    assert result["lr"] == 1e-1 and result["holdout_top1"] == max(by_point.values())


def test_grid_points_train_independently():
    x, y = separable_features(100, seed=2)
    together_w, together_b = probes.train_linear_probes(x, y, 4, [(1e-2, 0.0), (0.3, 1e-2)], epochs=2, batch_size=16)
    alone_w, alone_b = probes.train_linear_probes(x, y, 4, [(0.3, 1e-2)], epochs=2, batch_size=16)
    torch.testing.assert_close(together_w[1:], alone_w)
    torch.testing.assert_close(together_b[1:], alone_b)


KNN_FLAGS = ["--data", "procedural", "--procedural-train", "40", "--procedural-val", "20", "--procedural-classes",
             "4", "--size", "32", "--num-workers", "0", "--device", "cpu", "--batch-size", "32"]


def knn_top1_float64(train_x, train_y, test_x, test_y, k: int, temperature: float = 0.07) -> float:
    """Cosine k-NN with exp(similarity / T) votes, written out in float64: top-1 accuracy."""
    train_x = train_x.double() / train_x.double().norm(dim=1, keepdim=True)
    test_x = test_x.double() / test_x.double().norm(dim=1, keepdim=True)
    similarity, index = (test_x @ train_x.T).topk(k, dim=1)
    votes = torch.zeros(len(test_x), int(train_y.max()) + 1, dtype=torch.float64)
    votes.scatter_add_(1, train_y[index], (similarity / temperature).exp())
    return (votes.argmax(dim=1) == test_y).double().mean().item()


def test_knn_and_linear_cli_on_procedural_data_cache_their_features(checkpoint, tiny_backbone, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = ev.main(["knn", "--checkpoint", str(checkpoint), *KNN_FLAGS, "--ks", "5", "10",
                     "--cache-dir", str(cache)])
    assert set(first) == {"top1_k5", "top5_k5", "top1_k10", "top5_k10"}
    assert len(list(cache.glob("features_*.pt"))) == 2  # train and val
    # What the CLI cached are the class tokens of the backbone on the procedural images (40 train, 20 val, with
    # their labels), and its accuracies are those of a float64 k-NN on them.
    train_split, val_split = probes.procedural_splits(40, 20, 32, 4, seed=0)
    key = probes.checkpoint_fingerprint(checkpoint)
    cached = [torch.load(probes.feature_cache_file(cache, key, split, 32, 1.0), weights_only=True)
              for split in (train_split, val_split)]
    for split, features in zip((train_split, val_split), cached):
        images, labels = zip(*(split.images[i] for i in split.indices))
        with torch.no_grad():
            cls = tiny_backbone(torch.stack([probes.eval_pixels(image, 32) for image in images]))["x_norm_clstoken"]
        torch.testing.assert_close(features["cls"], cls, rtol=1e-4, atol=1e-4)
        assert features["labels"].tolist() == list(labels)
    train, val = cached
    for k in (5, 10):
        assert first[f"top1_k{k}"] == knn_top1_float64(train["cls"], train["labels"], val["cls"], val["labels"], k)

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was loaded although the features are cached")

    monkeypatch.setattr(ev, "load_eval_backbone", no_backbone)
    again = ev.main(["knn", "--checkpoint", str(checkpoint), *KNN_FLAGS, "--ks", "5", "10", "--cache-dir", str(cache)])
    assert again == first
    probe = ev.main(["linear", "--checkpoint", str(checkpoint), *KNN_FLAGS, "--epochs", "3",
                     "--cache-dir", str(cache)])
    # The CLI's probe is linear_probe (tested above) on the cached class + mean patch tokens, with its settings.
    defaults = ev.LinearArgs()
    expected = probes.linear_probe(
        torch.cat([train["cls"], train["patch_mean"]], dim=1), train["labels"],
        torch.cat([val["cls"], val["patch_mean"]], dim=1), val["labels"], n_classes=4, lrs=defaults.lrs,
        weight_decays=defaults.weight_decays, epochs=3, batch_size=defaults.probe_batch_size,
        holdout_fraction=defaults.holdout_fraction, seed=defaults.seed)
    assert probe == expected and len(probe["grid"]) == 18


def test_cache_key_follows_checkpoint_data_and_resolution(checkpoint, tmp_path, tiny_backbone):
    train, val = probes.procedural_splits(10, 5, 32, 4, seed=0)
    key = probes.checkpoint_fingerprint(checkpoint)
    base = probes.feature_cache_file(tmp_path, key, train, 32, 1.0)
    assert base == probes.feature_cache_file(tmp_path, key, train, 32, 1.0)
    assert base != probes.feature_cache_file(tmp_path, key, val, 32, 1.0)
    assert base != probes.feature_cache_file(tmp_path, key, train, 48, 1.0)
    copy = tmp_path / "copy.pth"
    copy.write_bytes(checkpoint.read_bytes())
    os.utime(copy, ns=(1, 1))
    stamp = probes.checkpoint_fingerprint(copy)
    os.utime(copy, ns=(2, 2))  # rewritten: another modification time
    assert stamp != probes.checkpoint_fingerprint(copy) and key != stamp
    weights = tiny_backbone.state_dict()
    changed = {**weights, "cls_token": weights["cls_token"] + 1}
    # A state dict is identified by its contents: copies of the tensors, in another key order, give the same key.
    copied = {name: value.clone() for name, value in reversed(list(weights.items()))}
    assert probes.checkpoint_fingerprint(weights) == probes.checkpoint_fingerprint(copied)
    assert probes.checkpoint_fingerprint(weights) != probes.checkpoint_fingerprint(changed)
    widened = {**weights, "cls_token": weights["cls_token"].double()}  # the same values in another dtype
    assert probes.checkpoint_fingerprint(weights) != probes.checkpoint_fingerprint(widened)


def test_every_checkpoint_format_loads(tiny_backbone, checkpoint, tmp_path):
    images = torch.randn(2, 3, 32, 48)

    def features(backbone):
        cls, patches = dense.forward_tokens(backbone, images)
        return torch.cat([cls[:, None], patches], dim=1)

    expected = features(tiny_backbone)
    torch.testing.assert_close(features(probes.load_eval_backbone(checkpoint)), expected)
    # A train.py checkpoint: the teacher's backbone (not the student's, not the heads).
    weights = tiny_backbone.state_dict()
    train_checkpoint = tmp_path / "checkpoint_00000010.pth"
    torch.save({"format": "dinov3-train-checkpoint", "step": 10,
                "teacher": {**{f"backbone.{k}": v for k, v in weights.items()},
                            "dino_head.last_layer.weight": torch.zeros(8, 4)},
                "student": {f"backbone.{k}": torch.zeros_like(v) for k, v in weights.items()}}, train_checkpoint)
    torch.testing.assert_close(features(probes.load_eval_backbone(train_checkpoint)), expected)
    # Hugging Face DINOv3ViTModel weights: a state dict file and a save_pretrained folder (model.safetensors).
    transformers = pytest.importorskip("transformers")
    config = transformers.DINOv3ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=128, num_register_tokens=4, rope_theta=100.0,
                                          patch_size=16, layerscale_value=1.0)
    torch.manual_seed(0)
    hf = transformers.DINOv3ViTModel(config).eval()
    reference = features(load_backbone(hf.state_dict()))
    torch.save(hf.state_dict(), tmp_path / "hf.pth")
    hf.save_pretrained(tmp_path / "hf_folder")
    torch.testing.assert_close(features(probes.load_eval_backbone(tmp_path / "hf.pth")), reference)
    torch.testing.assert_close(features(probes.load_eval_backbone(tmp_path / "hf_folder")), reference)
    torch.save({"format": "dinov3-train-checkpoint", "teacher": {}}, tmp_path / "headless.pth")
    with pytest.raises(CheckpointError, match="without teacher backbone weights"):
        probes.load_eval_backbone(tmp_path / "headless.pth")


def write_photo(path: Path, width: int, height: int) -> Path:
    """A picture with structure: a bright disk on a color gradient, plus noise."""
    y, x = np.mgrid[0:height, 0:width]
    disk = ((x - width * 0.6) ** 2 + (y - height * 0.4) ** 2 < (0.3 * min(width, height)) ** 2)[..., None]
    gradient = np.stack([x / width, y / height, 1 - x / width], axis=-1)
    pixels = np.where(disk, 0.9, gradient * 0.6) + 0.05 * np.random.default_rng(0).standard_normal((height, width, 3))
    Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


def test_pca_and_cosine_pngs_have_the_expected_size_and_content(checkpoint, tmp_path):
    photo = write_photo(tmp_path / "photo.png", 50, 40)
    # Native size: 50x40 is center-cropped to 48x32 (3x2 patches); the figure is image | map.
    (pca_png,) = ev.main(["pca", "--checkpoint", str(checkpoint), str(photo), "--size", "None", "--device", "cpu"])
    assert pca_png == tmp_path / "photo_pca.png"
    pca = np.asarray(Image.open(pca_png))
    assert pca.shape == (32, 96, 3)
    assert pca[:, 48:].reshape(-1, 3).std(axis=0).max() > 10  # the feature map is not one color
    cosine_png, sheet = ev.main(["cosine-map", "--checkpoint", str(checkpoint), str(photo), "--size", "64",
                                 "--patch", "1", "2", "--output-dir", str(tmp_path / "maps"),
                                 "--sheet", str(tmp_path / "sheet.png"), "--device", "cpu"])
    assert cosine_png == tmp_path / "maps" / "photo_cosine.png"
    cosine = np.asarray(Image.open(cosine_png))
    assert cosine.shape == (64, 160, 3)  # shorter side 40 -> 64, longer 50 -> 80: 4x5 patches
    heat = cosine[:, 80:]
    assert len(np.unique(heat.reshape(-1, 3), axis=0)) > 3
    # Inside the outlined patch (row 1, col 2) the map shows its similarity to itself, the maximum: yellow.
    np.testing.assert_array_equal(heat[16 + 4 : 32 - 4, 32 + 4 : 48 - 4], np.broadcast_to(figures.colormap(1.0), (8, 8, 3)))
    assert tuple(heat[16, 40]) == figures.MARKER_COLOR and tuple(cosine[16, 40]) == figures.MARKER_COLOR
    np.testing.assert_array_equal(np.asarray(Image.open(sheet)), cosine)


def test_foreground_threshold_blackens_the_background():
    grid = (6, 6)
    inside = torch.zeros(6, 6, dtype=torch.bool)
    inside[1:5, 1:5] = True
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(36, 16, generator=generator) * 0.1
    features[inside.flatten(), 0] += 3.0  # the object's patches differ along one direction
    rgb = figures.pca_rgb(features, grid, foreground_threshold=0.5)
    assert rgb.shape == (6, 6, 3)
    assert (rgb[~inside.numpy()] == 0).all() and (rgb[inside.numpy()].max(axis=-1) > 0).all()
    # The same features with the sign of the object flipped give the same mask: the orientation is not arbitrary.
    assert ((figures.pca_rgb(-features, grid, 0.5) == 0).all(axis=-1) == ~inside.numpy()).all()
    assert figures.pca_rgb(features, grid).reshape(-1, 3).std(axis=0).min() > 0


def test_colormap_runs_from_dark_purple_to_yellow():
    assert tuple(figures.colormap(0.0)) == (68, 1, 84) and tuple(figures.colormap(1.0)) == (253, 231, 37)
    luminance = figures.colormap(np.linspace(0, 1, 50)).astype(float) @ np.array([0.299, 0.587, 0.114])
    assert (np.diff(luminance) > 0).all()


def test_bad_inputs_give_clear_errors(checkpoint, tmp_path):
    def knn(data: Path):
        return ev.main(["knn", "--checkpoint", str(checkpoint), "--data", str(data), "--num-workers", "0",
                        "--device", "cpu", "--cache-dir", str(tmp_path / "cache")])

    only_train = tmp_path / "only_train"
    (only_train / "train" / "cat").mkdir(parents=True)
    write_photo(only_train / "train" / "cat" / "a.png", 32, 32)
    with pytest.raises(FileNotFoundError, match="has no val/ split"):
        knn(only_train)
    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    (empty / "val" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        knn(empty)
    unlabeled = tmp_path / "unlabeled"
    for split in ("train", "val"):
        (unlabeled / split).mkdir(parents=True)
        write_photo(unlabeled / split / "a.png", 32, 32)
    with pytest.raises(ValueError, match="outside class sub-folders"):
        knn(unlabeled)
    new_class = tmp_path / "new_class"
    for split, name in (("train", "cat"), ("val", "dog")):
        (new_class / split / name).mkdir(parents=True)
        write_photo(new_class / split / name / "a.png", 32, 32)
    with pytest.raises(ValueError, match=r"classes \['dog'\].*have no images in"):
        knn(new_class)
    with pytest.raises(ValueError, match="make run"):
        ev.main(["knn", "--data", "procedural"])
    with pytest.raises(ValueError, match="--data procedural"):
        ev.main(["knn", "--checkpoint", str(checkpoint)])
    tiny = write_photo(tmp_path / "tiny.png", 8, 12)
    with pytest.raises(ValueError, match=r"8x12 px, smaller than one 16x16 patch"):
        ev.main(["pca", "--checkpoint", str(checkpoint), str(tiny), "--device", "cpu"])
    with pytest.raises(FileNotFoundError, match="not found: .*missing.png"):
        ev.main(["pca", "--checkpoint", str(checkpoint), str(tmp_path / "missing.png")])
    photo = write_photo(tmp_path / "photo.png", 64, 48)
    with pytest.raises(ValueError, match=r"patch \(3, 0\) is outside the 3x4 patch grid"):
        ev.main(["cosine-map", "--checkpoint", str(checkpoint), str(photo), "--size", "None", "--patch", "3", "0",
                 "--device", "cpu"])


@pytest.mark.slow
def test_distributed_knn_equals_single_process(checkpoint, tmp_path):
    """torchrun, 2 processes (gloo): each extracts half the images, the all-gathered features give the same k-NN.

    About 12 s on an idle 2-core CPU (two more interpreters start up), so it runs with the slow tests."""
    flags = ["knn", "--checkpoint", str(checkpoint), *KNN_FLAGS, "--procedural-train", "21", "--ks", "3"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "eval.py"), *flags, "--cache-dir", str(tmp_path / "distributed")]
    result = subprocess.run(command, cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    single = ev.main([*flags, "--cache-dir", str(tmp_path / "single")])
    assert f"top-1 {100 * single['top1_k3']:6.2f}%" in result.stdout
    assert result.stdout.count("top-1") == 1  # only rank 0 prints
    distributed_files = sorted((tmp_path / "distributed").glob("*.pt"))
    single_files = sorted((tmp_path / "single").glob("*.pt"))
    assert [f.name for f in distributed_files] == [f.name for f in single_files]
    for a, b in zip(distributed_files, single_files):
        saved_a, saved_b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        assert torch.equal(saved_a["labels"], saved_b["labels"])
        torch.testing.assert_close(saved_a["cls"], saved_b["cls"])
