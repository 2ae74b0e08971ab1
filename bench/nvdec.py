"""NVDEC on this card through PyNvVideoCodec, against FFmpeg on the CPU: what decoding H.264 costs per frame.

    python -m bench.nvdec --clips clips/720p.mp4 clips/1080p.mp4 --decoders 1 4 8 16 --out bench/out/nvdec.json

Make the clips with bench/streams.py's `make_clip` (PyAV's libx264, on a machine that has PyAV). For each clip:
  - NVDEC, one decoder: the file demuxed by PyNvVideoCodec's own FFmpeg, decoded into device memory as
    interleaved RGB (`OutputColorType.RGB`), each frame taken by torch through DLPack and copied (the decoder
    reuses its surfaces); frames per second and the host's CPU per frame (this process);
  - NVDEC, N decoders at once on N threads: the aggregate frames per second (the card's NVDEC engines);
  - OpenCV's FFmpeg decode on the CPU, one thread: frames per second;
  - whether packets demuxed elsewhere (Annex B H.264, as a guarded PyAV demuxer would hand them over) decode the
    same when fed as `PacketData`, and whether a demuxer fed by a callback (an uploaded video) decodes.
It needs CUDA, PyNvVideoCodec and torch; PyAV only where it writes the Annex B packets (`--annexb`).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any


def _decode_file(nvc: Any, torch: Any, path: str) -> tuple[int, Any]:
    demuxer = nvc.CreateDemuxer(filename=path)
    decoder = nvc.CreateDecoder(gpuid=0, codec=demuxer.GetNvCodecId(), usedevicememory=True,
                                outputColorType=nvc.OutputColorType.RGB)
    frames, last = 0, None
    for packet in demuxer:
        for frame in decoder.Decode(packet):
            last = torch.from_dlpack(frame).clone()  # (H, W, 3) uint8 on the device
            frames += 1
    torch.cuda.synchronize()
    return frames, last


def _nvdec(nvc: Any, torch: Any, clip: str, decoders: list[int]) -> dict[str, Any]:
    frames, last = _decode_file(nvc, torch, clip)  # warm: the first open loads the decoder
    cpu, start = time.process_time(), time.perf_counter()
    frames, last = _decode_file(nvc, torch, clip)
    wall = time.perf_counter() - start
    row: dict[str, Any] = {"frames": frames, "shape": list(last.shape), "one_decoder_fps": round(frames / wall, 1),
                           "host_cpu_ms_per_frame": round((time.process_time() - cpu) * 1e3 / frames, 3)}
    for count in decoders:
        done: list[int] = []
        threads = [threading.Thread(target=lambda: done.append(_decode_file(nvc, torch, clip)[0]))
                   for _ in range(count)]
        cpu, start = time.process_time(), time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        row[f"decoders_{count}"] = {"aggregate_fps": round(sum(done) / wall, 1),
                                    "host_cpu_ms_per_frame": round((time.process_time() - cpu) * 1e3 / sum(done), 3)}
    return row


def _opencv(clip: str) -> float:
    import cv2

    capture = cv2.VideoCapture(clip)
    frames, start = 0, time.perf_counter()
    while capture.read()[0]:
        frames += 1
    capture.release()
    return round(frames / (time.perf_counter() - start), 1)


def _fed_packets(nvc: Any, torch: Any, annexb: Path) -> dict[str, int]:
    """Annex B packets (an .npz of `data`, `offsets`, `pts`) fed to a decoder one `PacketData` at a time."""
    import numpy as np

    saved = np.load(annexb)
    data, offsets, pts = saved["data"], saved["offsets"], saved["pts"]
    decoder = nvc.CreateDecoder(gpuid=0, codec=nvc.cudaVideoCodec.H264, usedevicememory=True,
                                outputColorType=nvc.OutputColorType.RGB)
    frames, held = 0, []
    for i in range(len(offsets) - 1):
        chunk = np.ascontiguousarray(data[offsets[i] : offsets[i + 1]])
        held.append(chunk)  # the decoder reads the bytes during Decode; keep them alive until then
        packet = nvc.PacketData()
        packet.bsl_data, packet.bsl, packet.pts = chunk.ctypes.data, chunk.size, int(pts[i])
        frames += sum(1 for _ in decoder.Decode(packet))
    frames += sum(1 for _ in decoder.Decode(nvc.PacketData()))  # an empty packet flushes
    return {"packets": len(offsets) - 1, "frames": frames}


def _callback_demuxer(nvc: Any, clip: str) -> int:
    raw, position = Path(clip).read_bytes(), [0]

    def feed(buffer: Any) -> int:
        count = min(len(buffer), len(raw) - position[0])
        if count <= 0:
            return 0
        buffer[:count] = raw[position[0] : position[0] + count]
        position[0] += count
        return count

    demuxer = nvc.CreateDemuxer(feed)
    decoder = nvc.CreateDecoder(gpuid=0, codec=demuxer.GetNvCodecId(), usedevicememory=True,
                                outputColorType=nvc.OutputColorType.RGB)
    return sum(1 for packet in demuxer for _ in decoder.Decode(packet))


def write_annexb(clip: Path, out: Path) -> None:
    """The clip's H.264 packets in Annex B form (PyAV's h264_mp4toannexb filter), for `--packets`."""
    import av
    import numpy as np
    from av.bitstream import BitStreamFilterContext

    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        bsf = BitStreamFilterContext("h264_mp4toannexb", stream)
        chunks, pts = [], []
        for packet in container.demux(stream):
            for filtered in bsf.filter(packet if packet.size else None):
                chunks.append(bytes(filtered))
                pts.append(filtered.pts if filtered.pts is not None else -1)
    offsets = np.cumsum([0] + [len(c) for c in chunks])
    np.savez(out, data=np.frombuffer(b"".join(chunks), np.uint8), offsets=offsets, pts=np.array(pts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", nargs="+", required=True)
    parser.add_argument("--decoders", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--packets", type=Path, help="an .npz of Annex B packets of the first clip (--annexb)")
    parser.add_argument("--annexb", type=Path, help="write the first clip's Annex B packets here and stop")
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args()
    if opts.annexb:
        write_annexb(Path(opts.clips[0]), opts.annexb)
        return
    import PyNvVideoCodec as nvc
    import torch

    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "pynvvideocodec": nvc.__version__, "clips": {}}
    for clip in opts.clips:
        row = _nvdec(nvc, torch, clip, opts.decoders)
        row["opencv_cpu_fps"] = _opencv(clip)
        result["clips"][Path(clip).name] = row
        print(Path(clip).name, json.dumps(row))
    if opts.packets:
        result["fed_packets"] = _fed_packets(nvc, torch, opts.packets)
    result["callback_demuxer_frames"] = _callback_demuxer(nvc, opts.clips[0])
    print(json.dumps({k: v for k, v in result.items() if k != "clips"}))
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
