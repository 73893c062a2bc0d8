"""The shape of the code that DESIGN.md promises: a short loop, short functions, no giant module, and
imports that point one way (cli → ui → lab → recipes/review → train/analyze → config → network/data/models → io → errors)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "loralab"

LAYERS = {  # a package may import only from packages of a lower layer (and from itself)
    "errors": 0,
    "io": 1,
    "models": 2, "data": 2, "network": 2,
    "config": 3,
    "train": 4, "analyze": 4,
    "recipes": 5, "review": 5,
    "lab": 6,
    "ui": 7,  # the web app; the CLI registers its command, so it sits below cli
    "cli": 8,
}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "loralab"


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, node.end_lineno - node.lineno + 1


def test_fit_is_about_one_screen_and_train_functions_are_short():
    loop = ast.parse((SRC / "train" / "loop.py").read_text())
    fit = next(n for n, _ in _functions(loop) if n.name == "fit")
    assert fit.end_lineno - fit.lineno + 1 <= 100
    long = [f"{p.name}:{n.name} ({length} lines)" for p in sorted((SRC / "train").glob("*.py"))
            for n, length in _functions(ast.parse(p.read_text())) if length > 80]
    assert long == []


def test_no_module_over_600_lines():
    big = [f"{p.relative_to(SRC)} ({n})" for p in sorted(SRC.rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > 600]
    assert big == []


def test_imports_point_one_way():
    wrong = []
    for p in sorted(SRC.rglob("*.py")):
        rel = p.relative_to(SRC)
        src = rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else "loralab"
        if src == "loralab":
            continue
        assert src in LAYERS, f"new package {src}: give it a layer in this test and in DESIGN.md"
        for node in ast.walk(ast.parse(p.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if not name.startswith("loralab."):
                    continue
                dst = _package(name)
                if dst != src and LAYERS[dst] >= LAYERS[src]:
                    wrong.append(f"{rel}: imports {name} ({src} layer {LAYERS[src]} -> {dst} layer {LAYERS[dst]})")
    assert wrong == []


def test_build_tools_are_not_in_the_package():
    assert not (SRC / "lab" / "train_base.py").exists() and not (SRC / "lab" / "pack.py").exists()
    tools = SRC.parents[1] / "tools" / "lab"
    assert (tools / "train_base.py").is_file() and (tools / "pack.py").is_file()
