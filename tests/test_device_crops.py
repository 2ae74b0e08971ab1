"""The GPU-resident image path's pieces, on whatever device torch has here (the CPU in CI, CUDA on the GPU
machine): crops cut on the device equal the host's, images decoded for the device equal the host's decode, and
the detector's working-size scaling on the device equals OpenCV's."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engines.device_crops import crop_resize_device, crop_resize_device_many, crop_resize_device_specs  # noqa: E402
from engines.device_image import DeviceDecoder, fit_side_tensor, orient_tensor  # noqa: E402
from engines.image import decode_bgr, fit_side, orient  # noqa: E402
from engines.preprocess import CropSpec, crop_resize, cut_crops_many, cut_crops_specs  # noqa: E402
from tests.images import collage, phone_photo  # noqa: E402

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
SPECS = [CropSpec(64, 64), CropSpec(32, 32), CropSpec(224, 224, square=False), CropSpec(64, 48, keep_aspect=True,
         square=False), CropSpec(64, 64, padding=0.3)]


def _boxes(frame: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Boxes of every kind: tiny (crops that grow), large (that shrink), one axis each way, half outside the frame,
    wholly outside it."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-60, 60, (count, 2)) + rng.uniform(0, 1, (count, 2)) * frame.shape[1::-1]
    sides = rng.uniform(2, 420, (count, 2))
    boxes = np.concatenate([centres - sides / 2, centres + sides / 2], 1).astype(np.float32)
    boxes[0] = [-300, -300, -200, -200]  # nothing of it inside the frame
    return boxes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.width}x{s.height}{'sq' if s.square else ''}"
                         f"{'-letterbox' if s.keep_aspect else ''}{'-pad' if s.padding else ''}")
def test_device_crops_are_the_hosts(device: str, spec: CropSpec) -> None:
    """Every pixel within one level of OpenCV's (its fixed-point arithmetic against float here)."""
    frame = collage()
    boxes = _boxes(frame, 32, seed=spec.width + spec.height)  # every kind of box; more only costs CI time
    host = crop_resize(frame, boxes, spec).astype(int)
    cut = crop_resize_device(torch.from_numpy(frame).to(device), boxes, spec)
    assert cut.device.type == device and cut.dtype == torch.uint8
    assert np.abs(cut.cpu().numpy().astype(int) - host).max() <= 1
    assert not cut[0].any()  # the box outside the frame is black


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[2], SPECS[3]], ids=["64sq", "224", "letterbox"])
def test_crops_of_many_frames_cut_together_are_each_frames_own(device: str, spec: CropSpec) -> None:
    """Frames of different sizes, one without objects, one whose only box is outside it, cut in one pass: each
    frame's crops, in order, exactly as cut frame by frame on the device, and within one level of OpenCV's."""
    base = collage()
    frames = [base, cv2.resize(base, (700, 300), interpolation=cv2.INTER_AREA), base[:200, :333].copy(),
              cv2.resize(base, (1500, 640), interpolation=cv2.INTER_LINEAR), base]
    boxes = [_boxes(frames[0], 12, 1), _boxes(frames[1], 9, 2), np.zeros((0, 4), np.float32),
             np.array([[-90, -90, -10, -10]], np.float32), _boxes(frames[4], 7, 3)]
    on_device = [torch.from_numpy(f).to(device) for f in frames]
    together = cut_crops_many(on_device, boxes, spec)
    one_by_one = torch.cat([crop_resize_device(f, b, spec) for f, b in zip(on_device, boxes)])
    assert together.device.type == device and tuple(together.shape) == (29, spec.height, spec.width, 3)
    assert torch.equal(together, one_by_one)
    host = cut_crops_many(frames, boxes, spec).astype(int)
    assert np.abs(together.cpu().numpy().astype(int) - host).max() <= 1


@pytest.mark.parametrize("device", DEVICES)
def test_every_geometry_cut_in_one_pass_is_each_geometrys_own(device: str) -> None:
    """The classifiers' geometries of a batch cut together on the largest one's canvas (the device pass cuts
    them so): each geometry's crops exactly as cut alone, in its own size, on frames of different sizes, a frame
    wanting no crop of some geometry and one wanting none at all; and the host's for the same call."""
    base = collage()
    frames = [base, cv2.resize(base, (700, 300), interpolation=cv2.INTER_AREA), base[:200, :333].copy()]
    on_device = [torch.from_numpy(f).to(device) for f in frames]
    none = np.zeros((0, 4), np.float32)
    boxes = [[_boxes(frames[0], 6, 10 + k), _boxes(frames[1], 4, 20 + k) if k % 2 else none, none]
             for k in range(len(SPECS))]
    together = crop_resize_device_specs(on_device, boxes, SPECS)
    host = cut_crops_specs(frames, boxes, SPECS)
    for spec, mine, on_host, xyxys in zip(SPECS, together, host, boxes):
        alone = crop_resize_device_many(on_device, xyxys, spec)
        assert mine.is_contiguous() and tuple(mine.shape) == (sum(map(len, xyxys)), spec.height, spec.width, 3)
        assert torch.equal(mine, alone)
        assert np.abs(mine.cpu().numpy().astype(int) - on_host.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="2 crop specs but 1"):
        crop_resize_device_specs(on_device, boxes[:1], SPECS[:2])


def test_crops_of_frames_without_objects_are_empty() -> None:
    frames = [torch.from_numpy(collage())] * 2
    cut = crop_resize_device_many(frames, [np.zeros((0, 4), np.float32)] * 2, CropSpec(64, 64))
    assert tuple(cut.shape) == (0, 64, 64, 3)
    with pytest.raises(ValueError, match="2 frames but 1"):
        crop_resize_device_many(frames, [np.zeros((0, 4), np.float32)], CropSpec(64, 64))


def test_device_crops_of_no_objects_are_empty() -> None:
    cut = crop_resize_device(torch.from_numpy(collage()), np.zeros((0, 4), np.float32), CropSpec(64, 64))
    assert tuple(cut.shape) == (0, 64, 64, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_the_working_side_scaled_on_the_device_is_opencvs(device: str) -> None:
    frame = cv2.resize(collage(), (3072, 1024), interpolation=cv2.INTER_LINEAR)
    host, host_scale = fit_side(frame, 1280)
    scaled, scale = fit_side_tensor(torch.from_numpy(frame).to(device), 1280)
    assert scale == host_scale and tuple(scaled.shape) == host.shape
    assert np.abs(scaled.cpu().numpy().astype(int) - host.astype(int)).max() <= 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_on_the_device_is_the_hosts(device: str, orientation: int) -> None:
    frame = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    turned = orient_tensor(torch.from_numpy(frame).to(device), orientation)
    assert np.array_equal(turned.cpu().numpy(), orient(frame, orientation))


@pytest.mark.parametrize("device", DEVICES)
def test_images_decoded_for_the_device_are_the_hosts_decode(device: str) -> None:
    """PNG, WebP and TIFF through OpenCV and one upload, JPEG through nvJPEG on CUDA (another decoder: within a
    few levels), each turned as its orientation says; undecodable bytes give None."""
    decoder = DeviceDecoder(device)
    image = collage()
    images = [phone_photo(image, 6), phone_photo(image, 3, "PNG"), phone_photo(image, 8, "WEBP"),
              cv2.imencode(".tiff", image)[1].tobytes(), b"\xff\xd8\xff\xe0 not a jpeg at all"]
    frames = decoder.decode_many(images)
    assert frames[-1] is None
    for data, frame in zip(images[:-1], frames[:-1]):
        host = decode_bgr(data)
        assert frame.device.type == device and tuple(frame.shape) == host.shape
        jpeg_on_gpu = data[:2] == b"\xff\xd8" and decoder.decodes_jpeg_on_device
        difference = np.abs(frame.cpu().numpy().astype(int) - host.astype(int))
        assert difference.mean() < (1.0 if jpeg_on_gpu else 1e-9) and difference.max() <= (48 if jpeg_on_gpu else 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["alike", "one-large"])
def test_the_area_tables_of_many_frames_in_one_block_or_each_alone_give_the_same_crops(device: str,
                                                                                         layout: str) -> None:
    """A batch of requests: sixteen frames, a face-sized box each at its own place, summed in one block of
    tables (`alike`); or one frame whose boxes span it among small ones, where one block would take over twice
    the memory and each frame's table is its own (`one-large`). Either way each frame's crops are those it gets
    alone, within one level of OpenCV's."""
    import engines.device_crops as device_crops

    base = collage()
    rng = np.random.default_rng(7)
    frames = [np.roll(base, int(rng.integers(0, 900)), axis=1) for _ in range(16)]
    corners = rng.uniform(0, 400, (16, 2))
    boxes = [np.array([[x, y, x + 90, y + 110]], np.float32) for x, y in corners]
    if layout == "one-large":
        boxes[3] = np.array([[5, 5, 500, 500], [1000, 10, 1530, 505]], np.float32)
    planned: list[object] = []
    area_plan = device_crops._area_plan
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(device_crops, "_area_plan", lambda *a: planned.append(area_plan(*a)) or planned[-1])
        on_device = [torch.from_numpy(f).to(device) for f in frames]
        together = cut_crops_many(on_device, boxes, CropSpec(64, 64))
    assert (planned[0].padded is not None) == (layout == "alike")  # type: ignore[attr-defined]
    one_by_one = torch.cat([crop_resize_device(f, b, CropSpec(64, 64)) for f, b in zip(on_device, boxes)])
    assert torch.equal(together, one_by_one)
    host = cut_crops_many(frames, boxes, CropSpec(64, 64)).astype(int)
    assert np.abs(together.cpu().numpy().astype(int) - host).max() <= 1
