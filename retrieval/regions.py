"""From a fused heatmap to scored regions: peaks → boxes → ROIAlign → descriptors → eq. 5.

s(I | q) = LSE_k <z, r_k>, here the mean-normalised LSE 1/β · log(1/K · Σ_k exp(β <z, r_k>)),
which stays in [-1, 1] whatever K is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import nms, roi_align


def gem(features: torch.Tensor, p: torch.Tensor | float, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean pooling over all trailing spatial dims: ``(N, C, *S)`` → ``(N, C)``.

    Negative activations are clamped to ``eps`` first, as in the GeM paper.
    """
    x = features.flatten(2).clamp_min(eps)
    return x.pow(p).mean(dim=2).pow(1.0 / p)


def find_peaks(heat: torch.Tensor, k: int, window: int = 3,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` local maxima of each map.

    Args:
        heat: ``(B, 1, H, W)`` heatmaps.
        k: peaks per map.
        window: side of the max-pool neighbourhood that defines a local maximum.
        valid: optional ``(B, 1, H, W)`` bool; cells outside are never peaks (batch padding).

    Returns:
        ``scores (B, k)`` (``-inf`` where a map has fewer than k peaks), ``ys (B, k)``, ``xs (B, k)``
        as cell indices.
    """
    b, _, h, w = heat.shape
    pooled = F.max_pool2d(heat, window, stride=1, padding=window // 2)
    is_peak = heat >= pooled
    if valid is not None:
        is_peak &= valid
    masked = torch.where(is_peak, heat, torch.full_like(heat, float("-inf"))).flatten(1)
    k = min(k, h * w)
    scores, idx = masked.topk(k, dim=1)
    return scores, idx // w, idx % w


def subcell_peaks(heat: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
                  valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Peak positions refined below the cell size by a 3-point parabola along each axis.

    A box centred on the peak cell is off by up to half a stride (4 px on P3), which
    alone can push a 20-px object's IoU under 0.5; the parabola through the peak and its
    two neighbours puts the centre where the correlation actually culminates.

    Args:
        heat: ``(B, 1, H, W)`` heatmaps; ys, xs: ``(B, k)`` integer peak cells (from :func:`find_peaks`).
        valid: optional ``(B, 1, H, W)`` bool; a neighbour outside it (or outside the map) leaves that axis unrefined.

    Returns:
        ``(ys, xs)`` as float ``(B, k)`` cell coordinates, each within ±0.5 of the input cell.
    """
    b, _, h, w = heat.shape
    flat = heat.flatten(1)
    ok = torch.ones_like(flat, dtype=torch.bool) if valid is None else valid.flatten(1)

    def axis(pos: torch.Tensor, step: int, size: int) -> torch.Tensor:
        centre = ys * w + xs
        has_lo, has_hi = pos > 0, pos < size - 1
        lo = torch.where(has_lo, centre - step, centre)
        hi = torch.where(has_hi, centre + step, centre)
        f0, f_lo, f_hi = flat.gather(1, centre), flat.gather(1, lo), flat.gather(1, hi)
        usable = has_lo & has_hi & ok.gather(1, lo) & ok.gather(1, hi) & torch.isfinite(f_lo + f_hi + f0)
        curvature = f_lo - 2 * f0 + f_hi
        delta = torch.where(usable & (curvature < 0), 0.5 * (f_lo - f_hi) / curvature.clamp(max=-1e-12),
                            torch.zeros_like(f0))
        return pos.to(heat.dtype) + delta.clamp(-0.5, 0.5)

    return axis(ys, w, h), axis(xs, 1, w)


def peak_boxes(ys: torch.Tensor, xs: torch.Tensor, stride: float, widths: torch.Tensor,
               heights: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """Boxes of the query's size centred on the peaks, clipped to each image.

    Args:
        ys, xs: ``(B, k)`` cell coordinates (fractional ones too) on a grid whose cell ``i`` is centred
            at pixel ``stride·(i + 0.5)``.
        widths, heights: ``(B, k)`` box sizes in pixels (query size at the peak's scale).
        image_sizes: ``(B, 2)`` as (height, width) pixels.

    Returns:
        ``(B, k, 4)`` boxes ``x0, y0, x1, y1`` in image pixels.
    """
    cy = (ys.to(widths.dtype) + 0.5) * stride
    cx = (xs.to(widths.dtype) + 0.5) * stride
    img_h = image_sizes[:, 0:1].to(widths.dtype)
    img_w = image_sizes[:, 1:2].to(widths.dtype)
    x0 = (cx - widths / 2).clamp(min=0)
    y0 = (cy - heights / 2).clamp(min=0)
    x1 = torch.minimum(cx + widths / 2, img_w)
    y1 = torch.minimum(cy + heights / 2, img_h)
    return torch.stack([x0, y0, x1, y1], dim=-1)


def suppress_overlaps(boxes: torch.Tensor, scores: torch.Tensor, iou: float,
                      keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy NMS per image, then the best ``keep``.

    Args:
        boxes: ``(B, n, 4)``; scores: ``(B, n)`` (``-inf`` marks an empty slot).

    Returns:
        ``boxes (B, keep, 4)``, ``scores (B, keep)`` (``-inf`` in unused slots), ``valid (B, keep)`` bool,
        ``indices (B, keep)`` of the kept boxes in the input (``-1`` in unused slots).
    """
    b = boxes.shape[0]
    out_boxes = boxes.new_zeros(b, keep, 4)
    out_scores = scores.new_full((b, keep), float("-inf"))
    out_index = torch.full((b, keep), -1, dtype=torch.long, device=boxes.device)
    for i in range(b):
        finite = torch.nonzero(torch.isfinite(scores[i]))[:, 0]
        kept = finite[nms(boxes[i][finite].float(), scores[i][finite].float(), iou)[:keep]]
        out_boxes[i, : len(kept)] = boxes[i][kept]
        out_scores[i, : len(kept)] = scores[i][kept]
        out_index[i, : len(kept)] = kept
    return out_boxes, out_scores, torch.isfinite(out_scores), out_index


def rank_boxes(peak_scores: torch.Tensor, similarities: torch.Tensor, valid: torch.Tensor,
               weight_peak: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each image's boxes by ``w · peak + (1 − w) · <z, r_k>``.

    The highest correlation peak is not always the object: a box whose pooled descriptor
    also resembles the query's is more often right (see ``RetrievalConfig.box_weight_peak``).

    Args:
        peak_scores: ``(B, K)`` fused-heatmap value at each box's peak.
        similarities: ``(B, K)`` cosine of the query descriptor z with each box's descriptor r_k.
        valid: ``(B, K)`` bool; invalid slots go last with score ``-inf``.

    Returns:
        ``scores (B, K)`` sorted descending, ``order (B, K)`` indices into the input slots.
    """
    combined = weight_peak * peak_scores + (1.0 - weight_peak) * similarities
    combined = torch.where(valid, combined, torch.full_like(combined, float("-inf")))
    scores, order = combined.sort(dim=1, descending=True, stable=True)
    return scores, order


def pool_regions(features: torch.Tensor, boxes: torch.Tensor, stride: float, roi_size: int,
                 p: torch.Tensor | float) -> torch.Tensor:
    """ROIAlign each box on its image's map, then GeM over the ROI cells.

    Args:
        features: ``(B, C, H, W)`` maps with cell ``i`` centred at pixel ``stride·(i + 0.5)``.
        boxes: ``(B, K, 4)`` pixel boxes.
        roi_size: ROIAlign output side.

    Returns:
        ``(B, K, C)`` pooled region features (not normalised).
    """
    b, k, _ = boxes.shape
    rois = torch.cat([torch.arange(b, device=boxes.device, dtype=features.dtype)
                      .repeat_interleave(k).unsqueeze(1), boxes.reshape(-1, 4).to(features.dtype)], dim=1)
    pooled = roi_align(features, rois, output_size=roi_size, spatial_scale=1.0 / stride,
                       sampling_ratio=2, aligned=True)
    return gem(pooled, p).view(b, k, -1)


def region_score(similarities: torch.Tensor, valid: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 5, a mean-normalised log-sum-exp over a image's regions.

    Args:
        similarities: ``(B, K)`` ⟨z, r_k⟩ of the L2-normalised query and region descriptors.
        valid: ``(B, K)`` bool; images with no valid region score -1.
        beta: LSE temperature (large → max, small → mean).

    Returns:
        ``(B,)`` image scores.
    """
    sims = similarities.masked_fill(~valid, float("-inf"))
    count = valid.sum(dim=1).clamp_min(1).to(sims.dtype)
    score = (torch.logsumexp(beta * sims, dim=1) - torch.log(count)) / beta
    return torch.where(valid.any(dim=1), score, torch.full_like(score, -1.0))
