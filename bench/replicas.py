"""The Serve replica processes of an application on this machine, found by their process titles."""

from __future__ import annotations

from pathlib import Path


def replica_processes(app: str) -> dict[int, str]:
    """pid -> `APP:DEPLOYMENT` for every replica process of Serve application `app` on this machine."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ServeReplica:" not in cmdline:
            continue
        # the title is `ray::ServeReplica:APP:DEPLOYMENT`, with `.METHOD` appended while a call runs
        title = cmdline.split("ServeReplica:", 1)[1].split()[0].split(".", 1)[0]
        if title.startswith(f"{app}:"):
            out[int(proc.name)] = title
    return out


def rss_mib(pid: int) -> float | None:
    """Resident memory of process `pid` in MiB, or None if it is gone."""
    try:
        return int((Path("/proc") / str(pid) / "statm").read_text().split()[1]) * 4096 / 2**20
    except (OSError, ValueError, IndexError):
        return None
