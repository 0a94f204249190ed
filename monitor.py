"""What a training loop shows besides its loss: a TensorBoard writer in the run folder, PCA and cosine feature maps
of a fixed batch, and the k-NN accuracy of a backbone on held-out labeled procedural images. Every rank computes
them (with FSDP a forward is collective); rank 0, the one with a writer, logs them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

import runtime
from figures import cosine_map_figure, pca_figure
from probes import knn_eval, load_eval_images

logger = logging.getLogger("dinov3")


def start_run_folder(out_dir: Path, cfg: object, dist_info: runtime.Dist, start_step: int):
    """Rank 0 writes the resolved config to <out_dir>/config.json and returns a TensorBoard writer that drops what
    an earlier session logged after `start_step`; the other ranks get None."""
    if not dist_info.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return SummaryWriter(out_dir / "tensorboard", purge_step=start_step)


def pca_batch(dataset, size: int, device: torch.device) -> torch.Tensor:
    """A fixed batch of up to 4 images of `dataset` at `size` (at least 64 px), for feature maps."""
    images, _ = load_eval_images(dataset, range(len(dataset)), max(size, 64), limit=4)
    return images.to(device)


def log_knn(writer, backbone: nn.Module, knn_sets: tuple, step: int) -> dict[str, float]:
    """k-NN accuracies of `backbone` on the held-out procedural set (`probes.load_procedural_sets`), logged."""
    accuracy = knn_eval(backbone, *knn_sets)
    if writer is not None:
        for name, value in accuracy.items():
            writer.add_scalar(f"knn/{name}", value, step)
    logger.info(f"step {step}: k-NN on the procedural set " + " ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    return accuracy


def log_feature_maps(writer, backbone: nn.Module, images: torch.Tensor, step: int) -> np.ndarray:
    """PCA and cosine-similarity maps of a fixed batch to TensorBoard; returns the PCA figure."""
    pca = pca_figure(backbone, images)
    cosine = cosine_map_figure(backbone, images)
    if writer is not None:
        writer.add_image("features/pca", pca, step, dataformats="HWC")
        writer.add_image("features/cosine", cosine, step, dataformats="HWC")
    return pca


def log_memory(writer, step: int, device: torch.device) -> None:
    """The process's peak memory: CUDA allocations on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        writer.add_scalar("train/max_memory_gib", torch.cuda.max_memory_allocated(device) / 2**30, step)
    else:
        import resource

        writer.add_scalar("train/max_rss_gib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, step)
