"""data/dense_sets.py: generated scenes and videos, and the segmentation / DAVIS folder readers on small generated
folders, broken files included (skipped and counted) and bad layouts (clear errors before any decoding)."""

import numpy as np
import pytest
from PIL import Image

from data.dense_sets import (
    IGNORE_INDEX,
    SCENE_CLASSES,
    DavisFolder,
    GeneratedScenes,
    GeneratedVideos,
    SegmentationFolder,
    generated_scene,
    generated_video,
    save_mask,
    segmentation_arrays,
)
from tests.helpers import write_davis_folder, write_segmentation_folder


def test_generated_scenes_are_deterministic_and_labeled_per_pixel():
    image, mask = generated_scene(3, size=64, seed=0)
    again_image, again_mask = generated_scene(3, size=64, seed=0)
    assert np.array_equal(np.asarray(image), np.asarray(again_image)) and np.array_equal(mask, again_mask)
    assert image.size == (64, 64) and mask.shape == (64, 64) and mask.dtype == np.uint8
    labels = set(np.unique(np.concatenate([generated_scene(i, 64)[1].ravel() for i in range(20)])).tolist())
    assert 0 in labels and IGNORE_INDEX in labels  # background, and the antialiased rims
    assert labels - {IGNORE_INDEX} <= set(range(len(SCENE_CLASSES)))
    assert len(labels - {0, IGNORE_INDEX}) >= 8  # most of the 10 pattern families appear in 20 scenes


def test_the_color_of_an_object_does_not_give_its_class():
    # Nearest class-mean color of each labeled object pixel, fit on 60 scenes and tried on 30 others: close to chance.
    def pixels_and_labels(first, n):
        colors, labels = [], []
        for index in range(first, first + n):
            image, mask = generated_scene(index, 48)
            objects = (mask > 0) & (mask != IGNORE_INDEX)
            colors.append(np.asarray(image, dtype=np.float32)[objects])
            labels.append(mask[objects])
        return np.concatenate(colors), np.concatenate(labels)

    colors, labels = pixels_and_labels(0, 60)
    means = np.stack([colors[labels == c].mean(axis=0) for c in range(1, len(SCENE_CLASSES))])
    test_colors, test_labels = pixels_and_labels(60, 30)
    guess = 1 + np.argmin(((test_colors[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (guess == test_labels).mean() < 0.25  # 10 object classes: chance is about 0.1


def test_generated_videos_move_and_keep_their_objects():
    frames, masks = generated_video(1, n_frames=6, size=64)
    assert len(frames) == len(masks) == 6 and frames[0].size == (64, 64)
    ids = sorted(set(np.unique(masks[0]).tolist()) - {0})
    assert ids == list(range(1, len(ids) + 1)) and 2 <= len(ids) <= 3
    assert any(not np.array_equal(masks[0] == i, masks[-1] == i) for i in ids)
    again = generated_video(1, n_frames=6, size=64)
    assert np.array_equal(np.asarray(frames[3]), np.asarray(again[0][3]))
    # Objects pass in front of each other: in some video an object loses a large part of its area for a while.
    def hidden_fraction(masks, i):
        areas = np.array([(m == i).sum() for m in masks], dtype=np.float64)
        return 1 - areas.min() / areas.max()

    assert max(hidden_fraction(generated_video(v, 8, 64)[1], i) for v in range(6) for i in (1, 2)) > 0.5


def test_segmentation_folder_reads_pairs_and_skips_a_broken_image(tmp_path):
    root = write_segmentation_folder(tmp_path / "DATA")
    (root / "train" / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    save_mask(np.zeros((48, 48), np.uint8), root / "train" / "masks" / "broken.png")
    train = SegmentationFolder(root, "train")
    assert len(train) == 7
    images, masks, skipped = segmentation_arrays(train, 32)
    assert skipped == 1 and images.shape == (6, 3, 32, 32) and masks.shape == (6, 32, 32)
    # Masks are resized nearest-neighbor: every index is one of the originals', none blended.
    originals = set(np.unique([generated_scene(i, 48)[1] for i in range(6)]).tolist())
    assert set(np.unique(masks.numpy()).tolist()) <= originals


def test_segmentation_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*--data generated"):
        SegmentationFolder(tmp_path / "missing", "train")
    root = write_segmentation_folder(tmp_path / "DATA", n_train=2, n_val=1)
    with pytest.raises(FileNotFoundError, match="test/images does not exist"):
        SegmentationFolder(root, "test")
    (root / "train" / "masks" / "scene001.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 2 images .* have no mask.*scene001.jpg"):
        SegmentationFolder(root, "train")
    save_mask(np.zeros((40, 48), np.uint8), root / "train" / "masks" / "scene001.png")
    with pytest.raises(ValueError, match="do not have the size of their image.*48x40"):
        SegmentationFolder(root, "train")
    Image.new("RGB", (48, 48)).save(root / "train" / "masks" / "scene001.png")
    with pytest.raises(ValueError, match="not single-channel PNGs of indices.*mode RGB"):
        SegmentationFolder(root, "train")


def test_generated_scene_sets_are_disjoint_slices():
    train, val = GeneratedScenes(4, 32), GeneratedScenes(2, 32, first=4)
    assert np.array_equal(val.load(0)[1], generated_scene(4, 32)[1])
    assert not np.array_equal(train.load(0)[1], val.load(0)[1])
    with pytest.raises(ValueError, match="n >= 1"):
        GeneratedScenes(0)


def test_davis_folder_reads_videos_and_skips_a_broken_frame(tmp_path):
    root = write_davis_folder(tmp_path / "DAVIS")
    (root / "JPEGImages" / "480p" / "video1" / "00002.jpg").write_bytes(b"garbage")
    (root / "Annotations" / "480p" / "video0" / "00003.png").unlink()  # an unannotated frame: kept, not scored
    videos = DavisFolder(root)
    assert videos.names == ["video0", "video1"]
    first = videos.load(0)
    assert len(first.frames) == 5 and first.masks[3] is None and first.n_skipped == 0
    assert np.array_equal(first.masks[0], generated_video(0, 5, 48)[1][0])
    second = videos.load(1)
    assert len(second.frames) == 4 and second.n_skipped == 1
    assert DavisFolder(root, videos=("video1",)).names == ["video1"]


def test_davis_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*DAVIS-2017 layout"):
        DavisFolder(tmp_path / "missing")
    (tmp_path / "empty" / "JPEGImages" / "480p").mkdir(parents=True)
    (tmp_path / "empty" / "Annotations" / "480p").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no videos found"):
        DavisFolder(tmp_path / "empty")
    root = write_davis_folder(tmp_path / "DAVIS", n_videos=1, n_frames=3)
    with pytest.raises(FileNotFoundError, match=r"video\(s\) \['nope'\] not found"):
        DavisFolder(root, videos=("nope",))
    with pytest.raises(FileNotFoundError, match="JPEGImages/1080p does not exist"):
        DavisFolder(root, resolution="1080p")
    save_mask(np.zeros((32, 48), np.uint8), root / "Annotations" / "480p" / "video0" / "00000.png")
    with pytest.raises(ValueError, match="do not have the size of their image"):
        DavisFolder(root)
    (root / "Annotations" / "480p" / "video0" / "00000.png").unlink()
    with pytest.raises(FileNotFoundError, match="no annotation of their first frame"):
        DavisFolder(root)


def test_generated_videos_dataset_names_and_loads():
    videos = GeneratedVideos(2, n_frames=3, size=32)
    video = videos.load(1)
    assert videos.names == ["generated_000", "generated_001"] and video.name == "generated_001"
    assert len(video.frames) == 3 and all(m is not None for m in video.masks)
