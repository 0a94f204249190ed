"""The install is what CI tested, and nothing of the project hides a dependency.

The repository root is the import root, so a root module or package named like the import name of an installed
distribution shadows it: transformers 5.25 began to import Hugging Face's `kernels`, and the project's former
`kernels/` package broke every Hugging Face model load started from the root. The locks (requirements/*.txt) make
such a change arrive by a deliberate `make lock`, not by surprise on a fresh machine.
"""

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements"
EXTRAS = ("runtime", "export", "timm", "curate", "gpu", "dev")
# The two packages DESIGN.md pins by hand; every lock must hold exactly these.
PINNED_BY_HAND = {"torch": "2.14.1", "torchvision": "0.29.1"}


def project_import_names() -> set[str]:
    """Top-level names the project puts on sys.path[0]: root modules and root regular packages. (A folder without
    __init__.py is only a namespace portion: an installed module of the same name still wins the import.)"""
    modules = {path.stem for path in REPO.glob("*.py")}
    packages = {path.parent.name for path in REPO.glob("*/__init__.py")}
    return modules | packages


def source_requirements(name: str) -> list[Requirement]:
    """The requirements of requirements/<name>.in, following its `-r` includes."""
    found = []
    for line in (REQUIREMENTS / f"{name}.in").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            found += source_requirements(Path(line[3:].strip()).stem)
        else:
            found.append(Requirement(line))
    return found


def locked(name: str) -> list[tuple[Requirement, list[str]]]:
    """The pins of requirements/<name>.txt with their hashes (uv's format: continuation lines)."""
    text = (REQUIREMENTS / f"{name}.txt").read_text()
    entries = []
    for block in re.split(r"\n(?=\S)", text):
        block = block.strip()
        if not block or block.startswith("#"):
            continue
        spec = block.split("\\", 1)[0].strip()
        entries.append((Requirement(spec), re.findall(r"--hash=sha256:([0-9a-f]{64})", block)))
    return entries


def pins_for_this_interpreter(name: str) -> dict[str, str]:
    """Package -> exact version of a lock, for the entries whose markers hold on this interpreter."""
    pins = {}
    for requirement, _ in locked(name):
        if requirement.marker is None or requirement.marker.evaluate():
            pins[canonicalize_name(requirement.name)] = pinned_version(requirement)
    return pins


def pinned_version(requirement: Requirement) -> str:
    (specifier,) = requirement.specifier
    assert specifier.operator == "==", f"{requirement} is not an exact pin"
    return specifier.version


def test_no_project_name_shadows_an_installed_distribution():
    shadowed = {
        name: importlib.metadata.packages_distributions()[name]
        for name in project_import_names()
        if name in importlib.metadata.packages_distributions()
    }
    assert not shadowed, (
        f"project names that are import names of installed distributions (the project's module would win and the "
        f"dependency would break): {shadowed}; rename the project's module")


def test_the_project_names_are_read_from_the_tree():
    # The collision test above is only as good as this list.
    names = project_import_names()
    assert {"train", "distill", "eval", "export", "dino_kernels", "models", "losses", "data", "tests"} <= names
    assert "docs" not in names and "requirements" not in names


def test_a_hugging_face_model_loads_beside_the_project_kernels_from_the_root():
    # The failure of transformers 5.25 with the former `kernels/` package, started the way users start the entry
    # points: from the repository root, which is sys.path[0].
    script = (
        "import transformers.integrations.hub_kernels, kernels, dino_kernels.rope_attention\n"
        "import torch\n"
        "from transformers import DINOv3ViTConfig, DINOv3ViTModel\n"
        "config = DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,"
        " image_size=32, patch_size=16, num_register_tokens=4)\n"
        "out = DINOv3ViTModel(config)(pixel_values=torch.randn(1, 3, 32, 32)).last_hidden_state\n"
        "print(kernels.__file__, tuple(out.shape))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    kernels_file, shape = done.stdout.strip().split(" ", 1)
    assert "site-packages" in Path(kernels_file).parts, f"`import kernels` found {kernels_file}, not the distribution"
    assert shape == "(1, 9, 32)"  # class token + 4 registers + 2x2 patches


@pytest.mark.parametrize("extra", EXTRAS)
def test_every_lock_pins_its_sources_exactly_with_hashes(extra):
    entries = locked(extra)
    assert entries, f"requirements/{extra}.txt is empty"
    for requirement, hashes in entries:
        pinned_version(requirement)
        assert hashes, f"requirements/{extra}.txt: {requirement.name} has no hash"
    lock_names = {canonicalize_name(requirement.name) for requirement, _ in entries}
    for requirement in source_requirements(extra):
        assert canonicalize_name(requirement.name) in lock_names, (
            f"requirements/{extra}.in asks for {requirement.name}, which requirements/{extra}.txt does not pin: "
            f"run `make lock`")
    pins = pins_for_this_interpreter(extra)
    for package, version in PINNED_BY_HAND.items():
        assert pins[package] == version, f"requirements/{extra}.txt pins {package}=={pins[package]}, not {version}"


@pytest.mark.parametrize("extra", [extra for extra in EXTRAS if extra != "dev"])
def test_the_locks_agree_on_every_shared_package(extra):
    # dev.txt is what CI tests; the extras are resolved against it (gpu against runtime), so a user who installs
    # one extra gets the versions CI ran.
    reference = pins_for_this_interpreter("runtime" if extra == "gpu" else "dev")
    differing = {package: (version, reference[package])
                 for package, version in pins_for_this_interpreter(extra).items()
                 if package in reference and reference[package] != version}
    assert not differing, f"requirements/{extra}.txt differs from the lock it follows: {differing}"


def test_the_environment_is_the_lock_make_installs():
    # `make test` installs requirements/dev.txt; a run in any other environment is not what CI tests.
    wrong = {}
    for package, version in pins_for_this_interpreter("dev").items():
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or installed.split("+")[0] != version:
            wrong[package] = (installed, version)
    assert not wrong, f"installed vs locked (run `make install`, or `make lock` if the sources changed): {wrong}"


def test_make_installs_the_lock_with_hashes():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"pip install .*--require-hashes -r requirements/dev\.txt", makefile)
    assert "$(STAMP): requirements/dev.txt" in makefile

