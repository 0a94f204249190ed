"""Datasets, unusable-image handling, and the loader: determinism across workers and exact resume."""

from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.augment import AugmentConfig, CropSizes, CropSizeSchedule, MultiCropAugmentation
from data.datasets import (
    FileListDataset,
    ImageFolderDataset,
    MultiCropDataset,
    ProceduralDataset,
    SampleImagesDataset,
    build_dataset,
    build_loader,
)

SMALL_SIZES = CropSizes(32, 16)
SMALL_AUGMENT = MultiCropAugmentation(AugmentConfig(n_local_crops=2))


# Run like a DataLoader worker (one thread): tiny ops stall on OpenMP barriers when the cores are busy.
pytestmark = pytest.mark.usefixtures("single_thread")


def save_image(path: Path, size: tuple[int, int] = (48, 40), value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(value).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def add_unusable_images(folder: Path) -> list[Path]:
    """A truncated JPEG, a zero-byte file, text named .png, an image smaller than a patch, an oversized image."""
    truncated = save_image(folder / "truncated.jpg", (64, 64), 1)
    truncated.write_bytes(truncated.read_bytes()[:300])
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    text = folder / "notes.png"
    text.write_text("not an image")
    tiny = save_image(folder / "tiny.png", (8, 8))
    huge = save_image(folder / "huge.png", (400, 400))  # a bomb once PIL's pixel limit is lowered below
    return [truncated, empty, text, tiny, huge]


@pytest.fixture
def low_pixel_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)


def test_image_folder_labels_from_class_subfolders(tmp_path):
    save_image(tmp_path / "dog" / "a.JPG")
    save_image(tmp_path / "dog" / "deeper" / "b.png")
    save_image(tmp_path / "cat" / "c.webp")
    save_image(tmp_path / "cat" / "d.tiff")
    (tmp_path / "cat" / "readme.txt").write_text("ignored")
    (tmp_path / "cat" / ".hidden.jpg").write_bytes(b"")
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.classes == ["cat", "dog"]
    expected = [("c.webp", 0), ("d.tiff", 0), ("a.JPG", 1), ("b.png", 1)]
    assert [(p.name, label) for p, label in dataset.samples] == expected
    image, label = dataset[2]
    assert image.mode == "RGB" and image.size == (48, 40) and label == 1


def test_image_folder_without_classes_and_build_dataset(tmp_path):
    save_image(tmp_path / "x.png")
    save_image(tmp_path / "sub" / "y.jpeg")
    dataset = build_dataset(str(tmp_path))
    assert isinstance(dataset, ImageFolderDataset) and dataset.classes == []
    assert [label for _, label in dataset.samples] == [-1, -1]


def test_file_list_with_labels_and_relative_paths(tmp_path):
    save_image(tmp_path / "images" / "one.png")
    absolute = save_image(tmp_path / "elsewhere" / "two file.png")
    list_file = tmp_path / "lists" / "train.txt"
    list_file.parent.mkdir()
    list_file.write_text(f"# a comment\n../images/one.png 3\n\n{absolute}\n")
    dataset = build_dataset(list_file)
    assert isinstance(dataset, FileListDataset)
    assert [label for _, label in dataset.samples] == [3, -1]
    assert dataset[0][0].size == (48, 40) and dataset[1][0].size == (48, 40)


def test_missing_or_empty_dataset_stops_with_a_clear_message(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        build_dataset(missing)
    with pytest.raises(FileNotFoundError, match="list.txt.*does not exist"):
        build_dataset(tmp_path / "list.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found in folder .*empty"):
        build_dataset(tmp_path / "empty")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no images found in image list .*empty.txt"):
        build_dataset(tmp_path / "empty.txt")


def test_procedural_pretraining_images_are_not_the_labeled_evaluation_images():
    from probes import procedural_splits

    pretrain = build_dataset("procedural")
    assert isinstance(pretrain, ProceduralDataset) and len(pretrain) >= 10_000
    labeled_train, labeled_val = procedural_splits(1000, 500, pretrain.size, 10, seed=0)
    for index in (0, 1, 1000, 1499):  # same index, other seed: other pixels
        pretrain_pixels = np.asarray(pretrain[index][0])
        for split in (labeled_train, labeled_val):
            assert not np.array_equal(pretrain_pixels, np.asarray(split.images[index][0]))


def test_bundled_sample_photos_are_the_default():
    dataset = build_dataset(None)
    assert isinstance(dataset, SampleImagesDataset) and len(dataset) > 10
    sizes = set()
    for i in range(len(dataset)):
        image, label = dataset[i]
        assert image.mode == "RGB" and min(image.size) >= 256 and label == -1
        sizes.add(image.size)
    assert len(sizes) > 5


def test_procedural_dataset_is_deterministic_and_labeled():
    a, b = ProceduralDataset(40, 32, 10, seed=0), ProceduralDataset(40, 32, 10, seed=0)
    assert np.array_equal(np.asarray(a[7][0]), np.asarray(b[7][0])) and a[7][1] == 7
    assert not np.array_equal(np.asarray(a[7][0]), np.asarray(ProceduralDataset(40, 32, 10, seed=1)[7][0]))
    assert [a[i][1] for i in range(20)] == [i % 10 for i in range(20)]
    assert a[3][0].size == (32, 32) and a[3][0].mode == "RGB"
    with pytest.raises(ValueError, match="n_classes"):
        ProceduralDataset(10, 32, 11)


def test_procedural_classes_are_not_given_away_by_mean_color():
    dataset = ProceduralDataset(400, 32, 10, seed=0)
    colors = np.stack([np.asarray(dataset[i][0], dtype=np.float32).mean((0, 1)) for i in range(400)])
    labels = np.arange(400) % 10
    centroids = np.stack([colors[:200][labels[:200] == c].mean(0) for c in range(10)])
    predicted = ((colors[200:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == labels[200:]).mean() < 0.25  # chance is 0.1


def test_unusable_images_are_skipped_logged_once_and_counted(tmp_path, caplog, low_pixel_limit):
    for i in range(3):
        save_image(tmp_path / f"good{i}.png", value=i)
    bad = add_unusable_images(tmp_path)
    images = ImageFolderDataset(tmp_path)
    dataset = MultiCropDataset(images, SMALL_AUGMENT, seed=0, sizes=SMALL_SIZES)
    bad_indices = [i for i, (path, _) in enumerate(images.samples) if path in bad]
    assert len(bad_indices) == 5
    samples = []
    with caplog.at_level(logging.WARNING, logger="data.datasets"):
        for position, index in enumerate(bad_indices * 2):
            sample = dataset[(index, position)]
            assert sample["n_skipped"] >= 1 and sample["index"] not in bad_indices
            assert sample["global_crops"].shape == (2, 3, 32, 32) and torch.isfinite(sample["global_crops"]).all()
            samples.append(sample)
    logged = [record.getMessage() for record in caplog.records]
    assert len(logged) == 5 and all(any(path.name in message for message in logged) for path in bad)
    # The replacement comes from (seed, position) alone: another dataset object, after the global generators
    # moved on, picks the same image and renders the same crops.
    torch.manual_seed(123)
    np.random.seed(123)
    fresh = MultiCropDataset(images, SMALL_AUGMENT, seed=0, sizes=SMALL_SIZES)
    for position in (0, 7):
        again = fresh[(bad_indices[position % 5], position)]
        assert (again["index"], again["n_skipped"]) == (samples[position]["index"], samples[position]["n_skipped"])
        assert torch.equal(again["global_crops"], samples[position]["global_crops"])


def test_a_dataset_of_only_unusable_images_fails_clearly(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"")
    dataset = MultiCropDataset(ImageFolderDataset(tmp_path), SMALL_AUGMENT, max_consecutive_skips=5)
    with pytest.raises(RuntimeError, match="6 images in a row could not be used"):
        dataset[(0, 0)]


def take_batches(loader, n: int) -> list[dict]:
    return list(islice(iter(loader), n))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def small_loader(images, sizes=SMALL_SIZES, **kwargs):
    return build_loader(images, AugmentConfig(n_local_crops=2), sizes, batch_size=4, seed=3, **kwargs)


def test_loader_batches_do_not_depend_on_worker_count_and_resume_exactly(tmp_path):
    images = ProceduralDataset(10, 40, 5)
    reference = take_batches(small_loader(images, num_workers=0), 5)
    batch = reference[0]
    assert batch["global_crops"].shape == (8, 3, 32, 32) and batch["local_crops"].shape == (8, 3, 16, 16)
    assert batch["masks"].shape == (8, 4)
    assert batch["positions"].tolist() == [0, 1, 2, 3]

    assert_same_batches(take_batches(small_loader(images, num_workers=2), 5), reference)
    assert_same_batches(take_batches(small_loader(images, num_workers=0, start_step=2), 3), reference[2:5])

    # Resumed with workers (which prefetch ahead of the step): still the batches of steps 3 and 4.
    assert_same_batches(take_batches(small_loader(images, num_workers=2, start_step=3), 2), reference[3:5])


def test_unusable_image_counts_reach_the_training_process(tmp_path):
    for i in range(6):
        save_image(tmp_path / f"good{i}.png", value=i)
    add_unusable_images(tmp_path)  # 4 unusable: the oversized one is fine at PIL's default pixel limit
    images = ImageFolderDataset(tmp_path)
    counts = []
    for workers in (0, 2):
        # 3 batches of 4: the whole first epoch of 11 images, so every unusable one comes up.
        batches = take_batches(small_loader(images, num_workers=workers), 3)
        counts.append(sum(int(batch["n_skipped"]) for batch in batches))
    assert counts[0] == counts[1] >= 4


def test_per_step_crop_sizes_agree_across_ranks():
    schedule = CropSizeSchedule((CropSizes(32, 16), CropSizes(48, 32)), (0.5, 0.5), seed=0)
    images = ProceduralDataset(16, 64, 4)
    per_rank = []
    for rank in range(2):
        batches = take_batches(small_loader(images, schedule, rank=rank, world_size=2), 8)
        per_rank.append([(b["global_crops"].shape[-1], b["local_crops"].shape[-1]) for b in batches])
    assert per_rank[0] == per_rank[1]
    assert per_rank[0] == [(schedule(step).global_size, schedule(step).local_size) for step in range(8)]
    assert len(set(per_rank[0])) == 2
