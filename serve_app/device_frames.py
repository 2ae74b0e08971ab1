"""Layout ingress with frames on the device: the requests that arrive together share the device work.

nvJPEG decodes a batch of JPEGs for little more than one (H200: 0.23 ms for one 512x512 image, 0.05 ms each in
batches of 16), and the crops of many frames cut together cost the launches of one frame (engines/device_crops.py).
So the JPEGs of concurrent requests are decoded in one call, and their classifier crops cut in one pass per crop
geometry, each through a `GreedyBatcher`: a batch runs as soon as the previous one is done, with what queued
meanwhile (up to `ingress.device_batch_size` frames), so a lone request waits for nothing (nvstreammux's
`batched-push-timeout` of 0). Each batcher runs on its own thread, off the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from deployments.batcher import GreedyBatcher
from deployments.execution import ComputeExecutor
from deployments.stages import ClassifierStage, DetectorStage
from engines import completed
from serve_app.config import PipelineConfig
from serve_app.graph import ClassifierRoute, cut_each_spec_once_many

if TYPE_CHECKING:
    from engines.device_image import DeviceDecoder
    from serve_app.device_pass import DevicePass

logger = logging.getLogger("ray.serve")

_Cut = tuple[Any, np.ndarray, list[tuple[ClassifierRoute, np.ndarray]]]  # frame, boxes, (route, object indices)


def frames_on_device(config: PipelineConfig, wiring: Any) -> DeviceDecoder | None:
    """The decoder that puts images on the detector's device, where every stage held here can take them there
    (`ingress.frames_on_device`); None: frames stay on the host."""
    wanted = config.ingress.frames_on_device
    detector, classifiers = wiring.detector, list(wiring.classifiers.values())
    if wanted is False or not isinstance(detector, DetectorStage):
        return None
    able = detector.takes_device_frames and all(
        isinstance(c, ClassifierStage) and c.takes_device_crops and c.device == detector.device for c in classifiers)
    if not able or (wanted == "auto" and not str(detector.device).startswith("cuda")):
        if wanted is True:
            logger.warning("ingress.frames_on_device: the detector or a classifier cannot take frames on %s; frames "
                           "stay on the host", detector.device)
        return None
    from engines.device_image import DeviceDecoder

    logger.info("images are decoded, detected, cropped and classified on %s", detector.device)
    if str(detector.device).startswith("cuda"):
        _log_mps()
    return DeviceDecoder(str(detector.device))


def _log_mps() -> None:
    """Say whether this card's replicas can share it at once (CUDA MPS) or take turns."""
    from engines.cuda_mps import control_pipe

    pipe = control_pipe()
    if pipe is not None:
        logger.info("CUDA MPS daemon found (%s): the replicas on this card run their kernels together", pipe)
    else:
        logger.info("no CUDA MPS daemon: replicas sharing this card take turns on it (README, On a GPU: "
                    "`nvidia-cuda-mps-control -d` before `serve run`)")


def device_pass(config: PipelineConfig, wiring: Any, decoder: DeviceDecoder) -> DevicePass | None:
    """`ingress.device_pass: whole`: the images of concurrent requests through the whole pipeline in one batch,
    on the detector's compute thread (serve_app/device_pass.py); None: stage by stage (`stages`, or a detector
    whose work does not run on a thread of its own: `engine.execution` inline or async)."""
    from serve_app.device_pass import DevicePass

    if config.ingress.device_pass != "whole":
        return None
    if wiring.detector.executor.mode != "thread":
        logger.warning("ingress.device_pass whole runs on the detector's compute thread, and detector.engine."
                       "execution is %s: the device path goes stage by stage", wiring.detector.executor.mode)
        return None
    routes = [ClassifierRoute.from_config(c, None) for c in config.classifiers]
    return DevicePass(decoder, wiring.detector, dict(wiring.classifiers), routes, config.ingress.device_batch_size,
                      config.detector.max_detect_side, config.ingress.detector_timeout_s,
                      decode_apart=config.ingress.decode_apart)


def is_jpeg(data: bytes) -> bool:
    """Whether nvJPEG's batched decode takes these bytes; other formats are decoded by OpenCV one by one, so that
    a large PNG does not hold the JPEGs that came with it."""
    return data[:2] == b"\xff\xd8"


class DeviceBatches:
    """`ingress.device_pass: stages`: the decodes of concurrent requests in one batch, and their crops cut in one
    pass per crop geometry; detector and classifiers batch in their own stages."""

    def __init__(self, decoder: DeviceDecoder, max_batch: int) -> None:
        self.decoder = decoder
        self._executors = [ComputeExecutor("thread", True, "device-decode"), ComputeExecutor("thread", True,
                                                                                              "device-crops")]
        self._decodes: GreedyBatcher[bytes, Any] = GreedyBatcher(
            lambda bodies: completed(decoder.decode_many, bodies), self._executors[0], max_batch)
        self._cuts: GreedyBatcher[_Cut, list[Any]] = GreedyBatcher(
            lambda cuts: completed(_cut_all, cuts), self._executors[1], max_batch)

    async def decode(self, data: bytes) -> Any | None:
        """The image as a device frame (H, W, 3) uint8 BGR, displayed; None if it will not decode."""
        return (await self._decodes.submit(data)).result

    async def cut(self, frame: Any, xyxy: np.ndarray, wanted: list[tuple[ClassifierRoute, np.ndarray]]) -> list[Any]:
        """`cut_each_spec_once` of one frame, cut together with the frames of other requests."""
        return (await self._cuts.submit((frame, xyxy, wanted))).result

    def close(self) -> None:
        for executor in self._executors:
            executor.close()


def _cut_all(cuts: Sequence[_Cut]) -> list[list[Any]]:
    return cut_each_spec_once_many([c[0] for c in cuts], [c[1] for c in cuts], [c[2] for c in cuts])
