import os

# Triton's interpreter must be chosen before Triton is first imported: kernels decorated with @triton.jit
# then run on the CPU (through numpy), which is how the kernel tests exercise them without a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def single_thread():
    """Run like a DataLoader worker (one thread): tiny ops stall on OpenMP barriers when the cores are busy.
    A module opts in with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny train.py teacher (vit_tiny, 1 step) and its released-format backbone, for the distill.py tests.

    LayerScale 1.0 makes the random teacher's tokens depend on the image (at 1e-5 every class token is the same,
    and Sinkhorn-Knopp turns identical rows into uniform targets); its prototype layers are scaled x30 so its
    assignments are as confident as a trained teacher's: the students then have something to learn in 16 steps.
    """
    import torch

    import train
    from tests.helpers import procedural, tiny_config

    folder = tmp_path_factory.mktemp("teacher")
    cfg = tiny_config(folder, "--optim.iterations", "1", "--data.batch-size", "4", "--model.layerscale-init", "1.0")
    train.train(cfg, procedural())
    payload = torch.load(folder / "checkpoint_00000001.pth", weights_only=True)
    for key in ("dino_head.last_layer.weight", "ibot_head.last_layer.weight"):
        payload["teacher"][key] *= 30.0
    torch.save(payload, folder / "teacher.pth")
    return {"heads": folder / "teacher.pth", "backbone": folder / "teacher_backbone.pth"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """24 procedural images as PNG files: a dataset folder for runs launched as separate processes."""
    from tests.helpers import procedural

    folder = tmp_path_factory.mktemp("images")
    data = procedural(n=24)
    for i in range(len(data)):
        data[i][0].save(folder / f"{i:03d}.png")
    return folder
