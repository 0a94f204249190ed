"""Checkpoints: released format round trip and key list, Hugging Face parity, preset inference, bad files."""

import pytest
import torch

from models.checkpoint import (
    CheckpointError,
    export_official,
    hf_to_official,
    infer_config,
    load_backbone,
    read_checkpoint_file,
    save_official,
)
from models.vit import VIT_ARCHS, build_vit
from tests.helpers import make_hf_model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def released_keys_and_shapes(C: int, depth: int, D: int, F: int, swiglu: bool, R: int = 4) -> dict:
    """The released checkpoint layout, written out from DESIGN.md's key list."""
    keys = {
        "cls_token": (1, 1, C),
        "storage_tokens": (1, R, C),
        "mask_token": (1, C),
        "patch_embed.proj.weight": (C, 3, 16, 16),
        "patch_embed.proj.bias": (C,),
        "rope_embed.periods": (D // 4,),
        "norm.weight": (C,),
        "norm.bias": (C,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({
            b + "norm1.weight": (C,), b + "norm1.bias": (C,),
            b + "attn.qkv.weight": (3 * C, C), b + "attn.qkv.bias": (3 * C,), b + "attn.qkv.bias_mask": (3 * C,),
            b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
            b + "ls1.gamma": (C,), b + "norm2.weight": (C,), b + "norm2.bias": (C,), b + "ls2.gamma": (C,),
        })
        if swiglu:
            keys.update({
                b + "mlp.w1.weight": (F, C), b + "mlp.w1.bias": (F,), b + "mlp.w2.weight": (F, C),
                b + "mlp.w2.bias": (F,), b + "mlp.w3.weight": (C, F), b + "mlp.w3.bias": (C,),
            })
        else:
            keys.update({b + "mlp.fc1.weight": (F, C), b + "mlp.fc1.bias": (F,), b + "mlp.fc2.weight": (C, F),
                         b + "mlp.fc2.bias": (C,)})
    return keys


@pytest.mark.parametrize(
    "arch, C, depth, D, F, swiglu",
    [("vit_small", 384, 12, 64, 1536, False), ("vit_small_plus", 384, 12, 64, 1536, True),
     ("vit_large", 1024, 24, 64, 4096, False)],
)
def test_export_has_exactly_the_released_keys_and_shapes(arch, C, depth, D, F, swiglu):
    with torch.device("meta"):
        model = build_vit(arch)
    exported = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert exported == released_keys_and_shapes(C, depth, D, F, swiglu)


def test_bias_mask_masks_only_k():
    mask = build_vit("vit_tiny").state_dict()["blocks.0.attn.qkv.bias_mask"]
    C = 192
    assert torch.equal(mask, torch.cat([torch.ones(C), torch.zeros(C), torch.ones(C)]))


def test_round_trip_through_the_released_format_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = build_vit("vit_small_plus", depth=2)
    path = tmp_path / "backbone.pth"
    save_official(model, path)
    reloaded = load_backbone(path)
    assert reloaded.cfg == model.cfg
    before, after = export_official(model), export_official(reloaded)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("arch", list(VIT_ARCHS))
def test_preset_is_inferred_from_shapes(arch):
    with torch.device("meta"):
        state_dict = build_vit(arch).state_dict()
    assert infer_config(state_dict) == VIT_ARCHS[arch]


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_parity_with_transformers_dinov3(gated):
    hf = make_hf_model(gated, seed=1 + gated)
    model = load_backbone(hf.state_dict()).eval()
    assert model.cfg.ffn == ("swiglu" if gated else "mlp") and model.cfg.num_heads == 2
    for h, w in [(224, 224), (224, 160), (96, 320), (100, 70)]:
        x = torch.randn(2, 3, h, w)
        masks = torch.rand(2, (h // 16) * (w // 16)) < 0.3
        for m in (None, masks):
            with torch.no_grad():
                ref = hf(pixel_values=x, bool_masked_pos=m).last_hidden_state
                out = model(x, m)
            assert rel_err(out["x_norm_clstoken"], ref[:, 0]) <= 1e-5
            assert rel_err(out["x_storage_tokens"], ref[:, 1:5]) <= 1e-5
            assert rel_err(out["x_norm_patchtokens"], ref[:, 5:]) <= 1e-5


def test_hf_conversion_rejects_unknown_keys():
    sd = dict(make_hf_model(False, seed=0).state_dict())
    sd["model.layer.0.attention.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unknown keys"):
        hf_to_official(sd)


def test_wrong_model_size_lists_the_mismatch():
    sd = export_official(build_vit("vit_tiny"))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_backbone(sd, arch="vit_small")


def test_missing_and_unexpected_keys_are_listed():
    sd = export_official(build_vit("vit_tiny"))
    del sd["blocks.1.ls1.gamma"]
    sd["blocks.1.surprise"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\).*ls1.gamma.*unexpected keys \(1\).*surprise"):
        load_backbone(sd, arch="vit_tiny")


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    good = tmp_path / "good.pth"
    save_official(build_vit("vit_tiny"), good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_backbone(truncated)
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_checkpoint_file(text)
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint_file(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint_file(tmp_path / "nope.pth")
    not_a_backbone = tmp_path / "dict.pth"
    torch.save({"step": torch.tensor(3), "optimizer": {"lr": torch.tensor(1.0)}}, not_a_backbone)
    with pytest.raises(CheckpointError, match="not a ViT backbone state dict"):
        load_backbone(not_a_backbone)


def test_wrapper_prefixes_are_stripped():
    sd = {"module." + k: v for k, v in export_official(build_vit("vit_tiny")).items()}
    assert load_backbone(sd).cfg == VIT_ARCHS["vit_tiny"]


def test_hf_file_layout_with_bare_layer_names_loads():
    """transformers' saved files name blocks `layer.N.*` (its state_dict says `model.layer.N.*`)."""
    hf = make_hf_model(False, seed=5)
    file_layout = {k[len("model."):] if k.startswith("model.layer.") else k: v for k, v in hf.state_dict().items()}
    model = load_backbone(file_layout).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert rel_err(model(x)["x_norm_clstoken"], hf(pixel_values=x).last_hidden_state[:, 0]) <= 1e-5
