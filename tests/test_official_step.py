"""bench/official_step.py, the side-by-side step against the official code: what a CPU can check.

The official code is never in the repository (third_party/ is git-ignored), so the recipe comparison is checked
here against the official config's numbers written out as a namespace (vitl_im1k_lin834.yaml, as read with the
search tool), and the whole dry run only where a developer put the official code in third_party/.
"""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import train
from bench.official_step import DEFAULT_OFFICIAL, PRESET, import_official, project_config_args, recipe_differences

REPO = Path(__file__).resolve().parents[1]


def official_vitl_im1k(batch: int) -> SimpleNamespace:
    """The numbers of the official vitl_im1k_lin834.yaml that set a step's work."""
    ns = SimpleNamespace
    return ns(
        student=ns(arch="vit_large", patch_size=16, ffn_ratio=4.0, n_storage_tokens=0, drop_path_rate=0.3),
        crops=ns(global_crops_size=224, local_crops_size=96, local_crops_number=8),
        train=ns(batch_size_per_gpu=batch),
        dino=ns(head_n_prototypes=65536, head_hidden_dim=2048, head_bottleneck_dim=256, koleo_loss_weight=0.1),
        ibot=ns(head_n_prototypes=65536, head_hidden_dim=2048, head_bottleneck_dim=256, mask_sample_probability=0.5,
                mask_ratio_min_max=[0.1, 0.5]),
        optim=ns(clip_grad=3.0),
    )


def test_the_preset_does_the_official_configs_work():
    assert recipe_differences(official_vitl_im1k(32), train.parse_config(project_config_args(32))) == []


@pytest.mark.parametrize("where, field, value, named", [
    ("crops", "local_crops_number", 10, "local crops: official 10 vs vitl16-im1k 8"),
    ("student", "arch", "vit_base", "backbone (width, depth, heads): official (768, 12, 12) vs vitl16-im1k"),
    ("ibot", "head_n_prototypes", 8192, "iBOT prototypes: official 8192 vs vitl16-im1k 65536"),
    ("student", "drop_path_rate", 0.0, "drop path: official 0.0 vs vitl16-im1k 0.3"),
])
def test_a_different_recipe_is_named(where, field, value, named):
    official = official_vitl_im1k(32)
    setattr(getattr(official, where), field, value)
    (difference,) = recipe_differences(official, train.parse_config(project_config_args(32)))
    assert difference.startswith(named)


def test_a_batch_that_differs_is_named():
    (difference,) = recipe_differences(official_vitl_im1k(16), train.parse_config([PRESET, "--data.batch-size", "32"]))
    assert difference == "batch per GPU: official 16 vs vitl16-im1k 32"


def test_missing_official_code_says_where_to_put_it(tmp_path):
    with pytest.raises(SystemExit, match=f"no official DINOv3 code in {tmp_path}.*fetch facebookresearch/dinov3"):
        import_official(tmp_path, None)


@pytest.mark.slow
@pytest.mark.skipif(not (DEFAULT_OFFICIAL / "dinov3").is_dir(), reason="the official code is not in third_party/")
def test_dry_run_with_the_official_code():
    done = subprocess.run([sys.executable, "bench/official_step.py", "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"collated_local_crops": [\n   16,' in done.stdout  # 8 local crops x batch 2, the official layout
