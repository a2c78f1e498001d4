"""MTCNN's three networks (P-, R-, O-net) as plain PyTorch modules, and their ONNX export.

The parameter names match facenet-pytorch's modules, so the state dicts that
ship in its wheel (``facenet_pytorch/data/{pnet,rnet,onet}.pt``, MIT) load
directly. facenet-pytorch itself is never imported (it pulls in torchvision).

All nets take float32 NCHW RGB input normalised the MTCNN way,
``(pixel - 127.5) / 128``. Outputs keep facenet-pytorch's order:

- PNet: ``offsets [N,4,h,w]``, ``probs [N,2,h,w]`` (fully convolutional, 12 px
  receptive field, stride 2);
- RNet (24x24 input): ``offsets [N,4]``, ``probs [N,2]``;
- ONet (48x48 input): ``offsets [N,4]``, ``landmarks [N,10]`` (5 x then 5 y,
  relative to the box), ``probs [N,2]``.

``probs[:, 1]`` is the face probability.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from facetron.assets import asset_path

ONNX_INPUT = "images"
ONNX_OUTPUTS: dict[str, tuple[str, ...]] = {
    "pnet": ("offsets", "probs"),
    "rnet": ("offsets", "probs"),
    "onet": ("offsets", "landmarks", "probs"),
}


def _conv_prelu(cin: int, cout: int, k: int) -> tuple[nn.Conv2d, nn.PReLU]:
    return nn.Conv2d(cin, cout, kernel_size=k), nn.PReLU(cout)


class PNet(nn.Module):
    """Proposal net: fully convolutional face/box-offset map over a pyramid level."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = _conv_prelu(3, 10, 3)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _conv_prelu(10, 16, 3)
        self.conv3, self.prelu3 = _conv_prelu(16, 32, 3)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


def _flatten_whc(x: torch.Tensor) -> torch.Tensor:
    # The weights come from Caffe/TF via facenet-pytorch, whose dense layers
    # expect the feature map flattened in (W, H, C) order.
    return x.permute(0, 3, 2, 1).flatten(1)


class RNet(nn.Module):
    """Refinement net: 24x24 crops -> face prob + box offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = _conv_prelu(3, 28, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _conv_prelu(28, 48, 3)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = _conv_prelu(48, 64, 2)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_flatten_whc(x)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output net: 48x48 crops -> face prob, box offsets, 5 landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = _conv_prelu(3, 32, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _conv_prelu(32, 64, 3)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = _conv_prelu(64, 64, 3)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = _conv_prelu(64, 128, 2)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_flatten_whc(x)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


def mtcnn_weight_paths() -> dict[str, Path]:
    """The three state-dict files shipped in the facenet-pytorch wheel."""
    return {name: asset_path(f"mtcnn_{name}") for name in ("pnet", "rnet", "onet")}


def load_mtcnn_nets() -> tuple[PNet, RNet, ONet]:
    """P/R/O-nets with the facenet-pytorch weights, in eval mode."""
    paths = mtcnn_weight_paths()
    nets = (PNet(), RNet(), ONet())
    for name, net in zip(("pnet", "rnet", "onet"), nets):
        state = torch.load(paths[name], map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        net.eval()
        net.requires_grad_(False)
    return nets


def _export_one(
    net: nn.Module, name: str, dummy: torch.Tensor, dynamic: dict[int, str], path: Path, opset: int
) -> None:
    outputs = ONNX_OUTPUTS[name]
    dynamic_axes = {ONNX_INPUT: dynamic}
    dynamic_axes.update({out: {0: "batch"} for out in outputs})
    if name == "pnet":  # spatial output maps follow the input size
        dynamic_axes.update({out: {0: "batch", 2: "out_height", 3: "out_width"} for out in outputs})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is chosen on purpose (dynamo=False): it
            # handles these small static-graph nets and dynamic axes directly.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                net,
                (dummy,),
                tmp,
                input_names=[ONNX_INPUT],
                output_names=list(outputs),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                dynamo=False,
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_mtcnn_onnx(out_dir: str | os.PathLike, opset: int = 17) -> dict[str, Path]:
    """Export pnet.onnx (dynamic batch/height/width), rnet.onnx, onet.onnx (dynamic batch).

    Input ``images``: float32 NCHW, already normalised ``(x - 127.5) / 128``.
    Each file is written to a temp file and renamed, so readers never see a
    partial model. Returns ``{"pnet": path, "rnet": path, "onet": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pnet, rnet, onet = load_mtcnn_nets()
    specs = {
        "pnet": (pnet, torch.zeros(1, 3, 37, 53), {0: "batch", 2: "height", 3: "width"}),
        "rnet": (rnet, torch.zeros(2, 3, 24, 24), {0: "batch"}),
        "onet": (onet, torch.zeros(2, 3, 48, 48), {0: "batch"}),
    }
    paths: dict[str, Path] = {}
    with torch.no_grad():
        for name, (net, dummy, dynamic) in specs.items():
            paths[name] = out / f"{name}.onnx"
            _export_one(net, name, dummy, dynamic, paths[name], opset)
    return paths
