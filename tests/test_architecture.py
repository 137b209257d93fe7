"""The folder tree is the data flow: every import goes down the layers of docs/architecture.md, none in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sonar_ft"
LAYERS = [
    {"errors", "scores", "progress"},
    {"config", "device", "cli"},
    {"run_files"},
    {"files"},
    {"stack_env", "download", "data"},
    {"models", "plots"},
    {"evaluate", "plan", "export"},
    {"training", "inference"},
    {"tune", "demo"},
    {"notebook"},
    {"colab"},
]
RANK = {box: i for i, layer in enumerate(LAYERS) for box in layer}


def _box(path: Path) -> str:
    """The box a module belongs to: its sub-package, or the top-level module's own name."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_boxes(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] + [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "sonar_ft" and len(parts) > 1 and parts[1] in RANK:
                found.add(parts[1])
    return found


def test_every_box_is_placed_in_a_layer():
    boxes = {_box(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE}
    assert boxes <= set(RANK), f"place {sorted(boxes - set(RANK))} in LAYERS (and docs/architecture.md)"


def test_imports_only_go_down_the_layers():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue
        box = _box(path)
        for target in _imported_boxes(path) - {box}:
            if RANK[target] >= RANK[box]:
                upward.append(f"{path.relative_to(PACKAGE.parent)} ({box}, layer {RANK[box]}) imports {target} (layer {RANK[target]})")
    assert not upward, "\n".join(sorted(upward))
