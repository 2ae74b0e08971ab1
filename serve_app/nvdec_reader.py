"""A live stream decoded on the GPU's NVDEC (PyNvVideoCodec, the `nvdec` extra) instead of FFmpeg on the CPU.

The source is still opened and demuxed by the CPU reader's PyAV, with the egress guard's options: every
connection stays guarded (PyNvVideoCodec's own demuxer would open network URLs itself). Its H.264 / HEVC packets
go to NVDEC in Annex B form (FFmpeg's `*_mp4toannexb` filter: an MP4's length-prefixed units get start codes and
the parameter sets, what NVDEC's parser reads), one `PacketData` each. Frames come out in device memory as RGB,
are scaled to the working size there and turned to BGR, and only that small frame is copied to the host: the
decode and the full-size conversion, most of a stream's host CPU, leave the CPU. Other codecs are decoded by
FFmpeg on the CPU, as without NVDEC.

Where PyAV is missing (a trimmed GPU environment) a file source is demuxed by PyNvVideoCodec itself (a local
file opens no connection); its display rotation is then unknown and taken as none.

Measured on an H100 (docs/benchmarks.md, "NVDEC through PyNvVideoCodec"): one decoder 1047 frames/s of 720p at
0.55 ms of host CPU a frame; sixteen at once 2351 frames/s.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from serve_app.decoding import InputError
from serve_app.stream_reader import Opened, StreamReader

if TYPE_CHECKING:
    import av

    from serve_app.config import PipelineConfig

logger = logging.getLogger("ray.serve")

# PyAV's codec name -> (PyNvVideoCodec's codec attribute, FFmpeg's filter that puts packets in Annex B form)
NVDEC_CODECS = {"h264": ("H264", "h264_mp4toannexb"), "hevc": ("HEVC", "hevc_mp4toannexb")}


def nvdec_unavailable(gpu_share: float) -> str | None:
    """Why streams cannot be decoded on NVDEC in this process (whose deployment holds `gpu_share` of a GPU), or None
    when they can."""
    if gpu_share <= 0:
        return "the streams deployment holds no GPU (ingress.streams.deployment.num_gpus is 0)"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "this replica sees no CUDA GPU"
    try:
        import PyNvVideoCodec  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or the package's own driver check (RuntimeError)
        return f"PyNvVideoCodec cannot be loaded (pip install '.[nvdec]'): {str(exc).splitlines()[0][:200]}"
    return None


def nvdec_refusal(setting: str, key: str, unavailable: Callable[[], str | None]) -> str | None:
    """Why NVDEC is not used where `key` (`ingress.streams.decoder`, `ingress.video.decoder`) is `setting`, or None
    when it is: `ffmpeg` never, `auto` where `unavailable()` gives no reason; `nvdec` where it gives one raises
    ValueError saying why (the replica fails its start)."""
    if setting == "ffmpeg":
        return f"{key} is ffmpeg"
    why = unavailable()
    if why and setting == "nvdec":
        raise ValueError(f"{key} is nvdec, but {why}")
    return why


def working_bgr(rgb: Any, target: tuple[int, int]) -> Any:
    """(H, W, 3) uint8 RGB on the device -> (target height, target width, 3) BGR uint8 on the device (area
    averaging where it shrinks); a copy, so NVDEC may reuse its surface."""
    import torch

    if (int(rgb.shape[1]), int(rgb.shape[0])) != target:
        planes = rgb.permute(2, 0, 1)[None].float()
        scaled = torch.nn.functional.interpolate(planes, size=(target[1], target[0]), mode="area")
        rgb = scaled[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
    bgr = rgb.flip(2).contiguous()  # a copy, in (H, W, 3) order whatever the scaled view's strides
    if bgr.is_cuda:  # the copy is done before NVDEC may overwrite the surface at the next Decode
        torch.cuda.current_stream(bgr.device).synchronize()
    return bgr


def to_working_bgr(rgb: Any, target: tuple[int, int]) -> np.ndarray:
    """`working_bgr` on the host: only the scaled frame crosses."""
    return np.ascontiguousarray(working_bgr(rgb, target).cpu().numpy())


def _packet(nvc: Any, data: np.ndarray | None, pts: int | None) -> Any:
    """A PacketData over `data` (which must stay alive until Decode returns); None: the empty packet that flushes."""
    packet = nvc.PacketData()
    if data is not None:
        packet.bsl_data, packet.bsl = data.ctypes.data, data.size
        if pts is not None:
            packet.pts = pts
    return packet


class NvdecReader(StreamReader):
    """`StreamReader` whose frames are decoded on NVDEC (same thread, same counts, same limits and errors)."""

    decoder = "nvdec"

    def _read(self, container: av.container.InputContainer) -> None:
        import av
        from av.bitstream import BitStreamFilterContext

        stream = container.streams.video[0]
        codec = stream.codec_context.name
        if codec not in NVDEC_CODECS:  # VP8, MJPEG, ...: FFmpeg on the CPU, as without NVDEC
            logger.info("stream source %s: %s is decoded on the CPU (NVDEC here takes %s)", self._shown, codec,
                        ", ".join(NVDEC_CODECS))
            self.decoder = "ffmpeg"
            super()._read(container)
            return
        import PyNvVideoCodec as nvc

        try:
            decoder = nvc.CreateDecoder(gpuid=0, codec=getattr(nvc.cudaVideoCodec, NVDEC_CODECS[codec][0]),
                                        usedevicememory=True, outputColorType=nvc.OutputColorType.RGB)
        except Exception as exc:  # noqa: BLE001 - no decoder for it on this card: FFmpeg on the CPU instead
            logger.warning("stream source %s: NVDEC cannot decode it (%s); FFmpeg on the CPU does", self._shown,
                           str(exc).splitlines()[0][:200])
            self.decoder = "ffmpeg"
            super()._read(container)
            return
        annexb = BitStreamFilterContext(NVDEC_CODECS[codec][1], stream)
        # The display rotation reaches PyAV on decoded frames only: FFmpeg decodes on the CPU until the first frame.
        probe: Any = stream.codec_context
        rotation = 0.0
        for packet in container.demux(stream):
            if self._stop.is_set():
                return
            if probe is not None and packet.size:
                with contextlib.suppress(av.FFmpegError):
                    frames = probe.decode(packet)
                    if frames:
                        rotation, probe = float(frames[0].rotation or 0), None
            for out in annexb.filter(packet if packet.size else None):
                if out.size:
                    data = np.frombuffer(bytes(out), np.uint8)  # alive until Decode has read it
                    self._keep_decoded(decoder, _packet(nvc, data, out.pts), rotation)
        self._keep_decoded(decoder, _packet(nvc, None, None), rotation)

    def _keep_decoded(self, decoder: Any, packet: Any, rotation: float) -> None:
        """Decode `packet` and keep each frame it gives (its surface used up before the next Decode)."""
        import torch

        for frame in decoder.Decode(packet):
            rgb = torch.from_dlpack(frame)
            render = working_bgr if self._device is not None else to_working_bgr  # on the device: the models are here
            self._keep_image((int(rgb.shape[1]), int(rgb.shape[0])), lambda target, rgb=rgb: render(rgb, target),
                             rotation, None)


class NvdecFileReader(NvdecReader):
    """A file source where PyAV is missing: PyNvVideoCodec demuxes it (a local file: nothing to guard)."""

    def _run(self) -> None:
        self._answered = False
        try:
            self._play()
        except InputError as exc:
            self.error = exc
        except Exception as exc:  # noqa: BLE001 - a source that breaks ends its stream with the reason
            if not self._stop.is_set():
                self.error = InputError(502, "source_failed", f"{self._shown}: {str(exc).splitlines()[0][:300]}")
        finally:
            if not self._answered:  # it failed before the open was answered: the start says why, never waits
                self._on_opened(self.error or InputError(422, "source_unavailable", f"cannot open {self._shown}"))
            self.ended.set()

    def _answer(self, result: Opened | InputError) -> None:
        self._answered = True
        self._on_opened(result)

    def _play(self) -> None:
        import PyNvVideoCodec as nvc

        try:
            demuxer = nvc.CreateDemuxer(filename=self._url)
            width, height = int(demuxer.Width()), int(demuxer.Height())
            decoder = nvc.CreateDecoder(gpuid=0, codec=demuxer.GetNvCodecId(), usedevicememory=True,
                                        outputColorType=nvc.OutputColorType.RGB)
        except Exception as exc:  # noqa: BLE001 - the client's answer
            self._answer(InputError(422, "source_unavailable", f"cannot open {self._shown} for NVDEC: "
                                    f"{str(exc).splitlines()[0][:200]}"))
            return
        if width * height > self._max_pixels:
            self._answer(InputError(413, "frames_too_large", f"{self._shown} sends {width}x{height} frames; the "
                                    f"limit is {self._max_pixels} pixels (ingress.streams.max_frame_pixels)"))
            return
        self._fps = float(demuxer.FrameRate() or 0.0)
        self._answer(Opened(self._fps, width, height, "nvdec"))
        for packet in itertools.chain(demuxer, [nvc.PacketData()]):  # the empty packet flushes the decoder
            if self._stop.is_set():
                return
            self._keep_decoded(decoder, packet, 0.0)


def reader_class(decoder: str, device_reason: str | None, is_file: bool) -> type[StreamReader]:
    """The reader for a source: FFmpeg on the CPU (`decoder` "ffmpeg", or "auto" where NVDEC is unavailable:
    `device_reason` says why), NVDEC with PyAV's guarded demuxer, or, for a file where PyAV is missing, NVDEC with
    PyNvVideoCodec's own demuxer."""
    if decoder == "ffmpeg" or device_reason is not None:
        return StreamReader
    try:
        import av  # noqa: F401
    except ImportError:
        return NvdecFileReader if is_file else StreamReader  # the CPU reader then says PyAV is needed
    return NvdecReader


def videos_on_nvdec(config: PipelineConfig, decoder: Any) -> bool:
    """Whether /v1/video decodes on NVDEC here (`ingress.video.decoder`): where frames stay on a CUDA device and
    PyNvVideoCodec loads; `nvdec` where that cannot be fails the start, saying why."""
    on_cuda = decoder is not None and str(decoder.device).startswith("cuda")
    return nvdec_refusal(config.ingress.video.decoder, "ingress.video.decoder", lambda: nvdec_unavailable(1.0) if on_cuda
                         else "the ingress keeps no frames on a CUDA device (layout ingress, models on cuda)") is None
