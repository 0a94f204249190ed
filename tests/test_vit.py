"""The DINOv3 ViT: shapes, parameter counts, list-of-crops forward, masking, drop path, attention backends, input
checks."""

import pytest
import torch

from dino_kernels.rope_attention import rope_attention, rope_attention_reference
from models.rope import RopeEmbedding
from models.vit import VIT_ARCHS, attention, build_vit

RELEASED_PARAMS = {
    "vit_small": 21_601_152,
    "vit_small_plus": 28_697_472,
    "vit_base": 85_669_632,
    "vit_large": 303_154_176,
    "vit_huge_plus": 840_633_600,
    "vit_7b": 6_716_043_264,
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("arch", list(RELEASED_PARAMS))
def test_parameter_counts_equal_the_released_models(arch):
    with torch.device("meta"):
        model = build_vit(arch)
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMS[arch]


@pytest.mark.parametrize("arch", list(VIT_ARCHS))
def test_shapes_of_every_preset_on_the_meta_device(arch):
    with torch.device("meta"):
        model = build_vit(arch).eval()
        out = model(torch.randn(2, 3, 224, 160))
    C = VIT_ARCHS[arch].embed_dim
    assert out["x_norm_clstoken"].shape == (2, C)
    assert out["x_storage_tokens"].shape == (2, VIT_ARCHS[arch].n_storage_tokens, C)
    assert out["x_norm_patchtokens"].shape == (2, 14 * 10, C)
    assert out["x_prenorm"].shape == (2, 1 + VIT_ARCHS[arch].n_storage_tokens + 140, C)


def test_224px_image_gives_201_tokens():
    model = build_vit("vit_tiny").eval()
    out = model(torch.randn(1, 3, 224, 224))
    assert out["x_prenorm"].shape[1] == 201
    assert out["x_norm_patchtokens"].shape[1] == 196


def test_sides_not_multiple_of_the_patch_are_cropped():
    model = build_vit("vit_tiny").eval()
    x = torch.randn(1, 3, 70, 100)
    out = model(x)
    ref = model(x[..., :64, :96].contiguous())
    assert out["x_norm_patchtokens"].shape[1] == 4 * 6
    torch.testing.assert_close(out["x_prenorm"], ref["x_prenorm"], rtol=0, atol=0)


def test_list_of_crops_equals_separate_forwards():
    torch.manual_seed(0)
    model = build_vit("vit_tiny", layerscale_init=1.0).eval()
    glob, loc = torch.randn(2, 3, 64, 64), torch.randn(4, 3, 32, 48)
    masks = torch.rand(2, 16) < 0.3
    together = model([glob, loc], [masks, None])
    alone = [model(glob, masks), model(loc)]
    for a, b in zip(together, alone):
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6)


def test_masks_replace_patch_tokens_by_the_mask_token():
    model = build_vit("vit_tiny").eval()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 48, 64)
    masks = torch.zeros(2, 12, dtype=torch.bool)
    masks[0, [1, 5, 7]] = True
    masks[1, 0] = True
    tokens, (h, w) = model.prepare_tokens(x, masks)
    unmasked, _ = model.prepare_tokens(x, None)
    patches = tokens[:, model.n_prefix :]
    assert (h, w) == (3, 4)
    torch.testing.assert_close(patches[masks], model.mask_token.expand(int(masks.sum()), -1))
    torch.testing.assert_close(patches[~masks], unmasked[:, model.n_prefix :][~masks])
    with pytest.raises(ValueError, match="masks must have shape"):
        model.prepare_tokens(x, masks[:, :5])


def test_mask_token_gets_a_gradient_even_without_masks():
    model = build_vit("vit_tiny")
    model(torch.randn(1, 3, 32, 32))["x_norm_clstoken"].sum().backward()
    assert model.mask_token.grad is not None


def test_drop_path_is_off_in_eval_and_active_in_training():
    torch.manual_seed(0)
    plain = build_vit("vit_tiny", layerscale_init=1.0).eval()
    dropped = build_vit("vit_tiny", layerscale_init=1.0, drop_path_rate=0.5)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    dropped.eval()
    torch.testing.assert_close(dropped(x)["x_prenorm"], plain(x)["x_prenorm"], rtol=0, atol=0)
    dropped.train()
    dropped.rope_embed.rescale = None  # isolate stochastic depth from RoPE jitter
    a, b = dropped(x)["x_prenorm"], dropped(x)["x_prenorm"]
    assert not torch.allclose(a, b)


def test_untied_local_class_norm_applies_only_to_training_local_crops():
    model = build_vit("vit_tiny", untie_global_and_local_cls_norm=True, rope_rescale=None)
    with torch.no_grad():
        model.local_cls_norm.weight.fill_(3.0)
    glob, loc = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    out = model([glob, loc])
    torch.testing.assert_close(out[1]["x_norm_clstoken"], model.local_cls_norm(out[1]["x_prenorm"][:, 0]))
    torch.testing.assert_close(out[0]["x_norm_clstoken"], model.norm(out[0]["x_prenorm"][:, 0]))
    model.eval()
    out = model([glob, loc])
    torch.testing.assert_close(out[1]["x_norm_clstoken"], model.norm(out[1]["x_prenorm"][:, 0]))


def test_get_intermediate_layers_matches_forward_and_reshapes():
    model = build_vit("vit_tiny", layerscale_init=1.0).eval()
    x = torch.randn(2, 3, 48, 80)
    out = model(x)
    layers = model.get_intermediate_layers(x, n=2, return_class_token=True, return_extra_tokens=True)
    assert len(layers) == 2
    patches, cls, regs = layers[-1]
    torch.testing.assert_close(patches, out["x_norm_patchtokens"])
    torch.testing.assert_close(cls, out["x_norm_clstoken"])
    torch.testing.assert_close(regs, out["x_storage_tokens"])
    (grid,) = model.get_intermediate_layers(x, n=[1], reshape=True)
    assert grid.shape == (2, 192, 3, 5)
    (raw,) = model.get_intermediate_layers(x, n=1, norm=False)
    torch.testing.assert_close(raw, out["x_prenorm"][:, model.n_prefix :])
    with pytest.raises(ValueError, match="asked for blocks"):
        model.get_intermediate_layers(x, n=[7])


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(1, 1, 32, 32), "3-channel"),
        (torch.randn(1, 3, 8, 32), "smaller than one 16x16 patch"),
        (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), "floating-point"),
        (torch.randn(3, 32, 32), r"\[B, C, H, W\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(x, message):
    with pytest.raises(ValueError, match=message):
        build_vit("vit_tiny")(x)


def test_unknown_preset_and_attention_backend_are_rejected():
    with pytest.raises(ValueError, match="unknown ViT preset"):
        build_vit("vit_gigantic")
    with pytest.raises(ValueError, match="unknown attention implementation 'flash9'; use auto, triton, reference"):
        build_vit("vit_tiny").set_attn_impl("flash9")
    with pytest.raises(ValueError, match="unknown attention implementation"):
        build_vit("vit_tiny", attn_impl="flash9")


def test_kernel_backends_are_the_kernels_dispatch_and_auto_is_sdpa_on_the_cpu():
    """"triton" / "reference" are rope_attention's impl; "auto" runs SDPA on the CPU, under the interpreter too."""
    q, k, v = torch.randn(3, 2, 17, 3, 32, generator=torch.Generator().manual_seed(0)).unbind(0)
    embed = RopeEmbedding(32, rescale=2.0).train()
    embed.seed(7)
    rope = embed(3, 4)
    coords, periods = rope.coords, rope.periods
    assert torch.equal(attention(q, k, v, rope, 5, "reference"), rope_attention_reference(q, k, v, coords, periods, 5))
    triton = rope_attention(q, k, v, coords, periods, 5, impl="triton")
    assert torch.equal(attention(q, k, v, rope, 5, "triton"), triton)
    assert torch.equal(attention(q, k, v, rope, 5, "auto"), attention(q, k, v, rope, 5, "sdpa"))
    assert rel_err(attention(q, k, v, rope, 5, "sdpa"), rope_attention_reference(q, k, v, coords, periods, 5)) < 1e-6
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention(q, k, v, rope, 5, "flash9")


@pytest.mark.parametrize("train", [False, True])
def test_reference_attention_in_the_model(train):
    """The whole model with attn_impl="reference" (the kernel's specification) against the default (SDPA here)."""
    torch.manual_seed(0)
    model = build_vit("vit_tiny", layerscale_init=1.0, drop_path_rate=0.2).train(train)
    images = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    outputs = {}
    for impl in ("auto", "reference"):
        model.set_attn_impl(impl)
        model.rope_embed.seed(123)
        torch.manual_seed(3)  # the same drop-path draws
        outputs[impl] = model(images)["x_norm_patchtokens"]
    assert rel_err(outputs["reference"], outputs["auto"]) < 1e-5


def test_xformers_backend_explains_why_it_cannot_run_on_cpu():
    model = build_vit("vit_tiny", attn_impl="xformers")
    with pytest.raises(RuntimeError, match="no CPU kernels"):
        model(torch.randn(1, 3, 32, 32))


def test_bf16_forward_backward_runs_and_stays_close():
    torch.manual_seed(0)
    model = build_vit("vit_tiny", layerscale_init=1.0).eval()
    x = torch.randn(2, 3, 48, 48)
    ref = model(x)["x_norm_clstoken"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)["x_norm_clstoken"]
    out.float().sum().backward()
    assert rel_err(out.float(), ref) < 5e-2
