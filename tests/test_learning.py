"""The objective learns end to end: a short run of the demo recipe on generated images must fit the DINO targets
well below the value of a uniform prediction, and the same run with the teacher's targets shuffled across samples
(an objective that no longer ties a crop to its own image: what a misaligned target or mask would do) must not.

The run leaves out the photometric augmentations (`--augment.no-photometric`). With them, a fresh ViT-tiny's two
views of an image get targets barely more alike than two different images' (docs/ablations.md), the DINO term
stays at its uniform value for thousands of steps and no short run can tell a working objective from a broken one;
without them the two views agree and the DINO term falls within a few hundred steps. Measured on the 2-core CPU
(200 steps, ~70 s per run): see the test's docstring.

Why not k-NN on held-out images: at this budget k-NN cannot tell the two apart. After 1000 steps the run with
shuffled targets reaches the same k-NN as the working one (32.0 % against 31.2 %), because the gain over
initialization comes from KoLeo (without it k-NN falls to 11.4 %); docs/ablations.md, section 1.
The runs use lr 1e-3, the rate the thresholds were measured at and at which the fit shows within 200 steps
(the demo itself trains at 5e-5, which k-NN prefers).
"""

import math

import pytest

import train

STEPS = 200
PROTOTYPES = 1024  # the demo's DINO head


def short_run(tmp_path, name: str, *flags: str) -> dict:
    cfg = train.parse_config(["demo", "--optim.iterations", str(STEPS), "--run.output-dir", str(tmp_path / name),
                              "--run.knn-every", "0", "--run.checkpoint-every", str(STEPS), "--run.log-every", "50",
                              "--run.device", "cpu", "--augment.no-photometric", "--optim.lr.peak", "1e-3",
                              # the suite runs Triton's interpreter; training tests take the PyTorch paths
                              "--model.kernel-impl", "reference", "--model.attn-impl", "sdpa", *flags])
    return train.train(cfg)


def final_dino_term(summary: dict) -> float:
    return sum(summary["term_history"]["dino"][-20:]) / 20


@pytest.mark.slow
def test_objective_fits_its_targets_and_shuffled_targets_do_not(tmp_path):
    """Measured (200 steps, mean DINO term of the last 20): working 6.33, shuffled 6.93; a uniform prediction
    over 1024 prototypes is ln 1024 = 6.931. Thresholds: below uniform - 0.25, and above uniform - 0.05."""
    uniform = math.log(PROTOTYPES)
    working = final_dino_term(short_run(tmp_path, "working"))
    print(f"DINO term after {STEPS} steps: {working:.3f} (uniform prediction {uniform:.3f})")
    assert working < uniform - 0.25, working

    # Broken on purpose: every DINO and iBOT target row goes to a random other sample (the train.py control).
    broken = final_dino_term(short_run(tmp_path, "shuffled", "--loss.shuffle-targets"))
    print(f"DINO term after {STEPS} steps with shuffled targets: {broken:.3f}")
    assert broken > uniform - 0.05, (working, broken)
