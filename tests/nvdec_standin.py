"""A stand-in for PyNvVideoCodec's decoder (NVIDIA's NVDEC bindings, which need an NVIDIA driver), for the machines
without one. It holds the stream reader to the library's documented rules (PyNvVideoCodec 2.2 docs and samples;
its `decode_with_low_latency.py` / `decode_from_memory_buffer.py`), decoding with FFmpeg on the CPU:

- `CreateDecoder(gpuid=, codec=, usedevicememory=, outputColorType=)`; `codec` is a `cudaVideoCodec` member;
  frames come out as interleaved RGB (H, W, 3) uint8 only when `outputColorType` is `OutputColorType.RGB`
  (NATIVE gives NV12, which this stand-in refuses to hand out, as the reader must not take it for RGB);
- `Decode(PacketData)` takes an elementary stream: H.264 / HEVC in Annex B form (start codes), what NVDEC's
  parser reads; an MP4's length-prefixed units are an error here (the real parser finds no start code and
  returns no frame), so a reader that skips the `mp4toannexb` filter fails;
- `PacketData.bsl_data` is the address of the packet's bytes and `bsl` their count, read during `Decode`; an
  empty packet (`bsl` 0) flushes the frames the decoder still holds;
- a decoded frame lives in one of the decoder's surfaces: valid until the next `Decode`, which reuses them
  (the stand-in overwrites every frame it handed out at the next call), and is taken by DLPack (`torch.from_dlpack`).
"""

from __future__ import annotations

import ctypes
import enum
import types
from typing import Any

import numpy as np


class OutputColorType(enum.Enum):
    NATIVE = 0
    RGB = 1
    RGBP = 2


class cudaVideoCodec(enum.Enum):  # noqa: N801 - the library's name
    H264 = 4
    HEVC = 8


class PacketData:
    def __init__(self) -> None:
        self.bsl_data = 0
        self.bsl = 0
        self.pts = 0
        self._held: Any = None  # a demuxed packet's bytes (the library's demuxer owns them)


class _Frame:
    """A decoded surface, taken through DLPack."""

    def __init__(self, pixels: Any) -> None:
        self._pixels = pixels  # a torch uint8 (H, W, 3) tensor: the surface

    def __dlpack__(self, stream: Any = None) -> Any:
        return self._pixels.__dlpack__()

    def __dlpack_device__(self) -> Any:
        return self._pixels.__dlpack_device__()


_FFMPEG = {cudaVideoCodec.H264: "h264", cudaVideoCodec.HEVC: "hevc"}


class _Decoder:
    def __init__(self, codec: cudaVideoCodec, color: OutputColorType) -> None:
        import av

        if color is not OutputColorType.RGB:
            raise ValueError("this stand-in hands out interleaved RGB only (OutputColorType.RGB)")
        self._codec = av.CodecContext.create(_FFMPEG[codec], "r")
        self._handed: list[Any] = []
        self.calls = 0

    def Decode(self, packet: PacketData) -> list[_Frame]:  # noqa: N802 - the library's name
        import av
        import torch

        for surface in self._handed:  # the decoder reuses its surfaces: the frames of the last call are gone
            surface.fill_(255)
        self._handed = []
        self.calls += 1
        if packet.bsl == 0:
            frames = self._codec.decode(None)
        else:
            data = ctypes.string_at(packet.bsl_data, packet.bsl)
            if not (data.startswith(b"\x00\x00\x01") or data.startswith(b"\x00\x00\x00\x01")):
                raise ValueError("NVDEC's parser takes Annex B (start codes); this packet is length-prefixed")
            frames = self._codec.decode(av.Packet(data))
        out = []
        for frame in frames:
            surface = torch.from_numpy(np.ascontiguousarray(frame.to_ndarray(format="rgb24")))
            self._handed.append(surface)
            out.append(_Frame(surface))
        return out


class _Demuxer:
    """`CreateDemuxer(filename=...)`: the file's video packets, in Annex B form as the library's demuxer gives them
    (it runs FFmpeg's `*_mp4toannexb` filter on MP4 input), each a `PacketData`; then the iteration ends."""

    def __init__(self, filename: str) -> None:
        import av

        self._container = av.open(filename)
        self._stream = self._container.streams.video[0]
        self._codec = {"h264": cudaVideoCodec.H264, "hevc": cudaVideoCodec.HEVC}[self._stream.codec_context.name]

    def GetNvCodecId(self) -> cudaVideoCodec:  # noqa: N802 - the library's name
        return self._codec

    def FrameRate(self) -> float:  # noqa: N802
        return float(self._stream.average_rate or 0)

    def Width(self) -> int:  # noqa: N802
        return self._stream.codec_context.width

    def Height(self) -> int:  # noqa: N802
        return self._stream.codec_context.height

    def __iter__(self) -> Any:
        from av.bitstream import BitStreamFilterContext

        annexb = BitStreamFilterContext(f"{self._stream.codec_context.name}_mp4toannexb", self._stream)
        for packet in self._container.demux(self._stream):
            for out in annexb.filter(packet if packet.size else None):
                data = np.frombuffer(bytes(out), np.uint8)
                packet_data = PacketData()
                packet_data.bsl_data, packet_data.bsl, packet_data._held = data.ctypes.data, data.size, data
                yield packet_data
        self._container.close()


def CreateDemuxer(filename: str) -> _Demuxer:  # noqa: N802 - the library's name
    return _Demuxer(filename)


def CreateDecoder(gpuid: int = 0, codec: cudaVideoCodec = cudaVideoCodec.H264,  # noqa: N802 - the library's name
                  usedevicememory: bool = True, outputColorType: OutputColorType = OutputColorType.NATIVE,
                  **_: Any) -> _Decoder:
    return _Decoder(codec, outputColorType)


def module() -> types.ModuleType:
    """The stand-in as a module, to put in `sys.modules["PyNvVideoCodec"]`."""
    standin = types.ModuleType("PyNvVideoCodec")
    for name in ("OutputColorType", "cudaVideoCodec", "PacketData", "CreateDecoder", "CreateDemuxer"):
        setattr(standin, name, globals()[name])
    standin.__version__ = "standin"
    return standin
