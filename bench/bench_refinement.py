"""One Gram-anchoring refinement step at high resolution: the fused Gram loss against the materializing one.

The issue's CPU case: vit_tiny, batch 2, 2 x 512 px global crops (1024 patches each) + 2 x 112 px local crops per
image, the Gram teacher on 2 x 1024 px crops (4096 patches, resampled to the student's 32 x 32 grid), demo-sized
heads. A step is everything train.py does: EMA teacher, Gram teacher and student forwards, Sinkhorn, DINO + iBOT
+ KoLeo + 2 x Gram, backward, AdamW, EMA. The two variants differ only in the Gram loss: `gram_loss` (fused,
dino_kernels/gram.py) or `gram_loss_reference` (both P x P Gram matrices in full, as the official code).

Each variant runs in a fresh process (one warm-up step, then the best of 3 timed steps); the peak is the increase
of the process's resident-memory high-water mark over the whole snippet (model, batch and activations included),
so the ratio says what the Gram loss's share is at this resolution: at P = 1024 the two Gram matrices are 4 MiB
per crop, small next to the activations. `gram_ms` is the Gram loss alone (forward + backward, best of 3) on the
step's real features: the part of the step the two variants differ in (CPU step times vary by ~15% between
runs, more than that part).
"""

import pytest

from bench.common import peak_rss_of, report, requires_cuda

_STEP = """
import torch
import train
import losses.gram
from data.augment import AugmentConfig, CropSizes
from data.datasets import SampleImagesDataset, build_loader
from dino_kernels.gram import gram_loss_reference

if {materializing}:
    def materializing(student, teacher, normalize, remove_neg, img_level, impl):
        return gram_loss_reference(student, teacher, normalize, remove_neg, img_level)
    losses.gram.gram_loss = materializing
gram_fn = losses.gram.gram_loss
captured = []

def capturing(*args, **kwargs):  # keeps the step's real features to time the Gram loss on them alone
    captured[:] = [args, kwargs]
    return gram_fn(*args, **kwargs)

losses.gram.gram_loss = capturing
device = torch.device("{device}")
cfg = train.parse_config(["demo", "--model.arch", "{arch}", "--gram.enabled", "--gram.start-iteration", "0",
                          "--run.device", "{device}", "--gram.{img_level}"])
torch.manual_seed(0)
student, teacher = train.build_student_teacher(cfg.model)
gram_teacher = train.build_gram_teacher(cfg)
train.copy_weights(gram_teacher, teacher.backbone)
for net in (student, teacher, gram_teacher):
    net.to(device)
step_losses = train.SSLLosses(cfg.model, cfg.loss, cfg.gram).to(device)
optimizer = torch.optim.AdamW(train.param_groups(student, cfg.optim), lr=1e-4)
state = train.TrainState(student, teacher, gram_teacher, student, optimizer, step_losses)
loader = build_loader(SampleImagesDataset(), AugmentConfig(n_local_crops=2), CropSizes({global_size}, 112, {gram_size}),
                      batch_size={batch}, num_workers=0)
batch = {{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(iter(loader)).items()}}
sched = train.schedules_at(10**6, cfg.optim, cfg.teacher, cfg.loss, cfg.gram)
autocast = device.type == "cuda"

def step():
    terms = train.forward_losses(state, batch, sched, autocast)
    train.backward_and_update(state, terms["total"], sched, cfg.optim.clip_grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return terms

step()
times = []
for _ in range(3):
    t0 = time.perf_counter()
    terms = step()
    times.append(time.perf_counter() - t0)
_result["seconds"] = min(times)
args, kwargs = captured
student_patches = args[0].detach().clone().requires_grad_()
gram_times = []
for _ in range(3):
    t0 = time.perf_counter()
    gram_fn(student_patches, *args[1:], **kwargs).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    gram_times.append(time.perf_counter() - t0)
_result["gram_loss_ms"] = min(gram_times) * 1e3
_result["gram"] = terms["gram"].item()
if device.type == "cuda":
    _result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
"""

# img_level: one Gram matrix per crop (the recipe) or "no-img-level": one over all crops of the rank's batch (an
# option of the official code), where the materializing matrix grows with the batch.
CASES = [
    pytest.param("cpu", "vit_tiny", 2, 512, 1024, "img-level", id="cpu-vit_tiny-b2-512+gram1024"),
    pytest.param("cpu", "vit_tiny", 2, 512, 1024, "no-img-level", id="cpu-vit_tiny-b2-512+gram1024-batch-gram"),
    pytest.param("cuda", "vit_large", 8, 512, 1024, "img-level", id="cuda-vit_large-b8-512+gram1024",
                 marks=requires_cuda),
]


@pytest.mark.parametrize("device, arch, batch, global_size, gram_size, img_level", CASES)
def test_refinement_step_fused_vs_materializing_gram(device, arch, batch, global_size, gram_size, img_level):
    results = {}
    for variant, materializing in (("fused", False), ("materializing", True)):
        code = _STEP.format(materializing=materializing, device=device, arch=arch, batch=batch,
                            global_size=global_size, gram_size=gram_size, img_level=img_level)
        results[variant] = peak_rss_of(code, timeout=1200)
    fused, reference = results["fused"], results["materializing"]
    # Same inputs and weights: the two formulations must agree on the loss value.
    assert abs(fused["gram"] - reference["gram"]) <= 1e-4 * abs(reference["gram"]) + 1e-7, (fused, reference)
    figures = dict(
        fused_s=fused["seconds"], materializing_s=reference["seconds"],
        time_ratio=reference["seconds"] / fused["seconds"],
        fused_gram_ms=fused["gram_loss_ms"], materializing_gram_ms=reference["gram_loss_ms"],
        gram_time_ratio=reference["gram_loss_ms"] / fused["gram_loss_ms"],
        fused_peak_mib=fused["peak_mib"], materializing_peak_mib=reference["peak_mib"],
        memory_ratio=reference["peak_mib"] / fused["peak_mib"], gram_loss=fused["gram"],
    )
    if device == "cuda":
        figures.update(fused_cuda_peak_mib=fused["cuda_peak_mib"], materializing_cuda_peak_mib=reference["cuda_peak_mib"],
                       cuda_memory_ratio=reference["cuda_peak_mib"] / fused["cuda_peak_mib"])
    report(f"refinement step {arch} {device} b{batch} 2x{global_size}+2x112, Gram teacher 2x{gram_size}, {img_level}",
           **figures)
