"""Tar shards (data/shards.py): written from a file list, streamed split over ranks and workers, shuffled, bad
members skipped and counted, resumed per shard, and trained on by train.py."""

import tarfile
from pathlib import Path

import pytest
import torch

from data.augment import AugmentConfig, CropSizes
from data.datasets import FileListDataset, build_dataset, concept_image
from data.shards import ShardImages, ShardProgress, build_shard_loader, stream_shard, write_shards

pytestmark = pytest.mark.usefixtures("single_thread")

N_IMAGES, PER_SHARD = 40, 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """8 shards of 5 images (labels = image number), written from a file list."""
    folder = tmp_path_factory.mktemp("shards")
    lines = []
    for i in range(N_IMAGES):
        concept_image(i, i % 50, 32, 0).save(folder / f"{i:03d}.png")
        lines.append(f"{i:03d}.png {i}\n")
    (folder / "list.txt").write_text("".join(lines))
    paths = write_shards(FileListDataset(folder / "list.txt"), folder / "tars", PER_SHARD)
    assert len(paths) == N_IMAGES // PER_SHARD
    return folder / "tars"


def loader(pattern: str, **kwargs):
    settings = dict(batch_size=2, seed=3, patch_size=16, shuffle_buffer=3)
    settings.update(kwargs)
    return build_shard_loader(ShardImages(pattern), AugmentConfig(n_local_crops=1), CropSizes(32, 16), **settings)


def take(data_loader, batches: int) -> list[dict]:
    iterator = iter(data_loader)
    return [next(iterator) for _ in range(batches)]


def test_an_epoch_reads_every_image_once_split_over_ranks_and_workers(shards):
    pattern = str(shards / "{000000..000007}.tar")
    assert isinstance(build_dataset(pattern), ShardImages)
    labels = []
    for rank in range(2):
        # 2 ranks x 2 workers: each worker reads 2 shards (10 images) per epoch = 5 batches of 2
        batches = take(loader(pattern, rank=rank, world_size=2, num_workers=2, shuffle_buffer=1), 10)
        labels += [label for batch in batches for label in batch["labels"].tolist()]
        positions = torch.cat([b["positions"] for b in batches])
        steps, within = positions // 4, positions % 4
        assert steps.tolist() == [s for s in range(10) for _ in range(2)]  # batch k of the rank is step k
        assert within.tolist() == [2 * rank, 2 * rank + 1] * 10  # its slice of each global batch
    assert sorted(labels) == list(range(N_IMAGES))
    # A shuffle buffer mixes the order within a worker's stream.
    plain = [b["labels"].tolist() for b in take(loader(pattern, shuffle_buffer=1), 5)]
    shuffled = [b["labels"].tolist() for b in take(loader(pattern, shuffle_buffer=4), 5)]
    assert plain != shuffled


def test_bad_members_are_skipped_and_counted(shards, tmp_path):
    import io
    import shutil

    for i in range(2):
        shutil.copy(shards / f"{i:06d}.tar", tmp_path / f"{i:06d}.tar")
    # shard 1: an extra member that is no image and one that is a truncated PNG
    good = io.BytesIO()
    concept_image(0, 0, 32, 0).save(good, format="PNG")
    with tarfile.open(tmp_path / "000001.tar", "a") as tar:
        for name, data in (("bad1.png", b"not a png"), ("bad2.png", good.getvalue()[:60])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # shard 2: a tar cut in the middle of its members
    data = (shards / "000002.tar").read_bytes()
    (tmp_path / "000002.tar").write_bytes(data[: len(data) // 2])
    batches = take(loader(str(tmp_path / "{000000..000002}.tar"), shuffle_buffer=1), 8)
    labels = [label for batch in batches[:6] for label in batch["labels"].tolist()]
    assert set(range(10)) <= set(labels)  # both whole shards read, then what the cut one gave
    assert sum(int(b["n_skipped"]) for b in batches) >= 3


def test_resume_skips_no_shard(shards):
    pattern = str(shards / "{000000..000007}.tar")
    first = take(loader(pattern, num_workers=2), 7)
    progress = ShardProgress(0, workers=2)
    for batch in first:
        progress.consumed(batch)
    resume = progress.resume_shard(lambda v: v)
    consumed_shards = {stream_shard(3, 8, s) for s in range(resume)}
    seen = {label // PER_SHARD for batch in first for label in batch["labels"].tolist()}
    assert consumed_shards <= seen  # everything before the resume index was fully read
    for shard in consumed_shards:
        # ... entirely: all five images of the shard
        assert {label for b in first for label in b["labels"].tolist() if label // PER_SHARD == shard} == \
            set(range(shard * PER_SHARD, (shard + 1) * PER_SHARD))
    resumed = take(loader(pattern, num_workers=2, start_step=7, start_shard=resume), 1)
    assert resumed[0]["positions"].tolist() == [14, 15]
    assert int(resumed[0]["resume_shard"]) >= resume


def test_train_runs_on_shards_and_checkpoints_the_shard_position(shards, tmp_path):
    import train
    from tests.helpers import tiny_config

    cfg = tiny_config(tmp_path, "--optim.iterations", "3", "--data.batch-size", "2", "--data.path",
                      str(shards / "{000000..000007}.tar"), "--data.shuffle-buffer", "1",
                      "--run.checkpoint-every", "2")
    summary = train.train(cfg)
    assert summary["step"] == 3
    payload = torch.load(tmp_path / "checkpoint_00000003.pth", weights_only=True)
    assert payload["stats"]["resume_shard"] == 1  # 6 images from shards of 5 (no shuffling): the first one is done
    more = tiny_config(tmp_path, "--optim.iterations", "5", "--data.batch-size", "2", "--data.path",
                       str(shards / "{000000..000007}.tar"), "--data.shuffle-buffer", "1", "--run.checkpoint-every", "2")
    assert train.train(more)["step"] == 5
    resumed = torch.load(tmp_path / "checkpoint_00000005.pth", weights_only=True)
    assert resumed["stats"]["resume_shard"] == 1  # restarted at shard 1: 4 more images, shard 1 not finished


def test_a_sample_without_an_image_is_skipped_and_counted(shards, tmp_path):
    import io
    import shutil

    shutil.copy(shards / "000000.tar", tmp_path / "000000.tar")  # images 0..4
    with tarfile.open(tmp_path / "000000.tar", "a") as tar:
        info = tarfile.TarInfo("999999999.txt")  # a sample of its own, with no image member
        info.size = 5
        tar.addfile(info, io.BytesIO(b"notes"))
    batches = take(loader(str(tmp_path / "{000000..000000}.tar"), shuffle_buffer=1), 3)
    assert [label for b in batches for label in b["labels"].tolist()] == [0, 1, 2, 3, 4, 0]  # then epoch 2
    assert [int(b["n_skipped"]) for b in batches] == [0, 0, 1]  # counted with the next sample given


def test_list_lines_naming_shard_samples_are_read_from_plain_and_compressed_shards(shards, tmp_path):
    import gzip

    from data.datasets import UNREADABLE_IMAGE_ERRORS, FileListDataset
    from data.shards import read_sample, sample_entry

    (tmp_path / "000001.tar.gz").write_bytes(gzip.compress((shards / "000001.tar").read_bytes()))
    cut = (shards / "000002.tar").read_bytes()
    (tmp_path / "000002.tar").write_bytes(cut[: len(cut) // 2])
    lines = [f"{sample_entry(shards / '000000.tar', '000000003')} 3",  # absolute
             "000001.tar.gz#000000007 7",  # relative to the list, in a gzip shard
             f"{sample_entry(tmp_path / '000002.tar', '000000014')} 14"]  # after the cut
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    images = FileListDataset(tmp_path / "list.txt")
    for index, number in enumerate((3, 7)):
        image, label = images.load(index)
        assert label == number and image.size == (32, 32)
        reference = concept_image(number, number % 50, 32, 0).convert("RGB")
        assert image.tobytes() == reference.tobytes()
    with pytest.raises(UNREADABLE_IMAGE_ERRORS, match="has no image member with key '000000014'"):
        images.load(2)
    with pytest.raises(FileNotFoundError):
        read_sample(sample_entry(shards / "000000.tar", "999999999"))


def test_shards_as_a_mixture_part_are_read_by_random_access(shards, tmp_path):
    import train
    from tests.helpers import tiny_config

    pattern = str(shards / "{000000..000007}.tar")
    listed = ShardImages(pattern).as_list()
    assert [label for _, label in listed.samples] == list(range(N_IMAGES))  # shard order, then archive order
    image, label = listed.load(17)
    assert label == 17 and image.tobytes() == concept_image(17, 17, 32, 0).convert("RGB").tobytes()
    cfg = tiny_config(tmp_path, "--optim.iterations", "3", "--data.batch-size", "2", "--data.path", "None",
                      "--data.parts", pattern, str(shards.parent / "list.txt"), "--data.ratios", "0.5", "0.5")
    summary = train.train(cfg)
    counts = summary["stats"]["part_counts"]
    assert summary["step"] == 3 and sum(counts) == 6 and min(counts) > 0
