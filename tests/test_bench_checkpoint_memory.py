"""The checkpoint-memory benchmark end to end at toy size: both formats save and resume through torchrun, and the
sharded resume reads less than the single file, which every rank reads whole."""

import pytest

from bench import bench_checkpoint_memory as bench


@pytest.mark.slow
def test_both_formats_are_measured_and_the_sharded_resume_reads_less(tmp_path):
    small_heads = ["--model.dino-prototypes", "1024", "--model.ibot-prototypes", "1024", "--model.dino-hidden", "256",
                   "--model.ibot-hidden", "256", "--model.dino-bottleneck", "64", "--model.ibot-bottleneck", "64"]
    results = bench.measure("vit_small", nproc=2, folder=tmp_path, timeout_s=600, heads=small_heads)
    assert set(results) == {"file", "sharded"}
    for fmt in ("file", "sharded"):
        assert results[fmt]["bytes"] > 0
        for phase in ("save", "resume"):
            assert results[fmt][phase]["peak_mib"] > 0 and results[fmt][phase]["seconds"] > 0
    assert results["sharded"]["resume"]["increase_mib"] < results["file"]["resume"]["increase_mib"]
    table = bench.report(results, "vit_small", 2)  # (its title names the default heads; the rows are what matter)
    assert "| file |" in table and "| sharded |" in table
