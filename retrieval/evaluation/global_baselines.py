"""Global-descriptor baselines (seeds 002 and 004) on one pretrained backbone tap.

Pooling functions are pure: a feature map ``(B, C, H, W)`` → ``(B, C)`` L2-normalised
descriptor. :class:`GlobalDescriptorMethod` pools the same tap (EfficientNet-Lite0 c5,
320 channels, stride 32, by default) of every gallery image and of the query patch and
ranks by cosine similarity. The tap is passed through a ReLU first: EfficientNet's block
outputs are linear bottlenecks with negative values, while these poolings were designed
for ReLU conv maps (on raw c5, R-MAC's regional maxima lose ~.08 mAP on tracking_dev).
No PCA-whitening is applied: the published versions learn it on a separate landmark set,
and these baselines measure the untrained pooling alone.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch import nn

from retrieval.backbones import build_backbone
from retrieval.images import resize_max_side, size_batches, to_tensor

EPS = 1e-6
Region = tuple[int, int, int, int]  # x0, y0, x1, y1 in feature cells, x1/y1 exclusive


def l2n(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """L2-normalise ``x`` along ``dim`` (any shape); zero vectors stay zero."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(EPS)


def mac(x: torch.Tensor) -> torch.Tensor:
    """Max of each channel over space. ``(B, C, H, W)`` → ``(B, C)``."""
    return l2n(x.amax(dim=(2, 3)))


def center_prior(h: int, w: int) -> torch.Tensor:
    """SPoC's centring weights ``(H, W)``: a Gaussian at the map centre whose σ is a third
    of the distance from the centre to the closest border (Babenko & Lempitsky 2015)."""
    sigma = min(h, w) / 2.0 / 3.0
    ys = torch.arange(h, dtype=torch.float32) + 0.5 - h / 2.0
    xs = torch.arange(w, dtype=torch.float32) + 0.5 - w / 2.0
    d2 = ys[:, None] ** 2 + xs[None, :] ** 2
    return torch.exp(-d2 / (2.0 * sigma**2))


def spoc(x: torch.Tensor) -> torch.Tensor:
    """Centre-weighted sum over space. ``(B, C, H, W)`` → ``(B, C)``."""
    weights = center_prior(x.shape[2], x.shape[3]).to(x)
    return l2n((x * weights).sum(dim=(2, 3)))


def gem(x: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """Generalised mean ``(mean x^p)^(1/p)`` over space, activations clamped at ε
    (p = 1 is average pooling, p → ∞ max pooling). ``(B, C, H, W)`` → ``(B, C)``."""
    return l2n(x.clamp_min(EPS).pow(p).mean(dim=(2, 3)).pow(1.0 / p))


def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4) -> list[Region]:
    """R-MAC's square regions on an ``h × w`` map (Tolias et al. 2016, as in cirtorch).

    Level ``l`` uses squares of side ``⌊2·min(h, w)/(l+1)⌋`` cells laid uniformly, with one
    extra step along the long side chosen so consecutive level-1 squares overlap by about
    ``overlap``. Level 1 alone covers the whole map. Boxes are ``(x0, y0, x1, y1)`` cells.
    """
    side = min(h, w)
    extra_w = extra_h = 0
    if h != w:
        steps = torch.arange(2, 8, dtype=torch.float64)
        b = (max(h, w) - side) / (steps - 1)
        extra = int(torch.argmin(torch.abs((side**2 - side * b) / side**2 - overlap))) + 1
        extra_w, extra_h = (extra, 0) if h < w else (0, extra)
    regions: list[Region] = []
    for level in range(1, levels + 1):
        wl = math.floor(2 * side / (level + 1))
        if wl == 0:
            continue
        half = math.floor(wl / 2 - 1)

        def starts(n_extra: int, length: int) -> list[int]:
            n = level + n_extra
            step = 0.0 if n == 1 else (length - wl) / (n - 1)
            return [int(math.floor(half + i * step) - half) for i in range(n)]

        for y0 in starts(extra_h, h):
            for x0 in starts(extra_w, w):
                regions.append((x0, y0, x0 + wl, y0 + wl))
    return regions


def regional_mac(x: torch.Tensor, regions: Sequence[Region]) -> torch.Tensor:
    """MAC of each region. ``(B, C, H, W)`` → ``(B, R, C)``, each row L2-normalised."""
    return torch.stack([mac(x[:, :, y0:y1, x0:x1]) for x0, y0, x1, y1 in regions], dim=1)


def rmac(x: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """Sum of the regional MACs, L2-normalised. ``(B, C, H, W)`` → ``(B, C)``."""
    return l2n(regional_mac(x, rmac_regions(x.shape[2], x.shape[3], levels)).sum(dim=1))


def crow(x: torch.Tensor, a: float = 2.0, b: float = 2.0) -> torch.Tensor:
    """Cross-dimensional weighting (Kalantidis et al. 2016) of ReLU activations.

    Spatial weight: the channel sum ``S`` normalised as ``(S / ‖S‖_a)^(1/b)``; channel
    weight: ``log(Σ_j Q_j / (ε + Q_k))`` with ``Q_k`` the fraction of non-zero positions
    of channel ``k``, so rare channels count more. ``(B, C, H, W)`` → ``(B, C)``.
    """
    x = x.clamp_min(0.0)
    s = x.sum(dim=1)  # (B, H, W)
    norm = s.pow(a).sum(dim=(1, 2), keepdim=True).pow(1.0 / a).clamp_min(EPS)
    spatial = (s / norm).pow(1.0 / b)
    q = (x > 0).float().mean(dim=(2, 3))  # (B, C)
    channel = torch.log(q.sum(dim=1, keepdim=True).clamp_min(EPS) / (EPS + q))
    return l2n(channel * (x * spatial[:, None]).sum(dim=(2, 3)))


def cgd(x: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """CGD-style combination: SPoC ⊕ MAC ⊕ GeM, each L2-normalised, concatenated and
    renormalised, so the cosine is the mean of the three cosines. ``(B, C, H, W)`` → ``(B, 3C)``."""
    return l2n(torch.cat([spoc(x), mac(x), gem(x, p)], dim=1))


POOLINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mac": mac, "spoc": spoc, "gem": gem, "rmac": rmac, "crow": crow, "cgd": cgd,
}


def place_backbone(backbone: nn.Module | None, device: str | torch.device | None) -> tuple[nn.Module, torch.device]:
    """The backbone to use and its device: a new EfficientNet-Lite0 when none is given;
    ``device=None`` leaves a shared backbone where its owner put it."""
    backbone = backbone if backbone is not None else build_backbone("efficientnet-lite0")
    if device is None:
        return backbone, next(backbone.parameters()).device
    return backbone.to(device), torch.device(device)


def prepare_query_patch(query: Image.Image, max_side: int, min_side: int) -> Image.Image:
    """The already-cropped query as searched: long side capped at ``max_side``; a patch
    whose short side is below ``min_side`` is enlarged to it, because EfficientNet's
    fixed padding rejects inputs under 32 px and a stride-32 map needs at least one cell."""
    img, _ = resize_max_side(query.convert("RGB"), max_side)
    if min(img.size) < min_side:
        f = min_side / min(img.size)
        img = img.resize((max(min_side, round(img.width * f)), max(min_side, round(img.height * f))),
                         Image.BICUBIC)
    return img


def batches_by_size(images: Sequence[Image.Image], batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Group same-size images into ``(indices, (B, 3, H, W) in [0, 1])`` batches."""
    for chunk in size_batches([img.size for img in images], batch_size):
        yield chunk, torch.stack([to_tensor(images[i]) for i in chunk])


def best_regions(regions: torch.Tensor, valid: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best region of every image for one query.

    regions ``(N, R, D)`` L2 descriptors (padded), valid ``(N, R)`` bool, query ``(D,)`` →
    (scores ``(N,)``: the max cosine, index ``(N,)`` of the region that reaches it).
    """
    sims = (regions @ query).masked_fill(~valid, -math.inf)
    return sims.max(dim=1)


def pad_regions(per_image: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-image region descriptors ``(R_i, D)`` into ``(N, R_max, D)`` (zero-padded)
    and the ``(N, R_max)`` bool mask of real regions."""
    n, r_max, d = len(per_image), max(len(r) for r in per_image), per_image[0].shape[1]
    regions, valid = torch.zeros(n, r_max, d), torch.zeros(n, r_max, dtype=torch.bool)
    for i, r in enumerate(per_image):
        regions[i, : len(r)] = r
        valid[i, : len(r)] = True
    return regions, valid


def cells_to_pixels(region: Region, map_hw: Sequence[int], image_wh: tuple[int, int],
                    scale: float) -> list[float]:
    """A cell box on an ``(h, w)`` map of a resized image → ``[x0, y0, x1, y1]`` in the
    stored image's pixels (``scale`` = resized px per stored px). Cells are spread evenly
    over the image, whatever padding made the map round up or down."""
    (x0, y0, x1, y1), (h, w), (iw, ih) = region, map_hw, image_wh
    sx, sy = iw / w / scale, ih / h / scale
    return [x0 * sx, y0 * sy, x1 * sx, y1 * sy]


class GlobalDescriptorMethod:
    """One pooled descriptor per image, cosine ranking; R-MAC also keeps its regional MACs
    so that the region closest to the query is returned as the box (others: whole image)."""

    def __init__(self, pooling: str = "gem", tap: str = "c5", backbone: nn.Module | None = None,
                 max_side: int = 640, min_query_side: int = 32, batch_size: int = 8,
                 rmac_levels: int = 3, relu: bool = True, device: str | None = None) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling '{pooling}'; choose one of {', '.join(POOLINGS)}")
        self.name = pooling
        self.pooling, self.tap, self.rmac_levels, self.relu = pooling, tap, rmac_levels, relu
        self.max_side, self.min_query_side, self.batch_size = max_side, min_query_side, batch_size
        self.backbone, self.device = place_backbone(backbone, device)
        self.config = {"pooling": pooling, "tap": tap, "max_side": max_side, "min_query_side": min_query_side,
                       "rmac_levels": rmac_levels, "relu": relu}

    def _pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → ``(B, D)``."""
        if self.pooling == "rmac":
            return rmac(fmap, self.rmac_levels)
        return POOLINGS[self.pooling](fmap)

    @torch.no_grad()
    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone(batch.to(self.device))[self.tap].float().cpu()
        return fmap.clamp_min(0.0) if self.relu else fmap

    def index(self, gallery: list[tuple[str, Image.Image]]) -> dict:
        start = time.perf_counter()
        self.ids = [gid for gid, _ in gallery]
        resized = [resize_max_side(img.convert("RGB"), self.max_side) for _, img in gallery]
        images = [img for img, _ in resized]
        self.sizes = [img.size for _, img in gallery]
        descriptors: list[torch.Tensor] = [torch.zeros(0)] * len(gallery)
        region_desc: list[torch.Tensor] = [torch.zeros(0)] * len(gallery)
        self.region_boxes: list[list[list[float]]] = [[] for _ in gallery]
        for idx, batch in batches_by_size(images, self.batch_size):
            fmap = self._features(batch)
            if self.pooling == "rmac":
                regions = rmac_regions(fmap.shape[2], fmap.shape[3], self.rmac_levels)
                per_region = regional_mac(fmap, regions)
                pooled = l2n(per_region.sum(dim=1))
            else:
                pooled = self._pool(fmap)
            for j, i in enumerate(idx):
                descriptors[i] = pooled[j]
                if self.pooling == "rmac":
                    region_desc[i] = per_region[j]
                    self.region_boxes[i] = [cells_to_pixels(r, fmap.shape[2:], images[i].size, resized[i][1])
                                            for r in regions]
        self.descriptors = torch.stack(descriptors)  # (N, D)
        n_bytes = self.descriptors.numel() * 4
        if self.pooling == "rmac":
            self.regions, self.valid = pad_regions(region_desc)
            n_bytes += int(self.valid.sum()) * (self.descriptors.shape[1] + 4) * 4  # descriptor + box
        return {"seconds": time.perf_counter() - start, "bytes_per_image": n_bytes / max(1, len(gallery))}

    def search(self, query: Image.Image) -> tuple[list[dict], dict]:
        patch = prepare_query_patch(query, self.max_side, self.min_query_side)
        q = self._pool(self._features(to_tensor(patch)[None]))[0]
        scores = self.descriptors @ q
        if self.pooling == "rmac":
            _, best = best_regions(self.regions, self.valid, q)
            boxes = [self.region_boxes[i][int(best[i])] for i in range(len(self.ids))]
        else:
            boxes = [[0.0, 0.0, float(w), float(h)] for w, h in self.sizes]
        order = torch.argsort(scores, descending=True).tolist()
        return [{"id": self.ids[i], "score": float(scores[i]), "box": boxes[i]} for i in order], {}
