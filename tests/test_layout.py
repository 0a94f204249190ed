"""The dependency direction of DESIGN.md, checked on the source: kernels -> models / losses / data -> the shared
training pieces -> entry points."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (at any depth in the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_kernels_import_no_model_loss_data_or_entry_point():
    forbidden = ("models", "losses", "data", "train", "distill", "eval", "export", "runtime", "schedules", "dense")
    for path in sorted((REPO / "kernels").glob("*.py")):
        bad = [m for m in imported_modules(path) if m.split(".")[0] in forbidden]
        assert not bad, f"{path.name} imports {bad}: kernels sit below every other layer"


def test_models_losses_and_data_import_no_entry_point():
    entry_points = ("train", "distill", "eval", "export")
    for folder in ("models", "losses", "data"):
        for path in sorted((REPO / folder).glob("*.py")):
            bad = [m for m in imported_modules(path) if m.split(".")[0] in entry_points]
            assert not bad, f"{folder}/{path.name} imports the entry point(s) {bad}"
