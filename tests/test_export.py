"""export.py: ONNX (onnxruntime) and Hugging Face (transformers) exports of the demo run's ViT teacher and ConvNeXt
student and of random-weight released-format ViTs, compared with the PyTorch model by relative error; the HF
conversions both ways; controls that the checks fail on a wrong model; clear errors for bad input."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distill
import export
import train
from models.checkpoint import (
    CheckpointError,
    convnext_to_hf,
    export_official,
    hf_to_convnext,
    hf_to_official,
    load_any_backbone,
    official_to_hf,
    save_official,
)
from models.convnext import build_convnext
from models.vit import build_vit
from tests.helpers import REPO, distill_config, procedural, tiny_config

onnx = pytest.importorskip("onnx", reason="export tests need requirements/export.txt (included in requirements/dev.txt)")
ort = pytest.importorskip("onnxruntime", reason="export tests need requirements/export.txt")
transformers = pytest.importorskip("transformers", reason="export tests need requirements/export.txt")

# Three resolutions, one not square; small so that every test stays quick on two CPU cores.
SIZES = ["32", "32", "48", "80", "64", "64"]


def rel_err(out, ref) -> float:
    out, ref = torch.as_tensor(out).double(), torch.as_tensor(ref).double()
    assert out.shape == ref.shape
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    """The demo's checkpoints, made by the entry points themselves: one train.py step (vit_tiny, LayerScale 1.0 as in
    the demo preset) and one distill.py step from it (vit_tiny and convnext_test students, LayerScale 1.0 so that
    their blocks shape the features)."""
    root = tmp_path_factory.mktemp("demo")
    train.train(tiny_config(root / "train", "--optim.iterations", "1", "--data.batch-size", "4",
                            "--model.layerscale-init", "1.0"), procedural())
    distill.distill(distill_config(root / "distill", root / "train" / "checkpoint_00000001.pth",
                                   "--students", "vit_tiny,convnext_test", "--student.layerscale-init", "1.0",
                                   "--optim.iterations", "1", "--data.batch-size", "4"), procedural())
    return {
        "train_run": root / "train",  # a run folder: its newest checkpoint is read
        "teacher_backbone": root / "train" / "teacher_backbone.pth",
        "distill_vit": root / "distill" / "vit_tiny" / "checkpoint_00000001.pth",
        "distill_convnext": root / "distill" / "convnext_test" / "checkpoint_00000001.pth",
        "convnext_backbone": root / "distill" / "convnext_test" / "backbone.pth",
    }


def same_weights(a: dict, b: dict) -> bool:
    """Bit-equal state dicts, comparing qkv biases with their mask applied (Hugging Face keeps only that)."""
    def effective(sd: dict) -> dict:
        return {k: v * sd[k + "_mask"] if k.endswith("qkv.bias") else v for k, v in sd.items()}

    a, b = effective(a), effective(b)
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter (biases, LayerScale, registers included) so each one shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("gamma"):  # LayerScale: order 1, so the blocks matter
                p.copy_(0.5 + 0.1 * noise)
            elif "weight" in name and p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Every checkpoint the project writes is read
# ----------------------------------------------------------------------------------------------------


def test_train_and_distill_checkpoints_give_the_backbones_they_hold(demo):
    """The exports read every checkpoint the entry points write (models.checkpoint.load_any_backbone)."""
    pairs = [("train_run", demo["teacher_backbone"]), ("distill_vit", demo["distill_vit"].parent / "backbone.pth"),
             ("distill_convnext", demo["convnext_backbone"])]
    for checkpoint, backbone_file in pairs:
        assert same_weights(export_official(load_any_backbone(demo[checkpoint])),
                            torch.load(backbone_file, weights_only=True)), checkpoint


# ----------------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------------


def test_onnx_vit_of_the_demo_run_matches_pytorch_at_any_resolution(demo, tmp_path):
    out = tmp_path / "vit.onnx"
    rows = export.main(["onnx", "--checkpoint", str(demo["train_run"]), "--out", str(out), "--verify-sizes", *SIZES,
                        "--intermediate-layers", "3", "1"])
    names = ["class_token", "register_tokens", "patch_tokens"]
    names += [f"layer{i}_{n}" for i in (1, 3) for n in ("class_token", "register_tokens", "patch_tokens")]
    assert [name for _, name, _ in rows] == names * 3
    assert {size for size, _, _ in rows} == {(32, 32), (48, 80), (64, 64)}
    assert max(error for _, _, error in rows) <= 1e-4

    # The graph: one input with symbolic batch/height/width, named outputs, RoPE computed from the grid size.
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["pixel_values"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) and d for d in (dims[0], dims[2], dims[3])), dims
    assert [o.name for o in graph.output] == names
    assert {"Range", "Sin", "Cos"} <= {node.op_type for node in graph.node}

    # Independently of export.verify_onnx: a resolution and batch it never saw, against forward / intermediate layers.
    model = load_any_backbone(demo["train_run"]).eval()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 96, 32)
    outputs = dict(zip(names, session.run(None, {"pixel_values": x.numpy()})))
    with torch.no_grad():
        ref = model(x)
        (patches1, cls1), (patches3, cls3) = model.get_intermediate_layers(x, n=[1, 3], return_class_token=True)
    assert rel_err(outputs["class_token"], ref["x_norm_clstoken"]) <= 1e-4
    assert rel_err(outputs["register_tokens"], ref["x_storage_tokens"]) <= 1e-4
    assert rel_err(outputs["patch_tokens"], ref["x_norm_patchtokens"]) <= 1e-4
    assert rel_err(outputs["layer1_patch_tokens"], patches1) <= 1e-4
    assert rel_err(outputs["layer1_class_token"], cls1) <= 1e-4
    assert rel_err(outputs["layer3_patch_tokens"], patches3) <= 1e-4
    # Sides that are not multiples of 16 run too and drop the last partial patch row/column, as PyTorch does.
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        ref = model(x)["x_norm_patchtokens"]
    assert rel_err(session.run(["patch_tokens"], {"pixel_values": x.numpy()})[0], ref) <= 1e-4

    # Control: the same check against a model whose RoPE periods differ fails, so RoPE is really in the graph and
    # the check can fail.
    other = load_any_backbone(demo["train_run"]).eval()
    other.rope_embed.periods.mul_(2.0)
    rows = export.verify_onnx(out, other, [1, 3], ((48, 80),))
    assert max(error for _, name, error in rows if name == "patch_tokens") > 1e-3


def test_onnx_convnext_student_of_the_demo_run_matches_pytorch(demo, tmp_path):
    out = tmp_path / "convnext.onnx"
    rows = export.main(["onnx", "--checkpoint", str(demo["distill_convnext"]), "--out", str(out),
                        "--verify-sizes", *SIZES, "--intermediate-layers", "1", "3"])
    names = ["class_token", "patch_tokens", "layer1_class_token", "layer1_patch_tokens", "layer3_class_token",
             "layer3_patch_tokens"]
    assert [name for _, name, _ in rows] == names * 3
    assert max(error for _, _, error in rows) <= 1e-4
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = load_any_backbone(demo["convnext_backbone"]).eval()
    x = torch.randn(3, 3, 112, 48)
    class_token, patch_tokens = session.run(["class_token", "patch_tokens"], {"pixel_values": x.numpy()})
    with torch.no_grad():
        ref = model(x)
    assert patch_tokens.shape == (3, 7 * 3, 192)  # the 16-px grid of a 112x48 image, convnext_test's width
    assert rel_err(class_token, ref["x_norm_clstoken"]) <= 1e-4
    assert rel_err(patch_tokens, ref["x_norm_patchtokens"]) <= 1e-4


# ----------------------------------------------------------------------------------------------------
# Hugging Face
# ----------------------------------------------------------------------------------------------------


def test_hf_export_of_the_demo_run_loads_in_transformers_and_matches(demo, tmp_path):
    folder = tmp_path / "hf"
    rows = export.main(["hf", "--checkpoint", str(demo["train_run"]), "--out", str(folder), "--verify-sizes", *SIZES])
    assert len(rows) == 9 and max(error for _, _, error in rows) <= 1e-5
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    # Independently: no missing/unexpected keys, and the outputs of a batch at another resolution.
    hf, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True)
    assert type(hf).__name__ == "DINOv3ViTModel" and not any(info.values()), info
    model = load_any_backbone(demo["train_run"]).eval()
    x = torch.randn(3, 3, 80, 112)
    with torch.no_grad():
        hidden, ref = hf.eval()(pixel_values=x).last_hidden_state, model(x)
    assert rel_err(hidden[:, 0], ref["x_norm_clstoken"]) <= 1e-5
    assert rel_err(hidden[:, 1:5], ref["x_storage_tokens"]) <= 1e-5
    assert rel_err(hidden[:, 5:], ref["x_norm_patchtokens"]) <= 1e-5
    # Round trip: the folder reads back (models.checkpoint) into exactly the original weights.
    assert same_weights(export_official(load_any_backbone(folder)), export_official(model))


def test_hf_export_of_the_convnext_student_loads_and_matches(demo, tmp_path):
    folder = tmp_path / "hf_convnext"
    rows = export.main(["hf", "--checkpoint", str(demo["distill_convnext"]), "--out", str(folder),
                        "--verify-sizes", *SIZES])
    assert [name for _, name, _ in rows] == ["class_token", "stride32_tokens"] * 3
    assert max(error for _, _, error in rows) <= 1e-5
    hf, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True)
    assert type(hf).__name__ == "DINOv3ConvNextModel" and not any(info.values()), info
    model = load_any_backbone(demo["convnext_backbone"]).eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        assert rel_err(hf.eval()(pixel_values=x).pooler_output, model(x)["x_norm_clstoken"]) <= 1e-5
    original = export_official(model)
    assert same_weights(hf_to_convnext(convnext_to_hf(original)), original)
    assert same_weights(export_official(load_any_backbone(folder)), original)


@pytest.mark.parametrize("variant", [
    dict(ffn="swiglu", ffn_ratio=6.0),  # ViT-S+ / H+ style SwiGLU
    dict(mask_k_bias=False),  # a k bias that is not masked out
    dict(qkv_bias=False, untie_global_and_local_cls_norm=True, ffn="swiglu", ffn_ratio=3.0, swiglu_align=64),  # 7B
    dict(rope_base=1000.0, n_storage_tokens=0),
], ids=["swiglu", "k_bias", "7b_style", "base1000_no_registers"])
def test_hf_export_of_architecture_variants(variant, tmp_path):
    model = randomize(build_vit("vit_tiny", attn_impl="sdpa", **variant))
    config, weights = export.hf_config_and_weights(model)
    export.write_hf_folder(tmp_path, config, weights)
    rows = export.verify_hf(tmp_path, model, ((32, 48), (64, 64)))
    assert max(error for _, _, error in rows) <= 1e-5
    # official -> HF -> official gives the same tensors (the 7B's local-crop class norm has no HF counterpart).
    official = export_official(model)
    back = hf_to_official(official_to_hf(official), rope_base=config["rope_theta"], head_dim=model.cfg.head_dim)
    kept = {k: v for k, v in official.items() if not k.startswith("local_cls_norm.")}
    assert back.keys() == kept.keys()
    for key, value in kept.items():
        if key.endswith("qkv.bias"):  # HF stores the bias with the mask applied
            value = value * official[key.replace("bias", "bias_mask")]
        assert torch.allclose(back[key], value, rtol=1e-6, atol=0), key


def test_hf_checks_fail_on_a_wrong_folder(tmp_path):
    """Controls: a folder with a key missing, one with q and k swapped, and a ConvNeXt that differs in one layer do
    not pass the checks."""
    model = randomize(build_vit("vit_tiny", attn_impl="sdpa"))
    config, weights = export.hf_config_and_weights(model)
    missing = dict(weights)
    del missing["layer.1.mlp.up_proj.bias"]
    export.write_hf_folder(tmp_path / "missing", config, missing)
    with pytest.raises(export.ExportCheckFailed, match="missing_keys.*layer.1.mlp.up_proj.bias"):
        export.verify_hf(tmp_path / "missing", model, ((32, 32),))
    swapped = dict(weights)
    swapped["layer.2.attention.q_proj.weight"] = weights["layer.2.attention.k_proj.weight"]
    swapped["layer.2.attention.k_proj.weight"] = weights["layer.2.attention.q_proj.weight"]
    export.write_hf_folder(tmp_path / "swapped", config, swapped)
    rows = export.verify_hf(tmp_path / "swapped", model, ((32, 48),))
    assert max(error for _, _, error in rows) > 1e-3
    with pytest.raises(export.ExportCheckFailed, match="differs from the PyTorch model"):
        export.check_errors(rows, export.HF_TOLERANCE, "Hugging Face")
    # ConvNeXt: transformers runs the same operators in the same order (error exactly 0); a model that differs in
    # one layer-scale vector is caught.
    convnext = randomize(build_convnext("convnext_test"))
    export.write_hf_folder(tmp_path / "convnext", *export.hf_config_and_weights(convnext))
    with torch.no_grad():
        convnext.stages[2][0].gamma.mul_(1.5)
    rows = export.verify_hf(tmp_path / "convnext", convnext, ((64, 64),))
    assert min(error for _, _, error in rows) > 1e-3


@pytest.mark.slow  # a fresh interpreter: imports alone take seconds
def test_export_runs_as_a_command(demo, tmp_path):
    """`python export.py hf ...` from the repository root (the checks run in-process in the tests above)."""
    folder = tmp_path / "hf"
    result = subprocess.run(
        [sys.executable, "export.py", "hf", "--checkpoint", str(demo["teacher_backbone"]), "--out", str(folder),
         "--no-verify"], cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DINOv3ViTModel" in result.stdout
    assert same_weights(export_official(load_any_backbone(folder)), torch.load(demo["teacher_backbone"]))


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


def test_bad_input_gets_a_clear_message_before_any_export(demo, tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    ckpt = str(demo["teacher_backbone"])
    with pytest.raises(ValueError, match=r"50x64 are not multiples of the patch size 16.*use e\.g\. 48x64"):
        export.main(["onnx", "--checkpoint", ckpt, "--out", str(out), "--verify-sizes", "50", "64"])
    with pytest.raises(ValueError, match=r"smaller than this backbone's smallest input side of 32"):
        export.main(["onnx", "--checkpoint", str(demo["convnext_backbone"]), "--out", str(out),
                     "--verify-sizes", "16", "64"])
    with pytest.raises(ValueError, match=r"--intermediate-layers \[4\] are outside this backbone's 4 blocks"):
        export.main(["onnx", "--checkpoint", ckpt, "--out", str(out), "--intermediate-layers", "4"])
    with pytest.raises(ValueError, match="no output given: pass --out"):
        export.main(["hf", "--checkpoint", ckpt])
    with pytest.raises(ValueError, match="no checkpoint given"):
        export.main(["onnx", "--out", str(out)])
    unknown = tmp_path / "unknown.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, unknown)
    with pytest.raises(CheckpointError, match=r"unknown.pth holds a dict of 1 entries.*not a backbone"):
        export.main(["onnx", "--checkpoint", str(unknown), "--out", str(out)])
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(demo["teacher_backbone"].read_bytes()[:5000])  # a truncated file
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        export.main(["hf", "--checkpoint", str(corrupt), "--out", str(tmp_path / "hf")])
    assert not out.exists() and not (tmp_path / "hf").exists()
    # A missing optional package names the requirements file (None in sys.modules makes the import fail).
    for package, argv in (("onnxscript", ["onnx", "--out", str(out)]), ("onnxruntime", ["onnx", "--out", str(out)]),
                          ("transformers", ["hf", "--out", str(tmp_path / "hf")])):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, package, None)
            with pytest.raises(ModuleNotFoundError, match=f"'{package}'.*pip install -r requirements/export.txt"):
                export.main([*argv, "--checkpoint", ckpt])
    # Weights Hugging Face's DINOv3ViTModel cannot hold: RoPE periods that are not base**(4i/D).
    log_spaced = build_vit("vit_tiny", rope_base=None, rope_min_period=0.5, rope_max_period=50.0)
    with pytest.raises(CheckpointError, match="not base.*for any base.*export it to ONNX instead"):
        export.hf_config_and_weights(log_spaced)


# ----------------------------------------------------------------------------------------------------
# Released sizes (random weights)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vit_small", "vit_small_plus", "vit_base", "vit_large"])
def test_released_sizes_export_and_match(arch, tmp_path):
    """Random-weight released-format files of each ViT size up to ViT-L, through both exports."""
    torch.manual_seed(0)
    path = tmp_path / f"{arch}.pth"
    save_official(randomize(build_vit(arch)), path)
    sizes = ["64", "64", "48", "112", "112", "112"]
    rows = export.main(["onnx", "--checkpoint", str(path), "--out", str(tmp_path / "model.onnx"),
                        "--verify-sizes", *sizes, "--verify-batch", "1"])
    assert len(rows) == 9 and max(error for _, _, error in rows) <= 1e-4
    rows = export.main(["hf", "--checkpoint", str(path), "--out", str(tmp_path / "hf"), "--verify-sizes", *sizes,
                        "--verify-batch", "1"])
    assert len(rows) == 9 and max(error for _, _, error in rows) <= 1e-5
