"""The network: frozen backbone → FPN (P3/P4/P5) → φ (query) / ψ (gallery) → descriptor head, box refiner.

The learnable parts (FPN, φ, ψ, GeM p, MLP, fusion α and γ, box refiner) are initialised so
that an untrained model already matches with the pretrained features: the FPN passes each
backbone tap through (identity where channels allow, an orthogonal projection
otherwise) with the top-down path scaled down, φ and ψ start as identities, the
MLP as a residual block whose output layer is zero, and the box refiner predicts no change.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from .backbones import build_backbone
from .box_refinement import BoxRefiner
from .config import RetrievalConfig
from .regions import gem

LEVEL_STRIDES = {"p3": 8, "p4": 16, "p5": 32}
_TAP_OF_LEVEL = {"p3": "c3", "p4": "c4", "p5": "c5"}
# Top-down contributions start this much weaker per level, so each P^l first carries its own tap.
TOP_DOWN_DAMPING = 0.05


class DescriptorHead(nn.Module):
    """z = L2(MLP(GeM(features))): ``(N, C, *S)`` → ``(N, C)``; residual MLP that starts as identity."""

    def __init__(self, channels: int, hidden: int, p: float) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` pooled features → ``(N, C)`` L2-normalised descriptors."""
        x = pooled + self.fc2(F.relu(self.fc1(pooled)))
        return F.normalize(x, dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.embed(gem(features, self.gem_p))

    @property
    def gem_p(self) -> torch.Tensor:
        return self.p.clamp(1.0, 8.0)


def _identity_conv_(conv: nn.Conv2d) -> None:
    """1×1 (or k×k centre-tap) identity on the shared channels, zero elsewhere."""
    with torch.no_grad():
        conv.weight.zero_()
        kh, kw = conv.weight.shape[-2:]
        n = min(conv.in_channels, conv.out_channels)
        conv.weight[torch.arange(n), torch.arange(n), kh // 2, kw // 2] = 1.0
        if conv.bias is not None:
            conv.bias.zero_()


def _passthrough_fpn_(fpn: FeaturePyramidNetwork, in_channels: list[int], out_channels: int) -> None:
    for depth, (inner, layer) in enumerate(zip(fpn.inner_blocks, fpn.layer_blocks)):
        lateral = inner[0]
        if in_channels[depth] <= out_channels:
            _identity_conv_(lateral)
        else:
            with torch.no_grad():
                nn.init.orthogonal_(lateral.weight.view(out_channels, -1))
                lateral.bias.zero_()
        with torch.no_grad():
            lateral.weight.mul_(TOP_DOWN_DAMPING ** depth)
        _identity_conv_(layer[0])


class RetrievalModel(nn.Module):
    """Backbone + FPN + φ/ψ + descriptor head + fusion parameters.

    ``pyramid``/``encode_gallery``/``encode_query`` take RGB batches ``(B, 3, H, W)`` in [0, 1].
    """

    def __init__(self, config: RetrievalConfig | None = None, backbone: nn.Module | None = None) -> None:
        super().__init__()
        # the untrained heads hold random draws (orthogonal P4/P5 laterals, the MLP's first
        # layer): fixed here, so that the untrained model is the same in every process (an
        # index built by one is searched by another) whatever the caller's RNG state
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self._build(config, backbone)

    def _build(self, config: RetrievalConfig | None, backbone: nn.Module | None) -> None:
        self.config = config or RetrievalConfig()
        cfg = self.config
        self.levels = tuple(cfg.levels)
        self.backbone = backbone if backbone is not None else build_backbone(cfg.backbone)
        in_channels = [self.backbone.channels[_TAP_OF_LEVEL[l]] for l in self.levels]
        self.fpn = FeaturePyramidNetwork(in_channels, cfg.fpn_channels)
        _passthrough_fpn_(self.fpn, in_channels, cfg.fpn_channels)
        self.phi = nn.Conv2d(cfg.fpn_channels, cfg.fpn_channels, 1)
        self.psi = nn.Conv2d(cfg.fpn_channels, cfg.fpn_channels, 1)
        _identity_conv_(self.phi)
        _identity_conv_(self.psi)
        self.head = DescriptorHead(cfg.fpn_channels, cfg.mlp_hidden, cfg.gem_p)
        self.alpha_logits = nn.Parameter(torch.tensor([float(a) for a in cfg.alpha_init][: len(self.levels)]))
        self.log_gamma = nn.Parameter(torch.tensor(float(cfg.gamma)).log())
        # built last, so the untrained heads above draw the same random values as before it existed
        self.box_refiner = BoxRefiner(cfg.refine_grid)

    # ---- parameters of eq. 4 ------------------------------------------------
    @property
    def alpha(self) -> torch.Tensor:
        """``(L,)`` level weights, positive and summing to 1."""
        return torch.softmax(self.alpha_logits, dim=0)

    @property
    def gamma(self) -> torch.Tensor:
        return self.log_gamma.exp()

    @property
    def strides(self) -> dict[str, int]:
        return {l: LEVEL_STRIDES[l] for l in self.levels}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the (frozen, pretrained) backbone: what a checkpoint stores."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def train(self, mode: bool = True) -> "RetrievalModel":
        super().train(mode)
        self.backbone.eval()  # BatchNorm statistics of the pretrained net stay fixed
        return self

    # ---- encoders -----------------------------------------------------------
    def pyramid(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` → ``{"p3": (B, C, ⌈H/8⌉, ⌈W/8⌉), "p4": …/16, "p5": …/32}``."""
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.backbone.parameters())
        with torch.set_grad_enabled(grad):
            taps = self.backbone(images)
        feats = OrderedDict((l, taps[_TAP_OF_LEVEL[l]]) for l in self.levels)
        return dict(self.fpn(feats))

    def encode_gallery(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """ψ(P^l) for every level: ``(B, 3, H, W)`` → ``{level: (B, C, H_l, W_l)}``."""
        return {l: self.psi(x) for l, x in self.pyramid(images).items()}

    def encode_query(self, patch: torch.Tensor) -> dict[str, torch.Tensor]:
        """φ(Z^l) for every level: ``(B, 3, h, w)`` → ``{level: (B, C, h_l, w_l)}``."""
        return {l: self.phi(x) for l, x in self.pyramid(patch).items()}

    def describe(self, features: torch.Tensor) -> torch.Tensor:
        """Global descriptor of whole maps: ``(N, C, H, W)`` → ``(N, C)`` L2-normalised."""
        return self.head(features)
