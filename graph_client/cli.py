"""graph-infer: send images to the inference graph and write what it finds as JSON Lines.

    graph-infer photos/                         every image under photos/, 8 at a time, JSON Lines to stdout
    graph-infer 'shots/*.jpg' -o results.jsonl --csv objects.csv --annotated out/
    graph-infer img.png --classifiers age,gender --url http://10.0.0.5:8000

Inputs are files, folders (searched recursively for image files) or glob patterns. Each input gives one
JSON line: {"file": ..., "result": <the /v1/infer answer>} or {"file": ..., "error": {"code", "message"}}.
--csv writes one row per detected object; --annotated saves each image with boxes and attributes drawn.
Answers 503 (a deployment starting or busy) are retried with backoff. The bearer token is read from the
environment variable PIPELINE_API_TOKEN (or the one named by --token-env). A progress bar goes to stderr
when it is a terminal, and a summary line at the end: images, objects, errors, images per second.
Exit status: 0 when every image was answered, 1 when some failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import glob
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from graph_client.client import AsyncGraphClient, GraphError, Retry

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def expand(inputs: list[str]) -> list[Path]:
    """Files, folders (recursively, image files only) and globs, in a stable order, each file once."""
    found: dict[Path, None] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"no image matches {item!r}")
        found.update(dict.fromkeys(matches))
    return list(found)


def annotated_names(files: list[Path]) -> dict[Path, Path]:
    """Where each input's annotated JPEG goes, relative to the output folder: its path below the inputs' common
    folder, with `.jpg` for its suffix (`x/a.png` -> `x/a.jpg`); inputs that would meet keep their own suffix too
    (`x/a.png` and `x/a.jpg` -> `x/a.png.jpg`, `x/a.jpg.jpg`). Never one name for two inputs."""
    resolved = [p.resolve() for p in files]
    root = Path(os.path.commonpath([p.parent for p in resolved])) if resolved else Path(".")
    relative = [p.relative_to(root) for p in resolved]
    plain = [r.with_suffix(".jpg") for r in relative]
    taken = {name: plain.count(name) for name in plain}
    names = {f: (r.with_name(r.name + ".jpg") if taken[n] > 1 else n) for f, r, n in zip(files, relative, plain)}
    if len(set(names.values())) != len(names):  # only if a file is literally named like another's fallback
        raise ValueError("two inputs would be saved under one annotated name; rename one of them")
    return names


class Progress:
    """A one-line progress bar on a terminal; nothing elsewhere."""

    def __init__(self, total: int, stream: TextIO, enabled: bool) -> None:
        self.total, self.done, self.stream, self.enabled = total, 0, stream, enabled
        self.start = time.perf_counter()

    def advance(self) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            filled = width * self.done // max(self.total, 1)
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {rate:.1f} img/s")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")


def csv_rows(file: str, result: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One row per detected object: the box, label, score and each attribute's label or value."""
    for index, obj in enumerate(result["objects"]):
        row = {"file": file, "object": index, "label": obj["label"], "score": obj["score"],
               "x1": obj["box"][0], "y1": obj["box"][1], "x2": obj["box"][2], "y2": obj["box"][3]}
        for name, attribute in obj["attributes"].items():
            row[name] = attribute.get("label", attribute.get("value"))
            if "score" in attribute:
                row[f"{name}_score"] = attribute["score"]
        yield row


async def run(args: argparse.Namespace, files: list[Path], out: TextIO, err: TextIO) -> int:
    classifiers = args.classifiers.split(",") if args.classifiers else None
    token = os.environ.get(args.token_env)
    names = annotated_names(files) if args.annotated else {}  # main() checked it: no name is taken twice
    records: list[dict[str, Any] | None] = [None] * len(files)
    progress = Progress(len(files), err, args.progress if args.progress is not None else err.isatty())
    semaphore = asyncio.Semaphore(args.concurrency)
    started = time.perf_counter()
    async with AsyncGraphClient(args.url, token, args.timeout, Retry(args.retries + 1), args.concurrency) as client:
        async def one(i: int, path: Path) -> None:
            async with semaphore:
                record: dict[str, Any] = {"file": str(path)}
                try:
                    record["result"] = await client.infer(path, classifiers, args.mode)
                    if args.annotated:
                        jpeg = await client.annotate(path, classifiers)
                        target = Path(args.annotated) / names[path]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(jpeg)
                        record["annotated"] = str(target)
                except GraphError as exc:
                    record["error"] = {"code": exc.code, "message": exc.message}
                except (OSError, ValueError) as exc:  # unreadable file, or a transport failure
                    record["error"] = {"code": "client_error", "message": f"{type(exc).__name__}: {exc}"}
                records[i] = record
                out.write(json.dumps(record) + "\n")  # as answers arrive: a long run shows its results
                out.flush()
                progress.advance()

        await asyncio.gather(*(one(i, path) for i, path in enumerate(files)))
    progress.close()
    wall = time.perf_counter() - started
    done = [r for r in records if r is not None]
    errors = sum("error" in r for r in done)
    objects = sum(len(r["result"]["objects"]) for r in done if "result" in r)
    if args.csv:
        rows = [row for r in done if "result" in r for row in csv_rows(r["file"], r["result"])]
        columns = list(dict.fromkeys(key for row in rows for key in row)) or ["file", "object"]
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows(rows)
    print(f"images {len(done)}, objects {objects}, errors {errors}, {len(done) / max(wall, 1e-9):.1f} images/s",
          file=err)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graph-infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="where the service answers (default: %(default)s)")
    parser.add_argument("-c", "--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)")
    parser.add_argument("--classifiers", help="comma-separated classifiers to run (default: all)")
    parser.add_argument("--mode", choices=["parallel", "sequential"], help="override the configured mode")
    parser.add_argument("-o", "--output", default="-", help="JSON Lines file (default: stdout)")
    parser.add_argument("--csv", help="also write one CSV row per detected object to this file")
    parser.add_argument("--annotated", help="save each image with boxes and attributes drawn into this folder")
    parser.add_argument("--retries", type=int, default=3, help="retries of a 503 answer, with backoff (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: %(default)s)")
    parser.add_argument("--token-env", default="PIPELINE_API_TOKEN",
                        help="environment variable holding the bearer token (default: %(default)s)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    try:
        files = expand(args.inputs)
        if args.annotated:
            annotated_names(files)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    if args.output == "-":
        return asyncio.run(run(args, files, sys.stdout, sys.stderr))
    with open(args.output, "w") as out:
        return asyncio.run(run(args, files, out, sys.stderr))


if __name__ == "__main__":
    sys.exit(main())
