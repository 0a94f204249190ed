"""eval.py segment and track end to end on generated data and on the folder formats (with a broken file), with
their baselines, and the pieces they are built from: pixel sampling, the SGD probe, the initialization baseline."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import probes
from data.dense_sets import generated_video, save_mask
from dense import predict_masks, region_iou, upsample_labels
from models.checkpoint import save_official
from models.vit import LayerScale, build_vit
from tests.helpers import blocky_masks, write_davis_folder, write_segmentation_folder

CPU = ["--device", "cpu", "--batch-size", "8"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "backbone.pth"
    save_official(build_vit("vit_tiny", layerscale_init=1.0, attn_impl="sdpa"), path)
    return path


def test_sampled_pixel_features_give_the_upsampled_logits_of_a_linear_layer():
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 5, 4, 6, generator=generator)
    masks = torch.randint(0, 3, (3, 32, 48), generator=generator, dtype=torch.uint8)
    masks[1, :, :20] = 255
    weight, bias = torch.randn(5, 3, generator=generator), torch.randn(3, generator=generator)
    features, labels = ev.sample_pixels(maps, masks, 50, torch.Generator().manual_seed(1))
    assert features.shape == (150, 5) and (labels != 255).all()
    logits = torch.nn.functional.interpolate(torch.einsum("nchw,ck->nkhw", maps, weight) + bias[:, None, None],
                                             size=(32, 48), mode="bilinear", align_corners=False)
    # Find each sampled pixel by its features: the layer applied to them equals the upsampled logits there.
    sampled_logits = features @ weight + bias
    flat = logits.permute(0, 2, 3, 1).reshape(3, -1, 3)
    for image in range(3):
        rows = sampled_logits[image * 50 : (image + 1) * 50]
        distance = (rows[:, None, :] - flat[image][None]).abs().amax(-1)
        assert distance.min(dim=1).values.max() < 1e-4
    assert predict_masks(maps, weight, bias, (32, 48)).equal(logits.argmax(dim=1))


def test_segmentation_probe_learns_a_separable_task_and_reports_chance_on_noise():
    n_classes, grid, patch = 3, 4, 8
    train_masks, val_masks = blocky_masks(20, grid, patch, n_classes, 0), blocky_masks(6, grid, patch, n_classes, 1)

    def code(masks):
        return torch.nn.functional.one_hot(masks[:, ::patch, ::patch].long(), n_classes).float().permute(0, 3, 1, 2)

    good = ev.segmentation_probe(code(train_masks), train_masks, code(val_masks), val_masks, n_classes,
                                 lrs=(0.1,), weight_decays=(0.0,), epochs=5, pixels_per_image=64)
    assert good["miou"] > 0.85 and good["pixel_accuracy"] > 0.9  # not 1: upsampling rounds the blocks' corners
    noise = ev.segmentation_probe(torch.randn(20, 3, grid, grid), train_masks, torch.randn(6, 3, grid, grid),
                                  val_masks, n_classes, epochs=5, pixels_per_image=64)
    assert noise["pixel_accuracy"] < 0.6


def test_initialization_baseline_is_the_same_architecture_started_as_the_run_was(tmp_path, checkpoint):
    backbone = probes.load_eval_backbone(checkpoint)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model": {"layerscale_init": 0.5}}))
    run_checkpoint = folder / "teacher_backbone.pth"
    run_checkpoint.write_bytes(checkpoint.read_bytes())
    init = ev.init_baseline(backbone, run_checkpoint)
    gammas = [m.gamma for m in init.modules() if isinstance(m, LayerScale)]
    assert gammas and all(torch.equal(g, torch.full_like(g, 0.5)) for g in gammas)
    assert not torch.equal(init.patch_embed.proj.weight, backbone.patch_embed.proj.weight)
    again = ev.init_baseline(backbone, run_checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(init.state_dict().values(), again.state_dict().values()))
    assert ev.run_layerscale_init(checkpoint) is None  # no config.json: the architecture's default


def check_segment_result(result: dict) -> None:
    for name in ("checkpoint", "same net at init", "raw pixels"):
        for key in ("miou", "pixel_accuracy", "ridge_miou", "ridge_pixel_accuracy"):
            assert 0 <= result[name][key] <= 1, (name, key)


def test_segment_runs_on_generated_scenes_with_baselines_and_a_figure(tmp_path, checkpoint, capsys):
    figure = tmp_path / "segment.png"
    result = ev.main(["segment", "--checkpoint", str(checkpoint), "--n-train", "8", "--n-val", "3", "--size", "32",
                      "--epochs", "2", "--knn-images", "20", "--figure", str(figure), "--figure-images", "2", *CPU])
    check_segment_result(result)
    assert set(result["knn"]) == {"checkpoint", "same net at init"} and result["n_classes"] == 11
    assert np.asarray(Image.open(figure)).shape == (2 * 32, 5 * 32, 3)  # image | truth | 3 predictions
    printed = capsys.readouterr().out
    assert "same net at init" in printed and "raw pixels" in printed and "class-token k-NN" in printed


def test_segment_runs_on_a_folder_and_counts_a_broken_image(tmp_path, checkpoint):
    root = write_segmentation_folder(tmp_path / "DATA", n_train=5, n_val=2)
    (root / "val" / "images" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.new("L", (48, 48)).save(root / "val" / "masks" / "zz_broken.png")
    result = ev.run_segment(ev.SegmentArgs(checkpoint=str(checkpoint), data=str(root), size=32, epochs=2,
                                           knn_images=0, figure=str(tmp_path / "f.png"), device="cpu"))
    check_segment_result(result)
    assert result["images_skipped"] == 1 and result["knn"] == {}
    (root / "train" / "masks" / "scene000.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 5 images .* have no mask"):
        ev.run_segment(ev.SegmentArgs(checkpoint=str(checkpoint), data=str(root), size=32, device="cpu"))


def check_track_result(result: dict, temperatures=(0.1, 0.2)) -> None:
    for name in ("checkpoint", "same net at init", "raw pixels"):
        for temperature in temperatures:
            scores = result[name][temperature]
            assert 0 <= scores["J"] <= 1 and 0 <= scores["F"] <= 1
            assert scores["J&F"] == pytest.approx((scores["J"] + scores["F"]) / 2)


def test_track_runs_on_generated_videos_and_writes_the_strip(tmp_path, checkpoint, capsys):
    strip = tmp_path / "track.png"
    result = ev.main(["track", "--checkpoint", str(checkpoint), "--n-videos", "2", "--n-frames", "5", "--size", "48",
                      "--knn-images", "0", "--strip", str(strip), "--strip-frames", "3", *CPU])
    check_track_result(result)
    assert result["videos"] == 2 and result["objects"] >= 4
    assert np.asarray(Image.open(strip)).shape == (2 * 2 * 48, 3 * 48, 3)  # per video: annotation, propagation
    assert "J&F" in capsys.readouterr().out


def test_track_runs_on_a_davis_folder_and_counts_a_broken_frame(tmp_path, checkpoint):
    root = write_davis_folder(tmp_path / "DAVIS", n_videos=2, n_frames=5, size=48)
    (root / "JPEGImages" / "480p" / "video0" / "00002.jpg").write_bytes(b"not a jpeg")
    result = ev.run_track(ev.TrackArgs(checkpoint=str(checkpoint), data=str(root), size=32, temperatures=(0.2,),
                                       knn_images=0, strip=str(tmp_path / "t.png"), device="cpu"))
    check_track_result(result, (0.2,))
    assert result["frames_skipped"] == 1 and result["videos"] == 2
    with pytest.raises(FileNotFoundError, match="JPEGImages/480p does not exist"):
        ev.run_track(ev.TrackArgs(checkpoint=str(checkpoint), data=str(tmp_path), device="cpu"))


def test_track_on_a_still_video_gives_back_the_first_mask(tmp_path, checkpoint):
    # Every frame is frame 0: each patch finds itself in the context, so propagation can only lose what the patch grid
    # loses. The bound: the first mask taken to the grid and back (J of that round trip, about 0.46 here).
    frames, masks = generated_video(0, 1, 128)
    root = tmp_path / "DAVIS"
    for t in range(4):
        (root / "JPEGImages" / "480p" / "still").mkdir(parents=True, exist_ok=True)
        frames[0].save(root / "JPEGImages" / "480p" / "still" / f"{t:05d}.png")
        save_mask(masks[0], root / "Annotations" / "480p" / "still" / f"{t:05d}.png")
    result = ev.run_track(ev.TrackArgs(checkpoint=str(checkpoint), data=str(root), size=128, knn_images=0,
                                       strip=str(tmp_path / "t.png"), device="cpu"))
    mask = torch.from_numpy(masks[0])
    ids = sorted(set(mask.unique().tolist()) - {0})
    round_trip = torch.tensor([0, *ids])[upsample_labels(ev.first_frame_labels(mask, ids, (8, 8))[None], (128, 128))][0]
    bound = float(np.mean([region_iou(round_trip == i, mask == i).item() for i in ids]))
    assert bound > 0.3
    for name in ("checkpoint", "same net at init", "raw pixels"):
        assert result[name][0.1]["J"] == pytest.approx(bound, abs=0.05), name
