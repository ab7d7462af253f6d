"""Imports run one way: each module imports only from its own layer or the layers below it, and no
two modules import each other (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import vistralv_ray

ROOT = Path(vistralv_ray.__file__).parent

# Lowest first. A module belongs to the longest prefix listed.
LAYERS = [
    ("errors", "logging"),
    ("config", "ray_runtime"),
    ("data.storage", "data.runs"),
    ("text",),
    # The scoring core of `eval --benchmark` (readers, prompts, answer clean-up, metrics: pure Python, no
    # model, no Ray) sits low, so that the training loop's benchmark step shares it; its runners
    # (runner, compare) stay above inference.
    ("evaluation.benchmarks", "evaluation.formats", "evaluation.metrics", "evaluation.text", "evaluation.bootstrap"),
    ("data",),
    ("model",),
    ("training",),
    ("inference",),
    ("evaluation",),
    ("tuning", "bench"),
    ("cli",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"vistralv_ray.{module} is in no layer: add it to LAYERS"
    return best


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The vistralv_ray modules `path` imports (`from pkg import submodule` counts the submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vistralv_ray"):
            base = node.module.removeprefix("vistralv_ray").lstrip(".")
            submodules = [f"{base}.{a.name}" if base else a.name for a in node.names]
            submodules = [m for m in submodules if is_module(m)]
            found.update(submodules or ([base] if base else []))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("vistralv_ray."):
                    found.add(alias.name.removeprefix("vistralv_ray."))
    return found


def graph() -> dict[str, set[str]]:
    edges = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = module_name(path)
        if name:
            edges[name] = {m for m in imports_of(path) if m != name}
    return edges


def test_the_checker_sees_lazy_imports_and_submodules(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from vistralv_ray.data import storage\n"
        "def f():\n    from vistralv_ray.training.checkpointing import TrainerState\n"
    )
    assert imports_of(source) == {"data.storage", "training.checkpointing"}
    assert layer_of("data.storage") < layer_of("text") < layer_of("data.prepare") < layer_of("model.assembly")


def test_imports_run_downward_only():
    upward = [
        f"vistralv_ray.{a} imports vistralv_ray.{b}"
        for a, targets in graph().items()
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_no_two_modules_import_each_other():
    edges = graph()
    mutual = sorted(f"{a} <-> {b}" for a, targets in edges.items() for b in targets if a < b and a in edges.get(b, ()))
    assert not mutual, "modules importing each other: " + ", ".join(mutual)
