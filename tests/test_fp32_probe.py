"""bench/fp32_attention_probe.py on the CPU: every 32-bit tile shape against float64 through Triton's interpreter,
and a child that dies at one config is reported as that config's fault while the probe goes on with the next."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAULTY = "fwd D=64 128x16 w8 s2"


@pytest.mark.slow
def test_probe_isolates_a_faulting_config(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "bench/fp32_attention_probe.py", "--dry-run", "--simulate-fault", FAULTY,
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "fp32_probe.json").read_text())
    status = {r["name"]: r["status"] for r in results}
    assert len(status) == len(results) == 19  # every 32-bit tile shape of the three kernels, once each
    assert status.pop(FAULTY) == "fault"
    assert set(status.values()) == {"ok"}, status  # the configs after the fault ran in a new child
    for r in results:
        if r["status"] == "ok":
            assert max(r["out"], r["dq"], r["dk"], r["dv"]) < 1e-5, r
    assert f"18 of 19 configs ok; not ok: ['{FAULTY}']" in done.stdout
