"""Helpers shared by several test modules (test modules import from here, never from each other).

Heavy imports (train, distill, transformers, tensorboard) happen inside the functions that need them, so a module
that takes only `free_port` does not pay for the training stack. Shared fixtures are in tests/conftest.py.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    import distill
    import train
    from data.datasets import ProceduralDataset

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------------


def process_env() -> dict[str, str]:
    """The environment for a child Python process (torchrun, train.py): real Triton, one OpenMP thread (the same
    float summation order in every run)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a gloo process group)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------------------------------
# train.py and distill.py on the CPU
# ----------------------------------------------------------------------------------------------------

# The kernels' Triton paths have their own interpreter tests; training tests run the PyTorch references.
TINY_FLAGS = [
    "--model.arch", "vit_tiny", "--model.dino-prototypes", "256", "--model.dino-hidden", "128",
    "--model.dino-bottleneck", "64", "--model.ibot-prototypes", "256", "--model.ibot-hidden", "128",
    "--model.ibot-bottleneck", "64", "--model.kernel-impl", "reference", "--model.attn-impl", "sdpa",
    "--data.global-size", "32", "--data.local-size", "16", "--augment.n-local-crops", "2",
    "--data.num-workers", "0", "--optim.lr.warmup-iterations", "2", "--optim.freeze-last-layer-iterations", "1",
    "--teacher.temp.warmup-iterations", "4", "--run.device", "cpu", "--run.log-every", "1000", "--run.knn-every", "0",
]


def tiny_config(tmp_path: Path, *flags: str) -> train.TrainConfig:
    import train

    return train.parse_config(["demo", *TINY_FLAGS, "--run.output-dir", str(tmp_path), *flags])


def procedural(n: int = 64, size: int = 48) -> ProceduralDataset:
    from data.datasets import ProceduralDataset

    return ProceduralDataset(n=n, size=size, n_classes=4, seed=0)


STUDENTS = "vit_tiny,convnext_test"
# Crops of 64/32 px (ConvNeXt needs >= 32), PyTorch references for Sinkhorn-Knopp and attention, no extra phases.
DISTILL_FLAGS = [
    "--teacher.kernel-impl", "reference", "--teacher.attn-impl", "sdpa", "--student.attn-impl", "sdpa",
    "--student.feature-head-hidden", "64", "--data.global-size", "64", "--data.local-size", "32",
    "--augment.n-local-crops", "2", "--data.num-workers", "0", "--optim.lr.warmup-iterations", "2",
    "--optim.freeze-last-layer-iterations", "1", "--phases.cooldown-iterations", "0",
    "--phases.high-res-iterations", "0", "--run.device", "cpu", "--run.log-every", "1000",
]


def distill_config(out: Path, teacher: Path, *flags: str) -> distill.DistillConfig:
    import distill

    return distill.parse_config(["demo", *DISTILL_FLAGS, "--teacher.checkpoint", str(teacher),
                                 "--run.output-dir", str(out), *flags])


class NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the TensorBoard event files in `folder` (values stored as float32)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def make_hf_model(gated: bool, seed: int):
    """A small Hugging Face DINOv3ViTModel with random weights everywhere; skips the test without transformers."""
    transformers = pytest.importorskip("transformers", reason="transformers is the test-only parity peer")
    config = transformers.DINOv3ViTConfig(
        hidden_size=128, num_hidden_layers=3, num_attention_heads=2, intermediate_size=256 if gated else 384,
        use_gated_mlp=gated, hidden_act="silu" if gated else "gelu", num_register_tokens=4,
        layerscale_value=1.0, rope_theta=100.0, patch_size=16, image_size=224,
    )
    torch.manual_seed(seed)
    hf = transformers.DINOv3ViTModel(config).eval()
    with torch.no_grad():  # random weights everywhere (HF initializes biases and the mask token to 0)
        for name, p in hf.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return hf


# ----------------------------------------------------------------------------------------------------
# Dense data
# ----------------------------------------------------------------------------------------------------


def blocky_masks(n: int, grid: int, patch: int, n_classes: int, seed: int) -> torch.Tensor:
    """uint8 [n, grid * patch, grid * patch]: a random class per patch, constant within the patch."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n, grid, grid), generator=generator)
    return labels.repeat_interleave(patch, 1).repeat_interleave(patch, 2).to(torch.uint8)


def write_segmentation_folder(root: Path, n_train: int = 6, n_val: int = 3, size: int = 48) -> Path:
    """Generated scenes as a segmentation folder: {train,val}/images/*.jpg with {train,val}/masks/*.png."""
    from data.dense_sets import generated_scene, save_mask

    for split, first, n in (("train", 0, n_train), ("val", n_train, n_val)):
        for index in range(first, first + n):
            image, mask = generated_scene(index, size)
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            image.save(root / split / "images" / f"scene{index:03d}.jpg")
            save_mask(mask, root / split / "masks" / f"scene{index:03d}.png")
    return root


def write_davis_folder(root: Path, n_videos: int = 2, n_frames: int = 5, size: int = 48) -> Path:
    """Generated videos in the DAVIS-2017 layout: JPEGImages/480p/<video>/*.jpg, Annotations/480p/<video>/*.png."""
    from data.dense_sets import generated_video, save_mask

    for index in range(n_videos):
        frames, masks = generated_video(index, n_frames, size)
        for t, (frame, mask) in enumerate(zip(frames, masks)):
            (root / "JPEGImages" / "480p" / f"video{index}").mkdir(parents=True, exist_ok=True)
            frame.save(root / "JPEGImages" / "480p" / f"video{index}" / f"{t:05d}.jpg", quality=95)
            save_mask(mask, root / "Annotations" / "480p" / f"video{index}" / f"{t:05d}.png")
    return root
