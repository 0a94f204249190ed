"""bench/memory_model.py against what train.py really allocates, on the CPU, so the model cannot drift silently.

- The parameter shapes the model derives from the config are the networks' own (every preset's architecture,
  the 7B on the meta device).
- Real training steps of a small config (ViT-tiny, stochastic depth 0.4, one process, float32): the parameter,
  gradient, AdamW and EMA-teacher bytes equal the prediction exactly; the activations (tensors autograd saves,
  and what the allocator holds after the forward) are within ACTIVATION_TOLERANCE, with and without activation
  checkpointing. Measured when written: predicted / measured 0.999-1.000 without checkpointing, 0.996-0.997 with.
- One block, each FFN kind and attention path (SDPA; the Triton kernel under the interpreter, the path GPUs run),
  with and without stochastic depth: the bytes it saves.
- FSDP2 as train.py applies it, over 4 ranks of a fake process group in this process: rank 0's shards of the
  parameters, gradients and AdamW moments equal the prediction exactly, and the roots FSDP2 keeps gathered are the
  ones the model counts (the teacher's heads until the EMA update, the student's until its backward); the 7B
  preset's shards over 256 ranks on the meta device too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

import runtime
import train
from bench import memory_model as mm
from models.vit import VIT_ARCHS, Block, build_vit

ACTIVATION_TOLERANCE = 0.05  # |predicted / measured - 1|


@pytest.mark.parametrize("preset", ["demo", "vitl16-im1k", "vit7b16"])
def test_parameter_shapes_are_the_networks(preset):
    cfg = train.PRESETS[preset][1]
    with torch.device("meta"):
        net = train.SSLNet(cfg.model, 0.0)
    assert mm.sslnet_shapes(cfg) == {name: tuple(p.shape) for name, p in net.named_parameters()}


@pytest.mark.parametrize("arch", [a for a in VIT_ARCHS if a != "vit_7b"])
def test_backbone_shapes_of_every_architecture(arch):
    with torch.device("meta"):
        model = build_vit(arch)
    assert mm.backbone_shapes(VIT_ARCHS[arch]) == {name: tuple(p.shape) for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def cpu_check():
    return mm.check()


def test_real_cpu_steps_match_the_prediction(cpu_check):
    print("\n" + mm.format_check(cpu_check))
    for row in cpu_check:
        if row["component"].startswith("activations"):
            assert abs(row["predicted"] / row["measured"] - 1) <= ACTIVATION_TOLERANCE, row
        else:  # parameters, gradients, AdamW state, teacher: counted from the tensors
            assert row["predicted"] == row["measured"], row
    components = {(row["checkpointing"], row["component"]) for row in cpu_check}
    for ac in (False, True):
        assert (ac, "gradients (fp32)") in components and (ac, "EMA teacher (fp32)") in components




# A 7B block at a small width: SwiGLU aligned to 64, no qkv bias, head dim 128.
SMALL_7B = dataclasses.replace(VIT_ARCHS["vit_7b"], embed_dim=256, num_heads=2, depth=1)


@pytest.mark.parametrize("vit", [VIT_ARCHS["vit_tiny"], VIT_ARCHS["vit_small_plus"], SMALL_7B],
                         ids=["mlp", "swiglu", "7b-block"])
@pytest.mark.parametrize("attn", ["sdpa", "triton"])
@pytest.mark.parametrize("drop_path", [0.0, 0.4])
def test_block_saves_what_the_model_says(vit, attn, drop_path):
    torch.manual_seed(0)
    vit = dataclasses.replace(vit, attn_impl=attn, drop_path_rate=drop_path, layerscale_init=1.0)
    block = Block(vit).train()
    model = build_vit(dataclasses.replace(vit, depth=1)).train()
    images, grid = 5, 3
    tokens = grid * grid + 1 + vit.n_storage_tokens
    x = torch.randn(images, tokens, vit.embed_dim, requires_grad=True)
    rope = model.rope_embed(grid, grid)
    measured = mm.saved_bytes(lambda: block(x * 1.0, rope, 1 + vit.n_storage_tokens), block, model)
    predicted = sum(mm.block_saved(vit, tokens, grid * grid, mm.FP32_CPU, attn, drop_path, images).values())
    assert predicted == measured, (predicted, measured)


@pytest.fixture
def fake_world():
    """A process group of `size` ranks in this process (collectives do nothing): FSDP2 shards as it would."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def start(size: int) -> runtime.Dist:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
        return runtime.Dist(rank=0, world_size=size, local_rank=0, device=torch.device("cpu"))

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * 4 for t in tensors)


def _gathered(module: torch.nn.Module) -> bool:
    """FSDP2 registers plain tensors while a unit is all-gathered, DTensor shards otherwise."""
    return not any(hasattr(p, "to_local") for p in module.parameters())


def test_fsdp_shards_and_gathered_roots(fake_world):
    world = 4
    dist_info = fake_world(world)
    cfg = mm.check_config("--run.parallel", "fsdp")
    runtime.seed_everything(0)
    student, teacher = train.build_student_teacher(cfg.model)
    losses = train.SSLLosses(cfg.model, cfg.loss, cfg.gram)
    model = train.wrap_for_parallel(student, teacher, cfg.run, dist_info)
    optimizer = torch.optim.AdamW(train.param_groups(student, cfg.optim), lr=1e-3)
    state = train.TrainState(student, teacher, None, model, optimizer, losses)
    predicted = mm.predict(cfg, gpus=world, precision=mm.FP32_CPU).static
    assert _local_bytes(student.parameters()) == predicted["student parameters (fp32)"]
    assert _local_bytes(teacher.parameters()) == predicted["EMA teacher (fp32)"]

    from data.datasets import ProceduralDataset, build_loader

    loader = build_loader(ProceduralDataset(n=16, size=64, n_classes=4, seed=0),
                          dataclasses.replace(cfg.augment, patch_size=16), train.crop_size_schedule(cfg),
                          batch_size=cfg.data.batch_size, num_workers=0, patch_size=16)
    batch = next(iter(loader))
    sched = train.schedules_at(0, cfg.optim, cfg.teacher, cfg.loss, cfg.gram)
    train.apply_schedules(optimizer, sched)
    terms = train.forward_losses(state, batch, sched, False)
    # The roots stay gathered after their forward; the blocks are resharded after theirs.
    assert _gathered(teacher.dino_head) and _gathered(teacher.ibot_head)
    assert _gathered(student.dino_head) and _gathered(student.ibot_head)
    assert not _gathered(teacher.backbone.blocks[0]) and not _gathered(student.backbone.blocks[0])
    for net in (student, teacher):  # the backbone root's own parameters (embeddings, tokens, final norm)
        assert not hasattr(net.backbone.cls_token, "to_local") and not hasattr(net.backbone.norm.weight, "to_local")
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    assert not _gathered(student.dino_head) and _gathered(teacher.dino_head)  # the teacher's until the EMA update
    optimizer.step()  # (the fake collectives leave the values meaningless, not the sizes)
    assert _local_bytes(p.grad for p in student.parameters()) == predicted["gradients (fp32)"]
    moments = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    assert _local_bytes(moments) == predicted["AdamW moments (2 x fp32)"]
    train.ema_update(teacher, student, 0.99)
    assert not _gathered(teacher.dino_head)


def test_7b_shards_over_256_ranks(fake_world):
    """The 7B preset's student, EMA teacher and (Gram anchoring) Gram teacher, sharded by train.wrap_for_parallel
    over 256 ranks on the meta device: rank 0 holds exactly the predicted parameter bytes."""
    gpus = 256
    dist_info = fake_world(gpus)
    cfg = train.PRESETS["gram-anchor"][1]
    with torch.device("meta"):
        student, teacher = train.build_student_teacher(cfg.model)
        gram_teacher = train.build_gram_teacher(cfg)
    train.wrap_for_parallel(student, teacher, dataclasses.replace(cfg.run, activation_checkpointing=False), dist_info,
                            gram_teacher)
    predicted = mm.predict(cfg, gpus=gpus).static
    assert _local_bytes(student.parameters()) == predicted["student parameters (fp32)"]
    assert _local_bytes(teacher.parameters()) == predicted["EMA teacher (fp32)"]
    assert _local_bytes(gram_teacher.parameters()) == predicted["Gram teacher (fp32)"]
    total = sum(p.numel() for p in student.parameters()) * 4
    assert predicted["student parameters (fp32)"] > total / gpus  # FSDP2 pads: rank 0 holds a full ceil() share


def test_report_prints_every_part_and_a_batch_that_fits():
    cfg = train.PRESETS["vit7b16"][1]
    text = mm.report(cfg, "vit7b16", gpus=256, gpu_memory_gb=80, reserve_gb=mm.DEFAULT_RESERVE_GB)
    for part in ("student parameters", "gradients", "AdamW moments", "EMA teacher", "FSDP gathered", "activations",
                 "Largest batch per GPU", "sharded: each rank writes"):
        assert part in text
    with_ac = mm.largest_batch(cfg, 256, 74e9, checkpointing=True)
    without = mm.largest_batch(cfg, 256, 74e9, checkpointing=False)
    assert with_ac > without >= 1
    assert mm.predict(cfg, 256, batch=with_ac, checkpointing=True).peak <= 74e9 < mm.predict(
        cfg, 256, batch=with_ac + 1, checkpointing=True).peak
