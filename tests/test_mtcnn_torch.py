"""The GPU-resident MTCNN (engines/mtcnn_torch.py) finds the numpy cascade's faces: on the CPU device here,
exactly (boxes within 1 px; in practice 1e-4 px), and on CUDA within fp16's reach (on the GPU machine)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from engines import create_engine
from engines.mtcnn import Mtcnn
from tests.images import ASTRONAUT, CAMERA, DATA, NO_FACE, collage, many_faces, read

if os.environ.get("CI") == "true":  # the test extra installs torch: in CI a failed install fails, it does not skip
    import torch
else:
    torch = pytest.importorskip("torch", reason="the GPU-resident cascade needs torch: pip install '.[torch]'")

from engines.mtcnn_static import Limits, _compact, _nms  # noqa: E402
from engines.mtcnn_torch import TorchMtcnn, _power_chunks  # noqa: E402
from engines.torch_boxes import greedy_nms  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"
PHOTOS = {
    "astronaut": lambda: read(ASTRONAUT),
    "camera": lambda: read(CAMERA),
    "no_face": lambda: read(NO_FACE),
    "cmyk": lambda: read(DATA / "astronaut_cmyk.jpg"),
    "collage": collage,
}


def _nets(backend: str, device: str, **options: object) -> list:
    return [create_engine(backend, MODELS / f"mtcnn_{n}.onnx", device, **options) for n in ("pnet", "rnet", "onet")]


@pytest.fixture(scope="module")
def reference() -> Mtcnn:
    return Mtcnn(*_nets("onnxruntime", "cpu"))


@pytest.fixture(scope="module")
def on_cpu() -> TorchMtcnn:
    detector = TorchMtcnn(*_nets("torch", "cpu"))
    detector.warm_up()
    return detector


@pytest.fixture(scope="module")
def fixed() -> TorchMtcnn:
    """The fixed-shape cascade (engines/mtcnn_static.py), run eagerly on the CPU device: on CUDA it is one graph."""
    return TorchMtcnn(*_nets("torch", "cpu"), fixed_shapes=True)


def _same_faces(got, expected, atol: float) -> None:
    assert len(got) == len(expected)
    if len(expected):
        order_got, order_expected = np.argsort(got.xyxy[:, 0]), np.argsort(expected.xyxy[:, 0])
        np.testing.assert_allclose(got.xyxy[order_got], expected.xyxy[order_expected], atol=atol)
        np.testing.assert_allclose(got.landmarks[order_got], expected.landmarks[order_expected], atol=atol)
        np.testing.assert_allclose(got.confidence[order_got], expected.confidence[order_expected], atol=1e-3)


@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_the_torch_cascade_on_cpu_finds_the_numpy_cascades_faces(photo: str, reference: Mtcnn,
                                                                 on_cpu: TorchMtcnn) -> None:
    image = PHOTOS[photo]()
    expected = reference.detect(image)
    assert len(expected) == {"astronaut": 1, "camera": 1, "no_face": 0, "cmyk": 1, "collage": 3}[photo]
    _same_faces(on_cpu.detect(image), expected, atol=1.0)


@pytest.mark.parametrize("cascade", ["data-following", "fixed shapes"])
def test_a_batch_of_mixed_sizes_gives_each_frame_its_own_faces(cascade: str, reference: Mtcnn, on_cpu: TorchMtcnn,
                                                               fixed: TorchMtcnn) -> None:
    """Same-size frames share each P-Net run; different sizes go their own way; R-Net and O-Net take every
    frame's candidates together (fixed shapes: a chunk of same-size frames at a time, and a chunk its slots do
    not hold goes the data-following way). Each frame still gets exactly its faces."""
    detector = on_cpu if cascade == "data-following" else fixed
    frames = [PHOTOS[p]() for p in ("astronaut", "collage", "no_face", "camera", "astronaut")]
    for got, frame in zip(detector.detect_batch(frames), frames):
        _same_faces(got, reference.detect(frame), atol=1.0)


@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_the_fixed_shape_cascade_finds_the_numpy_cascades_faces(photo: str, reference: Mtcnn,
                                                                fixed: TorchMtcnn) -> None:
    """Slots and masks instead of the data's own shapes, the same faces in the same order. A frame with more
    candidates than the slots (the collage: 648 P-Net cells pass, 256 slots) is answered the data-following way,
    and its slots double until they hold it: then the answers come from the fixed shapes."""
    image = PHOTOS[photo]()
    expected = reference.detect(image)
    for _ in range(4):
        before = fixed.frames_static
        _same_faces(fixed.detect(image), expected, atol=1.0)
        if fixed.frames_static == before + 1:
            break
    else:
        pytest.fail(f"the fixed shapes never answered the {photo} ({fixed._limits})")
    _same_faces(fixed.detect(image), expected, atol=1.0)
    assert fixed.frames_static == before + 2


def test_limits_too_small_for_a_frame_still_give_its_faces_and_grow_until_they_hold_it(reference: Mtcnn) -> None:
    """Every limit far too small: each answer is still exact (the fixed shapes say which limit was short, and
    the data-following cascade answers), each short limit doubles, and after a few frames the slots and
    passes hold the frame."""
    small = Limits(k1=64, k2=16, k3=2, passes_level=1, passes_frame=1, passes_rnet=1, passes_onet=1)
    detector = TorchMtcnn(*_nets("torch", "cpu"), fixed_shapes=True, fixed_shape_limits=small)
    image = read(ASTRONAUT)
    expected = reference.detect(image)
    for answers in range(1, 8):
        _same_faces(detector.detect(image), expected, atol=1.0)
        if detector.frames_static:
            break
    assert detector.frames_static == 1 and detector.frames_followed == answers - 1 >= 3
    grown = detector._limits[(*image.shape[:2], 1)]
    assert grown.k1 >= 2 * small.k1 and grown.k2 >= 2 * small.k2 and grown.k3 >= 2 * small.k3
    assert grown.passes_level > 1  # the level NMS of this photo needs 4 passes to settle


def _boxes(count: int, frames: int, seed: int) -> tuple:
    """Random clustered boxes (so that suppression chains form), scores with ties, pyramid levels, a validity
    mask: (frames, count, 4), (frames, count), (frames, count), (frames, count)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(frames, count, 2, generator=g) * 60
    sides = 8 + torch.rand(frames, count, 1, generator=g) * 20
    boxes = torch.cat([centres - sides / 2, centres + sides / 2], 2)
    scores = (torch.rand(frames, count, generator=g) * 10).round() / 10  # ties
    levels = torch.randint(0, 3, (frames, count), generator=g)
    valid = torch.rand(frames, count, generator=g) > 0.2
    return boxes, scores, levels, valid


@pytest.mark.parametrize("overlap", ["iou", "min"])
@pytest.mark.parametrize("per_level", [True, False])
def test_slot_nms_keeps_what_greedy_nms_keeps_in_its_order(overlap: str, per_level: bool) -> None:
    for seed in range(5):
        boxes, scores, levels, valid = _boxes(60, 3, seed)
        ordered, keep, settled = _nms(boxes, scores, levels if per_level else None, valid, 0.3, overlap, 64)
        assert bool(settled)
        for frame in range(3):
            mine = valid[frame].nonzero().reshape(-1)  # the boxes there, in slot order (the eager cascade's rows)
            groups = levels[frame, mine] if per_level else torch.zeros(len(mine), dtype=torch.int64)
            expected = boxes[frame, mine][greedy_nms(boxes[frame, mine], scores[frame, mine], groups, 0.3, overlap)]
            torch.testing.assert_close(ordered[frame][keep[frame]], expected, atol=0, rtol=0)


def test_slot_nms_says_when_its_passes_did_not_settle() -> None:
    """A chain: each box overlaps the next, scores falling, so greedy keeps every other box, an answer one
    matrix pass cannot reach."""
    boxes = torch.tensor([[[float(x), 0.0, x + 10.0, 10.0] for x in range(0, 20, 2)]])
    scores = torch.linspace(1, 0.1, 10)[None]
    valid = torch.ones(1, 10, dtype=torch.bool)
    _, keep, settled = _nms(boxes, scores, None, valid, 0.5, "iou", 1)
    assert not bool(settled)
    _, keep, settled = _nms(boxes, scores, None, valid, 0.5, "iou", 16)
    assert bool(settled) and keep[0].tolist() == [True, False] * 5


def test_compaction_moves_each_frames_boxes_to_the_front_in_order_and_says_how_many_the_fullest_had() -> None:
    boxes = torch.arange(2 * 6 * 1, dtype=torch.float32).reshape(2, 6, 1)
    valid = torch.tensor([[False, True, False, True, True, False], [True] * 6])
    out, kept, most = _compact(boxes, valid, 4)
    assert out[0, :3, 0].tolist() == [1, 3, 4] and kept[0].tolist() == [True, True, True, False]
    assert out[1, :, 0].tolist() == [6, 7, 8, 9] and int(most) == 6  # more than its 4 slots: some did not fit
    assert int(_compact(boxes[:1], valid[:1], 3)[2]) == 3


def test_the_detector_config_picks_the_torch_cascade_where_asked() -> None:
    from deployments.models import build_detector
    from serve_app.config import DetectorConfig

    numpy_default = build_detector(DetectorConfig(engine={"backend": "torch"}), "cpu")  # auto: torch on CUDA only
    assert type(numpy_default) is Mtcnn
    forced = build_detector(DetectorConfig(engine={"backend": "torch"}, mtcnn={"implementation": "torch"}), "cpu")
    assert type(forced) is TorchMtcnn
    with pytest.raises(ValueError, match="implementation: torch runs the cascade on the torch backend"):
        DetectorConfig(mtcnn={"implementation": "torch"})  # onnxruntime nets


def _cuda() -> bool:
    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU here (run on the GPU machine: see docs/benchmarks.md)")
@pytest.mark.parametrize("fp16", [False, True])
def test_the_cascade_on_cuda_finds_the_numpy_cascades_faces(fp16: bool, reference: Mtcnn) -> None:
    """On the GPU the nets compute in TF32 (fp32 convolutions) or fp16, so scores move in the third digit:
    the same faces, boxes within a few pixels (the measured deviation is printed). A size's first frame goes the
    data-following way, the second is captured as one fixed-shape graph; a frame its slots do not hold goes the
    data-following way again and is captured again with grown limits (so a graph is dropped and its memory pool
    must outlive it), until the fixed shapes answer: then every answer is a replay."""
    detector = TorchMtcnn(*_nets("torch", "cuda", fp16=fp16))
    detector.warm_up()
    assert detector.static
    assert all(e.captured for e in (detector.rnet, detector.onet))  # every R-Net and O-Net bucket replays
    for photo in sorted(PHOTOS):
        image = PHOTOS[photo]()
        expected = reference.detect(image)
        replays = 0
        for attempt in range(7):
            before = detector.frames_static
            got = detector.detect(image)
            _same_faces(got, expected, atol=4.0)
            if len(got):
                print(f"{photo} fp16={fp16} attempt {attempt}: max box deviation "
                      f"{np.abs(np.sort(got.xyxy, 0) - np.sort(expected.xyxy, 0)).max():.2f} px")
            replays += detector.frames_static - before
            if replays == 2:
                break
        assert replays == 2, f"{photo}: the fixed shapes answered {replays} of {attempt + 1} ({detector._limits})"
    assert detector._static_graphs and all(not isinstance(g, str) for g in detector._static_graphs.values())


@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU here (run on the GPU machine: see docs/benchmarks.md)")
def test_the_data_following_cascade_on_cuda_replays_its_pnet_stage(reference: Mtcnn) -> None:
    detector = TorchMtcnn(*_nets("torch", "cuda"), fixed_shapes=False)
    detector.warm_up()
    image = PHOTOS["collage"]()
    for _ in range(3):
        _same_faces(detector.detect(image), reference.detect(image), atol=4.0)
    assert detector._pnet_graphs and all(not isinstance(g, str) for g in detector._pnet_graphs.values())
    assert detector.frames_static == 0


@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU here (run on the GPU machine: see docs/benchmarks.md)")
def test_a_replayed_pnet_stage_gives_what_eager_gives() -> None:
    """One graph per frame size and chunk of frames: a batch of three same-size frames is a chunk of two and one
    of one, each replayed, and each frame gets its own maps."""
    detector = TorchMtcnn(*_nets("torch", "cuda"))
    image = collage()
    frames = detector._upload([image, image[:, ::-1].copy(), image[::-1].copy()])
    pyramid = detector._pyramid(*image.shape[:2])
    batch = frames[0][1]
    with torch.inference_mode(), torch.cuda.stream(detector._stream):
        eager = [t.clone() for t in detector._pnet_maps(batch, pyramid)]
        detector._pnet_maps_of(batch, pyramid)  # first sight of (size, 2) and (size, 1): eager
        replayed = [t.clone() for t in detector._pnet_maps_of(batch, pyramid)]  # captured, replayed
        single = [t.clone() for t in detector._pnet_maps_of(batch[2:3], pyramid)]
    height, width = image.shape[:2]
    assert set(detector._pnet_graphs) == {(height, width, 2), (height, width, 1)}
    assert not any(isinstance(g, str) for g in detector._pnet_graphs.values())
    for a, b, c in zip(eager, replayed, single):
        # eager ran the batch of three, the graphs two frames and one: cuDNN picks other (TF32) kernels per
        # batch size, which moves probabilities by up to ~6e-4 (seen on the H200); replays of one graph agree
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-2)
        torch.testing.assert_close(b[2:3], c, atol=0, rtol=0)


def test_frames_go_through_pnet_in_chunks_of_powers_of_two() -> None:
    assert _power_chunks(1, 16) == [1] and _power_chunks(13, 16) == [8, 4, 1]
    assert _power_chunks(40, 16) == [16, 16, 8] and _power_chunks(0, 16) == []
    for count in range(1, 70):
        chunks = _power_chunks(count, 16)
        assert sum(chunks) == count and all(c & (c - 1) == 0 and c <= 16 for c in chunks)
        assert chunks == sorted(chunks, reverse=True) and len(set(chunks) - {16}) == len(chunks) - chunks.count(16)


def test_the_pnet_stage_it_captures_makes_no_tensor_from_host_data(on_cpu: TorchMtcnn) -> None:
    """The pyramid and P-Net, which become one CUDA graph per frame size, only compute on tensors already on
    the device (their resize weights are made once per size, outside)."""
    from tests.test_torch_backend import _TensorFactorySpy

    image = read(ASTRONAUT)
    (_, rgb), = on_cpu._upload([image])
    pyramid = on_cpu._pyramid(*image.shape[:2])
    spy = _TensorFactorySpy()
    with spy.mode, torch.inference_mode():
        on_cpu._pnet_maps(rgb, pyramid)
    assert spy.calls and "aten.lift_fresh.default" not in spy.calls


_WAITS = {"aten.nonzero.default", "aten.item.default", "aten.is_nonzero.default", "aten._local_scalar_dense.default",
          "aten.equal.default", "aten.masked_select.default",
          "aten.lift_fresh.default"}  # a wait for the device (sizes, values read back) or a tensor made from host data


def _host_round_trips(work) -> list[str]:  # noqa: ANN001
    """The aten ops of `work` that, on CUDA, wait for the device or copy from the host (a graph capture refuses
    both), boolean-mask indexing included (its sizes come from the data)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found: list[str] = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            name = str(func)
            index = args[1] if name.startswith("aten.index") and len(args) > 1 else None
            masks = isinstance(index, (list, tuple)) and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                             for i in index)
            if name in _WAITS or masks:
                found.append(name)
            return func(*args, **(kwargs or {}))

    with Spy(), torch.inference_mode():
        work()
    return found


def test_the_fixed_shape_cascade_never_waits_for_the_device_so_a_batch_is_one_graph(fixed: TorchMtcnn,
                                                                                    on_cpu: TorchMtcnn) -> None:
    """From the frames to the face rows, nothing reads a size or a value back and nothing is made from host data:
    what CUDA-graph capture needs of the whole cascade. The data-following cascade does both (it would not
    capture)."""
    from engines import mtcnn_static

    image = read(ASTRONAUT)
    (indices, rgb), = fixed._upload([image])
    pyramid = fixed._pyramid(*image.shape[:2])
    assert _host_round_trips(lambda: mtcnn_static.cascade(fixed, rgb, pyramid, Limits())) == []
    assert "aten.nonzero.default" in _host_round_trips(lambda: on_cpu._follow([(indices, rgb)]))


class _Recorded:
    """A captured graph as the detector's policy sees it, on the CPU: `replay` runs the captured function again."""

    def __init__(self, fn, example, captures: list) -> None:  # noqa: ANN001
        self.fn, self.example = fn, example
        captures.append(fn.__qualname__.split(".")[1])  # which stage: the fixed shapes' or P-Net's own

    def pool(self) -> str:
        return "pool"


def _graphed(limits: Limits) -> TorchMtcnn:
    """A CPU detector with the fixed shapes, whose policy acts as on CUDA (the fixed shapes only through a graph)."""
    detector = TorchMtcnn(*_nets("torch", "cpu"), fixed_shapes=True, fixed_shape_limits=limits)
    detector.pnet.cuda_graphs = True
    return detector


def _fixed_shape_answers(detector: TorchMtcnn, image: np.ndarray, reference: Mtcnn, times: int,
                         frames: int = 1) -> list[int]:
    """Detects a batch of `frames` copies of `image` `times` times, each answer the numpy cascade's; per call, the
    frames the fixed shapes answered."""
    expected = reference.detect(image)
    answers = []
    for _ in range(times):
        before = detector.frames_static
        for got in detector.detect_batch([image] * frames):
            _same_faces(got, expected, atol=1.0)
        answers.append(detector.frames_static - before)
    return answers


@pytest.fixture()
def captures(monkeypatch: pytest.MonkeyPatch) -> list:
    """CUDA graph capture and replay stood in for on the CPU: a capture records which stage it was and keeps the
    function, a replay calls it again (the policy around them is what is tested, not CUDA)."""
    import engines.mtcnn_torch as module
    from engines.torch_engine import CapturedGraph

    recorded: list = []

    def capture(fn, example, stream, pool, warmups=2):  # noqa: ANN001, ANN202
        return CapturedGraph(_Recorded(fn, example, recorded), list(example), [])

    monkeypatch.setattr(module, "capture_graph", capture)
    monkeypatch.setattr(module, "replay", lambda graph, tensors: graph.graph.fn(tensors))
    return recorded


def test_a_size_is_captured_on_its_second_sight_and_again_when_its_limits_grow(captures: list,
                                                                               reference: Mtcnn) -> None:
    """The graph policy of the fixed shapes, on the CPU (CUDA graphs recorded as functions to call again): the
    first frame of a size goes the data-following way and captures nothing, the second captures; a frame the
    slots do not hold is answered the data-following way, its limits grow and the next frame of that size captures
    again with them; the first graph stays held (its memory pool must outlive any graph dropped)."""
    small = Limits(k1=40, k2=256, k3=64)  # the astronaut: 293 P-Net candidates, then 142 and 8 boxes
    detector, image = _graphed(small), read(ASTRONAUT)
    answers = _fixed_shape_answers(detector, image, reference, 6)
    # first sight: data-following; then captured with 40 slots, short of the 293 it says it needed: doubled as
    # often as that takes (320) in one step, captured again, and that holds it
    assert answers == [0, 0, 1, 1, 1, 1] and captures.count("_capture_static") == 2
    assert captures.count("_capture_pnet") == 1  # the data-following answers replay P-Net from their second
    assert detector._limits[(*image.shape[:2], 1)].k1 == 320
    counts = detector.cascade_counts()  # what GET /v1/pipeline shows of the detector
    assert counts["frames_fixed_shapes"] == 4 and counts["frames_data_following"] == 2
    assert counts["grown_limits"]["512x512x1"]["k1"] == 320
    assert detector._pool_owner is not None and detector._pool_owner is not detector._static_graphs[(*image.shape[:2], 1)]


def test_a_frame_beyond_the_largest_limits_stays_with_the_data_following_cascade(
        captures: list, reference: Mtcnn, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame that needs more slots than the largest limits (a crowd, or noise that passes P-Net everywhere) is
    still answered exactly, by the data-following cascade, and its size is not captured again: each capture would
    hold more memory for nothing."""
    from engines import mtcnn_static

    monkeypatch.setattr(mtcnn_static, "MOST", Limits(k1=160, k2=256, k3=64))  # the astronaut needs 293 candidates
    detector, image = _graphed(Limits(k1=80, k2=256, k3=64)), read(ASTRONAUT)
    assert _fixed_shape_answers(detector, image, reference, 5) == [0] * 5
    assert detector.frames_static == 0 and detector.frames_followed == 5
    assert captures.count("_capture_static") == 2  # with 80 slots, then 160: the most; then never again
    assert detector._static_graphs[(*image.shape[:2], 1)] == "failed"


def test_frames_whose_pooled_slots_do_not_fit_a_chunk_go_through_in_smaller_chunks(
        captures: list, reference: Mtcnn, monkeypatch: pytest.MonkeyPatch) -> None:
    """R-Net's slots are pooled over a chunk's frames, up to the largest pool: each astronaut needs 142 R-Net
    slots and a pool of 256 holds one's. Their size then goes through in chunks of one frame, each answered by the
    fixed shapes (the eight-face photo in batches of 16 on an H100 left them for good: docs/benchmarks.md run 11),
    and every answer on the way is the numpy cascade's. Four frames go straight to chunks of one: the slots a frame
    needed say that two would not fit either (halving alone: the out-of-memory capture test below)."""
    from engines import mtcnn_static

    frames = 4
    monkeypatch.setattr(mtcnn_static, "MOST", Limits(k1=512, k2=256, k3=64))
    detector, image = _graphed(Limits(k1=512, k2=128, k3=16)), read(ASTRONAUT)
    answered = _fixed_shape_answers(detector, image, reference, 4, frames=frames)
    # first sight; captured, short at the most, the chunk cut to one frame with the slots a frame needed; then
    # that chunk captured at once and every chunk answered
    assert answered == [0, 0, frames, frames], answered
    height, width = image.shape[:2]
    assert detector.cascade_counts()["largest_chunks"] == {f"{height}x{width}": 1}
    assert detector._static_graphs[(height, width, frames)] == "failed"
    assert [key for key in detector._limits if key[2] not in (1, frames)] == []  # no chunk size in between


def test_a_frame_of_many_faces_grows_past_1024_p_net_slots_and_is_answered_by_the_fixed_shapes(
        reference: Mtcnn) -> None:
    """The eight-face photo at full size passes 1294 P-Net cells (at the detector's 1280x640 working size 1003 in
    fp32, and more than 1024 in fp16 on an H100, where it gave up the fixed shapes): the slots grow to 2048 and the
    fixed shapes answer it, the data-following cascade's faces exactly."""
    detector = TorchMtcnn(*_nets("torch", "cpu"), fixed_shapes=True,
                          fixed_shape_limits=Limits(k1=1024, k2=1024, k3=96))
    image = many_faces()
    answers = _fixed_shape_answers(detector, image, reference, 3)
    assert answers == [0, 1, 1]  # short of P-Net slots once, then answered with twice as many
    assert detector._limits[(*image.shape[:2], 1)].k1 == 2048


@pytest.mark.parametrize("failures", [2, 5], ids=["fails-twice", "never-captures"])
def test_a_failed_capture_is_tried_again_at_later_sights_a_bounded_number_of_times(
        captures: list, reference: Mtcnn, monkeypatch: pytest.MonkeyPatch, failures: int) -> None:
    """Another thread's CUDA work can invalidate a capture (seen on an H100 with detection ahead on): the size is
    captured again at its next sights, up to three tries, and answered exactly the data-following way meanwhile;
    one that never captures stops being tried."""
    import engines.mtcnn_torch as module

    real = module.capture_graph
    tries: list = []

    def flaky(fn, example, stream, pool, warmups=2):  # noqa: ANN001, ANN202 - the fixed shapes' captures fail
        if "_capture_static" in fn.__qualname__:
            tries.append(fn)
            if len(tries) <= failures:
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        return real(fn, example, stream, pool, warmups)

    monkeypatch.setattr(module, "capture_graph", flaky)
    detector, image = _graphed(Limits(k1=512, k2=256, k3=64)), read(ASTRONAUT)
    answers = _fixed_shape_answers(detector, image, reference, 6)
    if failures == 2:  # first sight, two failed tries, then captured and replayed
        assert answers == [0, 0, 0, 1, 1, 1] and len(tries) == 3
    else:  # three tries, then never again
        assert answers == [0] * 6 and len(tries) == 3
        assert detector._static_graphs[(*image.shape[:2], 1)] == "failed"


def test_a_chunk_that_will_not_capture_goes_through_as_smaller_chunks_that_do(
        captures: list, reference: Mtcnn, monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture out of memory (four replicas on one H100, 16 frames of the eight-face photo: docs/benchmarks.md
    run 11) fails at every try: once the tries are spent, the size goes through in chunks of half as many frames,
    which capture, instead of leaving the fixed shapes for good."""
    import engines.mtcnn_torch as module

    real = module.capture_graph

    def out_of_memory(fn, example, stream, pool, warmups=2):  # noqa: ANN001, ANN202 - two frames never fit
        if "_capture_static" in fn.__qualname__ and example[0].shape[0] == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 300.00 MiB.")
        return real(fn, example, stream, pool, warmups)

    monkeypatch.setattr(module, "capture_graph", out_of_memory)
    detector, image = _graphed(Limits(k1=512, k2=256, k3=64)), read(ASTRONAUT)
    answered = _fixed_shape_answers(detector, image, reference, 7, frames=2)
    assert answered[-2:] == [2, 2], answered
    assert detector.cascade_counts()["largest_chunks"] == {"x".join(map(str, image.shape[:2])): 1}


def test_after_a_failed_capture_the_next_one_goes_into_a_new_memory_pool(captures: list, reference: Mtcnn,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed capture may leave its memory pool recording, and torch then refuses every capture into that pool
    (torch 2.11 on two H100s: "beginAllocateToPool: already recording to mempool_id"), so the detector's next
    capture must go into a new pool, not the shared one the failure spoiled."""
    import cv2

    import engines.mtcnn_torch as module

    real = module.capture_graph
    pools: list = []

    def failing_once(fn, example, stream, pool, warmups=2):  # noqa: ANN001, ANN202 - the second capture fails
        pools.append(pool)
        if len(pools) == 2:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        return real(fn, example, stream, pool, warmups)

    monkeypatch.setattr(module, "capture_graph", failing_once)
    detector, image = _graphed(Limits(k1=512, k2=256, k3=64)), read(ASTRONAUT)
    smaller = cv2.resize(image, (384, 384))
    assert _fixed_shape_answers(detector, image, reference, 2) == [0, 1]  # captured on its second sight
    assert _fixed_shape_answers(detector, smaller, reference, 3) == [0, 0, 1]  # a failed try, then captured
    # the shared pool, until a capture into it failed; then a new one, shared by the captures after it
    assert pools[:3] == [None, "pool", None] and set(pools[3:]) <= {"pool"}, pools
    assert detector._pool == "pool" and detector._pool_owner is not None  # the new pool is held from then on
