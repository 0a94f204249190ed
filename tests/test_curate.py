"""curate.py end to end on a tiny generated pool: every step, resume of embed and cluster, the file lists
train.py reads, and bad input (unreadable files, empty seeds, too many clusters, too large a target)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import curate
from data.curation import CurationError
from data.datasets import FileListDataset

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(work_dir: Path, *flags: str) -> curate.CurateConfig:
    return curate.parse_config([
        "small", "--work-dir", str(work_dir), "--device", "cpu", "--generate.images", "150",
        "--generate.seed-images-per-concept", "1", "--generate.size", "32", "--embed.size", "32",
        "--embed.chunk-size", "64", "--embed.batch-size", "32", "--embed.num-workers", "0",
        "--cluster.clusters", "12", "4", "--cluster.iterations", "5", "--cluster.resample-size", "1", "2",
        "--cluster.resample-steps", "0", "2", *flags,
    ])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    work_dir = tmp_path_factory.mktemp("curate")
    curate.curate(tiny(work_dir))
    return work_dir


def test_pipeline_writes_lists_train_reads_and_a_summary(finished):
    summary = json.loads((finished / "output" / "summary.json").read_text())
    kept = len(np.load(finished / "dedup" / "kept.npy"))
    assert summary["pool_images"] == 150 and summary["embedded"] == 150
    assert summary["curated"] == round(0.1 * kept)
    assert summary["near_duplicates_removed"] == 150 - kept
    assert sum(summary["level1_cluster_size_histogram"].values()) == 12
    curated = FileListDataset(finished / "output" / "curated.txt")
    assert len(curated) == summary["curated"] and curated[0][0].size == (32, 32)
    assert all(path.is_absolute() for path, _ in curated.samples)
    retrieved = FileListDataset(finished / "output" / "retrieved.txt")
    assert len(retrieved) == summary["retrieved"] <= 50 * 4
    assert set(summary["class_balance"]) == {"pool", "curated", "random_same_size"}


def test_embed_resumes_only_missing_chunks(finished, tmp_path):
    import shutil

    shutil.copytree(finished, tmp_path / "w")
    chunk = tmp_path / "w" / "embed" / "pool" / "chunk-000001"
    before = np.load(f"{chunk}.npy")
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "w" / "embed" / "pool").glob("chunk-*.npy")}
    Path(f"{chunk}.json").unlink()  # chunk 1 unfinished
    curate.curate(tiny(tmp_path / "w", "--steps", "embed"))
    after = {p: p.stat().st_mtime_ns for p in stamps}
    redone = {p.name for p in stamps if after[p] != stamps[p]}
    assert redone == {"chunk-000001.npy", "chunk-000001.ids.npy"}
    assert np.array_equal(np.load(f"{chunk}.npy"), before)


def test_cluster_resumes_from_a_level_checkpoint(finished, tmp_path):
    import shutil

    shutil.copytree(finished, tmp_path / "w")
    folder = tmp_path / "w" / "cluster"
    reference = {t: torch.load(folder / f"level{t}.pt", weights_only=True) for t in (1, 2)}
    # Level 2 interrupted after iteration 3 of its first k-means: rebuild that state by rerunning up to it.
    from data.curation import Level, cluster_level

    states = []
    cluster_level(reference[1]["centroids"], Level(4, 5, 2, 2), "cosine", "kmeans++", 2, checkpoint=states.append)
    (folder / "level2.pt").unlink()
    torch.save({**states[2], "inputs": reference[2]["inputs"]}, folder / "level2.state.pt")
    curate.curate(tiny(tmp_path / "w", "--steps", "cluster"))
    resumed = torch.load(folder / "level2.pt", weights_only=True)
    assert torch.equal(resumed["centroids"], reference[2]["centroids"])
    assert not (folder / "level2.state.pt").exists()


def test_unreadable_pool_files_are_skipped_and_counted(tmp_path):
    from data.datasets import concept_image

    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(30):
        concept_image(i, i % 50, 32, 0).save(pool / f"{i:03d}.png")
    (pool / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    good = (pool / "000.png").read_bytes()
    (pool / "zz_truncated.png").write_bytes(good[: len(good) // 2])
    (pool / "zz_text.jpg").write_text("not an image")
    (pool / "notes.txt").write_text("ignored: not an image extension")
    summary = curate.curate(tiny(tmp_path / "w", "--pool", str(pool), "--seeds", "None",
                                 "--steps", "embed", "dedup", "cluster", "sample", "output",
                                 "--dedup.threshold", "1.0", "--cluster.clusters", "6", "3"))
    assert summary["pool_images"] == 33 and summary["embedded"] == 30 and summary["unreadable_skipped"] == 3
    assert "retrieved" not in summary


def test_bad_input_fails_with_one_line(tmp_path, finished):
    with pytest.raises(CurationError, match="level 1 asks for 5000 clusters of"):
        curate.curate(tiny(finished, "--steps", "cluster", "--cluster.clusters", "5000", "4"))
    with pytest.raises(CurationError, match="sample.target=100000 is larger than the deduplicated pool"):
        curate.curate(tiny(finished, "--steps", "sample", "--sample.target", "100000"))
    with pytest.raises(CurationError, match="was made from other embeddings, dedup output or cluster settings"):
        curate.curate(tiny(finished, "--steps", "cluster", "--cluster.iterations", "6"))
    with pytest.raises(CurationError, match="must decrease from level to level"):
        curate.curate(tiny(finished, "--cluster.clusters", "4", "12"))
    with pytest.raises(CurationError, match="neither an image folder nor a .txt image list"):
        curate.curate(tiny(tmp_path / "w", "--steps", "embed", "--pool", str(tmp_path / "missing.csv")))
    empty = tmp_path / "seeds.txt"
    empty.write_text("# no images\n")
    with pytest.raises(CurationError, match="no images found in image list"):
        curate.curate(tiny(tmp_path / "w", "--steps", "embed", "--pool", str(finished / "pool" / "pool.txt"),
                           "--seeds", str(empty)))


@pytest.mark.slow
def test_torchrun_two_ranks_write_what_one_process_writes(tmp_path, finished):
    """curate.py under torchrun (2 CPU ranks, gloo): embed chunks dealt to the ranks, level-1 k-means over both;
    the same embeddings, clusters (centroids within 1e-5) and sample as the single process."""
    import shutil
    import subprocess
    import sys

    from tests.helpers import REPO, free_port, process_env

    shutil.copytree(finished / "pool", tmp_path / "pool")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(REPO / "curate.py"), "small", "--work-dir", str(tmp_path), "--device", "cpu",
               "--generate.images", "150", "--generate.seed-images-per-concept", "1", "--generate.size", "32",
               "--embed.size", "32", "--embed.chunk-size", "64", "--embed.batch-size", "32",
               "--embed.num-workers", "0", "--cluster.clusters", "12", "4", "--cluster.iterations", "5",
               "--cluster.resample-size", "1", "2", "--cluster.resample-steps", "0", "2"]
    result = subprocess.run(command, cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for chunk in range(3):
        assert np.array_equal(np.load(tmp_path / "embed" / "pool" / f"chunk-{chunk:06d}.npy"),
                              np.load(finished / "embed" / "pool" / f"chunk-{chunk:06d}.npy"))
    for t in (1, 2):
        one = torch.load(finished / "cluster" / f"level{t}.pt", weights_only=True)
        two = torch.load(tmp_path / "cluster" / f"level{t}.pt", weights_only=True)
        assert (one["centroids"] - two["centroids"]).abs().max() <= 1e-5
    assert np.array_equal(np.load(tmp_path / "sample" / "rows.npy"), np.load(finished / "sample" / "rows.npy"))


@pytest.fixture(scope="module")
def shard_pool(tmp_path_factory) -> Path:
    """60 PNG images of 6 concepts (image i: concept i % 6) as 4 tar shards of 15; shard 1 gets a corrupt extra
    sample, shard 2 a sample with no image (a text member), shard 3 is cut in half (a truncated tar)."""
    import io
    import tarfile

    from data.datasets import concept_image
    from data.shards import write_shards

    folder = tmp_path_factory.mktemp("shard-pool")
    (folder / "images").mkdir()
    for i in range(60):
        concept_image(i, i % 6, 32, 0).save(folder / "images" / f"{i:03d}.png")
    (folder / "images" / "list.txt").write_text("".join(f"{i:03d}.png {i % 6}\n" for i in range(60)))
    write_shards(FileListDataset(folder / "images" / "list.txt"), folder / "pool", 15)
    with tarfile.open(folder / "pool" / "000001.tar", "a") as tar:
        info = tarfile.TarInfo("corrupt.png")
        info.size = 20
        tar.addfile(info, io.BytesIO(b"\x89PNG\r\n\x1a\n" + b"garbage" + b"\0" * 5))
    with tarfile.open(folder / "pool" / "000002.tar", "a") as tar:
        info = tarfile.TarInfo("notes.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"notes"))
    cut = folder / "pool" / "000003.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    return folder


def test_a_shard_pool_is_embedded_curated_trained_on_and_written_to_new_shards(shard_pool, tmp_path):
    import train
    from data.augment import AugmentConfig, CropSizes
    from data.datasets import build_loader
    from data.shards import ShardImages, read_sample, sample_label, shard_samples
    from tests.helpers import tiny_config

    pattern = str(shard_pool / "pool" / "{000000..000003}.tar")
    summary = curate.curate(tiny(tmp_path, "--pool", pattern, "--seeds", "None", "--dedup.threshold", "1.0",
                                 "--cluster.clusters", "6", "3", "--sample.target", "10",
                                 "--steps", "embed", "dedup", "cluster", "sample", "output", "shards"))
    chunks = [json.loads((tmp_path / "embed" / "pool" / f"chunk-{c:06d}.json").read_text()) for c in range(4)]
    assert [c["images"] for c in chunks[:3]] == [15, 16, 16] and 0 < chunks[3]["images"] < 15
    assert chunks[1]["skipped"] == [str(shard_pool / "pool" / "000001.tar#corrupt")]
    assert chunks[2]["skipped"] == [str(shard_pool / "pool" / "000002.tar#notes")]
    assert len(chunks[3]["skipped"]) == 1 and "damaged tar" in chunks[3]["skipped"][0]
    assert [c["damage"] is None for c in chunks] == [True, True, True, False]
    assert summary["embedded"] == 45 + chunks[3]["images"] and summary["unreadable_skipped"] == 3
    # The curated list names shard samples; train.py's list reader opens them: the very image files of the pool.
    curated = FileListDataset(tmp_path / "output" / "curated.txt")
    assert len(curated) == summary["curated"] == 10
    for entry, label in curated.samples:
        shard, key = str(entry).split("#")
        assert Path(shard).is_absolute() and shard.endswith(".tar")
        assert read_sample(str(entry))[0] == (shard_pool / "images" / f"{int(key):03d}.png").read_bytes()
        assert label == int(key) % 6
    batch = next(iter(build_loader(curated, AugmentConfig(n_local_crops=1), CropSizes(32, 16), batch_size=2)))
    assert int(batch["n_skipped"].sum()) == 0 and len(batch["labels"]) == 2
    run = tiny_config(tmp_path / "train", "--optim.iterations", "2", "--data.batch-size", "2", "--data.path",
                      str(tmp_path / "output" / "curated.txt"))
    assert train.train(run)["step"] == 2
    # The shards step turns the list into new shards: the same files and labels, in list order.
    new = ShardImages(str(tmp_path / "shards" / "{000000..000000}.tar"))
    samples = list(shard_samples(new.urls[0], lambda err: False))
    assert [s["png"] for s in samples] == [read_sample(str(entry))[0] for entry, _ in curated.samples]
    assert [sample_label(s) for s in samples] == [label for _, label in curated.samples]


def test_shard_embedding_is_split_over_ranks_and_resumes(shard_pool, tmp_path, monkeypatch):
    import runtime

    pattern = str(shard_pool / "pool" / "{000000..000003}.tar")
    # One process with 2 data-loader workers (each its shards) against 2 ranks of none.
    curate.curate(tiny(tmp_path / "one", "--pool", pattern, "--seeds", "None", "--steps", "embed",
                       "--embed.num-workers", "2"))
    one = curate.load_embeddings(tmp_path / "one" / "embed" / "pool")
    monkeypatch.setattr(runtime, "barrier", lambda dist_info: None)  # two ranks, one after the other
    two = tiny(tmp_path / "two", "--pool", pattern, "--seeds", "None")
    backbone = curate.load_embed_backbone(two.embed.checkpoint, torch.device("cpu"))
    folder = tmp_path / "two" / "embed" / "pool"
    for rank in (1, 0):
        dist_info = runtime.Dist(rank, 2, rank, torch.device("cpu"))
        curate.embed_shards(curate.read_pool(two, pattern), folder, two.embed, backbone, dist_info, "pool")
        if rank == 1:
            assert sorted(p.name for p in folder.glob("chunk-*.json")) == ["chunk-000001.json", "chunk-000003.json"]
    merged = curate.load_embeddings(folder)
    assert torch.equal(merged.features, one.features) and np.array_equal(merged.ids, one.ids)
    assert merged.items == one.items and merged.skipped == one.skipped
    # Resume: a shard whose chunk is unfinished (no json) is embedded again, the others are kept.
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("chunk-*.npy")}
    (folder / "chunk-000002.json").unlink()
    curate.embed_shards(curate.read_pool(two, pattern), folder, two.embed, backbone,
                        runtime.Dist(0, 1, 0, torch.device("cpu")), "pool")
    assert {p.name for p in stamps if p.stat().st_mtime_ns != stamps[p]} == {"chunk-000002.npy",
                                                                               "chunk-000002.ids.npy"}
    with pytest.raises(CurationError, match="holds 3 of 4 shards' embeddings"):
        (folder / "chunk-000000.json").unlink()
        curate.load_embeddings(folder)
