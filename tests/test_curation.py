"""data/curation.py on constructed data with known answers: k-means against scikit-learn, 1 vs 2 ranks, resume,
budget splitting, balanced sampling of a long-tailed mixture, retrieval against brute force, planted duplicates."""

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from data.curation import (
    CurationError,
    Level,
    balanced_sample,
    check_levels,
    closest_per_cluster,
    cluster_level,
    coverage,
    hierarchical_kmeans,
    init_centroids,
    kmeans,
    near_duplicates,
    nearest_neighbors,
    normalized_entropy,
    prepare,
    split_budget,
)
from tests.helpers import free_port

pytestmark = pytest.mark.usefixtures("single_thread")


def blobs(n: int, centers: int, dim: int, seed: int, spread: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(centers, dim, generator=g)
    return means[torch.randint(0, centers, (n,), generator=g)] + torch.randn(n, dim, generator=g)


def long_tailed_embeddings(n: int, n_classes: int, dim: int, exponent: float, seed: int):
    """(embeddings, class of each): a Gaussian per class around a random direction, Zipf class frequencies."""
    from data.datasets import zipf_counts

    g = np.random.default_rng(seed)
    counts = zipf_counts(n, n_classes, exponent)
    labels = np.repeat(np.arange(n_classes), counts)
    means = g.standard_normal((n_classes, dim))
    x = means[labels] * 3.0 + g.standard_normal((len(labels), dim))
    return torch.tensor(x, dtype=torch.float32), labels


def test_kmeans_inertia_matches_sklearn():
    from sklearn.cluster import KMeans

    x = blobs(3000, 12, 8, seed=1)
    for init in ("kmeans++", "random"):
        start = init_centroids(x, 12, "l2", init, seed=3)
        ours = kmeans(x, 12, 8, "l2", centroids=start)
        theirs = KMeans(12, init=start.double().numpy(), n_init=1, max_iter=8, tol=0.0, algorithm="lloyd").fit(
            x.double().numpy())
        assert abs(ours.inertia - theirs.inertia_) / theirs.inertia_ < 1e-2
        # Same data, init and iterations: the same centroids, not just a similar inertia.
        assert torch.allclose(ours.centroids.double(), torch.from_numpy(theirs.cluster_centers_), atol=1e-4)


def test_init_picks_distinct_data_rows_and_rejects_too_many_clusters():
    x = torch.randn(50, 4)
    for init in ("kmeans++", "random"):
        centroids = init_centroids(x, 10, "l2", init, seed=0)
        matches = (centroids[:, None] == x[None]).all(-1).nonzero()[:, 1]
        assert len(set(matches.tolist())) == 10
    with pytest.raises(CurationError, match="cannot make 51 clusters from 50 points"):
        init_centroids(x, 51, "l2", "kmeans++", seed=0)
    with pytest.raises(CurationError, match="level 2 asks for 20 clusters of 10"):
        check_levels([50], [Level(10), Level(20)])


def test_cosine_kmeans_centroids_are_unit_norm_means():
    x = prepare(blobs(800, 5, 6, seed=2), "cosine")
    result = kmeans(x, 5, 10, "cosine", seed=0)
    assert torch.allclose(result.centroids.norm(dim=1), torch.ones(5), atol=1e-5)
    for c in range(5):
        members = x[result.labels == c]
        expected = torch.nn.functional.normalize(members.double().mean(0), dim=0)
        # labels are the assignment to the final centroids: one more Lloyd step would not move them much
        assert torch.nn.functional.cosine_similarity(expected, result.centroids[c].double(), dim=0) > 0.999


def test_level_resumes_to_the_same_centroids():
    x = prepare(blobs(600, 6, 4, seed=4), "l2")
    level = Level(12, iterations=6, resample_steps=2, resample_size=5)
    saved = []
    full = cluster_level(x, level, "l2", "kmeans++", 7, checkpoint=saved.append)
    assert [(s["phase"], s["iteration"]) for s in saved] == [(0, i) for i in range(1, 7)] + [(1, 6), (2, 6)]
    for state in (saved[2], saved[6]):  # mid k-means, after the first resampling step
        resumed = cluster_level(x, level, "l2", "kmeans++", 7, resume=state)
        assert torch.equal(resumed.centroids, full.centroids)


def test_closest_per_cluster():
    x = torch.arange(10, dtype=torch.float32)[:, None]
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 0, 1])
    dists = torch.tensor([5.0, 1.0, 3.0, 9.0, 2.0, 4.0, 1.0, 0.0, 2.0, 0.5])
    rows = closest_per_cluster(x, labels, dists, 3, 2)
    assert sorted(rows[:, 0].long().tolist()) == [1, 6, 7, 8, 9]


def test_split_budget_is_water_filling():
    g = np.random.default_rng(0)
    assert split_budget(np.array([1, 5, 10]), 9, g).tolist() == [1, 4, 4]
    assert split_budget(np.array([2, 2, 10]), 12, g).tolist() == [2, 2, 8]
    assert split_budget(np.array([3, 4]), 100, g).tolist() == [3, 4]
    shares = split_budget(np.array([10, 10, 10]), 10, g)
    assert shares.sum() == 10 and sorted(shares.tolist()) == [3, 3, 4]


def test_balanced_sample_top_down_known_answer():
    # 6 level-1 clusters of sizes 1, 1, 1, 1, 10, 30 under 2 level-2 clusters {0,1,2,3} and {4,5}.
    sizes = [1, 1, 1, 1, 10, 30]
    labels1 = np.repeat(np.arange(6), sizes)
    labels2 = np.array([0, 0, 0, 0, 1, 1])
    chosen = balanced_sample([labels1, labels2], 12, seed=0)
    per_cluster = np.bincount(labels1[chosen], minlength=6)
    # 6 per level-2 cluster; the first can give only 4, so the remainder (2) goes to the second: 8 = 4 + 4.
    assert per_cluster.tolist() == [1, 1, 1, 1, 4, 4]
    assert len(np.unique(chosen)) == 12
    assert np.array_equal(balanced_sample([labels1, labels2], 12, seed=0), chosen)  # seeded
    closest = balanced_sample([labels1, labels2], 12, strategy="closest", point_distances=np.arange(44.0))
    assert closest[labels1[closest] == 5].tolist() == [14, 15, 16, 17]
    with pytest.raises(CurationError, match="larger than the pool"):
        balanced_sample([labels1, labels2], 45)


def test_curated_subset_of_a_long_tailed_pool_is_balanced():
    """Measured target: a 10 % curated subset of 20k points of 50 classes with Zipf frequencies (largest > 100x
    the smallest) has normalized class entropy >= 0.95 and covers >= 95 % of the classes; a random subset does
    not."""
    x, labels = long_tailed_embeddings(20_000, 50, 32, exponent=1.2, seed=0)
    counts = np.bincount(labels)
    assert counts.max() >= 100 * counts.min()
    levels = hierarchical_kmeans(x, [Level(200, 15), Level(50, 15, 5, 3)], "cosine", "kmeans++", seed=0)
    chosen = balanced_sample([levels[0].labels.numpy(), levels[1].labels.numpy()], 2000, seed=0)
    random = np.random.default_rng(0).choice(len(labels), 2000, replace=False)
    assert normalized_entropy(labels[chosen], 50) >= 0.95 and coverage(labels[chosen], 50) >= 0.95
    assert normalized_entropy(labels[random], 50) < 0.9


def test_retrieval_is_exact_against_brute_force():
    g = torch.Generator().manual_seed(0)
    pool, queries = torch.randn(1000, 16, generator=g), torch.randn(37, 16, generator=g)
    normalize = torch.nn.functional.normalize
    brute = (normalize(queries, dim=1) @ normalize(pool, dim=1).T).topk(10, dim=1)
    for backend in ("torch", "faiss"):
        sims, ids = nearest_neighbors(queries, pool, 10, backend=backend, block=128)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), brute.indices.tolist())])
        assert recall == 1.0
        assert torch.allclose(sims, brute.values, atol=1e-5)
    with pytest.raises(CurationError, match="seed set is empty"):
        nearest_neighbors(torch.zeros(0, 16), pool, 3)
    with pytest.raises(CurationError, match="cannot retrieve 1001 neighbours"):
        nearest_neighbors(queries, pool, 1001)


def test_planted_near_duplicates_are_removed():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 32, generator=g)
    originals = torch.arange(0, 500, 7)
    copies = x[originals] + 0.01 * torch.randn(len(originals), 32, generator=g)
    pool = torch.cat([x, copies])
    drop = near_duplicates(pool, 0.99, block=64)
    assert drop[500:].all() and not drop[:500].any()
    # A chain a ~ b ~ c (c not similar to a): b goes with a, c stays because its only near neighbour b was dropped.
    a = torch.tensor([1.0, 0.0])
    chain = torch.stack([a, torch.tensor([1.0, 0.12]), torch.tensor([1.0, 0.24])])
    assert near_duplicates(chain, 0.99).tolist() == [False, True, False]


RANK_CASES = (("l2", "kmeans++"), ("cosine", "kmeans++"), ("l2", "random"))


def _two_rank_kmeans(rank: int, port: int, x: torch.Tensor, out: dict) -> None:
    import os

    import torch.distributed as dist

    from runtime import Dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    half = len(x) // 2 + 13  # unequal shares
    rows = x[:half] if rank == 0 else x[half:]
    info = Dist(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
    for metric, init in RANK_CASES:
        level = cluster_level(prepare(rows, metric), Level(9, 5, 2, 4), metric, init, 3, info)
        if rank == 0:
            out[metric, init] = level.centroids
    dist.destroy_process_group()


def test_two_ranks_give_the_same_centroids_as_one():
    x = blobs(900, 9, 5, seed=5)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_two_rank_kmeans, args=(free_port(), x, out), nprocs=2)
    for metric, init in RANK_CASES:
        single = cluster_level(prepare(x, metric), Level(9, 5, 2, 4), metric, init, 3)
        assert (out[metric, init] - single.centroids).abs().max() <= 1e-5, (metric, init)
