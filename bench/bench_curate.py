"""Curation benchmarks: balance of a curated subset (and how it falls as the classes overlap), the public code's
five-rings toy example, k-means against scikit-learn, and the throughput of embed, of one Lloyd iteration, of
retrieval (torch exact vs faiss) and of reading the same images from files and from tar shards (the readers alone,
and train.py's loaders).

    python -m bench.bench_curate                 # everything, printed; about 10 minutes on a 2-core CPU
    python -m bench.bench_curate --only rings lloyd
    pytest bench/bench_curate.py -s -m slow      # the same, through pytest

It prints figures and never asserts a speed: tests/test_curation.py holds the pass/fail checks.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.common import report
from data.curation import (
    Level,
    balanced_sample,
    coverage,
    hierarchical_kmeans,
    init_centroids,
    kmeans,
    lloyd_step,
    nearest_neighbors,
    normalized_entropy,
    prepare,
)
from data.datasets import zipf_counts


def long_tailed_embeddings(n: int, n_classes: int, dim: int, exponent: float, seed: int, separation: float = 3.0):
    """Class centers (standard normal, times `separation`) plus unit normal noise, Zipf class frequencies."""
    g = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), zipf_counts(n, n_classes, exponent))
    x = g.standard_normal((n_classes, dim))[labels] * separation + g.standard_normal((len(labels), dim))
    return torch.tensor(x, dtype=torch.float32), labels


def curated_and_random(x: torch.Tensor, labels: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a balanced hierarchical sample (levels 200 and 50, resampling on level 2) and of a random subset."""
    levels = hierarchical_kmeans(x, [Level(200, 15), Level(50, 15, 5, 3)], "cosine", "kmeans++", seed=0)
    chosen = balanced_sample([lv.labels.numpy() for lv in levels], target, seed=0)
    return chosen, np.random.default_rng(0).choice(len(labels), target, replace=False)


def bench_balance() -> None:
    """10 % of 20k points in 50 classes with Zipf frequencies (exponent 1.2: largest / smallest > 100)."""
    x, labels = long_tailed_embeddings(20_000, 50, 32, 1.2, seed=0)
    counts = np.bincount(labels)
    chosen, random = curated_and_random(x, labels, 2000)
    report("balance 10% of a long-tailed pool (20k points, 50 classes, largest/smallest "
           f"{counts.max()}/{counts.min()})",
           pool_entropy=normalized_entropy(labels, 50),
           curated_entropy=normalized_entropy(labels[chosen], 50), curated_coverage=coverage(labels[chosen], 50),
           random_entropy=normalized_entropy(labels[random], 50), random_coverage=coverage(labels[random], 50))


def bench_balance_vs_separation(queries: int = 3000) -> None:
    """The balance of bench_balance as the classes overlap more (centers scaled down against the unit noise), beside
    the 1-NN class accuracy of the points (cosine, `queries` of them against the whole pool): how well an embedder
    must separate the classes for curation to balance them."""
    for separation in (3.0, 1.5, 1.0, 0.7, 0.5):
        x, labels = long_tailed_embeddings(20_000, 50, 32, 1.2, seed=0, separation=separation)
        rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:queries]
        nearest = nearest_neighbors(x[rows], x, 2)[1][:, 1].numpy()  # the first is the point itself
        chosen, random = curated_and_random(x, labels, 2000)
        report(f"balance vs separation: class centers x {separation} (unit noise), 20k points, 50 classes, 10 %",
               one_nn_accuracy=float((labels[nearest] == labels[rows.numpy()]).mean()),
               curated_entropy=normalized_entropy(labels[chosen], 50), curated_coverage=coverage(labels[chosen], 50),
               random_entropy=normalized_entropy(labels[random], 50))


def rings(sizes: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Unit rings (radius noise 0.05) centred 3 apart on a line, `sizes[i]` points on ring i."""
    g = np.random.default_rng(seed)
    points, labels = [], []
    for i, n in enumerate(sizes):
        angle, radius = g.uniform(0, 2 * np.pi, n), 1 + 0.05 * g.standard_normal(n)
        points.append(np.stack([radius * np.cos(angle) + 3.0 * i, radius * np.sin(angle)], 1))
        labels.append(np.full(n, i))
    return torch.tensor(np.concatenate(points), dtype=torch.float32), np.concatenate(labels)


def bench_rings() -> None:
    """The public code's toy example: rings of 20000/200/1000/500/8000 points, 2 levels (1000, 300), 1000 samples."""
    x, ring = rings((20000, 200, 1000, 500, 8000))
    random = np.random.default_rng(0).choice(len(x), 1000, replace=False)
    report("rings: random 1000", per_ring=str(np.bincount(ring[random], minlength=5).tolist()))
    variants = {
        "no resampling": [Level(1000, 20), Level(300, 20)],
        "resampling level 2 (10 steps, 2 per cluster)": [Level(1000, 20), Level(300, 20, 10, 2)],
        "resampling both levels (10 steps; 10 and 2 per cluster)": [Level(1000, 20, 10, 10), Level(300, 20, 10, 2)],
    }
    for name, levels in variants.items():
        start = time.perf_counter()
        result = hierarchical_kmeans(x, levels, "l2", "kmeans++", seed=0)
        chosen = balanced_sample([lv.labels.numpy() for lv in result], 1000, seed=0)
        report(f"rings: {name}", per_ring=str(np.bincount(ring[chosen], minlength=5).tolist()),
               seconds=time.perf_counter() - start)


def bench_kmeans_vs_sklearn() -> None:
    from sklearn.cluster import KMeans

    x, _ = long_tailed_embeddings(20_000, 100, 64, 1.0, seed=1)
    start_centroids = init_centroids(x, 256, "l2", "kmeans++", seed=0)
    t0 = time.perf_counter()
    ours = kmeans(x, 256, 10, "l2", centroids=start_centroids)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = KMeans(256, init=start_centroids.double().numpy(), n_init=1, max_iter=10, tol=0.0,
                    algorithm="lloyd").fit(x.numpy())
    theirs_s = time.perf_counter() - t0
    report("k-means vs scikit-learn (20k x 64, k=256, same k-means++ init, 10 Lloyd iterations)",
           inertia_ours=ours.inertia, inertia_sklearn=float(theirs.inertia_),
           relative_difference=abs(ours.inertia - theirs.inertia_) / theirs.inertia_, seconds_ours=ours_s,
           seconds_sklearn=theirs_s)


def bench_lloyd(n: int = 100_000, dim: int = 384, k: int = 1024) -> None:
    x = prepare(torch.randn(n, dim), "cosine")
    centroids = x[torch.randperm(n)[:k]].clone()
    lloyd_step(x[:1000], centroids, "cosine")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        lloyd_step(x, centroids, "cosine")
        times.append(time.perf_counter() - t0)
    report(f"one Lloyd iteration ({n} x {dim}, k={k}, cosine, CPU)", seconds=min(times),
           points_per_s=n / min(times))


def bench_embed(images: int = 512) -> None:
    import curate
    import runtime
    from data.datasets import FileListDataset, concept_image

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        lines = []
        for i in range(images):
            concept_image(i, i % 50, 64, 0).save(folder / f"{i:05d}.png")
            lines.append(f"{i:05d}.png {i % 50}\n")
        (folder / "list.txt").write_text("".join(lines))
        dist_info = runtime.Dist(0, 1, 0, torch.device("cpu"))
        for arch, size in (("vit_tiny", 64), ("vit_small", 224)):
            n = images if arch == "vit_tiny" else images // 4
            (folder / "list_n.txt").write_text("".join(lines[:n]))
            cfg = curate.EmbedConfig(checkpoint=f"random:{arch}", size=size, batch_size=64, chunk_size=n,
                                     num_workers=1)
            backbone = curate.load_embed_backbone(cfg.checkpoint, dist_info.device)
            out = folder / f"out-{arch}"
            t0 = time.perf_counter()
            curate.embed_images(FileListDataset(folder / "list_n.txt"), out, cfg, backbone, dist_info, arch)
            seconds = time.perf_counter() - t0
            report(f"embed ({arch} at {size} px, PNG decode + forward, CPU, batch 64)", images=n,
                   images_per_s=n / seconds)


def bench_retrieval(pool_size: int = 100_000, queries: int = 1000, dim: int = 384, k: int = 10) -> None:
    g = torch.Generator().manual_seed(0)
    pool, query = torch.randn(pool_size, dim, generator=g), torch.randn(queries, dim, generator=g)
    results = {}
    for backend in ("torch", "faiss"):
        nearest_neighbors(query[:10], pool[:1000], k, backend)
        t0 = time.perf_counter()
        results[backend] = nearest_neighbors(query, pool, k, backend)
        results[backend + "_s"] = time.perf_counter() - t0
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(results["torch"][1].tolist(),
                                                                 results["faiss"][1].tolist())])
    report(f"retrieval ({queries} queries, pool {pool_size} x {dim}, k={k}, exact)",
           torch_s=results["torch_s"], faiss_s=results["faiss_s"], faiss_recall_vs_torch=float(recall))


def _webdataset_members(url: str):
    """The shard reader this project used before data/tar_reader.py: webdataset's tarfile-based iterator."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open(url, "rb", buffering=1 << 20) as stream:
        yield from group_by_keys({**member, "__url__": url} for member in tar_file_iterator(stream))


@contextlib.contextmanager
def concept_images_and_shards(images: int, per_shard: int) -> Iterator[tuple]:
    """`images` generated 64 px PNGs (50 concepts) in a temporary folder, and the same files as tar shards of
    `per_shard`: (the folder's ImageFolderDataset, the shards' ShardImages), removed afterwards."""
    from data.datasets import ImageFolderDataset, concept_image
    from data.shards import ShardImages, write_shards

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "images").mkdir()
        for i in range(images):
            concept_image(i, i % 50, 64, 0).save(folder / "images" / f"{i:05d}.png")
        dataset = ImageFolderDataset(folder / "images")
        paths = write_shards(dataset, folder / "tars", per_shard)
        yield dataset, ShardImages(str(folder / "tars" / f"{{000000..{len(paths) - 1:06d}}}.tar"))


def bench_shards(images: int = 2000, per_shard: int = 250) -> None:
    """Reading (+ decoding) the same PNG images from a folder and from tar shards, by the project's reader and by
    webdataset's (one process, interleaved passes)."""
    from data.shards import decode_sample, shard_samples

    with concept_images_and_shards(images, per_shard) as (dataset, shards):

        def folder_pass(decode: bool) -> int:  # what the folder loader does per image: dataset.load
            for index, (path, _) in enumerate(dataset.samples):
                dataset.load(index) if decode else path.read_bytes()
            return len(dataset)

        def shard_pass(read, decode: bool) -> int:
            return sum(1 for url in shards.urls for sample in read(url)
                       if (decode_sample(sample) if decode else sample))

        passes = {"folder": folder_pass,
                  "shards": lambda decode: shard_pass(lambda url: shard_samples(url, lambda err: False), decode),
                  "shards_webdataset": lambda decode: shard_pass(_webdataset_members, decode)}
        for decode in (False, True):
            best = dict.fromkeys(passes, 0.0)
            for _ in range(7):  # interleaved, best of 7: the page cache is warm for all after the first
                for name, one_pass in passes.items():
                    t0 = time.perf_counter()
                    n = one_pass(decode)
                    assert n == images, f"{name} read {n} of {images} images"
                    best[name] = max(best[name], n / (time.perf_counter() - t0))
            report(f"reader: {images} PNG images (64 px), {'read + decoded' if decode else 'bytes read'}, page cache "
                   "warm, 1 process, best of 7", **{f"{name}_images_per_s": value for name, value in best.items()})


def bench_shard_loaders(images: int = 1000, per_shard: int = 250, workers: int = 1, batches: int = 20) -> None:
    """train.py's two training loaders on the same PNG images, the same workers and augmentation (2 global crops of
    64 px, 2 local of 32): the folder's (map-style, sampler) against the shards' (stream, shuffle buffer)."""
    from data.augment import AugmentConfig, CropSizes
    from data.datasets import build_loader
    from data.shards import build_shard_loader

    with concept_images_and_shards(images, per_shard) as (dataset, shards):
        settings = dict(augment=AugmentConfig(n_local_crops=2), sizes=CropSizes(64, 32), batch_size=32,
                        num_workers=workers)
        loaders = {"folder": lambda: build_loader(dataset, **settings),
                   "shards": lambda: build_shard_loader(shards, shuffle_buffer=100, **settings)}
        best = dict.fromkeys(loaders, 0.0)
        for _ in range(3):  # interleaved, best of 3
            for name, make in loaders.items():
                iterator = iter(make())
                for _ in range(2):  # worker start-up and the first batches are not the steady state
                    next(iterator)
                t0 = time.perf_counter()
                for _ in range(batches):
                    next(iterator)
                best[name] = max(best[name], batches * 32 / (time.perf_counter() - t0))
                del iterator
        report(f"training loaders: {images} PNG images (64 px), multi-crop 2x64 + 2x32 px, batch 32, {workers} "
               "worker(s), best of 3", **{f"{name}_images_per_s": value for name, value in best.items()})


BENCHES = {"balance": bench_balance, "separation": bench_balance_vs_separation, "rings": bench_rings,
           "sklearn": bench_kmeans_vs_sklearn, "lloyd": bench_lloyd, "embed": bench_embed,
           "retrieval": bench_retrieval, "shards": bench_shards, "shard_loaders": bench_shard_loaders}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BENCHES))
def test_bench_curate(name: str) -> None:
    BENCHES[name]()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(BENCHES), default=list(BENCHES))
    for name in parser.parse_args().only:
        BENCHES[name]()


if __name__ == "__main__":
    main()
