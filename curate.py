"""Data curation (DINOv3 section 3.1): turn a large, redundant, long-tailed image pool into training data.

    python curate.py small                        # the whole pipeline on a generated long-tailed pool, CPU
    torchrun --nproc_per_node=8 curate.py web --pool /data/pool.txt --embed.checkpoint dinov3_vitl16.pth
    python curate.py small --steps sample output --sample.fraction 0.2     # rerun some steps only

Steps, in order (`--steps` picks some; each reads what the earlier ones wrote under `--work-dir` and resumes from
its own outputs; the pool itself is never modified):
- generate: (the `small` preset only) a long-tailed pool of generated images, concepts with Zipf frequencies;
- embed:    a backbone's class token for every pool (and seed) image, in float16 chunks of `embed.chunk_size`
            images with their ids; rank r embeds chunks r, r + world size, ...; a finished chunk is not redone;
            unreadable images are skipped and counted; a pool of tar shards ('pool/{000000..000999}.tar') is
            embedded one shard per chunk, its images named '<shard>#<key>' in the lists written below;
- dedup:    near-duplicates of the pool (cosine >= `dedup.threshold` to an earlier kept image) are dropped;
- cluster:  hierarchical k-means with resampling on the kept embeddings (data/curation.py), distributed over the
            ranks, checkpointed every iteration of a level's main k-means and after each resampling step;
- sample:   balanced hierarchical sampling to `sample.target` images (or `sample.fraction` of the kept pool);
- retrieve: the `retrieve.k` most similar kept pool images of every seed image;
- output:   `curated.txt` and `retrieved.txt` (one image per line, the pool's labels when it has some: what
            `train.py --data.path` reads) and `summary.json`;
- shards:   (not run by default) a file list (`shards.list`, by default curated.txt) as WebDataset tar shards of
            `shards.per_shard` images, for `train.py --data.path 'shards/{000000..000099}.tar'` (data/shards.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro

import runtime
from data.curation import (
    Backend,
    CurationError,
    Init,
    LeafStrategy,
    Level,
    Metric,
    balanced_sample,
    check_levels,
    cluster_level,
    coverage,
    near_duplicates,
    nearest_neighbors,
    normalized_entropy,
    prepare,
)
from data.datasets import (
    N_CONCEPTS,
    UNREADABLE_IMAGE_ERRORS,
    FileListDataset,
    ImageFolderDataset,
    PathListDataset,
    concept_image,
    zipf_counts,
)
from data.shards import (
    ShardImages,
    decode_sample,
    is_shard_pattern,
    sample_entry,
    sample_label,
    shard_samples,
    write_shards,
)
from data.tar_reader import DamagedTar
from dense import forward_tokens
from models.vit import build_vit
from probes import eval_pixels, load_eval_backbone

logger = logging.getLogger("dinov3")

Step = Literal["generate", "embed", "dedup", "cluster", "sample", "retrieve", "output", "shards"]
STEPS: tuple[Step, ...] = ("generate", "embed", "dedup", "cluster", "sample", "retrieve", "output", "shards")


@dataclass
class GenerateConfig:
    images: int = 20_000
    concepts: int = N_CONCEPTS
    zipf_exponent: float = 1.2  # 50 concepts: the largest about 110x the smallest
    size: int = 64
    seed_images_per_concept: int = 2  # the seed set for retrieval: a few images of every concept, another seed
    seed: int = 0


@dataclass
class EmbedConfig:
    # A backbone file the project loads (train.py / distill.py checkpoint, released .pth, Hugging Face weights or
    # folder), or "random:<arch>": a seeded, untrained ViT (LayerScale 1.0) for pipeline tests and demos.
    checkpoint: str = "random:vit_tiny"
    size: int = 224  # shorter side resized to this, center crop
    batch_size: int = 64
    chunk_size: int = 4096  # images per output file and unit of resume
    num_workers: int = 4


@dataclass
class DedupConfig:
    enabled: bool = True
    threshold: float = 0.98  # cosine similarity at or above which an image is a near-duplicate of an earlier one


@dataclass
class ClusterConfig:
    clusters: tuple[int, ...] = (1000, 300)  # per level: level 1 clusters the images, level t the level t-1 centroids
    iterations: int = 20  # Lloyd iterations of every k-means
    resample_steps: tuple[int, ...] = (0, 10)  # per level
    resample_size: tuple[int, ...] = (1, 2)  # points per cluster kept by a resampling step, per level
    metric: Metric = "cosine"
    init: Init = "kmeans++"
    seed: int = 0


@dataclass
class SampleConfig:
    target: int | None = None  # images in the curated part; None: `fraction` of the (deduplicated) pool
    fraction: float = 0.1
    strategy: LeafStrategy = "random"  # how a level-1 cluster gives its share: at random, or closest to centroid
    seed: int = 0


@dataclass
class RetrieveConfig:
    k: int = 4  # pool images per seed image
    backend: Backend = "torch"  # exact blocked search in PyTorch, or faiss' exact inner-product index
    block: int = 4096  # pool rows per block of the torch search


@dataclass
class ShardsConfig:
    list: str | None = None  # the .txt list to write as tar shards; None: the output step's curated.txt
    per_shard: int = 1000  # images per shard
    folder: str = "shards"  # under the work dir (or absolute)


@dataclass
class CurateConfig:
    # Image folder, .txt list or tar shards ('pool/{000000..000999}.tar'); a relative path that does not exist
    # from the current folder is taken relative to the work dir (where `small` generates its pool).
    pool: str = "pool"
    seeds: str | None = None  # seed images for retrieval (folder, .txt list or shards); None: no retrieved part
    work_dir: str = "runs/curate"
    steps: tuple[Step, ...] = ("embed", "dedup", "cluster", "sample", "retrieve", "output")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Subtract the pool's mean embedding before dedup, cluster and retrieve. An untrained backbone's class tokens
    # share a large common component (cosine ~0.98 between any two images) that would hide their differences;
    # a trained backbone's do not need it.
    center: bool = False
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)


def _small() -> CurateConfig:
    """The paper's pipeline at small scale on the CPU: 20k generated images of 50 concepts with Zipf-like
    frequencies, an untrained ViT-tiny at 64 px, 2 levels (500, 100 clusters), a 10 % curated part, 4 retrieved
    images per seed image."""
    return CurateConfig(
        pool="pool/pool.txt", seeds="pool/seeds.txt", work_dir="runs/curate-small", center=True,
        # An untrained backbone puts unrelated images close: a looser threshold would drop a quarter of the pool.
        dedup=DedupConfig(threshold=0.995),
        steps=("generate", "embed", "dedup", "cluster", "sample", "retrieve", "output"),
        embed=EmbedConfig(checkpoint="random:vit_tiny", size=64, batch_size=256, chunk_size=4096, num_workers=2),
        cluster=ClusterConfig(clusters=(500, 100), iterations=20, resample_steps=(0, 10), resample_size=(1, 2)),
    )


def _web() -> CurateConfig:
    """The paper's structure for a web-scale pool (LVD-1689M: 5 levels of 200M, 8M, 800k, 100k and 25k clusters
    over 17B images); the cluster counts are for a pool of about 100M images, a step down from the paper's."""
    return CurateConfig(
        pool="pool.txt", work_dir="runs/curate-web", device="auto",
        embed=EmbedConfig(checkpoint="", size=224, batch_size=256, chunk_size=65536, num_workers=8),
        # Random init: k-means++ picks its centroids one after another, a collective round each, which a million
        # clusters cannot afford.
        cluster=ClusterConfig(clusters=(1_000_000, 50_000, 10_000, 2_000), iterations=20, init="random",
                              resample_steps=(0, 10, 10, 10), resample_size=(1, 10, 5, 3)),
        sample=SampleConfig(fraction=0.1),
    )


PRESETS: dict[str, tuple[str, CurateConfig]] = {
    "small": ("generated long-tailed pool, CPU, a few minutes", _small()),
    "web": ("the paper's structure for a large pool (set --pool and --embed.checkpoint)", _web()),
}


def parse_config(argv: list[str] | None = None) -> CurateConfig:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["small", *argv]
    if argv[0] not in PRESETS and not argv[0].startswith("-"):
        raise SystemExit(f"unknown preset {argv[0]!r}; choose one of: {', '.join(PRESETS)}")
    return tyro.extras.overridable_config_cli(PRESETS, args=argv)


def config_problems(cfg: CurateConfig) -> list[str]:
    problems = []
    c = cfg.cluster
    if not (len(c.clusters) == len(c.resample_steps) == len(c.resample_size)) or not c.clusters:
        problems.append(f"cluster.clusters, cluster.resample-steps and cluster.resample-size need one value per level "
                        f"(got {len(c.clusters)}, {len(c.resample_steps)}, {len(c.resample_size)})")
    if any(b >= a for a, b in zip(c.clusters, c.clusters[1:])):
        problems.append(f"cluster.clusters={c.clusters} must decrease from level to level")
    if c.iterations < 1:
        problems.append("cluster.iterations must be >= 1")
    if cfg.sample.target is None and not 0 < cfg.sample.fraction <= 1:
        problems.append(f"sample.fraction={cfg.sample.fraction} must be in (0, 1]")
    if cfg.sample.target is not None and cfg.sample.target < 1:
        problems.append(f"sample.target={cfg.sample.target} must be >= 1")
    if not -1 <= cfg.dedup.threshold <= 1:
        problems.append(f"dedup.threshold={cfg.dedup.threshold} is a cosine similarity: it must be in [-1, 1]")
    if cfg.retrieve.k < 1:
        problems.append("retrieve.k must be >= 1")
    if "embed" in cfg.steps and not cfg.embed.checkpoint:
        problems.append("embed.checkpoint is empty: pass a backbone file (train.py checkpoint, released .pth, Hugging "
                        "Face folder) or random:vit_tiny for a pipeline test")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Paths


def work(cfg: CurateConfig) -> Path:
    return Path(cfg.work_dir)


def resolve(cfg: CurateConfig, path: str) -> Path:
    """A pool or seed path: absolute, relative to the current folder if it exists there, else to the work dir."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else work(cfg) / p


def read_images(path: Path) -> PathListDataset:
    """An image folder or a .txt list (one clear line when it is neither, is missing or lists no images)."""
    try:
        if path.is_dir():
            return ImageFolderDataset(path)
        if path.suffix.lower() == ".txt":
            return FileListDataset(path)
    except (FileNotFoundError, ValueError) as err:
        raise CurationError(str(err)) from None
    raise CurationError(f"{str(path)!r} is neither an image folder nor a .txt image list: pass one of those, or tar "
                        "shards as a brace pattern ('pool/{000000..000099}.tar')")


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# generate


def generate_pool(cfg: CurateConfig, dist_info: runtime.Dist) -> None:
    """PNG images of concepts with Zipf-like frequencies under <work>/pool, listed with their concept in pool.txt,
    and a seed set of `seed_images_per_concept` images of every concept (another generator seed) in seeds.txt."""
    g = cfg.generate
    folder = work(cfg) / "pool"
    if (folder / "pool.txt").exists() and (folder / "seeds.txt").exists():
        logger.info(f"generate: {folder} exists, kept")
        return
    counts = zipf_counts(g.images, g.concepts, g.zipf_exponent)
    concepts = np.repeat(np.arange(g.concepts), counts)
    concepts = concepts[np.random.default_rng(g.seed).permutation(len(concepts))]
    seed_concepts = np.repeat(np.arange(g.concepts), g.seed_images_per_concept)
    jobs = [("pool", i, int(c), g.seed) for i, c in enumerate(concepts)]
    jobs += [("seed", i, int(c), g.seed + 1) for i, c in enumerate(seed_concepts)]
    for kind, i, concept, seed in jobs[dist_info.rank:: dist_info.world_size]:
        path = folder / kind / f"{i:06d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            concept_image(i, concept, g.size, seed).save(path)
    runtime.barrier(dist_info)
    if dist_info.is_main:
        write_atomic(folder / "seeds.txt", "".join(f"seed/{i:06d}.png {c}\n" for i, c in enumerate(seed_concepts)))
        write_atomic(folder / "pool.txt", "".join(f"pool/{i:06d}.png {c}\n" for i, c in enumerate(concepts)))
        logger.info(f"generate: {len(concepts)} pool images of {g.concepts} concepts (largest {counts.max()}, "
                    f"smallest {counts.min()}) and {len(seed_concepts)} seed images in {folder}")
    runtime.barrier(dist_info)


# ---------------------------------------------------------------------------------------------------------------
# embed


def load_embed_backbone(checkpoint: str, device: torch.device) -> torch.nn.Module:
    if checkpoint.startswith("random:"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            backbone = build_vit(checkpoint.removeprefix("random:"), layerscale_init=1.0)
        return backbone.to(device).eval()
    return load_eval_backbone(checkpoint, device)


class _EmbedItems(torch.utils.data.Dataset):
    """(pixels, position) of some positions of an image list; (None, position, error) for unreadable images."""

    def __init__(self, images: PathListDataset, positions: range, size: int) -> None:
        self.images, self.positions, self.size = images, positions, size

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        position = self.positions[i]
        try:
            image, _ = self.images.load(position, self.size)
            return eval_pixels(image, self.size), position, None
        except UNREADABLE_IMAGE_ERRORS as err:
            return None, position, f"{type(err).__name__}: {err}"


def _collate(batch: list):
    readable = [(pixels, position) for pixels, position, _ in batch if pixels is not None]
    skipped = [(position, error) for pixels, position, error in batch if pixels is None]
    if not readable:
        return None, torch.zeros(0, dtype=torch.int64), skipped
    pixels, positions = zip(*readable)
    return torch.stack(pixels), torch.tensor(positions, dtype=torch.int64), skipped


def chunk_done(folder: Path, chunk: int) -> bool:
    return (folder / f"chunk-{chunk:06d}.json").exists()


def embed_images(images: PathListDataset, folder: Path, cfg: EmbedConfig, backbone: torch.nn.Module,
                 dist_info: runtime.Dist, name: str) -> None:
    """Class tokens of every readable image into <folder>/chunk-NNNNNN.{npy,ids.npy,json} (json last: a chunk
    with its json is complete), this rank's chunks only."""
    n_chunks = math.ceil(len(images) / cfg.chunk_size)
    mine = [c for c in range(dist_info.rank, n_chunks, dist_info.world_size) if not chunk_done(folder, c)]
    if dist_info.is_main:
        # Absolute paths: the lists written from these items live in another folder than the pool's list.
        write_atomic(folder / "items.txt", "".join(f"{Path(path).resolve()} {label}\n"
                                                   for path, label in images.samples))
    start, done_images = time.perf_counter(), 0
    for done, chunk in enumerate(mine, start=1):
        positions = range(chunk * cfg.chunk_size, min((chunk + 1) * cfg.chunk_size, len(images)))
        loader = torch.utils.data.DataLoader(_EmbedItems(images, positions, cfg.size), batch_size=cfg.batch_size,
                                             num_workers=cfg.num_workers, collate_fn=_collate)
        features, ids, skipped = [], [], []
        for pixels, batch_ids, batch_skipped in loader:
            skipped += batch_skipped
            if pixels is not None:
                features.append(forward_tokens(backbone, pixels)[0].half().cpu())
                ids.append(batch_ids)
        for position, error in skipped:
            logger.warning(f"embed: skipping unreadable image {images.describe(position)}: {error}")
        dim = backbone.embed_dim
        save_npy(folder / f"chunk-{chunk:06d}.npy", torch.cat(features).numpy() if features
                 else np.zeros((0, dim), np.float16))
        save_npy(folder / f"chunk-{chunk:06d}.ids.npy", torch.cat(ids).numpy() if ids else np.zeros(0, np.int64))
        write_atomic(folder / f"chunk-{chunk:06d}.json", json.dumps(
            {"images": len(positions), "embedded": len(positions) - len(skipped),
             "skipped": [images.describe(p) for p, _ in skipped]}))
        done_images += len(positions)
        elapsed = time.perf_counter() - start
        rate = done_images / elapsed
        remaining = sum(min(cfg.chunk_size, len(images) - c * cfg.chunk_size) for c in mine[done:])
        logger.info(f"embed {name}: rank {dist_info.rank} chunk {done}/{len(mine)}, {rate:.1f} images/s, "
                    f"ETA {runtime.Progress.format_seconds(remaining / max(rate, 1e-9))}")
    runtime.barrier(dist_info)


class _ShardEmbedParts(torch.utils.data.IterableDataset):
    """A DataLoader worker's shards (worker w of n takes shards w, w + n, ... of the list), each as dicts of up to
    `batch_size` samples: `chunk` (the shard's number), `pixels` [b, 3, size, size] (None when none was readable),
    `rows` (the samples' numbers within the shard), `skipped` (entry, error) pairs; a shard's last dict also has
    `entries` (every sample's '<shard>#<key>' and label, in shard order) and `damage` (what ended it early)."""

    def __init__(self, shards: list[tuple[int, str]], size: int, batch_size: int) -> None:
        self.shards, self.size, self.batch_size = shards, size, batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for chunk, url in self.shards[worker::workers]:
            entries, pixels, rows, skipped, damage = [], [], [], [], None

            def part(last: bool) -> dict:
                return {"chunk": chunk, "pixels": torch.stack(pixels) if pixels else None,
                        "rows": torch.tensor(rows, dtype=torch.int64), "skipped": skipped,
                        "entries": entries if last else None, "damage": damage}

            def bad_member(err: Exception) -> bool:  # a duplicate member name: that member is skipped
                skipped.append((f"{url} (a member)", f"{type(err).__name__}: {err}"))
                return True

            try:
                for sample in shard_samples(url, bad_member):
                    entry = sample_entry(url, sample["__key__"])
                    try:
                        image, label = decode_sample(sample, self.size)
                        pixels.append(eval_pixels(image, self.size))
                        rows.append(len(entries))
                    except UNREADABLE_IMAGE_ERRORS as err:
                        label = sample_label(sample)
                        skipped.append((entry, f"{type(err).__name__}: {err}"))
                    entries.append((entry, label))
                    if len(pixels) == self.batch_size:
                        yield part(last=False)
                        pixels, rows, skipped = [], [], []
            except (DamagedTar, OSError) as err:  # what the shard gave before is kept
                damage = f"{type(err).__name__}: {err}"
            yield part(last=True)


def embed_shards(shards: ShardImages, folder: Path, cfg: EmbedConfig, backbone: torch.nn.Module,
                 dist_info: runtime.Dist, name: str) -> None:
    """Class tokens of every readable sample of tar shards: chunk c is shard c of the pattern's list (rank r embeds
    shards r, r + world size, ...), written as for images (`embed_images`) plus chunk-NNNNNN.items.txt, the
    shard's samples as '<shard>#<key> label' lines; a chunk's ids count samples within its shard."""
    if dist_info.is_main:
        write_atomic(folder / "shards.txt", "".join(f"{Path(url).resolve()}\n" for url in shards.urls))
    mine = [(c, url) for c, url in enumerate(shards.urls)
            if c % dist_info.world_size == dist_info.rank and not chunk_done(folder, c)]
    loader = torch.utils.data.DataLoader(_ShardEmbedParts(mine, cfg.size, cfg.batch_size), batch_size=None,
                                         num_workers=min(cfg.num_workers, len(mine)))
    pending: dict[int, tuple[list, list, list]] = {}
    start, done_images, done = time.perf_counter(), 0, 0
    for part in loader:
        features, ids, skipped = pending.setdefault(part["chunk"], ([], [], []))
        if part["pixels"] is not None:
            features.append(forward_tokens(backbone, part["pixels"])[0].half().cpu())
            ids.append(part["rows"])
        skipped += part["skipped"]
        if part["entries"] is None:
            continue
        chunk, entries = part["chunk"], part["entries"]
        del pending[chunk]
        if part["damage"] is not None:
            skipped.append((f"{shards.urls[chunk]} (a damaged tar: what follows its first {len(entries)} samples)",
                            part["damage"]))
        for entry, error in skipped:
            logger.warning(f"embed: skipping unreadable {entry}: {error}")
        save_npy(folder / f"chunk-{chunk:06d}.npy", torch.cat(features).numpy() if features
                 else np.zeros((0, backbone.embed_dim), np.float16))
        save_npy(folder / f"chunk-{chunk:06d}.ids.npy", torch.cat(ids).numpy() if ids else np.zeros(0, np.int64))
        write_atomic(folder / f"chunk-{chunk:06d}.items.txt", "".join(f"{e} {label}\n" for e, label in entries))
        write_atomic(folder / f"chunk-{chunk:06d}.json", json.dumps(
            {"images": len(entries), "embedded": sum(len(i) for i in ids), "skipped": [e for e, _ in skipped],
             "damage": part["damage"]}))
        done, done_images = done + 1, done_images + len(entries)
        elapsed = time.perf_counter() - start
        logger.info(f"embed {name}: rank {dist_info.rank} shard {done}/{len(mine)}, {done_images / elapsed:.1f} "
                    f"images/s, ETA {runtime.Progress.format_seconds(elapsed / done * (len(mine) - done))}")
    runtime.barrier(dist_info)


def read_pool(cfg: CurateConfig, path: str) -> PathListDataset | ShardImages:
    """A pool or seed set: tar shards (a brace pattern; relative ones as `resolve` takes paths), an image folder or
    a .txt list."""
    if not is_shard_pattern(path):
        return read_images(resolve(cfg, path))
    from braceexpand import braceexpand

    if not (Path(path).is_absolute() or Path(next(iter(braceexpand(path)))).exists()):
        path = str(work(cfg) / path)
    try:
        return ShardImages(path)
    except FileNotFoundError as err:
        raise CurationError(str(err)) from None


def run_embed(cfg: CurateConfig, dist_info: runtime.Dist) -> None:
    sets = [("pool", cfg.pool)] + ([("seeds", cfg.seeds)] if cfg.seeds else [])
    pools = [(name, read_pool(cfg, path)) for name, path in sets]  # a missing pool fails before the model loads
    backbone = load_embed_backbone(cfg.embed.checkpoint, dist_info.device)
    if cfg.embed.size % backbone.patch_size:
        raise CurationError(f"embed.size={cfg.embed.size} is not a multiple of the backbone's {backbone.patch_size} "
                            "px patch")
    for name, images in pools:
        embed = embed_shards if isinstance(images, ShardImages) else embed_images
        embed(images, work(cfg) / "embed" / name, cfg.embed, backbone, dist_info, name)


@dataclass
class Embeddings:
    features: torch.Tensor  # [n, C] float32
    ids: np.ndarray  # [n]: position of each row in items
    items: list[tuple[str, int]]  # (path, label) of every listed image, embedded or not
    skipped: list[str]


def load_embeddings(folder: Path) -> Embeddings:
    if (folder / "shards.txt").exists():
        return _load_shard_embeddings(folder)
    metas = sorted(folder.glob("chunk-*.json"))
    if not metas or not (folder / "items.txt").exists():
        raise CurationError(f"no embeddings in {folder}: run the embed step first (--steps embed)")
    items = _read_items(folder / "items.txt")
    expected = math.ceil(len(items) / max(json.loads(metas[0].read_text())["images"], 1))
    if len(metas) < expected:
        raise CurationError(f"{folder} holds {len(metas)} of {expected} embedding chunks: rerun the embed step to "
                            "finish it")
    features = [np.load(m.with_name(m.name.replace(".json", ".npy"))) for m in metas]
    ids = [np.load(m.with_name(m.name.replace(".json", ".ids.npy"))) for m in metas]
    skipped = [name for m in metas for name in json.loads(m.read_text())["skipped"]]
    return Embeddings(torch.from_numpy(np.concatenate(features)).float(), np.concatenate(ids), items, skipped)


def _read_items(path: Path) -> list[tuple[str, int]]:
    """(path or '<shard>#<key>', label) per line of an items file."""
    items = []
    for line in path.read_text().splitlines():
        entry, label = line.rsplit(maxsplit=1)
        items.append((entry, int(label)))
    return items


def _load_shard_embeddings(folder: Path) -> Embeddings:
    """A shard pool's embeddings: the chunks (one per shard) in shard order, their sample numbers made positions
    in the concatenated items."""
    n_shards = len((folder / "shards.txt").read_text().splitlines())
    metas = [folder / f"chunk-{c:06d}.json" for c in range(n_shards)]
    missing = sum(not m.exists() for m in metas)
    if missing:
        raise CurationError(f"{folder} holds {n_shards - missing} of {n_shards} shards' embeddings: rerun the embed "
                            "step to finish it")
    features, ids, items, skipped = [], [], [], []
    for m in metas:
        stem = m.with_suffix("")
        features.append(np.load(f"{stem}.npy"))
        ids.append(np.load(f"{stem}.ids.npy") + len(items))
        items += _read_items(Path(f"{stem}.items.txt"))
        skipped += json.loads(m.read_text())["skipped"]
    return Embeddings(torch.from_numpy(np.concatenate(features)).float(), np.concatenate(ids), items, skipped)


# ---------------------------------------------------------------------------------------------------------------
# dedup, cluster, sample, retrieve


def pool_and_mean(cfg: CurateConfig) -> tuple[Embeddings, torch.Tensor]:
    """The pool's embeddings (centered when cfg.center) and what was subtracted (zeros otherwise)."""
    pool = load_embeddings(work(cfg) / "embed" / "pool")
    mean = pool.features.mean(0) if cfg.center else torch.zeros(pool.features.shape[1])
    pool.features = pool.features - mean
    return pool, mean


def run_dedup(cfg: CurateConfig, dist_info: runtime.Dist) -> None:
    pool, _ = pool_and_mean(cfg)
    if cfg.dedup.enabled:
        drop = near_duplicates(pool.features.to(dist_info.device), cfg.dedup.threshold)
    else:
        drop = np.zeros(len(pool.features), dtype=bool)
    if dist_info.is_main:
        save_npy(work(cfg) / "dedup" / "kept.npy", np.flatnonzero(~drop))
        logger.info(f"dedup: {int(drop.sum())} near-duplicates of {len(drop)} embedded pool images dropped "
                    f"(cosine >= {cfg.dedup.threshold})")
    runtime.barrier(dist_info)


def kept_rows(cfg: CurateConfig) -> np.ndarray:
    path = work(cfg) / "dedup" / "kept.npy"
    if not path.exists():
        raise CurationError(f"{path} is missing: run the dedup step first (--steps dedup)")
    return np.load(path)


def levels_of(c: ClusterConfig) -> list[Level]:
    return [Level(k, c.iterations, steps, size) for k, steps, size in zip(c.clusters, c.resample_steps,
                                                                           c.resample_size)]


def run_cluster(cfg: CurateConfig, dist_info: runtime.Dist) -> None:
    """Level files <work>/cluster/level{t}.pt: centroids, labels (of the kept pool rows at level 1, of level t-1's
    centroids above) and distances; level{t}.state.pt checkpoints a level in progress."""
    features = pool_and_mean(cfg)[0].features[kept_rows(cfg)]
    levels = levels_of(cfg.cluster)
    check_levels([len(features)], levels)
    folder = work(cfg) / "cluster"
    inputs = cluster_inputs(cfg)
    # Each rank clusters a contiguous slice of the rows (the order the k-means++ draws rely on).
    bounds = np.linspace(0, len(features), dist_info.world_size + 1).astype(int)
    points = prepare(features[bounds[dist_info.rank]: bounds[dist_info.rank + 1]], cfg.cluster.metric)
    points = points.to(dist_info.device)
    for t, level in enumerate(levels, start=1):
        final, state_file = folder / f"level{t}.pt", folder / f"level{t}.state.pt"
        if final.exists():
            done = torch.load(final, weights_only=True)
            check_inputs(done, inputs, final)
            points = done["centroids"].to(dist_info.device)
            logger.info(f"cluster: level {t} done before, kept")
            continue
        resume = torch.load(state_file, weights_only=True) if state_file.exists() else None
        if resume is not None:
            check_inputs(resume, inputs, state_file)
        if resume is not None:
            logger.info(f"cluster: level {t} resumes at phase {resume['phase']}, iteration {resume['iteration']}")

        def checkpoint(state: dict, state_file: Path = state_file) -> None:
            if dist_info.is_main:
                runtime.atomic_save({**state, "inputs": inputs}, state_file)

        start = time.perf_counter()
        result = cluster_level(points, level, cfg.cluster.metric, cfg.cluster.init, cfg.cluster.seed + t,
                               dist_info if t == 1 else None, resume, checkpoint)
        labels, dists = result.labels, result.distances
        if t == 1 and dist_info.enabled:
            labels, dists = (_gather(v, dist_info) for v in (labels, dists))
        if dist_info.is_main:
            runtime.atomic_save({"centroids": result.centroids.cpu(), "labels": labels.cpu(),
                                 "distances": dists.cpu(), "inputs": inputs}, final)
            state_file.unlink(missing_ok=True)
            sizes = np.bincount(labels.cpu().numpy(), minlength=level.clusters)
            logger.info(f"cluster: level {t}, {level.clusters} clusters of {len(labels)} "
                        f"{'images' if t == 1 else 'centroids'} in {time.perf_counter() - start:.1f} s; sizes "
                        f"min {sizes.min()} median {int(np.median(sizes))} max {sizes.max()}")
        runtime.barrier(dist_info)
        points = result.centroids


def cluster_inputs(cfg: CurateConfig) -> str:
    """What the cluster step's outputs depend on: the kept rows and the cluster settings (levels and their files
    made from other inputs must not be reused)."""
    digest = hashlib.sha256(np.ascontiguousarray(kept_rows(cfg)).tobytes())
    digest.update(json.dumps([dataclasses.asdict(cfg.cluster), cfg.center, cfg.embed.checkpoint]).encode())
    return digest.hexdigest()[:16]


def check_inputs(saved: dict, inputs: str, path: Path) -> None:
    if saved.get("inputs") != inputs:
        raise CurationError(f"{path} was made from other embeddings, dedup output or cluster settings: delete "
                            f"{path.parent} to cluster again")


def _gather(tensor: torch.Tensor, dist_info: runtime.Dist) -> torch.Tensor:
    from probes import all_gather_rows

    return all_gather_rows(tensor, dist_info)


def load_levels(cfg: CurateConfig) -> list[dict]:
    levels = []
    for t in range(1, len(cfg.cluster.clusters) + 1):
        path = work(cfg) / "cluster" / f"level{t}.pt"
        if not path.exists():
            raise CurationError(f"{path} is missing: run the cluster step first (--steps cluster)")
        levels.append(torch.load(path, weights_only=True))
    return levels


def sample_target(cfg: CurateConfig, n_kept: int) -> int:
    return cfg.sample.target if cfg.sample.target is not None else max(1, round(cfg.sample.fraction * n_kept))


def run_sample(cfg: CurateConfig, dist_info: runtime.Dist) -> None:
    kept = kept_rows(cfg)
    target = sample_target(cfg, len(kept))
    if target > len(kept):
        raise CurationError(f"sample.target={target} is larger than the deduplicated pool ({len(kept)} images): ask "
                            f"for at most {len(kept)}")
    levels = load_levels(cfg)
    if len(levels[0]["labels"]) != len(kept):
        raise CurationError("the cluster step's level 1 does not match the dedup step's output: rerun cluster "
                            "(delete <work-dir>/cluster)")
    chosen = balanced_sample([lv["labels"].numpy() for lv in levels], target, cfg.sample.seed, cfg.sample.strategy,
                             levels[0]["distances"].numpy())
    if dist_info.is_main:
        save_npy(work(cfg) / "sample" / "rows.npy", kept[chosen])
        logger.info(f"sample: {len(chosen)} of {len(kept)} images, balanced over {len(levels)} levels")


def run_retrieve(cfg: CurateConfig, dist_info: runtime.Dist) -> None:
    if cfg.seeds is None:
        logger.info("retrieve: no seed set (--seeds), skipped")
        return
    seeds = load_embeddings(work(cfg) / "embed" / "seeds")
    if len(seeds.features) == 0:
        raise CurationError(f"none of the seed images of {cfg.seeds} could be read: give readable seed images")
    kept = kept_rows(cfg)
    pool, mean = pool_and_mean(cfg)
    pool = pool.features[kept]
    sims, rows = nearest_neighbors((seeds.features - mean).to(dist_info.device), pool.to(dist_info.device),
                                   cfg.retrieve.k, cfg.retrieve.backend, cfg.retrieve.block)
    if dist_info.is_main:
        save_npy(work(cfg) / "retrieve" / "rows.npy", kept[rows.cpu().numpy()])
        save_npy(work(cfg) / "retrieve" / "similarities.npy", sims.cpu().numpy())
        logger.info(f"retrieve: {cfg.retrieve.k} neighbours of each of {len(seeds.features)} seed images, "
                    f"{len(np.unique(rows.cpu().numpy()))} distinct pool images")


# ---------------------------------------------------------------------------------------------------------------
# output


def class_balance(labels: np.ndarray, n_classes: int) -> dict:
    return {"normalized_entropy": normalized_entropy(labels, n_classes), "coverage": coverage(labels, n_classes)}


def run_output(cfg: CurateConfig, dist_info: runtime.Dist) -> dict:
    """curated.txt, retrieved.txt and summary.json in <work>/output; returns the summary."""
    if not dist_info.is_main:
        return {}
    pool = load_embeddings(work(cfg) / "embed" / "pool")
    kept = kept_rows(cfg)
    curated_rows = np.load(work(cfg) / "sample" / "rows.npy")
    out = work(cfg) / "output"
    items = [pool.items[i] for i in pool.ids[curated_rows]]
    write_atomic(out / "curated.txt", "".join(f"{path} {label}\n" for path, label in items))
    level1 = load_levels(cfg)[0]["labels"].numpy()
    sizes = np.bincount(level1, minlength=cfg.cluster.clusters[0])
    edges = [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10**12]
    histogram = {f"{lo}-{hi - 1}" if hi < 10**12 else f">={lo}": int(((sizes >= lo) & (sizes < hi)).sum())
                 for lo, hi in zip(edges, edges[1:])}
    summary = {
        "pool_images": len(pool.items), "embedded": len(pool.features), "unreadable_skipped": len(pool.skipped),
        "near_duplicates_removed": len(pool.features) - len(kept), "curated": len(items),
        "levels": list(cfg.cluster.clusters), "level1_cluster_size_histogram": histogram,
        "files": {"curated": str(out / "curated.txt")},
    }
    labels = np.array([label for _, label in pool.items])
    if (labels >= 0).all():
        n_classes = int(labels.max()) + 1
        random_rows = np.random.default_rng(cfg.sample.seed).choice(len(kept), size=len(items), replace=False)
        summary["class_balance"] = {
            "pool": class_balance(labels[pool.ids[kept]], n_classes),
            "curated": class_balance(labels[pool.ids[curated_rows]], n_classes),
            "random_same_size": class_balance(labels[pool.ids[kept[random_rows]]], n_classes),
        }
    retrieved_file = work(cfg) / "retrieve" / "rows.npy"
    if cfg.seeds is not None and retrieved_file.exists():
        rows = np.unique(np.load(retrieved_file))
        retrieved = [pool.items[i] for i in pool.ids[rows]]
        write_atomic(out / "retrieved.txt", "".join(f"{path} {label}\n" for path, label in retrieved))
        summary["retrieved"] = len(retrieved)
        summary["files"]["retrieved"] = str(out / "retrieved.txt")
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    logger.info(f"output: {json.dumps(summary)}")
    return summary


def run_shards(cfg: CurateConfig, dist_info: runtime.Dist) -> None:
    """The images of a file list, unchanged, as WebDataset tar shards that `train.py --data.path` streams."""
    source = resolve(cfg, cfg.shards.list) if cfg.shards.list else work(cfg) / "output" / "curated.txt"
    images = read_images(source)
    folder = Path(cfg.shards.folder) if Path(cfg.shards.folder).is_absolute() else work(cfg) / cfg.shards.folder
    if dist_info.is_main:
        paths = write_shards(images, folder, cfg.shards.per_shard)
        pattern = f"{folder}/{{{0:06d}..{len(paths) - 1:06d}}}.tar"
        logger.info(f"shards: {len(images)} images of {source} in {len(paths)} shards; train on them with "
                    f"--data.path '{pattern}'")
    runtime.barrier(dist_info)


RUNNERS = {"generate": generate_pool, "embed": run_embed, "dedup": run_dedup, "cluster": run_cluster,
           "sample": run_sample, "retrieve": run_retrieve, "output": run_output, "shards": run_shards}


def curate(cfg: CurateConfig) -> dict:
    problems = config_problems(cfg)
    if problems:
        raise CurationError("; ".join(problems))
    dist_info = runtime.setup_distributed(cfg.device)
    runtime.setup_logging(work(cfg), dist_info.is_main)
    if dist_info.is_main:
        work(cfg).mkdir(parents=True, exist_ok=True)
        write_atomic(work(cfg) / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    summary = {}
    for step in STEPS:
        if step in cfg.steps:
            start = time.perf_counter()
            result = RUNNERS[step](cfg, dist_info)
            summary = result or summary
            logger.info(f"{step}: {time.perf_counter() - start:.1f} s")
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    try:
        curate(cfg)
    except CurationError as err:
        raise SystemExit(f"curate.py: {err}") from None
    finally:
        runtime.teardown_distributed()


if __name__ == "__main__":
    main()
    runtime.leave_torchrun_worker()
