"""The checkpoint-memory benchmark end to end at toy size: both formats save and resume through torchrun, and the
sharded resume reads less than the single file, which every rank reads whole."""

import pytest

from bench import bench_checkpoint_memory as bench


@pytest.mark.slow
def test_both_formats_are_measured_and_the_sharded_resume_reads_less(tmp_path):
    results = bench.measure("vit_tiny", nproc=2, folder=tmp_path, timeout_s=600)
    assert set(results) == {"file", "sharded"}
    for fmt in ("file", "sharded"):
        assert results[fmt]["bytes"] > 0
        for phase in ("save", "resume"):
            assert results[fmt][phase]["peak_mib"] > 0 and results[fmt][phase]["seconds"] > 0
    assert results["sharded"]["resume"]["increase_mib"] < results["file"]["resume"]["increase_mib"]
    table = bench.report(results, "vit_tiny", 2)
    assert "| file |" in table and "| sharded |" in table
