"""Check a Serve config file offline, before starting anything: one line per problem, exit 1 if any.

    python -m serve_app.validate serve_config.yaml [--gpus N] [--cpus N] [--resources NAME=N ...]

Checks each application's `args`: the config's fields, that every model file exists and fits the
input size, colour format and classes the config gives it, and that the plan can be scheduled on
this machine (its CPUs or N CPUs, N GPUs, and the custom resources given).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
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


def port_in_use(document: dict) -> str | None:
    """A note when the HTTP address of the config is taken now (`serve run` would then fail with a traceback)."""
    options = document.get("http_options") or {}
    host, port = options.get("host", "127.0.0.1"), int(options.get("port", 8000))
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return (f"note: {host}:{port} (http_options) is in use now; unless that is this service, `serve run` will "
                    f"fail: see who holds it with ss -ltnp 'sport = :{port}', or change http_options.port")
    return None


def field_errors(exc: ValidationError) -> list[str]:
    """pydantic's errors as `field.path: message` lines, without its URLs and input dumps."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "args"
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}")
    return lines


def validate(path: Path, gpus: float = 0.0, resources: dict[str, float] | None = None,
             cpus: float | None = None) -> tuple[list[str], list[str]]:
    """(problems, notes): a problem fails the check; a note (a busy HTTP port) only informs."""
    from deployments.models import check_models
    from serve_app.app import bind_pipeline

    # (after importing Ray, which sets its loggers up) the placement's "falling back to CPU" warnings
    # describe the plan, not a problem with the file
    logging.getLogger("ray.serve").setLevel(logging.ERROR)
    document, unreadable = _load(path)
    if unreadable:
        return [unreadable], []
    node = {"CPU": float(cpus if cpus is not None else os.cpu_count() or 1), "GPU": gpus, **(resources or {})}
    problems = []
    for app in document.get("applications", []):
        prefix = f"{path}: application {app.get('name', '?')!r}"
        try:
            config = PipelineConfig.model_validate(app.get("args", {}))
        except ValidationError as exc:
            problems += [f"{prefix}: {line}" for line in field_errors(exc)]
            continue
        problems += [f"{prefix}: {line}" for line in check_models(config.detector, config.classifiers)]
        try:
            bind_pipeline(config, [node])
        except PlacementError as exc:
            problems.append(f"{prefix}: {exc}")
    note = port_in_use(document)
    return problems, [note] if note else []


def _resource(text: str) -> tuple[str, float]:
    name, _, amount = text.partition("=")
    try:
        if not name:
            raise ValueError
        return name, float(amount)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=N, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.validate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", type=Path, help="a Serve config file, e.g. serve_config.yaml")
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs to plan for (default 0: this machine's CPU only)")
    parser.add_argument("--cpus", type=float, default=None,
                        help="CPUs to plan for (default: this machine's), for a config meant for a bigger box")
    parser.add_argument("--resources", type=_resource, action="append", default=[], metavar="NAME=N",
                        help="a custom Ray resource the cluster offers, e.g. classifier_node=4 (repeatable)")
    args = parser.parse_args(argv)
    problems, notes = validate(args.config, args.gpus, dict(args.resources), args.cpus)
    for line in (*problems, *notes):
        print(line, file=sys.stderr)
    if not problems:
        print(f"{args.config}: OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
