"""How much of the interpreter's lock NVDEC readers leave to the rest of a stream worker's process.

    python -m bench.gil_probe --clip 720p.mp4 --readers 8

A pure-Python counting thread runs alone for `--seconds`, then beside N NVDEC readers (serve_app/nvdec_reader.py,
frames kept on the GPU, each playing the clip at its own rate, as a camera sends it) for as long: the counter's rate beside them over its
rate alone is the share of the GIL the readers leave (1 / (N + 1) or so if they wait on the device without it,
much less if they hold it while they decode). The decoded frames per second of the readers are printed beside.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path


def count_for(seconds: float) -> float:
    """Increments per second of a pure-Python loop on another thread."""
    done = threading.Event()
    counted = [0]

    def loop() -> None:
        n = 0
        while not done.is_set():
            n += 1
        counted[0] = n

    thread = threading.Thread(target=loop)
    began = time.perf_counter()
    thread.start()
    time.sleep(seconds)
    done.set()
    thread.join()
    return counted[0] / (time.perf_counter() - began)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", type=Path, required=True)
    parser.add_argument("--readers", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=3.0)
    opts = parser.parse_args(argv)
    from serve_app.nvdec_reader import reader_class

    alone = count_for(opts.seconds)
    print(f"counter alone: {alone / 1e6:.2f} M/s")
    for n in opts.readers:
        readers = []
        for _ in range(n):
            cls = reader_class("nvdec", None, True)
            readers.append(cls(str(opts.clip), {}, opts.clip.name, open_timeout_s=10, read_timeout_s=10,
                               max_frame_pixels=3840 * 2160, max_side=1280, pace=True,
                               on_opened=lambda result: None, device="cuda"))
        began = time.monotonic()  # every reader opened and decoding (the first opens load NVDEC: seconds)
        while not all(r.frames for r in readers) and time.monotonic() - began < 30:
            time.sleep(0.05)
        before = sum(r.frames for r in readers)
        beside = count_for(opts.seconds)
        decoded = (sum(r.frames for r in readers) - before) / opts.seconds
        for r in readers:
            r.stop()
        for r in readers:
            r.join(10)
        print(f"{n} NVDEC readers ({cls.__name__}): counter {beside / 1e6:.2f} M/s = {beside / alone:.2f} of alone; "
              f"readers decoded {decoded:.0f} frames/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
