"""A real RTSP server for the tests: GStreamer's gst-rtsp-server, serving H.264 files on 127.0.0.1.

Run by the *system* python3 (it needs PyGObject and the GstRtspServer introspection data from the distribution's
packages, which a virtual environment does not see):

    /usr/bin/python3 tests/rtsp_server.py PORT MOUNT=FILE.mp4 [MOUNT=FILE.mp4 ...]

Each client of rtsp://127.0.0.1:PORT/MOUNT gets its own pipeline, the file played from its start at its own
rate (as a camera delivers frames), packetised as RTP/H.264 over RTSP (UDP or TCP, as the client asks). The
script prints `ready` once it listens, and stops on SIGTERM or when its standard input closes, so a test that
dies cannot leave it behind. tests/media.py starts and stops it (`RtspServer`).
"""

from __future__ import annotations

import signal
import sys
import threading

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> None:
    port, mounts = sys.argv[1], dict(arg.split("=", 1) for arg in sys.argv[2:])
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    points = server.get_mount_points()
    for mount, path in mounts.items():
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(f"( filesrc location={path} ! qtdemux ! h264parse config-interval=-1 ! "
                           "rtph264pay name=pay0 pt=96 )")
        factory.set_shared(False)
        points.add_factory(f"/{mount}", factory)
    loop = GLib.MainLoop()
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{port}", flush=True)
        sys.exit(1)
    signal.signal(signal.SIGTERM, lambda *_: loop.quit())

    def watch_stdin() -> None:  # the parent went away: stop
        sys.stdin.read()
        GLib.idle_add(loop.quit)

    threading.Thread(target=watch_stdin, daemon=True).start()
    print("ready", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
