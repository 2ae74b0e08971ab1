"""Whose CPU it is: every process's CPU time over a window, grouped by what the process is (Ray sets its workers'
titles: `ray::ServeReplica:app:Ingress`, `ray::StreamWorker`; its daemons are `raylet`, `gcs_server`, ...).

`/proc/stat` says how much the host spent; this says where, so a figure such as "13.8 ms of host CPU a frame" can
be split into the stream workers' own work, the ingress, Serve's proxy and Ray's daemons.

    before = snapshot()
    ...
    shares = by_role(before, snapshot())   # {"ray::StreamWorker": 12.3, "raylet": 0.4, ...} in CPU seconds
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_seconds(stat: str) -> float:
    """User + system CPU seconds from a /proc stat line (a process's or a thread's)."""
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": the comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def _cpu_seconds(pid: str) -> float | None:
    try:
        return _stat_seconds(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return None


def _role(pid: str) -> str:
    """What a process is, in a few words: Ray's title for its workers (replica and actor class, without the
    replica's id), the program's name otherwise."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    words = [w for w in raw.decode(errors="replace").split("\0") if w]
    if not words:
        return "?"
    head = words[0].split()[0] if words[0].split() else words[0]
    if head.startswith("ray::"):  # ray::ServeReplica:app:Ingress / ray::StreamWorker.method: the class is enough
        return re.sub(r"\.[A-Za-z_]+$", "", head)
    name = Path(head).name
    if name.startswith("python") and len(words) > 1:  # a Python program: the module or script it runs
        rest = [w for w in words[1:] if not w.startswith("-") or w in ("-m", "-c")]  # past -u, -X ...
        if rest[:1] == ["-c"]:
            return "python -c"
        target = rest[1] if rest[:1] == ["-m"] and len(rest) > 1 else (rest[0] if rest else "")
        return f"python {Path(target).name}".rstrip()
    return name


def snapshot() -> dict[str, tuple[str, float]]:
    """Every live process's role and CPU seconds so far, by pid."""
    shot: dict[str, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            seconds = _cpu_seconds(entry)
            if seconds is not None:
                shot[entry] = (_role(entry), seconds)
    return shot


def by_role(before: dict[str, tuple[str, float]], after: dict[str, tuple[str, float]],
            leave_out: tuple[int | None, ...] = ()) -> dict[str, float]:
    """CPU seconds spent between two snapshots, per role, largest first; a process born in between counts from 0,
    one that ended in between is not seen (its time is in /proc/stat's total only). `leave_out`: pids not to count
    (the measuring processes)."""
    spent: dict[str, float] = {}
    skipped = {str(pid) for pid in leave_out if pid is not None}
    for pid, (role, seconds) in after.items():
        if pid in skipped:
            continue
        delta = seconds - before.get(pid, (role, 0.0))[1]
        if delta > 0:
            spent[role] = spent.get(role, 0.0) + delta
    return dict(sorted(spent.items(), key=lambda item: -item[1]))


def host_kinds() -> dict[str, float]:
    """The whole host's busy CPU seconds so far by kind, from /proc/stat: processes' user and system time, and the
    kernel's interrupt handling (irq + softirq: loopback TCP's packets are handled there, counted in no process)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return {k: v / _TICK for k, v in (("user", user + nice), ("system", system), ("interrupts", irq + softirq),
                                      ("steal", steal))}


def busy(kinds: dict[str, float]) -> float:
    """The busy seconds of `host_kinds()`: processes' user and system time and interrupts; not steal, the time the
    hypervisor gave another guest while this one waited to run (no work of ours: on the GPU machine's VM a third
    of the busy time at c1 and 2 ms a request at c128, docs/benchmarks.md run 11)."""
    return kinds["user"] + kinds["system"] + kinds["interrupts"]


def spent(before: dict[str, tuple[str, float]], after: dict[str, tuple[str, float]], pid: int | None) -> float:
    """One process's CPU seconds between two snapshots (0 for None or a process not seen)."""
    if pid is None or str(pid) not in after:
        return 0.0
    return after[str(pid)][1] - before.get(str(pid), ("", 0.0))[1]


def threads() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of each thread of this process so far, by thread id, with its name: Python's
    for a thread Python started (a pool's `detector-thread_0`), the kernel's otherwise (torch's and CUDA's own)."""
    import threading

    named = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[int, tuple[str, float]] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        tid = int(task.name)
        out[tid] = (named.get(tid) or stat[stat.index("(") + 1 : stat.rindex(")")], _stat_seconds(stat))
    return out


def threads_spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each thread name spent between two `threads()` snapshots (threads of one name summed), most
    first."""
    spent: dict[str, float] = {}
    for tid, (name, seconds) in after.items():
        spent[name] = spent.get(name, 0.0) + seconds - before.get(tid, (name, 0.0))[1]
    return dict(sorted(spent.items(), key=lambda kv: -kv[1]))
