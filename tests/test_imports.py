"""Imports flow one way, engines < deployments < serve_app, and the model stages load without Ray Serve."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("engines", "deployments", "serve_app")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
    return names


def test_no_package_imports_one_above_it() -> None:
    climbing = []
    for rank, package in enumerate(ORDER):
        for path in sorted((ROOT / package).rglob("*.py")):
            above = _imports(path) & set(ORDER[rank + 1:])
            climbing += [f"{path.relative_to(ROOT)} imports {name}" for name in sorted(above)]
    assert climbing == []


def test_the_stages_and_the_graph_load_without_ray_serve() -> None:
    """What the graph and the stages need (their types, config and compute) must not drag in every
    @serve.deployment and ray.serve._private."""
    code = ("import sys; import deployments.stages, deployments.results, serve_app.graph; "
            "print(sorted(m for m in sys.modules if m == 'ray.serve' or m.startswith('ray.serve.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
