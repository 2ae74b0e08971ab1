"""Validate a Serve config file offline, before starting anything:

    python -m serve_app.validate serve_config.yaml [--gpus N]

Exits 1 with the field at fault when an application's `args` would fail at startup (missing
model, bad value, or a plan that cannot be scheduled on this machine's CPUs and N GPUs, default 0).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from serve_app.config import PipelineConfig
from serve_app.placement import PlacementError


def _load(path: Path) -> tuple[dict, str | None]:
    """The YAML document, or one line saying why it cannot be read (no traceback)."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        return {}, f"{path}: cannot read the file: {exc.strerror}"
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return {}, f"{path}: not valid YAML{where}: {problem}"
    if not isinstance(document, dict):
        return {}, f"{path}: expected a Serve config (a mapping with 'applications'), got {type(document).__name__}"
    return document, None


def validate(path: Path, gpus: float = 0.0) -> list[str]:
    from serve_app.app import bind_pipeline

    document, unreadable = _load(path)
    if unreadable:
        return [unreadable]
    problems = []
    for app in document.get("applications", []):
        name = app.get("name", "?")
        try:
            config = PipelineConfig.model_validate(app.get("args", {}))
            bind_pipeline(config, cluster_resources={"CPU": float(os.cpu_count() or 1), "GPU": gpus})
        except (ValidationError, PlacementError) as exc:
            problems.append(f"application {name!r}: {exc}")
    return problems


def main(argv: list[str]) -> int:
    gpus = 0.0
    if len(argv) == 3 and argv[1] == "--gpus":
        gpus, argv = float(argv[2]), argv[:1]
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    problems = validate(Path(argv[0]), gpus)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"{argv[0]}: OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
