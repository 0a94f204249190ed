"""ConvNeXt students: sizes, the ViT-style output dictionary, iBOT mask modes, released keys, save/load."""

import pytest
import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError, export_official
from models.convnext import CONVNEXT_ARCHS, ConvNeXt, build_convnext, infer_convnext_config, load_convnext


def test_presets_have_the_released_sizes():
    """Parameter counts plus a 1000-class linear head (how the original ConvNeXt counts them) round to the model
    card's 29M / 50M / 89M / 198M."""
    expected = {"convnext_tiny": 29, "convnext_small": 50, "convnext_base": 89, "convnext_large": 198}
    for name, millions in expected.items():
        cfg = CONVNEXT_ARCHS[name]
        with torch.device("meta"):
            n_params = sum(p.numel() for p in ConvNeXt(cfg).parameters())
        with_head = n_params + cfg.embed_dim * 1000 + 1000
        assert round(with_head / 1e6) == millions, (name, with_head)
    assert CONVNEXT_ARCHS["convnext_base"].dims == (128, 256, 512, 1024)
    assert CONVNEXT_ARCHS["convnext_small"].depths == (3, 3, 27, 3)


def test_output_dictionary_matches_the_vit_layout():
    torch.manual_seed(0)
    model = build_convnext("convnext_test").eval()
    x = torch.randn(2, 3, 96, 64)
    out = model(x)
    C, P = 192, (96 // 16) * (64 // 16)
    assert out["x_norm_clstoken"].shape == (2, C)
    assert out["x_storage_tokens"].shape == (2, 0, C)
    assert out["x_norm_patchtokens"].shape == (2, P, C)
    assert out["x_prenorm"].shape == (2, 1 + P, C)
    assert out["masks"] is None
    # Class vector = final norm of the global average pool of the last stage; patches = last stage resized to the
    # 16-px grid (bilinear), row-major, through the same norm.
    last = model.stage_features(x)[-1]
    assert last.shape == (2, C, 3, 2)
    torch.testing.assert_close(out["x_norm_clstoken"], model.norm(last.mean(dim=(-2, -1))))
    resized = F.interpolate(last, size=(6, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["x_norm_patchtokens"], model.norm(resized.flatten(2).transpose(1, 2)))


def test_list_forward_equals_one_forward_per_crop_size():
    torch.manual_seed(0)
    model = build_convnext("convnext_test").eval()
    big, small = torch.randn(2, 3, 64, 64), torch.randn(4, 3, 32, 32)
    outs = model([big, small])
    for crop, out in zip((big, small), outs):
        torch.testing.assert_close(out["x_norm_patchtokens"], model(crop)["x_norm_patchtokens"])


def test_mask_modes():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 5, 6]] = True
    ignore = build_convnext("convnext_test", mask_mode="ignore").eval()
    out = ignore(x, masks)
    assert out["masks"] is masks
    torch.testing.assert_close(out["x_norm_patchtokens"], ignore(x)["x_norm_patchtokens"])

    pixel = build_convnext("convnext_test", mask_mode="pixel").eval()
    pixel.load_state_dict(ignore.state_dict())
    masked_input = pixel.mask_pixels(x, masks)
    # Masked patch 5 = row 1, column 1 of the 4x4 grid: its 16x16 pixels are zero, the image's other pixels intact.
    assert masked_input[0, :, 16:32, 16:32].abs().sum() == 0
    assert torch.equal(masked_input[0, :, 32:, :], x[0, :, 32:, :])
    assert torch.equal(masked_input[1], x[1])
    masked_out = pixel(x, masks)["x_norm_patchtokens"]
    assert not torch.allclose(masked_out[0], out["x_norm_patchtokens"][0])
    torch.testing.assert_close(masked_out[1], out["x_norm_patchtokens"][1])
    with pytest.raises(ValueError, match="masks must have shape"):
        pixel(x, masks[:, :8])


def test_state_dict_has_the_released_key_names_and_loads_back(tmp_path):
    torch.manual_seed(0)
    model = build_convnext("convnext_test")
    keys = set(model.state_dict())
    assert {"downsample_layers.0.0.weight", "downsample_layers.0.1.bias", "downsample_layers.3.0.weight",
            "downsample_layers.3.1.weight", "stages.2.0.dwconv.weight", "stages.2.0.norm.weight",
            "stages.2.0.pwconv1.weight", "stages.2.0.pwconv2.bias", "stages.2.0.gamma", "norm.weight"} <= keys
    assert model.state_dict()["stages.0.0.dwconv.weight"].shape == (24, 1, 7, 7)
    assert torch.all(model.state_dict()["stages.1.0.gamma"] == 1e-6)
    path = tmp_path / "convnext.pth"
    torch.save(export_official(model), path)
    loaded = load_convnext(path).eval()
    assert loaded.cfg.depths == (1, 1, 1, 1) and loaded.cfg.dims == (24, 48, 96, 192)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x)["x_norm_clstoken"], model.eval()(x)["x_norm_clstoken"])
    # DDP / head wrappers' prefixes are stripped; a ViT or a mismatched size is refused with a clear error.
    load_convnext({f"backbone.{k}": v for k, v in model.state_dict().items()})
    with pytest.raises(CheckpointError, match="not a ConvNeXt"):
        load_convnext({"cls_token": torch.zeros(1, 1, 8)})
    with pytest.raises(CheckpointError, match="does not fit"):
        load_convnext(path, arch="convnext_tiny")
    assert infer_convnext_config(model.state_dict()) == CONVNEXT_ARCHS["convnext_test"]


def test_training_mode_gradients_and_drop_path():
    torch.manual_seed(0)
    model = build_convnext("convnext_test", drop_path_rate=0.5, layerscale_init=1.0).train()
    rates = [block.drop_path_rate for block in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == 0.5 and rates == sorted(rates)
    out = model(torch.randn(4, 3, 32, 32))
    out["x_norm_clstoken"].pow(2).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_inputs_are_refused():
    model = build_convnext("convnext_test")
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="3-channel"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="unknown ConvNeXt preset"):
        build_convnext("convnext_huge")
    with pytest.raises(ValueError, match="mask_mode"):
        build_convnext("convnext_test", mask_mode="zeros")


def test_intermediate_layers_on_the_vit_grid():
    model = build_convnext("convnext_test").eval()
    x = torch.randn(2, 3, 64, 96)
    layers = model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
    assert [tuple(p.shape) for p, _ in layers] == [(2, 96, 4, 6), (2, 192, 4, 6)]
    assert [tuple(c.shape) for _, c in layers] == [(2, 96), (2, 192)]
    last_patches = model.get_intermediate_layers(x)[0]
    torch.testing.assert_close(last_patches, model(x)["x_norm_patchtokens"])
