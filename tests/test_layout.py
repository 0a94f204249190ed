"""The dependency direction of DESIGN.md, checked on the source: kernels -> models / losses / data -> the shared
training pieces -> entry points. No entry point imports another; no kernel imports a model."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINTS = ("train", "distill", "eval", "export", "curate")
# The repository root's other modules: what the entry points share, each named for what it holds.
SHARED = ("config", "runtime", "schedules", "student_teacher", "objective", "optimizer", "monitor", "probes",
          "figures", "dense", "health")


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (at any depth in the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def first_party(path: Path) -> set[str]:
    return {m.split(".")[0] for m in imported_modules(path)} & {*ENTRY_POINTS, *SHARED, "dino_kernels", "models", "losses",
                                                                  "data"}


def test_every_root_module_is_classified():
    """A new file at the root must be named here as an entry point or a shared module, so the checks cover it."""
    root = {path.stem for path in REPO.glob("*.py")}
    assert root == {*ENTRY_POINTS, *SHARED}, f"unclassified: {root ^ {*ENTRY_POINTS, *SHARED}}"


def test_kernels_import_nothing_above_them():
    for path in sorted((REPO / "dino_kernels").glob("*.py")):
        bad = first_party(path) - {"dino_kernels"}
        assert not bad, f"dino_kernels/{path.name} imports {sorted(bad)}: kernels sit below every other layer"


def test_models_losses_and_data_import_only_kernels_and_each_other():
    for folder in ("models", "losses", "data"):
        for path in sorted((REPO / folder).glob("*.py")):
            bad = first_party(path) - {"dino_kernels", "models", "losses", "data", "runtime"}
            assert not bad, f"{folder}/{path.name} imports {sorted(bad)}, which sit above it"


def test_shared_modules_import_no_entry_point():
    for name in SHARED:
        bad = first_party(REPO / f"{name}.py") & set(ENTRY_POINTS)
        assert not bad, f"{name}.py imports the entry point(s) {sorted(bad)}: entry points sit on top"


def test_no_entry_point_imports_another():
    for name in ENTRY_POINTS:
        bad = first_party(REPO / f"{name}.py") & (set(ENTRY_POINTS) - {name})
        assert not bad, f"{name}.py imports the entry point(s) {sorted(bad)}: move what they share to a shared module"


def test_the_checks_see_imports():
    """The checks above pass vacuously if the parser misses imports: train.py must be seen importing its pieces."""
    assert {"config", "objective", "student_teacher", "runtime", "data", "models"} <= first_party(REPO / "train.py")
    assert "train" in first_party(REPO / "bench" / "bench_train.py")
