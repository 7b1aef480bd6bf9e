"""DASR-style baseline (seed 003, Xiao, Zhao et al., TOMM 2022), untrained.

Salient regions of each gallery image come from activation peaks of the pretrained
backbone: the channel sum of a ReLU'd tap, above its median, is a saliency map; its
local maxima are candidate instances, and each peak gives one box per relative threshold τ — the
bounding box of the connected blob around the peak where saliency ≥ τ·peak — so a
peak yields boxes at several scales. Each box is described by ROIAlign + GeM on a
(possibly different) tap, L2-normalised. The query patch is described the same way
over its whole extent; an image scores the best cosine over its regions, and that
region is the box. This simplifies DASR, which back-propagates activations to find
the regions; the peak → blob → ROI-pooled descriptor pipeline is the same.
"""
from __future__ import annotations

import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.ops import nms, roi_align

from retrieval.evaluation.global_baselines import (batches_by_size, best_regions, gem, pad_regions,
                                                   place_backbone, prepare_query_patch)
from retrieval.images import resize_max_side, to_tensor


def saliency_map(fmap: torch.Tensor) -> torch.Tensor:
    """Channel sum of ReLU activations minus its per-image median, clamped at 0.
    ``(B, C, H, W)`` → ``(B, H, W)``.

    The raw sum is far from zero everywhere (peaks are only ~2× the mean), so blobs at
    thresholds relative to a peak would swallow the whole image; the median is the
    background level that the thresholds should be measured from.
    """
    s = fmap.clamp_min(0.0).sum(dim=1)
    background = s.flatten(1).median(dim=1).values
    return (s - background[:, None, None]).clamp_min(0.0)


def local_maxima(sal: torch.Tensor, max_peaks: int, min_rel: float = 0.1) -> list[tuple[int, int]]:
    """``(y, x)`` of the strongest ``max_peaks`` 3×3 local maxima of ``sal`` ``(H, W)`` that
    reach ``min_rel`` of the global maximum, strongest first."""
    pooled = F.max_pool2d(sal[None, None], 3, stride=1, padding=1)[0, 0]
    top = float(sal.max())
    if top <= 0:
        return [(int(sal.shape[0]) // 2, int(sal.shape[1]) // 2)]  # flat map: one central peak
    mask = (sal == pooled) & (sal >= min_rel * top)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    order = torch.argsort(sal[ys, xs], descending=True)[:max_peaks]
    return [(int(ys[i]), int(xs[i])) for i in order]


def peak_regions(sal: np.ndarray, peaks: list[tuple[int, int]],
                 thresholds: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Blob boxes around each peak of a saliency map ``(H, W)``.

    For each peak and each τ: the bounding box of the 8-connected component of
    ``sal ≥ τ·sal[peak]`` that contains the peak. Returns boxes ``(R, 4)`` as cell
    ``x0, y0, x1, y1`` (x1/y1 exclusive) and their peak values ``(R,)``.
    """
    boxes, values = [], []
    for y, x in peaks:
        for tau in thresholds:
            binary = (sal >= tau * sal[y, x]).astype(np.uint8)
            _, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
            x0, y0, w, h = stats[labels[y, x], :4]
            boxes.append((x0, y0, x0 + w, y0 + h))
            values.append(sal[y, x])
    return np.array(boxes, np.float32).reshape(-1, 4), np.array(values, np.float32)


def region_descriptors(fmap: torch.Tensor, boxes: torch.Tensor, roi_size: int, p: float) -> torch.Tensor:
    """ROIAlign + GeM of boxes on one feature map.

    fmap ``(1, C, H, W)``, boxes ``(R, 4)`` in that map's cells → ``(R, C)`` L2-normalised.
    """
    rois = roi_align(fmap, [boxes], output_size=roi_size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return gem(rois, p)


class DasrMethod:
    """Salient-region descriptors per gallery image; image score = best region cosine."""

    def __init__(self, saliency_tap: str = "c4", describe_tap: str = "c5", backbone: nn.Module | None = None,
                 max_peaks: int = 8, thresholds: tuple[float, ...] = (0.7, 0.5, 0.3), min_rel: float = 0.1,
                 nms_iou: float = 0.7, roi_size: int = 3, gem_p: float = 3.0, max_side: int = 640,
                 min_query_side: int = 32, batch_size: int = 8, device: str | None = None) -> None:
        self.name = "dasr"
        self.saliency_tap, self.describe_tap = saliency_tap, describe_tap
        self.max_peaks, self.thresholds, self.min_rel, self.nms_iou = max_peaks, thresholds, min_rel, nms_iou
        self.roi_size, self.gem_p = roi_size, gem_p
        self.max_side, self.min_query_side, self.batch_size = max_side, min_query_side, batch_size
        self.backbone, self.device = place_backbone(backbone, device)
        self.config = {"saliency_tap": saliency_tap, "describe_tap": describe_tap, "max_peaks": max_peaks,
                       "thresholds": list(thresholds), "min_rel": min_rel, "nms_iou": nms_iou,
                       "roi_size": roi_size, "gem_p": gem_p, "max_side": max_side, "min_query_side": min_query_side}

    @torch.no_grad()
    def _taps(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.backbone(batch.to(self.device))
        return {k: out[k].float().cpu() for k in {self.saliency_tap, self.describe_tap}}

    def image_regions(self, sal: torch.Tensor, desc_map: torch.Tensor,
                      image_wh: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Regions of one image: saliency ``(Hs, Ws)``, describing map ``(1, C, Hd, Wd)`` →
        descriptors ``(R, C)`` and boxes ``(R, 4)`` in the (resized) image's pixels."""
        peaks = local_maxima(sal, self.max_peaks, self.min_rel)
        cells, values = peak_regions(sal.numpy(), peaks, self.thresholds)
        sh, sw = sal.shape
        iw, ih = image_wh
        pixels = torch.from_numpy(cells) * torch.tensor([iw / sw, ih / sh, iw / sw, ih / sh])
        keep = nms(pixels, torch.from_numpy(values), self.nms_iou)
        pixels = pixels[keep]
        dh, dw = desc_map.shape[2:]
        in_desc = pixels * torch.tensor([dw / iw, dh / ih, dw / iw, dh / ih])
        return region_descriptors(desc_map, in_desc, self.roi_size, self.gem_p), pixels

    def index(self, gallery: list[tuple[str, Image.Image]]) -> dict:
        start = time.perf_counter()
        self.ids = [gid for gid, _ in gallery]
        resized = [resize_max_side(img.convert("RGB"), self.max_side) for _, img in gallery]
        descs: list[torch.Tensor] = [torch.zeros(0)] * len(gallery)
        self.boxes: list[torch.Tensor] = [torch.zeros(0, 4)] * len(gallery)
        for idx, batch in batches_by_size([img for img, _ in resized], self.batch_size):
            taps = self._taps(batch)
            sal = saliency_map(taps[self.saliency_tap])
            for j, i in enumerate(idx):
                img, scale = resized[i]
                descs[i], pixels = self.image_regions(sal[j], taps[self.describe_tap][j:j + 1], img.size)
                self.boxes[i] = pixels / scale  # stored-image pixels
        self.regions, self.valid = pad_regions(descs)
        n_regions = int(self.valid.sum())
        return {"seconds": time.perf_counter() - start,  # descriptor + box per region
                "bytes_per_image": n_regions * (self.regions.shape[2] + 4) * 4 / max(1, len(gallery))}

    def search(self, query: Image.Image) -> tuple[list[dict], dict]:
        patch = prepare_query_patch(query, self.max_side, self.min_query_side)
        fmap = self._taps(to_tensor(patch)[None])[self.describe_tap]
        h, w = fmap.shape[2:]
        q = region_descriptors(fmap, torch.tensor([[0.0, 0.0, float(w), float(h)]]), self.roi_size, self.gem_p)[0]
        scores, best = best_regions(self.regions, self.valid, q)
        order = torch.argsort(scores, descending=True).tolist()
        return [{"id": self.ids[i], "score": float(scores[i]), "box": self.boxes[i][int(best[i])].tolist()}
                for i in order], {}
