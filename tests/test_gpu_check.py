"""bench/gpu_check.sh --dry-run: the prepared GPU script's plan and every step a CPU can run (CI runs it here)."""

import json
import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OUT": str(tmp_path)}
    result = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), "--dry-run"], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "the plan on a CUDA machine" in result.stdout
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.count(": exit 0,") == 4, summary
    assert "3 passed" in (tmp_path / "interpreter_tests.txt").read_text()
    assert "skipped" in (tmp_path / "gpu_tests.txt").read_text()  # collected, and skipped without CUDA
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert timings["environment"]["dry_run"] is True
    for section in ("attention", "sinkhorn", "gram", "train", "distill", "loader", "curate"):
        rows = timings[section]
        assert rows and all("error" not in row for row in rows), (section, rows)
    assert (tmp_path / "timings.md").read_text().startswith("# GPU timings")
    learning = json.loads((tmp_path / "learning.json").read_text())
    assert learning["environment"]["dry_run"] is True
    assert [run["run"] for run in learning["runs"]] == ["working", "shuffled", "koleo-off"]
    for run in learning["runs"]:
        assert run["steps"] == 3 and 0 <= run["knn_top1_k20"] <= 100 and run["images_per_s"] > 0, run
        assert sorted(run["knn_curve"]) == ["0", "2", "3"] and "rankme" in run["health"], run
    assert "Targets: working DINO term <= 0.8 ln K" in (tmp_path / "learning.md").read_text()
