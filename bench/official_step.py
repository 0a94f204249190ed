"""This project's training step against the official DINOv3 code's, on one GPU, at the `vitl16-im1k` recipe.

The official side runs the official code itself, as its `dinov3/train/train.py` runs a step: `SSLMetaArch` built on
the meta device, parallelized by its own `ac_compile_parallelize` (FSDP2 SHARD_GRAD_OP, bf16 parameters, fp32
reductions, `torch.compile` per block as the config says), `init_weights`, its AdamW parameter groups and
schedules, then per step: schedules applied, `forward_backward`, gradient clipping per student module, optimizer
step, EMA update. This project's side is `train.py`'s step on the `vitl16-im1k` preset (bench.bench_train). Both
get the same batch shape (2 x 224 + 8 x 96 crops, the recipe's iBOT masking); data loading is timed by neither.

Nothing of the official code is committed: fetch facebookresearch/dinov3, put its `dinov3/` package folder in
`third_party/dinov3/` (git-ignored) and its pure-Python requirements (omegaconf, ftfy, regex, submitit, termcolor,
torchmetrics and their dependencies) as wheels in `third_party/wheels/` for a machine without network, then:

    torchrun --nproc_per_node=1 bench/official_step.py --batch 32 --out gpu_results   # on the GPU (carry third_party)
    python bench/official_step.py --dry-run                                          # CPU: checks, no timing

The dry run checks what can be checked without CUDA (the official code moves its batch to CUDA in every step):
the official config resolves and its recipe equals the preset's (`recipe_differences`), the official collate
builds the batch, and this project's side runs at a tiny size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import train  # noqa: E402
from bench.bench_train import measure_config_step, timed_steps  # noqa: E402

OFFICIAL_CONFIG = "dinov3/configs/train/vitl_im1k_lin834.yaml"
PRESET = "vitl16-im1k"
DEFAULT_OFFICIAL = REPO / "third_party" / "dinov3"
DEFAULT_SITE = REPO / "third_party" / "site"


def import_official(official_dir: Path, site_dir: Path | None) -> None:
    """Put the official package (and a folder of its pure-Python requirements, if given) on sys.path."""
    if not (official_dir / "dinov3" / "train" / "ssl_meta_arch.py").is_file():
        raise SystemExit(f"error: no official DINOv3 code in {official_dir} (expected {official_dir}/dinov3/train/"
                         f"ssl_meta_arch.py): fetch facebookresearch/dinov3 and copy its dinov3/ folder there")
    for path in (official_dir, site_dir):
        if path is not None and path.is_dir() and str(path) not in sys.path:
            sys.path.insert(0, str(path))


def official_config(official_dir: Path, batch: int, compile_blocks: bool, output_dir: str):
    """The official vitl_im1k_lin834 config merged into the official defaults, with this benchmark's overrides
    (the learning-rate scaling rule is not applied: it needs the process group and changes no shape)."""
    from dinov3.configs.config import DinoV3SetupArgs, get_cfg_from_args

    args = DinoV3SetupArgs(config_file=str(official_dir / OFFICIAL_CONFIG), output_dir=output_dir, opts=[
        f"train.batch_size_per_gpu={batch}", f"train.compile={str(compile_blocks).lower()}",
        "train.num_workers=0", "evaluation.eval_period_iterations=0"])
    return get_cfg_from_args(args, strict=False)


def project_config_args(batch: int) -> list[str]:
    return [PRESET, "--data.batch-size", str(batch)]


def recipe_differences(official_cfg, project_cfg: train.TrainConfig) -> list[str]:
    """Every number that sets the step's work, official against the preset: empty when both do the same work."""
    from models.vit import VIT_ARCHS

    vit = VIT_ARCHS[project_cfg.model.arch]
    official_widths = {"vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}
    pairs = {
        "backbone (width, depth, heads)": (official_widths.get(official_cfg.student.arch, official_cfg.student.arch),
                                           (vit.embed_dim, vit.depth, vit.num_heads)),
        "FFN ratio": (official_cfg.student.ffn_ratio, vit.ffn_ratio),
        "storage tokens": (official_cfg.student.n_storage_tokens, vit.n_storage_tokens),
        "patch size": (official_cfg.student.patch_size, vit.patch_size),
        "drop path": (official_cfg.student.drop_path_rate, project_cfg.model.drop_path_rate),
        "global crop size": (official_cfg.crops.global_crops_size, project_cfg.data.global_size),
        "local crop size": (official_cfg.crops.local_crops_size, project_cfg.data.local_size),
        "local crops": (official_cfg.crops.local_crops_number, project_cfg.augment.n_local_crops),
        "batch per GPU": (official_cfg.train.batch_size_per_gpu, project_cfg.data.batch_size),
        "DINO prototypes": (official_cfg.dino.head_n_prototypes, project_cfg.model.dino_prototypes),
        "DINO hidden": (official_cfg.dino.head_hidden_dim, project_cfg.model.dino_hidden),
        "DINO bottleneck": (official_cfg.dino.head_bottleneck_dim, project_cfg.model.dino_bottleneck),
        "iBOT prototypes": (official_cfg.ibot.head_n_prototypes, project_cfg.model.ibot_prototypes),
        "iBOT hidden": (official_cfg.ibot.head_hidden_dim, project_cfg.model.ibot_hidden),
        "iBOT bottleneck": (official_cfg.ibot.head_bottleneck_dim, project_cfg.model.ibot_bottleneck),
        "iBOT mask probability": (official_cfg.ibot.mask_sample_probability, project_cfg.data.mask_probability),
        "iBOT mask ratio": (tuple(official_cfg.ibot.mask_ratio_min_max), tuple(project_cfg.data.mask_ratio)),
        "KoLeo weight": (official_cfg.dino.koleo_loss_weight, project_cfg.loss.koleo_weight),
        "gradient clip": (official_cfg.optim.clip_grad, project_cfg.optim.clip_grad),
    }
    return [f"{name}: official {theirs} vs {PRESET} {ours}" for name, (theirs, ours) in pairs.items()
            if theirs != ours]


def official_batch(official_cfg, batch: int, generator: torch.Generator) -> dict:
    """One collated batch as the official data loader gives it (its collate and masking generator), from random
    crops: 2 global and n local crops per image, the recipe's iBOT mask share and ratios."""
    from dinov3.data import MaskingGenerator, collate_data_and_cast

    crops = official_cfg.crops
    grid = crops.global_crops_size // official_cfg.student.patch_size
    samples = [({"global_crops": [torch.randn(3, crops.global_crops_size, crops.global_crops_size,
                                              generator=generator) for _ in range(2)],
                 "local_crops": [torch.randn(3, crops.local_crops_size, crops.local_crops_size, generator=generator)
                                 for _ in range(crops.local_crops_number)]}, ()) for _ in range(batch)]
    data = collate_data_and_cast(
        samples, mask_ratio_tuple=tuple(official_cfg.ibot.mask_ratio_min_max),
        mask_probability=official_cfg.ibot.mask_sample_probability, dtype=torch.bfloat16, n_tokens=grid * grid,
        mask_generator=MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid),
        random_circular_shift=official_cfg.ibot.mask_random_circular_shift)
    data["global_batch_size"] = batch
    return data


def time_official_step(official_cfg, batch: int, steps: int, warmup: int) -> dict:
    """Seconds per official step and its peak memory on this GPU (run under torchrun: the official code starts its
    process group from torchrun's environment)."""
    from dinov3.configs.config import apply_scaling_rules_to_cfg, setup_job
    from dinov3.train.ssl_meta_arch import SSLMetaArch
    from dinov3.train.train import apply_optim_scheduler, build_optimizer, build_schedulers

    setup_job(output_dir=official_cfg.train.output_dir, seed=0, restrict_print_to_main_process=True)
    apply_scaling_rules_to_cfg(official_cfg)
    with torch.device("meta"):
        model = SSLMetaArch(official_cfg)
    model.prepare_for_distributed_training()
    # As the official main(): materialize on the GPU filled with NaN, so that init_weights must set everything.
    model._apply(lambda t: torch.full_like(t, math.nan if t.dtype.is_floating_point else 0, device="cuda"),
                 recurse=True)
    optimizer = build_optimizer(official_cfg, model.get_params_groups())
    lr, wd, momentum, teacher_temp, last_layer_lr = build_schedulers(official_cfg)
    model.init_weights()
    model.train()
    data = official_batch(official_cfg, batch, torch.Generator().manual_seed(0))
    iteration = 10 * official_cfg.train.OFFICIAL_EPOCH_LENGTH  # past the warmups and the frozen last layer

    def step() -> float:
        apply_optim_scheduler(optimizer, lr[iteration], wd[iteration], last_layer_lr[iteration])
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model.forward_backward(data, teacher_temp=teacher_temp[iteration], iteration=iteration)
        for module in model.student.values():
            torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm=official_cfg.optim.clip_grad).item()
        optimizer.step()
        model.update_ema(momentum[iteration])
        torch.cuda.synchronize()
        return loss.item()

    for _ in range(warmup):
        step()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    seconds = (time.perf_counter() - start) / steps
    return dict(seconds=seconds, images_per_s=batch / seconds, peak_mib=torch.cuda.max_memory_allocated() / 2**20,
                finite_losses=all(math.isfinite(v) for v in losses))


def compare(args: argparse.Namespace) -> dict:
    import_official(args.official, args.site)
    device = "cpu" if args.dry_run else "cuda"
    batch = 2 if args.dry_run else args.batch
    official_cfg = official_config(args.official, batch, args.compile, tempfile.mkdtemp(prefix="official_step_"))
    differences = recipe_differences(official_cfg, train.parse_config(project_config_args(batch)))
    if differences:
        raise SystemExit("error: the official config and the preset do different work:\n  " + "\n  ".join(
            differences))
    data = official_batch(official_cfg, batch, torch.Generator().manual_seed(0))
    result = dict(recipe=f"{OFFICIAL_CONFIG} vs train.py {PRESET}", batch=batch,
                  official_batch_shapes={k: list(v.shape) for k, v in data.items() if isinstance(v, torch.Tensor)})
    if args.dry_run:
        # This project's side at a tiny size: the same code path, the preset shrunk to a CPU step.
        tiny = ["--model.arch", "vit_tiny", "--model.dino-prototypes", "256", "--model.ibot-prototypes", "256",
                "--data.global-size", "64", "--data.local-size", "32"]
        result["project"] = measure_config_step("cpu", project_config_args(batch) + tiny, timed_steps(1, warmup=0))
        return result
    project = measure_config_step(device, project_config_args(batch), timed_steps(args.steps, args.warmup))
    torch.cuda.empty_cache()
    official = time_official_step(official_cfg, batch, args.steps, args.warmup)
    official["mfu"] = project["gflop"] / official["seconds"] / project["peak_gflops"]  # the same FLOPs per step
    result.update(project=project, official=official, speedup=project["images_per_s"] / official["images_per_s"],
                  memory_ratio=project["peak_mib"] / official["peak_mib"], device=torch.cuda.get_device_name(),
                  torch=torch.__version__)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, default=DEFAULT_OFFICIAL, help="folder holding dinov3/")
    parser.add_argument("--site", type=Path, default=DEFAULT_SITE, help="folder of the official code's requirements")
    parser.add_argument("--batch", type=int, default=32, help="images per GPU, both sides")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (the official blocks compile)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="the official blocks without torch.compile (the config compiles them)")
    parser.add_argument("--dry-run", action="store_true", help="CPU: the checks and a tiny project step, no timing")
    parser.add_argument("--out", type=Path, default=None, help="folder for official_step.json")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("error: the timed comparison needs a CUDA GPU (the official step moves its batch to CUDA); "
                         "use --dry-run on the CPU")
    result = compare(args)
    text = json.dumps(result, indent=1, default=str)
    if int(os.environ.get("RANK", "0")) == 0:
        print(text)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "official_step.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
