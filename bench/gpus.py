"""Several GPUs in the benchmark: which cards a run may use, how busy each card is, and which replica holds a
CUDA context on which card (the check that every replica sits where it was meant to).

Everything comes from `nvidia-smi`'s query interface, whose CSV output is documented and stable:
`--query-gpu=index,uuid,utilization.gpu --format=csv,noheader,nounits` prints `0, GPU-8d1c..., 37` per card,
`--query-compute-apps=pid,gpu_uuid --format=csv,noheader` prints `12345, GPU-8d1c...` per process holding a
context. A process found there is on that card for real, whatever Ray's bookkeeping says.
"""

from __future__ import annotations

import statistics
import subprocess
import threading
from collections import Counter

from bench.replicas import replica_processes


def visible_devices(count: int) -> str:
    """CUDA_VISIBLE_DEVICES for a run on the first `count` cards: Ray sees (and hands out) only those."""
    if count < 1:
        raise ValueError(f"a run needs at least one GPU, not {count}")
    return ",".join(str(i) for i in range(count))


def _nvidia_smi(*args: str) -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _query_gpus() -> dict[str, tuple[int, float | None]] | None:
    """Every card's uuid: (index, busy %) now, or None without nvidia-smi."""
    text = _nvidia_smi("--query-gpu=index,uuid,utilization.gpu", "--format=csv,noheader,nounits")
    return None if text is None else parse_gpus(text)


def _rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split(",")] for line in text.splitlines() if line.strip()]


def parse_gpus(text: str) -> dict[str, tuple[int, float | None]]:
    """`index, uuid, utilization.gpu` rows (csv, noheader, nounits) -> uuid: (index, busy %). A card that
    cannot report its utilisation says `[N/A]` (or `[Not Supported]`): None."""
    out = {}
    for row in _rows(text):
        if len(row) != 3:
            raise ValueError(f"unexpected nvidia-smi row {row!r}: want index, uuid, utilization.gpu")
        index, uuid, busy = row
        out[uuid] = (int(index), None if busy.startswith("[") else float(busy))
    return out


def parse_compute_apps(text: str) -> list[tuple[int, str]]:
    """`pid, gpu_uuid` rows (csv, noheader) -> (pid, uuid) for every process holding a CUDA context."""
    out = []
    for row in _rows(text):
        if len(row) != 2:
            raise ValueError(f"unexpected nvidia-smi row {row!r}: want pid, gpu_uuid")
        out.append((int(row[0]), row[1]))
    return out


def placement_by_card(gpus: dict[str, tuple[int, float | None]], apps: list[tuple[int, str]],
                      titles: dict[int, str]) -> dict[int, dict[str, int]]:
    """card index -> {deployment: replicas holding a context there}, for the replica processes in `titles`
    (pid -> `APP:DEPLOYMENT`). Processes that are not those replicas are left out."""
    cards: dict[int, Counter] = {index: Counter() for index, _ in gpus.values()}
    for pid, uuid in apps:
        if pid in titles and uuid in gpus:
            cards[gpus[uuid][0]][titles[pid].split(":", 1)[1]] += 1
    return {index: dict(sorted(c.items())) for index, c in sorted(cards.items())}


def one_set_per_card(cards: dict[int, dict[str, int]], gpu_deployments: list[str]) -> bool:
    """Whether every card holds exactly one replica of each deployment that asks for a GPU."""
    return bool(cards) and all(c.get(name, 0) == 1 for c in cards.values() for name in gpu_deployments)


def replicas_by_card(app: str) -> dict[int, dict[str, int]] | None:
    """Where application `app`'s replicas hold their CUDA contexts now, or None without nvidia-smi. In a PID
    namespace that nvidia-smi cannot see into, no pid matches and every card shows empty: say so, not 'wrong'."""
    gpus = _query_gpus()
    apps = _nvidia_smi("--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader")
    if gpus is None or apps is None:
        return None
    return placement_by_card(gpus, parse_compute_apps(apps), replica_processes(app))


class UtilisationSampler:
    """Every card's utilisation every `every_s`, between `start()` and `stop()`, from one `nvidia-smi` in its loop
    mode (`-lms`): a new nvidia-smi per sample cost the host about 1 ms of CPU per processed frame at 240 frames/s
    (bench/streams.py), which a benchmark would count as the service's. `pid`: that process's, for leaving its CPU
    out; None where nvidia-smi is missing (no samples then)."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.every_s = every_s
        self.samples: dict[int, list[float]] = {}
        self.pid: int | None = None
        self._process: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> UtilisationSampler:
        try:
            self._process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=index,uuid,utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", str(max(int(self.every_s * 1e3), 1))],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return self
        self.pid = self._process.pid
        self._thread = threading.Thread(target=self._read, args=(self._process,), name="gpu-utilisation", daemon=True)
        self._thread.start()
        return self

    def card(self, index: int = 0) -> list[float]:
        """One card's samples so far (busy %), in order; the list grows while sampling."""
        return self.samples.setdefault(index, [])

    def __enter__(self) -> UtilisationSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read(self, process: subprocess.Popen[str]) -> None:
        for line in process.stdout or []:
            try:
                rows = parse_gpus(line)
            except ValueError:  # a line that is not a card's row (a warning): skipped
                continue
            for index, busy in rows.values():
                if busy is not None:
                    self.card(index).append(busy)

    def stop(self) -> dict[str, dict[str, float]]:
        """Each card's mean and max busy % over the samples, keyed by card index."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._thread is not None:
            self._thread.join(timeout=15)
        return {str(i): {"mean_pct": round(statistics.fmean(v), 1), "max_pct": max(v), "samples": len(v)}
                for i, v in sorted(self.samples.items()) if v}
