"""Sharded streaming input: WebDataset-style tar shards (`--data.path 'shards/{000000..000999}.tar'`).

A shard is a tar file of samples: members sharing a key (the name up to the first dot) form one sample, e.g.
`000042.jpg` (+ an optional `000042.cls` holding an integer label). Their files are read by data/tar_reader.py (a
lean header reader: on small images, the tarfile-based reader of the `webdataset` library spends most of the read
time parsing headers) and grouped by key by webdataset's `group_by_keys`; `write_shards` writes with its `TarWriter`.

The stream. The shard list is read in epochs, each a permutation of the shards drawn from (seed, epoch); shard
stream index i is shard permutation_{i // n}[i % n]. Global data-loader worker g = rank * workers + worker (of G
in all) reads stream shards g, g + G, g + 2G, ... from the start index on, decodes their images and yields them
through a shuffle buffer of `shuffle_buffer` samples (seeded per worker and start). Bad members (not decodable,
truncated, not an image) are skipped and counted in the next sample's `n_skipped`; a shard that cannot be opened or
ends early (a truncated tar) is skipped after what it gave, and logged.

Positions. The DataLoader takes whole batches from its workers in turn, so a worker knows the step of each batch
it makes: batch j of worker w on a rank is that rank's batch j * workers + w. A sample's position is
step * global batch + rank * batch + slot, as the map-style loader's (data/sampler.py), so augmentation seeds and
iBOT masks (data/masking.py) work unchanged.

Resume is exact per shard, not per sample. Every sample carries `shard`: the oldest shard stream index whose samples
its worker has not all yielded once that sample is (one still in the buffer, else the shard being read). The
smallest of those over the latest batch of every worker of every rank (`resume_shard`) is a stream index before
which every shard was fully consumed: a run restarted there skips no shard and reads again at most the shards in flight (about one per
worker) — with other augmentation draws, since positions go on from the resumed step.
"""

from __future__ import annotations

import functools
import io
import logging
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.augment import AugmentConfig, CropSizes, CropSizeSchedule, MultiCropAugmentation, sample_rng
from data.datasets import (
    IMAGE_EXTENSIONS,
    SHARD_SAMPLE,
    UNREADABLE_IMAGE_ERRORS,
    ImageDataset,
    PathListDataset,
    UnusableImageError,
    ignore_stop_signals,
    open_image,
)
from data.masking import MaskingCollate
from data.tar_reader import DECOMPRESSION_ERRORS, DamagedTar, open_tar, tar_index, tar_members

logger = logging.getLogger(__name__)

SHARD_PATTERN = re.compile(r"\.tar($|\W)")
READ_AHEAD = 32
IMAGE_KEYS = frozenset(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
META_FILE = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (e.g. __index__), not samples


def is_shard_pattern(path: str) -> bool:
    return bool(SHARD_PATTERN.search(path))


def shard_urls(pattern: str) -> list[str]:
    """The shard files of a brace pattern ('shards/{000000..000999}.tar'); missing ones raise, naming them."""
    from braceexpand import braceexpand

    urls = list(braceexpand(pattern))
    missing = [url for url in urls if not Path(url).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(urls)} shards of {pattern!r} do not exist (first: {missing[0]}): write "
            "them first (curate.py --steps shards) or fix the pattern"
        )
    return urls


def shard_samples(url: str, on_error) -> Iterator[dict]:
    """Samples (dicts: '__key__', '__url__' and one entry per extension) of a shard: its files read by
    data/tar_reader.py, grouped by key by webdataset's `group_by_keys` (which reports a duplicate name to
    `on_error`, skipping the member when it returns True). Raises DamagedTar where the shard cannot be read on."""
    from webdataset.tariterators import group_by_keys

    with open_tar(url) as stream:
        files = ({"fname": name, "data": data, "__url__": url} for name, data in tar_members(stream)
                 if not META_FILE.match(name))
        # Samples are read in runs of READ_AHEAD rather than one between two decodes: measured 2-4 % more images/s
        # with decoding (bench/bench_curate.py --only shards), at the cost of READ_AHEAD compressed images held.
        ahead: list[dict] = []
        try:
            for sample in group_by_keys(files, handler=on_error):
                ahead.append(sample)
                if len(ahead) == READ_AHEAD:
                    yield from ahead
                    ahead = []
        except DamagedTar:
            yield from ahead  # what was read before the damage
            raise
        yield from ahead


def decode_sample(sample: dict, min_side: int | None = None) -> tuple[Image.Image, int]:
    """(RGB image, label or -1) of a grouped tar sample; raises one of UNREADABLE_IMAGE_ERRORS if it has none.
    `min_side` as open_image's (JPEGs reduced at decode time)."""
    for key in sample:  # group_by_keys lower-cases the extensions
        if key in IMAGE_KEYS:
            break
    else:
        raise ValueError(f"sample {sample.get('__key__')!r} has no image member (extensions: {sorted(sample)})")
    return open_image(io.BytesIO(sample[key]), min_side), sample_label(sample)


def sample_label(sample: dict) -> int:
    """The integer in a sample's .cls member; -1 when it has none (or not an integer: a label is never a reason to
    drop an image)."""
    try:
        return int(sample["cls"]) if "cls" in sample else -1
    except ValueError:
        return -1


def sample_entry(url: str | Path, key: str) -> str:
    """How a file list names sample `key` of shard `url`: '<absolute shard path>#<key>' (data/datasets.py reads
    such lines like image paths, through `read_sample`)."""
    return f"{Path(url).resolve()}#{key}"


@functools.lru_cache(maxsize=256)
def _shard_members(shard: str) -> tuple[dict[str, tuple[int, int, str]], dict[str, tuple[int, int]]]:
    """({sample key: (offset, size, extension) of its first image member}, {sample key: (offset, size) of its .cls
    member}) of a shard, from one scan of its headers; a damaged shard lists the samples before the damage. Cached:
    a worker reads many samples of a shard."""
    from webdataset.tariterators import base_plus_ext

    with open_tar(shard) as stream:
        index, damage = tar_index(stream)
    if damage is not None:
        logger.warning(f"shard {shard}: {damage}; its samples after that point cannot be read")
    images: dict[str, tuple[int, int, str]] = {}
    labels: dict[str, tuple[int, int]] = {}
    for name, (offset, size) in index.items():
        key, extension = base_plus_ext(name)
        if key is None:
            continue
        if extension.lower() in IMAGE_KEYS and key not in images:
            images[key] = (offset, size, extension.lower())
        elif extension.lower() == "cls":
            labels[key] = (offset, size)
    return images, labels


def read_sample(entry: str) -> tuple[bytes, str]:
    """(image file bytes, extension) of a '<shard>#<key>' entry; raises FileNotFoundError when the shard has no
    image for that key and EOFError when the shard ends inside it (both UNREADABLE_IMAGE_ERRORS: a loader skips
    and counts the sample)."""
    mark = SHARD_SAMPLE.search(entry)
    shard, key = entry[:mark.end() - 1], entry[mark.end():]
    found = _shard_members(shard)[0].get(key)
    if found is None:
        raise FileNotFoundError(f"{entry}: shard {shard} has no image member with key {key!r}")
    offset, size, extension = found
    try:
        with open_tar(shard) as stream:  # a compressed shard is decompressed up to the offset: slow, but it works
            stream.seek(offset)
            data = stream.read(size)
    except DECOMPRESSION_ERRORS as err:
        raise EOFError(f"{entry}: the compressed shard is damaged before the image ({err})") from err
    if len(data) < size:
        raise EOFError(f"{entry}: the shard ends inside the image ({len(data)} of {size} bytes)")
    return data, extension


def stream_shard(seed: int, n_shards: int, index: int) -> int:
    """The shard (position in the shard list) at shard stream index `index`."""
    epoch, offset = divmod(index, n_shards)
    return int(np.random.default_rng([seed, 1, epoch]).permutation(n_shards)[offset])


class ShardImages:
    """A list of tar shards, read as a stream (see the module docstring): what `build_dataset` returns for a shard
    pattern. `preview(n)` holds the first n readable images, for the few places that want random access."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.urls = shard_urls(pattern)

    def __len__(self) -> int:
        return len(self.urls)

    def as_list(self) -> PathListDataset:
        """Every sample with an image as a '<shard>#<key>' list entry (labels from the .cls members), in shard and
        archive order: random access, for what needs it (a mixture part), at the cost of one scan of each shard's
        headers here and one seek per image read."""
        samples = []
        for url in self.urls:
            images, label_members = _shard_members(url)
            labels = {}
            if label_members:
                with open_tar(url) as stream:
                    for key, (offset, size) in label_members.items():
                        stream.seek(offset)
                        labels[key] = sample_label({"cls": stream.read(size)})
            samples += [(Path(sample_entry(url, key)), labels.get(key, -1)) for key in images]
        return PathListDataset(samples, f"the tar shards {self.pattern!r}")

    def preview(self, n: int = 4) -> ImageDataset:
        images = []
        for url in self.urls:
            try:
                for sample in shard_samples(url, lambda err: True):
                    try:
                        images.append(decode_sample(sample))
                    except UNREADABLE_IMAGE_ERRORS:
                        continue
                    if len(images) == n:
                        return _InMemoryImages(images)
            except (DamagedTar, OSError):  # the next shard may be whole
                continue
        if not images:
            raise ValueError(f"no readable image in the shards {self.pattern!r}: check that they hold images")
        return _InMemoryImages(images)


class _InMemoryImages(ImageDataset):
    def __init__(self, images: list[tuple[Image.Image, int]]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int, min_side: int | None = None) -> tuple[Image.Image, int]:
        return self.images[index]


class ShardStream(torch.utils.data.IterableDataset):
    """Endless training samples of this rank, per the module docstring: `make(image, label, position)` (the
    multi-crop augmentation) plus "shard" and "n_skipped". Images smaller than `min_side` are skipped."""

    def __init__(self, shards: ShardImages, make, *, seed: int, rank: int, world_size: int, batch_size: int,
                 start_step: int, start_shard: int, shuffle_buffer: int, min_side: int) -> None:
        self.urls, self.make, self.seed = shards.urls, make, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.start_step, self.start_shard, self.shuffle_buffer = start_step, start_shard, max(1, shuffle_buffer)
        self.min_side = min_side

    def _samples(self, worker: int, workers: int) -> Iterator[tuple[dict, int, int]]:
        """(undecoded sample, shard stream index, damaged members before it) of this worker's shards, in order."""
        global_worker, global_workers = self.rank * workers + worker, self.world_size * workers
        damaged, shards_without_samples = 0, 0
        index = self.start_shard + global_worker
        while True:
            url = self.urls[stream_shard(self.seed, len(self.urls), index)]
            errors: list[Exception] = []

            def skip_member(err: Exception) -> bool:
                errors.append(err)
                return True

            gave = False
            try:
                for sample in shard_samples(url, skip_member):
                    gave = True
                    yield sample, index, damaged
                    damaged = 0
            except (DamagedTar, OSError) as err:  # the shard cannot be read (on): what it gave is kept
                errors.append(err)
            if errors:
                damaged += len(errors)
                logger.warning(f"shard {url}: {len(errors)} unreadable member(s) or a damaged tar, skipped "
                               f"(first: {type(errors[0]).__name__}: {errors[0]})")
            shards_without_samples = 0 if gave else shards_without_samples + 1
            if shards_without_samples >= len(self.urls):
                raise RuntimeError(f"{len(self.urls)} shards in a row of {self.urls[0]}... gave no sample: check that "
                                   "the shards hold images")
            index += global_workers

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.seed, 2, self.start_shard, self.rank * workers + worker])
        buffer: list[tuple[dict, int]] = []  # undecoded: a buffer of compressed images costs little memory
        pending: dict[int, int] = {}  # shard stream index -> its samples still in the buffer
        global_batch = self.batch_size * self.world_size
        produced, skipped = 0, 0
        for sample, shard, damaged in self._samples(worker, workers):
            reading = shard
            skipped += damaged
            buffer.append((sample, shard))
            pending[shard] = pending.get(shard, 0) + 1
            if len(buffer) < self.shuffle_buffer:
                continue
            pick = int(rng.integers(len(buffer)))
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            sample, shard = buffer.pop()
            pending[shard] -= 1
            if not pending[shard]:
                del pending[shard]
            # The oldest shard not all yielded once this sample is: one still in the buffer, else the one being read.
            oldest = min(pending) if pending else reading
            try:
                image, label = decode_sample(sample)
                if min(image.size) < self.min_side:
                    raise UnusableImageError(f"{image.width}x{image.height} pixels is smaller than one "
                                             f"{self.min_side}px patch")
            except UNREADABLE_IMAGE_ERRORS as err:
                skipped += 1
                where = f"{sample.get('__key__')} of {sample.get('__url__', 'a shard')}"
                logger.warning(f"skipping unreadable member {where}: {type(err).__name__}: {err}")
                continue
            batch, slot = divmod(produced, self.batch_size)
            step = self.start_step + batch * workers + worker
            position = step * global_batch + self.rank * self.batch_size + slot
            produced += 1
            yield {**self.make(image, label, position), "shard": oldest, "n_skipped": skipped}
            skipped = 0


def write_shards(images: PathListDataset, folder: str | Path, per_shard: int = 1000,
                 prefix: str = "") -> list[Path]:
    """The listed images' files (or '<shard>#<key>' samples), unchanged (no re-encoding), as `{prefix}{NNNNNN}.tar`
    shards of `per_shard` samples (`{key}.{ext}` + `{key}.cls` when labeled); returns the shard paths. A shard is
    written to a temporary name and renamed, so a finished shard is never rewritten by a resumed run."""
    import os

    from webdataset import TarWriter

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(images), per_shard)):
        path = folder / f"{prefix}{shard:06d}.tar"
        paths.append(path)
        if path.exists():
            continue
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as stream, TarWriter(stream, encoder=False) as writer:
            for index in range(start, min(start + per_shard, len(images))):
                file, label = images.samples[index]
                if SHARD_SAMPLE.search(str(file)):  # a sample of another shard (curate.py's lists of a shard pool)
                    data, extension = read_sample(str(file))
                else:
                    data, extension = Path(file).read_bytes(), Path(file).suffix.lower().lstrip(".")
                sample = {"__key__": f"{index:09d}", extension: data}
                if label >= 0:
                    sample["cls"] = str(label).encode()
                writer.write(sample)
        os.replace(tmp, path)
    return paths


class _CollateWithShard:
    """The masking collate, plus the batch's `resume_shard`: its last sample's `shard` (a worker's `shard` values
    never decrease, and a batch comes from one worker)."""

    def __init__(self, collate: MaskingCollate) -> None:
        self.collate = collate

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.collate(samples)
        batch["resume_shard"] = torch.tensor(samples[-1]["shard"], dtype=torch.int64)
        return batch


class ShardProgress:
    """Where a restarted run may begin reading: the smallest `resume_shard` of each worker's latest batch (the
    last `workers` batches hold one of every worker; the start index stands for those that made none yet)."""

    def __init__(self, start_shard: int, workers: int) -> None:
        self.recent = deque([start_shard], maxlen=max(workers, 1))

    def consumed(self, batch: dict) -> None:
        if "resume_shard" in batch:
            self.recent.append(int(batch["resume_shard"]))

    def resume_shard(self, all_ranks_min) -> int:
        """The index for a checkpoint; `all_ranks_min(value)` makes it the smallest over the ranks."""
        return int(all_ranks_min(min(self.recent)))


def build_shard_loader(
    shards: ShardImages,
    augment: AugmentConfig,
    sizes: CropSizes | CropSizeSchedule,
    *,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    start_shard: int = 0,
    num_workers: int = 0,
    patch_size: int = 16,
    shuffle_buffer: int = 1000,
    mask_probability: float = MaskingCollate.mask_probability,
    mask_ratio: tuple[float, float] = MaskingCollate.mask_ratio,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """`build_loader` (data/datasets.py) for tar shards: the same batches' keys plus `resume_shard`, from step
    `start_step` and shard stream index `start_shard` on."""
    if augment.patch_size != patch_size:
        augment = replace(augment, patch_size=patch_size)
    if isinstance(sizes, CropSizes):
        sizes = CropSizeSchedule((sizes,), (1.0,))
    for choice in sizes.choices:
        choice.validate(patch_size)
    augmentation = MultiCropAugmentation(augment)
    global_batch_size = batch_size * world_size
    stream = ShardStream(shards, _MultiCrop(augmentation, sizes, seed, global_batch_size), seed=seed, rank=rank,
                         world_size=world_size, batch_size=batch_size, start_step=start_step,
                         start_shard=start_shard, shuffle_buffer=shuffle_buffer, min_side=patch_size)
    collate = MaskingCollate(patch_size=patch_size, mask_probability=mask_probability, mask_ratio=mask_ratio,
                             seed=seed, global_batch_size=global_batch_size)
    return torch.utils.data.DataLoader(
        stream, batch_size=batch_size, num_workers=num_workers, collate_fn=_CollateWithShard(collate),
        pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
    )


class _MultiCrop:
    """(image, label, position) -> the multi-crop sample, seeded from the position as MultiCropDataset's."""

    def __init__(self, augmentation: MultiCropAugmentation, sizes: CropSizeSchedule, seed: int,
                 global_batch_size: int) -> None:
        self.augmentation, self.sizes, self.seed, self.global_batch_size = augmentation, sizes, seed, global_batch_size

    def __call__(self, image: Image.Image, label: int, position: int) -> dict:
        sizes = self.sizes(position // self.global_batch_size)
        crops = self.augmentation(image, sample_rng(self.seed, position), sizes)
        return {**crops, "label": label, "index": -1, "position": position}
