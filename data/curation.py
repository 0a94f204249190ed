"""Data curation algorithms on embeddings: distributed k-means, hierarchical k-means with resampling, balanced
hierarchical sampling, nearest-neighbour retrieval and near-duplicate removal (curate.py is the entry point).

Hierarchical k-means and balanced sampling follow Vo et al. 2024 ("Automatic Data Curation for Self-Supervised
Learning: A Clustering-Based Approach", arXiv 2405.15613), which DINOv3 uses to build LVD-1689M:

- level 1 clusters the embeddings, level t > 1 clusters the centroids of level t - 1;
- within a level, after k-means, each resampling step takes the `resample_size` points closest to each centroid
  (a roughly equal number per cluster) and re-runs k-means on that set alone, then reassigns every point: dense
  regions no longer outvote sparse ones, so centroids move toward a uniform cover of the data's support. Each
  resampling k-means is initialized afresh (k-means++ or random, as configured), as in the public code;
- sampling goes top-down: a cluster's budget is split equally among its children, a child smaller than its share
  gives all it has and the remainder goes to the others (water-filling); the last units of an uneven split go to
  children drawn at random (seeded). At level 1 the points are drawn at random or closest to the centroid.

Distributed k-means. Every rank holds a contiguous slice of the rows (rank order = row order). A Lloyd iteration
assigns the rank's rows, then all-reduces the per-cluster sums (float64) and counts, so every rank computes the
same centroids; k-means++ draws each next centroid by inverse CDF over the concatenated rows, with the per-rank
totals all-reduced and one generator shared by all ranks, so 1 and N ranks pick the same points. Clusters that
end an iteration empty keep their previous centroid.

Cosine k-means (spherical) works on unit-norm rows and renormalizes each centroid after the mean; its inertia is
sum(1 - cos). L2 k-means' inertia is the sum of squared distances.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from runtime import Dist

logger = logging.getLogger(__name__)

Metric = Literal["cosine", "l2"]
Init = Literal["kmeans++", "random"]
LeafStrategy = Literal["random", "closest"]

# Rows per block when a [rows, k] distance matrix is formed: bounds memory at about 64 MiB of float32 per block
# for k = 1024 (larger k: smaller blocks).
DISTANCE_ELEMENTS_PER_BLOCK = 2**24


class CurationError(ValueError):
    """Input a curation step cannot work with (named in the message, with the fix)."""


# ---------------------------------------------------------------------------------------------------------------
# Collectives (no-ops on one process)


def _all_reduce_sum(tensor: torch.Tensor, dist_info: Dist | None) -> torch.Tensor:
    if dist_info is not None and dist_info.enabled:
        dist.all_reduce(tensor)
    return tensor


def _rank_row_counts(n_local: int, dist_info: Dist | None, device: torch.device) -> list[int]:
    if dist_info is None or not dist_info.enabled:
        return [n_local]
    counts = torch.zeros(dist_info.world_size, dtype=torch.int64, device=device)
    counts[dist_info.rank] = n_local
    return _all_reduce_sum(counts, dist_info).tolist()


def _rank(dist_info: Dist | None) -> int:
    return dist_info.rank if dist_info is not None and dist_info.enabled else 0


# ---------------------------------------------------------------------------------------------------------------
# Distances and assignment


def prepare(x: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Rows as float32, unit-norm for cosine."""
    x = x.float()
    return F.normalize(x, dim=1) if metric == "cosine" else x


def _block_rows(k: int) -> int:
    return max(1, DISTANCE_ELEMENTS_PER_BLOCK // max(k, 1))


def distances(x: torch.Tensor, centroids: torch.Tensor, metric: Metric) -> torch.Tensor:
    """[n, k]: squared L2 distances, or 1 - cosine similarity (rows and centroids already unit-norm)."""
    if metric == "cosine":
        return 1.0 - x @ centroids.T
    return (x.square().sum(1, keepdim=True) - 2.0 * x @ centroids.T + centroids.square().sum(1)).clamp_min_(0.0)


def assign(x: torch.Tensor, centroids: torch.Tensor, metric: Metric) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest centroid [n] int64, its distance [n] float32), computed in row blocks."""
    labels, dists = [], []
    for block in x.split(_block_rows(len(centroids))):
        d = distances(block, centroids, metric)
        best, index = d.min(dim=1)
        labels.append(index)
        dists.append(best)
    if not labels:
        return torch.zeros(0, dtype=torch.int64, device=x.device), torch.zeros(0, device=x.device)
    return torch.cat(labels), torch.cat(dists)


# ---------------------------------------------------------------------------------------------------------------
# Initialization


def _global_row(x: torch.Tensor, index: int, offsets: list[int], dist_info: Dist | None) -> torch.Tensor:
    """Row `index` of the rows of all ranks concatenated: its owner contributes it, the others zeros."""
    row = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    start = offsets[_rank(dist_info)]
    if start <= index < start + len(x):
        row += x[index - start].double()
    return _all_reduce_sum(row, dist_info).float()


def _global_rows(x: torch.Tensor, indices: np.ndarray, offsets: list[int], dist_info: Dist | None,
                 block: int = 65536) -> torch.Tensor:
    """Rows `indices` of all ranks' rows, in that order: one all-reduce per block of rows (each rank fills in the
    rows it owns, zeros elsewhere)."""
    start, parts = offsets[_rank(dist_info)], []
    for first in range(0, len(indices), block):
        wanted = torch.as_tensor(indices[first: first + block], device=x.device)
        rows = torch.zeros(len(wanted), x.shape[1], dtype=torch.float64, device=x.device)
        mine = (wanted >= start) & (wanted < start + len(x))
        rows[mine] = x[wanted[mine] - start].double()
        parts.append(_all_reduce_sum(rows, dist_info).float())
    return torch.cat(parts)


def init_centroids(x: torch.Tensor, k: int, metric: Metric, init: Init, seed: int,
                   dist_info: Dist | None = None) -> torch.Tensor:
    """[k, d] initial centroids drawn from the rows of all ranks (random distinct rows, or k-means++)."""
    counts = _rank_row_counts(len(x), dist_info, x.device)
    offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
    n = offsets[-1]
    if k > n:
        raise CurationError(f"cannot make {k} clusters from {n} points: ask for at most {n} clusters "
                            "(or cluster more data)")
    generator = np.random.default_rng(seed)  # the same draws on every rank
    if init == "random":
        return _global_rows(x, generator.choice(n, size=k, replace=False), offsets, dist_info)
    centroids = [_global_row(x, int(generator.integers(n)), offsets, dist_info)]
    closest = distances(x, centroids[0][None], metric)[:, 0].double()
    for _ in range(1, k):
        rank_totals = torch.zeros(len(counts), dtype=torch.float64, device=x.device)
        rank_totals[_rank(dist_info)] = closest.sum()
        rank_totals = _all_reduce_sum(rank_totals, dist_info).cpu().numpy()
        total = rank_totals.sum()
        if total <= 0:  # every point already is a centroid (duplicates): fall back to a uniform draw
            index = int(generator.integers(n))
        else:
            target = generator.random() * total
            owner = min(int(np.searchsorted(np.cumsum(rank_totals), target, side="right")), len(counts) - 1)
            local = 0
            if owner == _rank(dist_info):
                cumulative = torch.cumsum(closest, 0)
                remaining = torch.tensor([target - rank_totals[:owner].sum()], dtype=torch.float64, device=x.device)
                local = offsets[owner] + min(int(torch.searchsorted(cumulative, remaining)), len(x) - 1) + 1
            # The owner's row number, known to all ranks (the others add 0).
            index = int(_all_reduce_sum(torch.tensor([local], device=x.device), dist_info).item()) - 1
        centroid = _global_row(x, index, offsets, dist_info)
        centroids.append(centroid)
        closest = torch.minimum(closest, distances(x, centroid[None], metric)[:, 0].double())
    return torch.stack(centroids)


# ---------------------------------------------------------------------------------------------------------------
# Lloyd iterations


def lloyd_step(x: torch.Tensor, centroids: torch.Tensor, metric: Metric,
               dist_info: Dist | None = None) -> tuple[torch.Tensor, float]:
    """One Lloyd iteration over the rows of all ranks: (new centroids, inertia of the given centroids)."""
    labels, dists = assign(x, centroids, metric)
    k, d = centroids.shape
    sums = torch.zeros(k, d, dtype=torch.float64, device=x.device).index_add_(0, labels, x.double())
    counts = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(
        0, labels, torch.ones_like(dists, dtype=torch.float64))
    inertia = dists.double().sum().reshape(1)
    packed = _all_reduce_sum(torch.cat([sums.flatten(), counts, inertia]), dist_info)
    sums, counts, inertia = packed[: k * d].view(k, d), packed[k * d: k * d + k], packed[-1]
    filled = counts > 0
    new = centroids.double().clone()
    new[filled] = sums[filled] / counts[filled, None]
    if metric == "cosine":
        new[filled] = F.normalize(new[filled], dim=1)
    return new.float(), float(inertia)


def inertia_of(x: torch.Tensor, centroids: torch.Tensor, metric: Metric, dist_info: Dist | None = None) -> float:
    _, dists = assign(x, centroids, metric)
    return float(_all_reduce_sum(dists.double().sum().reshape(1), dist_info))


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [k, d]
    labels: torch.Tensor  # [n_local]: this rank's rows' clusters
    distances: torch.Tensor  # [n_local]: to their centroid
    inertia: float  # over all ranks


def kmeans(x: torch.Tensor, k: int, iterations: int, metric: Metric = "l2", init: Init = "kmeans++",
           seed: int = 0, dist_info: Dist | None = None, centroids: torch.Tensor | None = None,
           start_iteration: int = 0,
           on_iteration: Callable[[int, torch.Tensor], None] | None = None) -> KMeansResult:
    """k-means on the rows of all ranks (`x`: this rank's rows, already `prepare`d). `centroids` skips the
    initialization (a resumed run passes its checkpoint and `start_iteration`); `on_iteration(i, centroids)` is
    called after each iteration i (1-based), e.g. to checkpoint."""
    if centroids is None:
        centroids = init_centroids(x, k, metric, init, seed, dist_info)
    for iteration in range(start_iteration + 1, iterations + 1):
        centroids, _ = lloyd_step(x, centroids, metric, dist_info)
        if on_iteration is not None:
            on_iteration(iteration, centroids)
    labels, dists = assign(x, centroids, metric)
    inertia = float(_all_reduce_sum(dists.double().sum().reshape(1), dist_info))
    return KMeansResult(centroids, labels, dists, inertia)


# ---------------------------------------------------------------------------------------------------------------
# Hierarchical k-means with resampling


@dataclass(frozen=True)
class Level:
    clusters: int
    iterations: int = 20
    resample_steps: int = 0  # resampling steps after the first k-means (Vo et al.: 10 on the upper levels)
    resample_size: int = 1  # points per cluster kept by a resampling step (<= 1: no resampling)


def _first_per_cluster(labels: torch.Tensor, dists: torch.Tensor, k: int, size: int) -> torch.Tensor:
    """Positions of the `size` smallest distances within each cluster."""
    order = torch.sort(dists, stable=True).indices
    order = order[torch.sort(labels[order], stable=True).indices]  # by cluster, then by distance
    sorted_labels = labels[order]
    starts = torch.searchsorted(sorted_labels, torch.arange(k, device=labels.device))
    rank_in_cluster = torch.arange(len(order), device=labels.device) - starts[sorted_labels]
    return order[rank_in_cluster < size]


def closest_per_cluster(x: torch.Tensor, labels: torch.Tensor, dists: torch.Tensor, k: int, size: int,
                        dist_info: Dist | None = None) -> torch.Tensor:
    """The rows (of all ranks) among the `size` closest to their own centroid, identical on every rank: each
    rank proposes its `size` closest per cluster, the proposals are gathered and the global `size` closest kept."""
    keep = _first_per_cluster(labels, dists, k, size)
    rows, labels, dists = x[keep], labels[keep], dists[keep]
    if dist_info is not None and dist_info.enabled:
        rows, labels, dists = (_all_gather_rows(t, dist_info) for t in (rows, labels, dists))
        rows = rows[_first_per_cluster(labels, dists, k, size)]
    return rows


def _all_gather_rows(tensor: torch.Tensor, dist_info: Dist) -> torch.Tensor:
    counts = _rank_row_counts(len(tensor), dist_info, tensor.device)
    padded = torch.zeros((max(counts), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: len(tensor)] = tensor
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:count] for part, count in zip(gathered, counts)])


@dataclass
class LevelResult:
    centroids: torch.Tensor  # [k_t, d]
    labels: torch.Tensor  # level 1: this rank's points' clusters; level t > 1: cluster of each level t-1 centroid
    distances: torch.Tensor  # to the assigned centroid


# A checkpoint inside a level: {"phase", "iteration", "centroids"}. Phase 0 is the k-means on all points (over
# ranks: checkpointed every iteration), phase p >= 1 resampling step p (on a small set: checkpointed when done,
# with iteration = level.iterations).
LevelCheckpoint = dict


def cluster_level(x: torch.Tensor, level: Level, metric: Metric, init: Init, seed: int,
                  dist_info: Dist | None = None, resume: LevelCheckpoint | None = None,
                  checkpoint: Callable[[LevelCheckpoint], None] | None = None) -> LevelResult:
    """One level: k-means on `x` (rows of all ranks), then `level.resample_steps` resampling steps."""
    n_phases = 1 + (level.resample_steps if level.resample_size > 1 else 0)
    phase, iteration, centroids = 0, 0, None
    if resume is not None:
        phase, iteration, centroids = resume["phase"], resume["iteration"], resume["centroids"].to(x.device)
    if phase == 0 and (centroids is None or iteration < level.iterations):
        on_iteration = None
        if checkpoint is not None:
            def on_iteration(i: int, c: torch.Tensor) -> None:
                checkpoint({"phase": 0, "iteration": i, "centroids": c.cpu()})
        centroids = kmeans(x, level.clusters, level.iterations, metric, init, seed, dist_info, centroids, iteration,
                           on_iteration).centroids
    for step in range(phase + 1, n_phases):
        sample = closest_per_cluster(x, *assign(x, centroids, metric), level.clusters, level.resample_size,
                                     dist_info)
        # Every rank holds the same sample: the resampling k-means runs alike on each, without collectives. It
        # starts afresh (a new seed per step): started from the current centroids, k-means only polishes them
        # locally and a region's share of centroids never changes.
        centroids = kmeans(sample, level.clusters, level.iterations, metric, init, seed + step, None).centroids
        if checkpoint is not None:
            checkpoint({"phase": step, "iteration": level.iterations, "centroids": centroids.cpu()})
    labels, dists = assign(x, centroids, metric)
    return LevelResult(centroids, labels, dists)


def hierarchical_kmeans(x: torch.Tensor, levels: list[Level], metric: Metric = "l2", init: Init = "kmeans++",
                        seed: int = 0, dist_info: Dist | None = None) -> list[LevelResult]:
    """All levels at once (no checkpoints): level 1 on this rank's rows `x` of all ranks' data, level t > 1 on the
    centroids of level t - 1 (held whole by every rank, so computed alike on each)."""
    check_levels([len(x) if dist_info is None or not dist_info.enabled
                  else sum(_rank_row_counts(len(x), dist_info, x.device))], levels)
    results = []
    points = prepare(x, metric)
    for t, level in enumerate(levels):
        results.append(cluster_level(points, level, metric, init, seed + t, dist_info if t == 0 else None))
        points = results[-1].centroids
    return results


def check_levels(n_points: list[int], levels: list[Level]) -> None:
    """One line naming the level whose cluster count cannot be made (before any work)."""
    available = n_points[0]
    for t, level in enumerate(levels, start=1):
        if level.clusters < 1 or level.clusters > available:
            raise CurationError(f"level {t} asks for {level.clusters} clusters of {available} "
                                f"{'points' if t == 1 else 'level-' + str(t - 1) + ' centroids'}: use between 1 and "
                                f"{available} clusters there (and fewer at each next level)")
        available = level.clusters


# ---------------------------------------------------------------------------------------------------------------
# Balanced hierarchical sampling


def split_budget(sizes: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Integer shares of `budget` over children of `sizes`: equal shares, capped by each child's size, the
    remainder passed on to the others (water-filling); the last uneven units to random children with room."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if budget >= sizes.sum():
        return sizes.copy()
    low, high = 0, int(sizes.max())  # the largest cap c with sum(min(sizes, c)) <= budget
    while low < high:
        middle = (low + high + 1) // 2
        if np.minimum(sizes, middle).sum() <= budget:
            low = middle
        else:
            high = middle - 1
    shares = np.minimum(sizes, low)
    remainder = int(budget - shares.sum())
    if remainder:
        room = np.flatnonzero(sizes > low)
        shares[rng.choice(room, size=remainder, replace=False)] += 1
    return shares


def balanced_sample(labels: list[np.ndarray], target: int, seed: int = 0, strategy: LeafStrategy = "random",
                    point_distances: np.ndarray | None = None) -> np.ndarray:
    """Indices (sorted) of `target` points drawn top-down through the hierarchy.

    labels[0][i] is point i's level-1 cluster, labels[t][j] the level-(t+1) cluster of level-t cluster j. The
    "closest" strategy takes the points nearest to their level-1 centroid (`point_distances`), "random" draws."""
    n_points = len(labels[0])
    if target > n_points:
        raise CurationError(f"the target size {target} is larger than the pool ({n_points} images): ask for at most "
                            f"{n_points}")
    if target < 0:
        raise CurationError(f"the target size must be >= 0, got {target}")
    if strategy == "closest" and point_distances is None:
        raise CurationError("strategy 'closest' needs the points' distances to their centroids")
    rng = np.random.default_rng(seed)
    # Members of every cluster, per level: members[t][c] = indices of level-t items (points for t = 0) in c.
    members = [_group(level_labels) for level_labels in labels]
    # Points under each cluster of each level.
    sizes = [np.bincount(labels[0], minlength=len(members[0]))]
    for t in range(1, len(labels)):
        sizes.append(np.bincount(labels[t], weights=sizes[t - 1], minlength=len(members[t])).astype(np.int64))
    budgets = split_budget(sizes[-1], target, rng)
    for t in range(len(labels) - 1, 0, -1):
        child_budgets = np.zeros(len(labels[t]), dtype=np.int64)
        for cluster, children in enumerate(members[t]):
            if budgets[cluster]:
                child_budgets[children] = split_budget(sizes[t - 1][children], int(budgets[cluster]), rng)
        budgets = child_budgets
    chosen = []
    for cluster, points in enumerate(members[0]):
        take = int(budgets[cluster])
        if take == 0:
            continue
        if strategy == "closest":
            chosen.append(points[np.argsort(point_distances[points], kind="stable")[:take]])
        else:
            chosen.append(rng.choice(points, size=take, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _group(labels: np.ndarray) -> list[np.ndarray]:
    """members[c] = the indices i with labels[i] == c, for c in range(max + 1)."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(labels.max() + 2 if len(labels) else 1))
    return [order[bounds[c]: bounds[c + 1]] for c in range(len(bounds) - 1)]


# ---------------------------------------------------------------------------------------------------------------
# Retrieval and near duplicates

Backend = Literal["torch", "faiss"]


def nearest_neighbors(queries: torch.Tensor, pool: torch.Tensor, k: int, backend: Backend = "torch",
                      block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine similarities [q, k], pool indices [q, k]) of each query's k most similar pool rows, most similar
    first. "torch": exact, blocked over the pool; "faiss": faiss' exact inner-product index (IndexFlatIP)."""
    if len(queries) == 0:
        raise CurationError("the seed set is empty: give a seed folder or list with at least one readable image")
    if not 1 <= k <= len(pool):
        raise CurationError(f"cannot retrieve {k} neighbours from a pool of {len(pool)} images: use 1 <= k <= "
                            f"{len(pool)}")
    q, p = F.normalize(queries.float(), dim=1), F.normalize(pool.float(), dim=1)
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(p.shape[1])
        index.add(np.ascontiguousarray(p.cpu().numpy()))
        sims, ids = index.search(np.ascontiguousarray(q.cpu().numpy()), k)
        return torch.from_numpy(sims), torch.from_numpy(ids).long()
    best_sims = torch.full((len(q), k), -torch.inf, device=q.device)
    best_ids = torch.zeros((len(q), k), dtype=torch.int64, device=q.device)
    for start in range(0, len(p), block):
        sims = q @ p[start: start + block].T
        top_sims, top_ids = sims.topk(min(k, sims.shape[1]), dim=1)
        merged_sims = torch.cat([best_sims, top_sims], dim=1)
        merged_ids = torch.cat([best_ids, top_ids + start], dim=1)
        best_sims, which = merged_sims.topk(k, dim=1)
        best_ids = merged_ids.gather(1, which)
    return best_sims, best_ids


def near_duplicates(x: torch.Tensor, threshold: float, block: int = 2048) -> np.ndarray:
    """Boolean mask of rows to drop: a row whose cosine similarity to an earlier kept row is >= threshold (each
    group of near duplicates keeps its first member)."""
    x = F.normalize(x.float(), dim=1)
    earlier_similar: list[list[int]] = [[] for _ in range(len(x))]
    for start in range(0, len(x), block):
        rows = x[start: start + block]
        sims = rows @ x[: start + len(rows)].T
        # Only pairs (i, j) with j < i count.
        columns = torch.arange(start + len(rows), device=x.device)
        sims = sims.masked_fill(columns[None, :] >= columns[start:, None], -torch.inf)
        for i, j in (sims >= threshold).nonzero().tolist():
            earlier_similar[start + i].append(j)
    drop = np.zeros(len(x), dtype=bool)
    for i, similar in enumerate(earlier_similar):
        drop[i] = any(not drop[j] for j in similar)
    return drop


# ---------------------------------------------------------------------------------------------------------------
# Balance measures


def normalized_entropy(classes: np.ndarray, n_classes: int) -> float:
    """Entropy of the class distribution divided by log(n_classes): 1 = perfectly uniform over all classes."""
    counts = np.bincount(np.asarray(classes, dtype=np.int64), minlength=n_classes).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(n_classes))


def coverage(classes: np.ndarray, n_classes: int) -> float:
    """Fraction of the classes with at least one member."""
    return float(len(np.unique(classes)) / n_classes)
