"""The dense metric through the CPU demo chain: pretraining (`demo`), Gram anchoring (`demo-gram`, from runs/demo)
and high-resolution adaptation (`demo-hrft`, from runs/demo-gram), each run with `--run.dense-every`.

The dense metric is what train.py logs (dense.py: ridge-probe mIoU of the EMA teacher's last-layer patch features
on 96 / 48 generated scenes at the global crop size, 11 classes). Each phase starts with the value of the teacher
it starts from (its step 0). For reference: the same probe on raw pixels of the same scenes, and the mIoU of predicting
the background everywhere.

    python -m bench.dense_chain --out docs               # run the three phases into runs/, write docs/dense_curve.*
    python -m bench.dense_chain --out docs --plot-only   # the curve of runs already in runs/ (their TensorBoard logs)

The phases write runs/demo, runs/demo-gram and runs/demo-hrft (`--runs` for another folder), as the presets do.

It writes dense_curve.csv and dense_curve.png and prints the curve; it asserts nothing (tests/test_dense_training.py
checks that the metric is logged).
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.common import REPO_ROOT
from dense import confusion_matrix, fast_dense_set, pixel_feature_maps, ridge_probe, segmentation_scores
from train import PRESETS, parse_config, train

# (preset, --run.dense-every): a value every ~10 % of each phase.
PHASES = (("demo", 75), ("demo-gram", 10), ("demo-hrft", 10))


def run_chain(runs: Path, flags: Sequence[str] = ()) -> None:
    """Train the three phases into runs/<preset>, each from the previous one's folder (resumable), with `flags`
    added to every phase."""
    previous = None
    for preset, every in PHASES:
        start = ["--init-from", str(runs / previous)] if previous else []
        train(parse_config([preset, "--run.output-dir", str(runs / preset), *start, "--run.dense-every", str(every),
                            *flags]))
        previous = preset


def read_curve(runs: Path) -> list[dict]:
    """Rows {phase, step, chain_step, miou, pixel_accuracy} from each phase's TensorBoard log, the phases one
    after the other (chain_step counts the steps of the earlier phases too)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows, offset = [], 0
    for preset, _ in PHASES:
        folder = runs / preset / "tensorboard"
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist: run the chain first (python -m bench.dense_chain)")
        events = EventAccumulator(str(folder))
        events.Reload()
        if "dense/miou" not in events.Tags()["scalars"]:
            raise ValueError(f"{folder} holds no dense metric: the run was made without --run.dense-every")
        accuracy = {e.step: e.value for e in events.Scalars("dense/pixel_accuracy")}
        for event in events.Scalars("dense/miou"):
            rows.append({"phase": preset, "step": event.step, "chain_step": offset + event.step,
                         "miou": event.value, "pixel_accuracy": accuracy[event.step]})
        offset = rows[-1]["chain_step"]
    return rows


def references() -> dict[str, float]:
    """mIoU of the same ridge probe on each patch's raw pixels of the same scenes (at the demo's global crop size),
    and of predicting the background everywhere (the floor a probe that finds nothing falls to)."""
    scenes = fast_dense_set(parse_config([PHASES[0][0]]).data.global_size)
    pixels = ridge_probe(pixel_feature_maps(scenes.train_images, 16), scenes.train_masks,
                         pixel_feature_maps(scenes.val_images, 16), scenes.val_masks, scenes.n_classes)
    background = confusion_matrix(torch.zeros_like(scenes.val_masks), scenes.val_masks, scenes.n_classes)
    return {"raw pixels, same probe": pixels["miou"],
            "background everywhere": segmentation_scores(background)["miou"]}


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)


def plot(rows: list[dict], reference: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    for color, (preset, _) in zip(("C0", "C1", "C2"), PHASES):
        phase = [r for r in rows if r["phase"] == preset]
        ax.plot([r["chain_step"] for r in phase], [100 * r["miou"] for r in phase], marker="o", markersize=3,
                color=color, label=preset)
        ax.axvline(phase[0]["chain_step"], color="grey", linewidth=0.5)
    for (name, value), style in zip(reference.items(), (":", "--")):
        ax.axhline(100 * value, color="black", linestyle=style, linewidth=1, label=name)
    ax.set_ylim(0, max(20.0, 110 * max(r["miou"] for r in rows)))
    lengths = ", then ".join(f"{preset} {PRESETS[preset][1].optim.iterations}" for preset, _ in PHASES)
    ax.set_xlabel(f"step of the chain ({lengths})")
    ax.set_ylabel("ridge-probe mIoU (%)")
    ax.set_title("dense metric of the EMA teacher on generated scenes (11 classes)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "dense_chain")
    parser.add_argument("--runs", type=Path, default=REPO_ROOT / "runs", help="where runs/<preset> go")
    parser.add_argument("--plot-only", action="store_true", help="read the runs in --runs instead of training")
    args = parser.parse_args()
    if not args.plot_only:
        run_chain(args.runs)
    rows = read_curve(args.runs)
    reference = references()
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "dense_curve.csv")
    plot(rows, reference, args.out / "dense_curve.png")
    for row in rows:
        print(f"{row['phase']:<10} step {row['step']:>4} (chain {row['chain_step']:>4})  "
              f"mIoU {100 * row['miou']:5.1f} %  pixel accuracy {100 * row['pixel_accuracy']:5.1f} %")
    for name, value in reference.items():
        print(f"{name}: mIoU {100 * value:.1f} %")
    print(f"curve: {args.out / 'dense_curve.csv'}  plot: {args.out / 'dense_curve.png'}")


if __name__ == "__main__":
    main()
