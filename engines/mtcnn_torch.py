"""The MTCNN cascade kept on the device: the GPU detector for the torch backend.

engines/mtcnn.py runs the cascade's pixel work in numpy and OpenCV on the host (on a GPU machine about 25
of its 40 ms per photo). Here every frame is uploaded once and stays on the device: the pyramid is resized
there (OpenCV's INTER_AREA as two matrix products, engines/torch_boxes.py), P-Net's outputs are thresholded
and NMS'd there (exact greedy NMS for every level of every frame at once), the R-Net and O-Net patches are
cut and resized there, R-Net and O-Net replay as CUDA graphs per batch bucket (TorchEngine.run_tensors), and
one device-to-host copy brings back the faces. The box arithmetic is the numpy cascade's own functions,
run on tensors (`xp=torch`), so both find the same faces: tests/test_mtcnn_torch.py runs this cascade on the
CPU device against the numpy one.

Frames of one `detect_batch` call that have the same size share every P-Net launch (one batch per pyramid
level); R-Net and O-Net take the candidates of all frames in one batch each. On CUDA, the pyramid and P-Net
of a frame size seen before are CUDA-graph replays: the second time a size comes, its whole
P-Net stage is captured for that number of frames (frames go through in chunks of powers of two, each one
replay; an LRU of `_PNET_GRAPHS` pairs of size and chunk); other sizes run eager.

Where the nets replay CUDA graphs, a chunk of frames goes instead through the same cascade in fixed shapes
(engines/mtcnn_static.py): the whole of it, P-Net to O-Net, one graph replay, and one copy back for the batch.
The data-following cascade here answers a size's first sight and any frame the fixed shapes' slots did not hold.
R-Net's and O-Net's slots are pooled over a chunk's frames, up to a largest pool (`static.MOST`): where a size's
frames need more than that pool holds for a chunk (eight faces a frame, 16 frames), or its chunk's graph will not
capture (out of memory), that size goes through in chunks of half as many frames, each its own replay, instead of
leaving the fixed shapes for good.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines import mtcnn_static as static
from engines.batching import bucket_samples
from engines.detections import Detections
from engines.mtcnn import (
    PIXEL_OFFSET,
    PIXEL_SCALE,
    STAGE_BATCH,
    MtcnnParams,
    candidates,
    cell_boxes,
    landmarks_of,
    pyramid_scales,
    regress,
    square,
)
from engines.torch_boxes import crop_resize, greedy_nms, image_resize_weights, integral_image, resize_image
from engines.torch_engine import CapturedGraph, TorchEngine, capture_graph, replay, to_host

logger = logging.getLogger(__name__)

_PYRAMID_CACHE = 16  # frame sizes whose level geometry is kept
_PNET_GRAPHS = 24  # (frame size, chunk of frames) pairs whose P-Net stage is kept as a CUDA graph
_PNET_MAX_CHUNK = 16  # frames of one P-Net replay
_STATIC_GRAPHS = 24  # (frame size, chunk of frames) pairs whose whole fixed-shape cascade is kept as a CUDA graph
_SEEN, _FAILED = "seen", "failed"
# A capture can fail for a reason of the moment (on an H100, another thread's CUDA work invalidated one): a key
# is captured again at later sights, up to this many tries in all, before it stays uncaptured.
_CAPTURE_TRIES = 3


@dataclass(frozen=True)
class _Level:
    scale: float
    height: int  # the level image
    width: int
    weights: tuple[Any, Any]  # the frame -> level resize (torch_boxes.image_resize_weights)


@dataclass(frozen=True)
class _Pyramid:
    """The levels of one frame size, and for every P-Net output cell of every level (flattened, level by
    level, row-major) its column, row, level scale and level index."""

    levels: tuple[_Level, ...]
    xs: Any
    ys: Any
    scales: Any
    level_of: Any


class TorchMtcnn:
    """Face detector: BGR uint8 frames -> Detections with 5 landmarks per face, every step on the nets' device."""

    class_names = ("face",)
    backend = "torch"
    takes_device_frames = True  # (H, W, 3) uint8 BGR tensors on its device, as engines/device_image.py decodes them

    def __init__(self, pnet: TorchEngine, rnet: TorchEngine, onet: TorchEngine, params: MtcnnParams | None = None,
                 pad_batches: bool = True, fixed_shapes: bool | None = None,
                 fixed_shape_limits: static.Limits | None = None) -> None:
        import torch

        if len({pnet.device, rnet.device, onet.device}) != 1:
            raise ValueError("P-Net, R-Net and O-Net must run on one device")
        self.pnet, self.rnet, self.onet = pnet, rnet, onet
        self.params = params or MtcnnParams()
        self.pad_batches = pad_batches
        self.device = pnet.device
        self._torch = torch
        self._stream = torch.cuda.Stream() if self.device == "cuda" else None
        self._pyramids: OrderedDict[tuple[int, int], _Pyramid] = OrderedDict()
        self._stage_batch = {id(e): e.batch_limit(STAGE_BATCH) for e in (rnet, onet)}
        # per (height, width, frames): the captured P-Net stage, or _SEEN (once, eager), or _FAILED (eager for good)
        self._pnet_graphs: OrderedDict[tuple[int, int, int], CapturedGraph | str] = OrderedDict()
        self._pnet_failures: dict[tuple[int, int, int], int] = {}  # failed captures per key, P-Net's and the
        self._static_failures: dict[tuple[int, int, int], int] = {}  # fixed shapes' (tried again: _CAPTURE_TRIES)
        self._pool: Any = None
        # the first graph captured into the shared pool, kept for the detector's life: torch frees a pool when its
        # last graph goes, and a capture into a freed pool's id fails an internal assert (seen on an H100 when a
        # graph was dropped to be captured again with grown limits)
        self._pool_owner: CapturedGraph | None = None
        self.capture_s = 0.0  # seconds spent capturing graphs (P-Net stages and fixed-shape cascades)
        # the fixed-shape cascade (engines/mtcnn_static.py): by default where it captures as one graph (CUDA)
        self.static = fixed_shapes if fixed_shapes is not None else bool(pnet.cuda_graphs)
        self._static_graphs: OrderedDict[tuple[int, int, int], CapturedGraph | str] = OrderedDict()
        self._first_limits = fixed_shape_limits or static.Limits()
        self._limits: dict[tuple[int, int, int], static.Limits] = {}  # per (height, width, frames), once grown
        # per (height, width): the most frames of a fixed-shape chunk, once a chunk of more did not fit
        self._static_chunks: dict[tuple[int, int], int] = {}
        self.frames_static = self.frames_followed = 0  # frames each cascade answered

    def warm_up(self) -> None:
        """Capture R-Net and O-Net per batch bucket (CUDA), so a stage of n candidates is one replay of the
        smallest bucket that holds them; P-Net, whose shape follows the frame, runs eager."""
        if self.pad_batches:
            for engine, size in ((self.rnet, 24), (self.onet, 48)):
                engine.prepare(bucket_samples(engine.inputs[0].name, (3, size, size), np.dtype(np.float32),
                                              self._stage_batch[id(engine)]))

    def cascade_counts(self) -> dict[str, object]:
        """Which cascade answered how many frames, and the fixed shapes' limits grown per (height, width,
        frames): for the pipeline's description (GET /v1/pipeline)."""
        return {"fixed_shapes": self.static, "frames_fixed_shapes": self.frames_static,
                "frames_data_following": self.frames_followed,
                "grown_limits": {"x".join(map(str, key)): vars(limits) for key, limits in self._limits.items()},
                "largest_chunks": {"x".join(map(str, size)): frames for size, frames in self._static_chunks.items()}}

    def close(self) -> None:
        self._static_graphs.clear()
        self._pnet_graphs.clear()
        self._pool_owner = self._pool = None
        for engine in (self.pnet, self.rnet, self.onet):
            engine.close()

    def detect(self, frame_bgr: np.ndarray) -> Detections:
        return self.detect_batch([frame_bgr])[0]

    def detect_batch(self, frames_bgr: Sequence[np.ndarray]) -> list[Detections]:
        for frame in frames_bgr:
            if frame.ndim != 3 or frame.shape[2] != 3:
                raise ValueError(f"frame must be (H, W, 3) BGR, got {frame.shape}")
        if not frames_bgr:
            return []
        torch = self._torch
        if self._stream is not None and not isinstance(frames_bgr[0], np.ndarray):
            self._stream.wait_stream(torch.cuda.current_stream())  # frames decoded or scaled on the caller's stream
        context = torch.cuda.stream(self._stream) if self._stream is not None else _null()
        with torch.inference_mode(), context:
            return self._detect(frames_bgr)

    # -- the cascade -------------------------------------------------------------------------------------

    def _detect(self, frames_bgr: Sequence[np.ndarray]) -> list[Detections]:
        groups = self._upload(frames_bgr)  # [(frame indices, (B, 3, H, W) float32 RGB)]
        rows: list[np.ndarray] = []
        if self.static:
            groups, rows = self._detect_static(groups)
        if groups:
            rows.append(self._follow(groups))
        return self._detections(np.concatenate(rows) if rows else np.zeros((0, 16), np.float32), frames_bgr)

    def _detect_static(self, groups: list[tuple[list[int], Any]]) -> tuple[list[tuple[list[int], Any]], list[np.ndarray]]:
        """The frames of each group through the fixed-shape cascade (engines/mtcnn_static.py) in chunks of powers
        of two, on CUDA each chunk one graph replay (captured the second time its size and chunk come), every
        chunk's answer brought back in one copy. Returns the frames left to the data-following cascade (a chunk
        seen for the first time, or one whose answer a limit made inexact: that limit grows for the next
        capture) and the face rows of the others (frame index in the last column)."""
        torch = self._torch
        left: list[tuple[list[int], Any]] = []
        launched: list[tuple[list[int], Any, Any, tuple[int, int, int], static.Limits]] = []  # chunk: its answer
        for indices, rgb in groups:
            pyramid = self._pyramid(rgb.shape[2], rgb.shape[3])
            start = 0
            most = self._static_chunks.get((int(rgb.shape[2]), int(rgb.shape[3])), _PNET_MAX_CHUNK)
            for size in _power_chunks(len(indices), most):
                chunk, chunk_indices = rgb[start : start + size], indices[start : start + size]
                start += size
                key = (int(rgb.shape[2]), int(rgb.shape[3]), size)
                limits = self._limits.get(key, self._first_limits)
                flat = self._static_run(key, chunk, pyramid, limits) if pyramid.levels else None
                if flat is None:
                    left.append((chunk_indices, chunk))
                else:
                    launched.append((chunk_indices, chunk, flat, key, limits))
        if not launched:
            return left, []
        host = to_host(torch.cat([flat for _, _, flat, _, _ in launched]))  # the one wait for the device
        rows, offset = [], 0
        for indices, chunk, flat, key, limits in launched:
            outcome = static.read(host[offset : offset + len(flat)])
            offset += len(flat)
            if outcome.short:
                self._grow(key, limits, outcome.short, outcome.needed)
                left.append((indices, chunk))
                continue
            self.frames_static += len(indices)
            found = outcome.rows
            found[:, 15] = np.asarray(indices, np.float32)[found[:, 15].astype(np.int64)]  # the chunk's -> the call's
            rows.append(found)
        return left, rows

    def _static_run(self, key: tuple[int, int, int], chunk: Any, pyramid: _Pyramid, limits: static.Limits) -> Any:
        """The fixed-shape cascade's flat answer for a chunk, on the device: a graph replay on CUDA (None while
        the key has no graph yet: first sight, or its capture failed), the cascade itself elsewhere."""
        if self._static_graphs.get(key) == _FAILED:  # beyond the largest limits, or would not capture
            return None
        if not self.pnet.cuda_graphs:
            return static.cascade(self, chunk, pyramid, limits)
        graph = _second_sight(self._static_graphs, key, _STATIC_GRAPHS,
                              lambda: self._capture_static(chunk, pyramid, limits), self._static_failures)
        if self._static_graphs.get(key) == _FAILED:  # would not capture, tries spent: fewer frames take less memory
            self._fewer_frames(key, limits, "its graph would not capture")
        if not isinstance(graph, CapturedGraph):  # first sight: the data-following cascade answers
            return None
        return replay(graph, [chunk])[0].clone()  # the graphs share a memory pool: the next replay may overwrite

    def _capture_static(self, chunk: Any, pyramid: _Pyramid, limits: static.Limits) -> CapturedGraph | str:
        return self._capture(lambda x: [static.cascade(self, x[0], pyramid, limits)], chunk,
                             "the fixed-shape cascade", "the data-following cascade answers")

    def _capture(self, fn: Any, frames: Any, what: str, instead: str) -> CapturedGraph | str:
        """`fn` over (B, 3, H, W) frames captured as one graph into the detector's shared pool; _FAILED (and why,
        at each try) where it will not capture: `instead` keeps answering. The first graph captured is kept for the
        detector's life (`_pool_owner`)."""
        start = time.perf_counter()
        try:  # one warm-up: the eager run of the first sight already chose this size's kernels
            graph = capture_graph(fn, [frames], self._stream, self._pool, warmups=1)
        except Exception as exc:
            logger.warning("%s for %d frames of %dx%d will not capture (%s); %s", what, frames.shape[0],
                           frames.shape[2], frames.shape[3], str(exc).splitlines()[0][:200], instead)
            # the next capture goes into a new pool: a failed one may leave its pool recording, and torch 2.11
            # then refuses every capture into it ("already recording to mempool_id", seen on two H100s); the
            # graphs captured so far keep the old one alive
            self._pool = self._pool_owner = None
            return _FAILED
        if self._pool_owner is None:
            self._pool, self._pool_owner = graph.graph.pool(), graph
        self.capture_s += time.perf_counter() - start
        return graph

    def _grow(self, key: tuple[int, int, int], limits: static.Limits, short: list[str],
              needed: dict[str, int]) -> None:
        """A chunk's answer was inexact: the short limits double (slots: as often as it takes to hold what the
        chunk `needed`; up to static.MOST) and its graph is captured again at its next sight; at the most, its
        frames take the data-following cascade for good (or, pooled slots, go in smaller chunks)."""
        grown = limits.grown(short, static.MOST, key[2], needed)
        if grown == limits:
            self._static_graphs[key] = _FAILED
            pooled = set(short) <= set(static.POOLED)  # a chunk of fewer frames gives each frame more of those
            if pooled and self._fewer_frames(key, limits, f"{', '.join(short)} at the most", needed):
                return
            logger.warning("frames of %dx%d need more than the fixed-shape cascade's largest %s; they take the "
                           "data-following cascade", key[0], key[1], ", ".join(short))
            return
        logger.info("fixed-shape cascade for %s: %s grown to %s", key, short, grown)
        self._limits[key] = grown
        if self.pnet.cuda_graphs:
            self._static_graphs[key] = _SEEN  # captured again, with the new limits, at its next sight

    def _fewer_frames(self, key: tuple[int, int, int], limits: static.Limits, why: str,
                      needed: dict[str, int] | None = None) -> bool:
        """A chunk of `key`'s frames does not fit the fixed shapes (`why`): frames of its size go through in chunks
        of at most half as many from now on (fewer where the pooled slots per frame it `needed` show that half
        would not hold them either), with its per-frame limits and slots enough for what it needed, captured at
        the next sight. False for a chunk of one frame."""
        height, width, frames = key
        if frames < 2:
            return False
        needed = needed or {}
        half = frames // 2
        while half > 1 and any(needed.get(name, 0) > getattr(static.MOST, name) // half for name in static.POOLED):
            half //= 2
        if self._static_chunks.get((height, width), _PNET_MAX_CHUNK) > half:
            logger.warning("fixed-shape cascade for %d frames of %dx%d: %s; frames of that size go through in "
                           "chunks of %d", frames, height, width, why, half)
            self._static_chunks[(height, width)] = half
        short = [name for name in static.POOLED if needed.get(name, 0) > getattr(limits, name)]
        self._limits.setdefault((height, width, half), limits.grown(short, static.MOST, half, needed))
        if self.pnet.cuda_graphs and (height, width, half) not in self._static_graphs:
            self._static_graphs[(height, width, half)] = _SEEN  # a size known to come: captured at its next sight
        return True

    def _follow(self, groups: list[tuple[list[int], Any]]) -> np.ndarray:
        """The data-following cascade over groups of same-size frames: (n, 16) face rows, frame index last."""
        torch = self._torch
        _, t2, t3 = self.params.thresholds
        self.frames_followed += sum(len(indices) for indices, _ in groups)
        tables = [integral_image(rgb) for _, rgb in groups]  # for the R-Net and O-Net patches

        found = [self._stage1(indices, rgb) for indices, rgb in groups]
        boxes = torch.cat([b for b, _ in found])  # (K, 9)
        frame_of = torch.cat([f for _, f in found])
        keep = greedy_nms(boxes, boxes[:, 4], frame_of, 0.7)
        boxes, frame_of = square(candidates(boxes[keep], torch), torch), frame_of[keep]

        # Stage 2: R-Net refines and rejects.
        boxes, frame_of, out = self._refine(self.rnet, groups, tables, boxes, frame_of, 24, t2)
        keep = greedy_nms(boxes, boxes[:, 4], frame_of, 0.7)
        boxes = square(regress(boxes[keep], out["regression"][keep], torch), torch)
        frame_of = frame_of[keep]

        # Stage 3: O-Net gives final boxes, scores and landmarks.
        boxes, frame_of, out = self._refine(self.onet, groups, tables, boxes, frame_of, 48, t3)
        landmarks = landmarks_of(boxes, out["landmarks"], torch)
        boxes = regress(boxes, out["regression"], torch)
        keep = greedy_nms(boxes, boxes[:, 4], frame_of, 0.7, overlap="min")
        return to_host(torch.cat([boxes[keep, :5], landmarks[keep].reshape(-1, 10), frame_of[keep, None].float()], 1))

    def _upload(self, frames_bgr: Sequence[Any]) -> list[tuple[list[int], Any]]:
        """Frames grouped by size, each group one (B, 3, H, W) float32 RGB tensor on the device (one copy; a frame
        already on the device, decoded there, is not copied)."""
        torch = self._torch
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, frame in enumerate(frames_bgr):
            by_size.setdefault(tuple(int(d) for d in frame.shape[:2]), []).append(i)
        groups = []
        for indices in by_size.values():
            frames = [frames_bgr[i] for i in indices]
            if isinstance(frames[0], np.ndarray):
                stacked = np.stack(frames) if len(frames) > 1 else frames[0][None]
                pixels = torch.from_numpy(np.ascontiguousarray(stacked)).to(self.device, non_blocking=True)
            else:
                pixels = (torch.stack(frames) if len(frames) > 1 else frames[0][None]).to(self.device)
            groups.append((indices, pixels.flip(3).permute(0, 3, 1, 2).float().contiguous()))
        return groups

    def _pyramid(self, height: int, width: int) -> _Pyramid:
        key = (height, width)
        if key in self._pyramids:
            self._pyramids.move_to_end(key)
            return self._pyramids[key]
        torch = self._torch
        levels, xs, ys, scales, level_of = [], [], [], [], []
        for index, scale in enumerate(pyramid_scales(height, width, self.params.min_face_size, self.params.scale_factor)):
            level_height, level_width = int(height * scale + 1), int(width * scale + 1)
            rows, cols = _pnet_output_size(level_height), _pnet_output_size(level_width)
            if rows <= 0 or cols <= 0:
                continue
            levels.append(_Level(scale, level_height, level_width,
                                 image_resize_weights(height, width, level_height, level_width, self.device)))
            grid_y, grid_x = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
            xs.append(grid_x.reshape(-1))
            ys.append(grid_y.reshape(-1))
            scales.append(np.full(rows * cols, scale, np.float32))
            level_of.append(np.full(rows * cols, index, np.int64))

        def device(parts: list[np.ndarray], dtype: Any) -> Any:
            joined = np.concatenate(parts) if parts else np.zeros(0)
            return torch.from_numpy(joined.astype(dtype)).to(self.device)

        pyramid = _Pyramid(tuple(levels), device(xs, np.float32), device(ys, np.float32), device(scales, np.float32),
                           device(level_of, np.int64))
        self._pyramids[key] = pyramid
        if len(self._pyramids) > _PYRAMID_CACHE:
            self._pyramids.popitem(last=False)
        return pyramid

    def _stage1(self, indices: list[int], rgb: Any) -> tuple[Any, Any]:
        """P-Net over the pyramid of a group of same-size frames, every level one batched run: (K, 9) boxes
        (x1 y1 x2 y2 score + 4 regression values) after the per-level NMS, and each box's frame index;
        ordered by frame, then level, then score, as the numpy cascade's concatenation is."""
        torch = self._torch
        pyramid = self._pyramid(rgb.shape[2], rgb.shape[3])
        if not pyramid.levels:
            return rgb.new_zeros((0, 9)), torch.zeros(0, dtype=torch.int64, device=rgb.device)
        prob, reg = self._pnet_maps_of(rgb, pyramid)  # (B, M), (B, 4, M)
        frame, cell = torch.nonzero(prob >= self.params.thresholds[0], as_tuple=True)
        x1, y1, x2, y2 = cell_boxes(pyramid.xs[cell], pyramid.ys[cell], pyramid.scales[cell], torch)
        boxes = torch.cat([torch.stack([x1, y1, x2, y2, prob[frame, cell]], 1), reg[frame, :, cell]], 1)
        frame_of = torch.as_tensor(indices, device=rgb.device)[frame]
        levels = len(pyramid.levels) + 1
        keep = greedy_nms(boxes, boxes[:, 4], frame_of * levels + pyramid.level_of[cell], 0.5)
        return boxes[keep], frame_of[keep]

    def _pnet_maps(self, rgb: Any, pyramid: _Pyramid) -> list[Any]:
        """P-Net's face probability (B, M) and regression (B, 4, M) over every cell of every level."""
        torch = self._torch
        probs, regs = [], []
        for level in pyramid.levels:
            scaled = (resize_image(rgb, level.weights) - PIXEL_OFFSET) * PIXEL_SCALE
            reg, prob = self.pnet.run_tensors([scaled])
            if tuple(prob.shape[2:]) != (_pnet_output_size(level.height), _pnet_output_size(level.width)):
                raise ValueError(f"P-Net gave {tuple(prob.shape[2:])} cells for a {level.height}x{level.width} level")
            probs.append(prob[:, 1].reshape(len(rgb), -1))
            regs.append(reg.reshape(len(rgb), 4, -1))
        return [torch.cat(probs, 1), torch.cat(regs, 2)]

    def _pnet_maps_of(self, rgb: Any, pyramid: _Pyramid) -> list[Any]:
        """`_pnet_maps`, replayed as CUDA graphs: the frames of a batch go through in chunks of powers of two (13
        frames: 8, 4 and 1), each chunk one replay of the graph of its frame size and chunk size, captured the
        second time that pair comes (so a burst of new batch sizes does not capture under load, 100-200 ms each,
        and a size seen once costs nothing). Replaying a one-frame graph per frame instead left P-Net's small
        convolutions a frame wide: most of the detector's kernel time in batches of 16."""
        torch = self._torch
        if not self.pnet.cuda_graphs:
            return self._pnet_maps(rgb, pyramid)
        chunks = _power_chunks(len(rgb), _PNET_MAX_CHUNK)
        maps = []
        start = 0
        for size in chunks:
            chunk = rgb[start : start + size]
            start += size
            graph = self._pnet_graph((int(rgb.shape[2]), int(rgb.shape[3]), size), chunk, pyramid)
            if not isinstance(graph, CapturedGraph):
                maps.append(self._pnet_maps(chunk, pyramid))
            elif len(chunks) == 1:
                return replay(graph, [chunk])
            else:  # the graphs share one memory pool: another's replay may overwrite these outputs, so copy now
                maps.append([t.clone() for t in replay(graph, [chunk])])
        return [torch.cat([m[k] for m in maps]) for k in range(2)] if len(maps) > 1 else maps[0]

    def _pnet_graph(self, key: tuple[int, int, int], chunk: Any, pyramid: _Pyramid) -> CapturedGraph | str:
        """The captured P-Net stage for (height, width, frames), captured on its second sight; _SEEN or _FAILED
        (run eager) otherwise. The least recently used are dropped beyond `_PNET_GRAPHS`."""
        return _second_sight(self._pnet_graphs, key, _PNET_GRAPHS, lambda: self._capture_pnet(chunk, pyramid),
                             self._pnet_failures)

    def _capture_pnet(self, rgb: Any, pyramid: _Pyramid) -> CapturedGraph | str:
        return self._capture(lambda x: self._pnet_maps(x[0], pyramid), rgb, "P-Net stage", "it runs eager")

    def _refine(self, engine: TorchEngine, groups: list[tuple[list[int], Any]], tables: list[Any], boxes: Any,
                frame_of: Any, size: int, threshold: float) -> tuple[Any, Any, dict[str, Any]]:
        """Run a refinement net on the patch of every box (all frames in one batch); keep the boxes whose
        region is not empty and that it scores above `threshold`: their (K, 5) boxes with the net's score,
        frame indices, and the net's other outputs."""
        torch = self._torch
        patches, kept = self._patches(groups, tables, boxes, frame_of, size)
        out = self._run_batched(engine, (patches - PIXEL_OFFSET) * PIXEL_SCALE)
        score = out["probability"][:, 1]
        passed = torch.nonzero((score > threshold) & kept).reshape(-1)
        return (torch.cat([boxes[passed, :4], score[passed, None]], 1), frame_of[passed],
                {name: value[passed] for name, value in out.items()})

    def _patches(self, groups: list[tuple[list[int], Any]], tables: list[Any], boxes: Any, frame_of: Any,
                 size: int) -> tuple[Any, Any]:
        """Every box's patch from its own frame (`crop_resize` per group of same-size frames)."""
        torch = self._torch
        if len(groups) == 1:
            (indices, rgb), = groups
            local = frame_of if indices == list(range(len(indices))) else \
                torch.as_tensor(np.searchsorted(indices, np.arange(max(indices) + 1)), device=rgb.device)[frame_of]
            return crop_resize(rgb, local, boxes, size, tables[0])
        patches = boxes.new_zeros((len(boxes), 3, size, size))
        kept = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
        for (indices, rgb), table in zip(groups, tables):
            lookup = torch.full((int(frame_of.max()) + 1 if len(frame_of) else 1,), -1, dtype=torch.int64,
                                device=rgb.device)
            mine = torch.as_tensor(indices, device=rgb.device)
            lookup[mine[mine < len(lookup)]] = torch.arange(len(indices), device=rgb.device)[mine < len(lookup)]
            local = lookup[frame_of]
            group_patches, group_kept = crop_resize(rgb, local.clamp(min=0), boxes, size, table)
            inside = local >= 0
            patches = torch.where(inside[:, None, None, None], group_patches, patches)
            kept |= inside & group_kept
        return patches, kept

    def _run_batched(self, engine: TorchEngine, x: Any) -> dict[str, Any]:
        """The net over (N, 3, s, s) in chunks of at most the stage batch; on CUDA each chunk replays the graph of
        the smallest bucket that holds it (TorchEngine.run_tensors)."""
        torch = self._torch
        names = [spec.name for spec in engine.outputs]
        limit = self._stage_batch[id(engine)]
        if len(x) == 0:
            return {name: x.new_zeros((0, *_tail(engine, name))) for name in names}
        chunks = [engine.run_tensors([x[start : start + limit]]) for start in range(0, len(x), limit)]
        if len(chunks) == 1:
            return dict(zip(names, chunks[0]))
        return {name: torch.cat([c[i] for c in chunks]) for i, name in enumerate(names)}

    def _detections(self, rows: np.ndarray, frames_bgr: Sequence[np.ndarray]) -> list[Detections]:
        out = []
        for i, frame in enumerate(frames_bgr):
            mine = rows[rows[:, 15] == i]
            if len(mine) == 0:
                out.append(Detections.empty(self.class_names, num_landmarks=5))
                continue
            h, w = frame.shape[:2]
            out.append(Detections(
                mine[:, :4].astype(np.float32),
                mine[:, 4].astype(np.float32),
                np.zeros(len(mine), np.int32),
                self.class_names,
                mine[:, 5:15].reshape(-1, 5, 2).astype(np.float32),
            ).clip(w, h))
        return out


def _second_sight(graphs: OrderedDict[Any, CapturedGraph | str], key: Any, most: int,
                  capture: Callable[[], CapturedGraph | str], failures: dict[Any, int]) -> CapturedGraph | str:
    """The graph of `key`, captured (`capture()`) the second time the key comes, so that a burst of new shapes
    does not capture under load (100-200 ms each) and a shape seen once costs nothing: _SEEN at the first sight,
    _FAILED where the capture failed (tried again at the key's next sights until `failures` counts
    _CAPTURE_TRIES for it). The least recently used keys beyond `most` are dropped."""
    if key not in graphs:
        graphs[key] = _SEEN
        while len(graphs) > most:
            graphs.popitem(last=False)
        return _SEEN
    graphs.move_to_end(key)
    if graphs[key] == _SEEN:
        graphs[key] = capture()
        if graphs[key] == _FAILED:
            failures[key] = failures.get(key, 0) + 1
            if failures[key] < _CAPTURE_TRIES:
                graphs[key] = _SEEN
                return _FAILED
    return graphs[key]


def _power_chunks(count: int, largest: int) -> list[int]:
    """`count` as a sum of powers of two of at most `largest` (itself one), largest first: 13 -> [8, 4, 1]."""
    chunks = [largest] * (count // largest)
    rest = count % largest
    chunks += [1 << bit for bit in range(rest.bit_length() - 1, -1, -1) if rest >> bit & 1]
    return chunks


def _pnet_output_size(size: int) -> int:
    """P-Net's output cells along an axis of `size` pixels: conv 3, max-pool 2 (ceil), conv 3, conv 3."""
    return -(-(size - 2) // 2) - 4


def _tail(engine: TorchEngine, name: str) -> tuple[int, ...]:
    spec = next(s for s in engine.outputs if s.name == name)
    return tuple(d if isinstance(d, int) and d > 0 else 0 for d in spec.shape[1:])


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
