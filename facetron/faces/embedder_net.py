"""dlib's 128-D face recognition ResNet (``anet_type``) in plain PyTorch.

Same layers and arithmetic as dlib (``tools/python/src/face_recognition.cpp``):
input ``(rgb - mean) / 256``; conv 7x7/2 -> affine -> relu -> max-pool 3x3/2;
residual stages of 32, 64, 128, 256, 256 filters; global average pool;
``fc_no_bias`` to 128. "affine" is dlib's frozen batch-norm (per-channel
scale and shift).

One dlib detail matters for parity: a downsampling block adds its 3x3/2 conv
branch to a 2x2/2 average-pooled shortcut, and dlib's ``add_prev`` adds tensors
of different shapes by treating missing elements as zero. The shortcut has
fewer channels, and at 8x8 and 4x4 inputs the pooled shortcut is one pixel
larger than the conv branch (4x4 vs 3x3, 2x2 vs 1x1). The network therefore
only works at the fixed 150x150 input, and those zero-paddings are computed
once from the config.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from facetron.assets import asset_path
from facetron.contract import CHIP_SIZE, EMBEDDING_DIM
from facetron.faces.dlib_dat import (
    ANET_STAGES,
    ANET_STEM_FILTERS,
    DatFormatError,
    DlibNet,
    anet_spec,
    read_dlib_dat,
)


@dataclass(frozen=True)
class DlibResNetConfig:
    """Everything that shapes the network, in one place."""

    input_size: int = CHIP_SIZE
    stem_filters: int = ANET_STEM_FILTERS
    #: (filters, residual blocks, first block downsamples), forward order.
    stages: tuple[tuple[int, int, bool], ...] = ANET_STAGES
    embed_dim: int = EMBEDDING_DIM
    #: dlib's input_rgb_image_sized defaults (the .dat's own values replace them on load).
    input_mean: tuple[float, float, float] = (122.782, 117.001, 104.298)
    input_divisor: float = 256.0


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class Affine(nn.Module):
    """dlib ``affine_`` in conv mode: ``x * gamma[c] + beta[c]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(channels), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class ResidualBlock(nn.Module):
    """dlib ``ares`` / ``ares_down``: relu(block(x) + shortcut(x))."""

    def __init__(self, in_ch: int, out_ch: int, down: bool, in_size: int):
        super().__init__()
        stride = 2 if down else 1
        pad = 0 if down else 1  # dlib's default padding for 3x3 convs
        self.down = down
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=pad)
        self.affine1 = Affine(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1)
        self.affine2 = Affine(out_ch)
        branch = _conv_out(in_size, 3, stride, pad)
        shortcut = _conv_out(in_size, 2, 2, 0) if down else in_size
        self.out_size = max(branch, shortcut)
        # F.pad tuples (last dim first) implementing dlib's zero-extended add.
        self.branch_pad = (0, self.out_size - branch, 0, self.out_size - branch)
        self.shortcut_pad = (0, self.out_size - shortcut, 0, self.out_size - shortcut,
                             0, out_ch - in_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        s = F.avg_pool2d(x, 2, 2) if self.down else x
        if any(self.branch_pad):
            y = F.pad(y, self.branch_pad)
        if any(self.shortcut_pad):
            s = F.pad(s, self.shortcut_pad)
        return F.relu(y + s)


class DlibResNet(nn.Module):
    """dlib's face descriptor network.

    ``forward`` takes float32 (or uint8) RGB ``[N, 3, 150, 150]`` with values in
    0..255 and returns the raw (not normalised) 128-D descriptors, as dlib's
    ``compute_face_descriptor`` does.
    """

    def __init__(self, config: DlibResNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or DlibResNetConfig()
        self.register_buffer("input_mean", torch.tensor(cfg.input_mean).view(1, 3, 1, 1))
        self.stem_conv = nn.Conv2d(3, cfg.stem_filters, 7, stride=2, padding=0)
        self.stem_affine = Affine(cfg.stem_filters)
        size = _conv_out(_conv_out(cfg.input_size, 7, 2, 0), 3, 2, 0)
        blocks: list[ResidualBlock] = []
        ch = cfg.stem_filters
        for filters, n_blocks, down in cfg.stages:
            for i in range(n_blocks):
                block = ResidualBlock(ch, filters, down and i == 0, size)
                blocks.append(block)
                ch, size = filters, block.out_size
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(ch, cfg.embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.config.input_size
        if not torch.jit.is_tracing() and tuple(x.shape[1:]) != (3, size, size):
            raise ValueError(f"expected [N, 3, {size}, {size}] RGB, got {list(x.shape)}")
        x = (x.float() - self.input_mean) / self.config.input_divisor
        x = F.relu(self.stem_affine(self.stem_conv(x)))
        x = F.max_pool2d(x, 3, 2)
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))

    def _weighted_layers(self) -> list[nn.Module]:
        """Conv / Affine / Linear modules in dlib's forward order."""
        out: list[nn.Module] = [self.stem_conv, self.stem_affine]
        for b in self.blocks:
            out += [b.conv1, b.affine1, b.conv2, b.affine2]
        return out + [self.fc]

    @torch.no_grad()
    def load_dlib(self, net: DlibNet) -> "DlibResNet":
        """Copy weights parsed by :func:`read_dlib_dat` into this module."""
        off = [i for i, layer in enumerate(net.layers) if layer.attrs.get("disabled")]
        if off:
            raise DatFormatError(f"{net.path}: layers {off} are disabled; this port runs every layer")
        src = [layer for layer in net.layers if layer.kind in ("con", "affine", "fc")]
        dst = self._weighted_layers()
        if len(src) != len(dst):
            raise DatFormatError(f"{net.path}: expected {len(dst)} weighted layers, found {len(src)}")
        for i, (layer, mod) in enumerate(zip(src, dst)):
            if not isinstance(mod, _MODULE_OF[layer.kind]):
                raise DatFormatError(f"{net.path}: weighted layer {i} is {layer.kind}, "
                                     f"the network expects {type(mod).__name__}")
            for src_name, dst_name in _PARAM_NAMES[layer.kind]:
                if src_name not in layer.arrays:
                    raise DatFormatError(f"{net.path}: weighted layer {i} ({layer.kind}) has no {src_name}")
                arr = torch.from_numpy(layer.arrays[src_name])
                if layer.kind == "fc":
                    arr = arr.T  # dlib stores fc weights as [in, out] and computes x @ W
                param = getattr(mod, dst_name)
                if tuple(param.shape) != tuple(arr.shape):
                    raise DatFormatError(
                        f"{net.path}: weighted layer {i} ({layer.kind}.{src_name}) has shape "
                        f"{tuple(arr.shape)}, the network expects {tuple(param.shape)}")
                param.copy_(arr)
        input_layer = net.layers[0]
        self.input_mean.copy_(torch.tensor(input_layer.attrs["avg_rgb"]).view(1, 3, 1, 1))
        return self


# dlib layer kind -> torch module type, and its (dlib array, torch parameter) name pairs
_MODULE_OF = {"con": nn.Conv2d, "affine": Affine, "fc": nn.Linear}
_PARAM_NAMES = {"con": (("weight", "weight"), ("bias", "bias")),
                "affine": (("gamma", "weight"), ("beta", "bias")),
                "fc": (("weight", "weight"),)}


def load_dlib_resnet(path: str | os.PathLike | None = None,
                     config: DlibResNetConfig | None = None) -> DlibResNet:
    """Build :class:`DlibResNet` in eval mode with weights read from dlib's ``.dat``."""
    if path is None:

        path = asset_path("dlib_resnet")
    cfg = config or DlibResNetConfig()
    net = read_dlib_dat(path, anet_spec(cfg.stages))
    return DlibResNet(cfg).load_dlib(net).eval()


class _OnnxWrapper(nn.Module):
    """uint8 NHWC chips -> (raw descriptors, L2-normalised embeddings)."""

    def __init__(self, net: DlibResNet):
        super().__init__()
        self.net = net

    def forward(self, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = faces.permute(0, 3, 1, 2).float()
        desc = self.net(x)
        emb = desc / desc.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return desc, emb


def export_embedder_onnx(path: str | os.PathLike, opset: int = 17,
                         net: DlibResNet | None = None) -> Path:
    """Export to ONNX: input ``faces`` UINT8 ``[N,150,150,3]`` (RGB), outputs
    ``descriptors`` and ``embeddings`` FP32 ``[N,128]``; dynamic batch.

    Written to a temporary file beside ``path`` and renamed, so readers never
    see a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = net if net is not None else load_dlib_resnet()
    size = net.config.input_size
    wrapper = _OnnxWrapper(net).eval()
    dummy = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter warns about its own Pad lowering; harmless here.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*[Cc]onstant folding.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(
                wrapper, (dummy,), tmp, dynamo=False, opset_version=opset,
                input_names=["faces"], output_names=["descriptors", "embeddings"],
                dynamic_axes={"faces": {0: "batch"}, "descriptors": {0: "batch"},
                              "embeddings": {0: "batch"}},
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
