"""The distribution packages the stream tests need: GStreamer's RTSP server (a real camera stand-in) and its H.264
encoder, driven by the system python3.

    python -m tests.system_packages          # the README's test command runs this before pytest

Installs them with apt-get when they are missing and this runs as root (CI does); otherwise it prints the
command to run and exits 0: the tests that need a real RTSP server then skip, naming it (and fail under
CI=true, where a missing server is a broken set-up, not a reason to skip).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

PACKAGES = ("gir1.2-gst-rtsp-server-1.0", "python3-gi", "gstreamer1.0-tools", "gstreamer1.0-plugins-base",
            "gstreamer1.0-plugins-good", "gstreamer1.0-plugins-ugly", "gstreamer1.0-rtsp")
SYSTEM_PYTHON = "/usr/bin/python3"
_PROBE = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
          "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
          "assert all(Gst.ElementFactory.find(e) for e in ('x264enc', 'rtph264pay', 'qtdemux', 'mp4mux', 'jpegdec'))")
INSTALL = f"sudo apt-get install -y {' '.join(PACKAGES)}"


def missing() -> str | None:
    """Why the RTSP server cannot run here, or None when it can."""
    if not os.path.exists(SYSTEM_PYTHON):
        return f"no {SYSTEM_PYTHON}"
    if shutil.which("gst-launch-1.0") is None:
        return "no gst-launch-1.0"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", _PROBE], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return (probe.stderr.strip().splitlines() or ["GStreamer's RTSP server does not load"])[-1]
    return None


def main() -> int:
    why = missing()
    if why is None:
        print("system packages: GStreamer RTSP server and H.264 encoder present")
        return 0
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"system packages: installing {' '.join(PACKAGES)} ({why})", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], check=True, env=env, stdout=subprocess.DEVNULL)
        why = missing()
        if why is not None:
            print(f"system packages: still missing after the install: {why}", file=sys.stderr)
            return 1
        return 0
    print(f"system packages: {why}; the RTSP stream tests will skip. To run them: {INSTALL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
