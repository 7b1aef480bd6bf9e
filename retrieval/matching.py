"""The fine stage: a query encoded at several scales matched against gallery maps.

query patch ─► templates φ(Z^l) per scale ─┐
gallery ψ(X^l) maps ───────────────────────┴► eq. 3 per level ─► P3 grid ─► eq. 4 per scale
  ─► best scale per cell ─► peaks ─► boxes ─► ROIAlign ─► r_k ─► eq. 5 ─► image score
                                        └─► box refiner (query box grid vs gallery ψ(P3)) ─► output boxes
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from PIL import Image
from torchvision.ops import roi_align

from .config import RetrievalConfig
from .box_refinement import refine_boxes
from .correlation import cosine_cross_correlation_many, window_offset
from .fusion import lse_fusion, resample_heatmap
from .images import to_tensor
from .model import LEVEL_STRIDES, RetrievalModel
from .regions import (find_peaks, peak_boxes, pool_regions, rank_boxes, region_score, subcell_peaks,
                      suppress_overlaps)

FINE_STRIDE = LEVEL_STRIDES["p3"]  # every heatmap is fused on the P3 grid


@dataclass
class QueryEncoding:
    """A query patch ready for matching."""

    patch_size: tuple[int, int]                     # (width, height) px of the patch at scale 1
    scales: list[float]                             # query scales actually used
    sizes: list[tuple[int, int]]                    # (width, height) px of the patch at each scale
    templates: list[dict[str, torch.Tensor]]        # per scale: level → (C, h_l, w_l)
    descriptor: torch.Tensor                        # (C,) z = L2(MLP(GeM(φ(Z^{p3}))))
    box_grids: torch.Tensor                         # (S, C, g, g) φ(P3) over the box at each scale (box refiner)


def reference_scale(scales: list[float]) -> int:
    """Index of the scale nearest 1: the one the descriptor z comes from."""
    return min(range(len(scales)), key=lambda i: abs(math.log(scales[i])))


def box_cells(fmap: torch.Tensor, box: tuple[float, float, float, float], stride: float,
              cells: int | tuple[int, int]) -> torch.Tensor:
    """A box of one map ROIAligned to ``cells``: ``(1, C, H, W)``, pixel box → ``(C, rows, cols)``."""
    roi = torch.tensor([[0.0, *box]], device=fmap.device, dtype=fmap.dtype)
    return roi_align(fmap, roi, cells, 1.0 / stride, 2, True)[0]


def usable_scales(width: int, height: int, config: RetrievalConfig) -> list[float]:
    """Query scales whose patch is neither below ``min_query_side`` nor too big for the coarsest level.

    Falls back to the single nearest admissible scale so that any patch of at least a
    few pixels can be searched.
    """
    coarsest = max(LEVEL_STRIDES[l] for l in config.levels)
    s_max = config.max_template_cells * coarsest / max(width, height)
    s_min = config.min_query_side / min(width, height)
    chosen = [s for s in config.query_scales if s_min <= s <= s_max]
    if chosen:
        return chosen
    return [min(max(1.0, s_min), s_max)]


@torch.no_grad()
def encode_query(model: RetrievalModel, patch: Image.Image, config: RetrievalConfig | None = None,
                 device: torch.device | str = "cpu") -> QueryEncoding:
    """Encode an RGB patch at every usable scale (``config.query_scales``)."""
    cfg = config or model.config
    width, height = patch.size
    scales = usable_scales(width, height, cfg)
    sizes, templates, grids = [], [], []
    for s in scales:
        size = (max(1, round(width * s)), max(1, round(height * s)))
        resized = patch if size == patch.size else patch.resize(size, Image.BICUBIC)
        maps = model.encode_query(to_tensor(resized).unsqueeze(0).to(device))
        sizes.append(size)
        templates.append({l: m[0] for l, m in maps.items()})
        grids.append(box_cells(maps["p3"], (0.0, 0.0, float(size[0]), float(size[1])), FINE_STRIDE, cfg.refine_grid))
    descriptor = model.describe(templates[reference_scale(scales)]["p3"].unsqueeze(0))[0]
    return QueryEncoding((width, height), scales, sizes, templates, descriptor, torch.stack(grids))


def template_cells(width: float, height: float, scale: float, level: str) -> tuple[int, int]:
    """(rows, cols) of a box's template at a level: its side at ``scale`` in cells, at least 1."""
    stride = LEVEL_STRIDES[level]
    return max(1, round(height * scale / stride)), max(1, round(width * scale / stride))


def context_window(box: tuple[float, float, float, float], width: int, height: int,
                   config: RetrievalConfig) -> tuple[int, int, int, int]:
    """The part of the source image encoded around a query box: the box plus a margin of
    ``max(context_min_px, context_ratio · box side)``, clipped to the image."""
    x0, y0, x1, y1 = box
    margin = max(config.context_min_px, config.context_ratio * max(x1 - x0, y1 - y0))
    return (max(0, math.floor(x0 - margin)), max(0, math.floor(y0 - margin)),
            min(width, math.ceil(x1 + margin)), min(height, math.ceil(y1 + margin)))


@torch.no_grad()
def encode_query_in_context(model: RetrievalModel, image: Image.Image, box: tuple[float, float, float, float],
                            config: RetrievalConfig | None = None,
                            device: torch.device | str = "cpu") -> QueryEncoding:
    """Encode a query box together with its surroundings, then cut the box's cells out.

    The backbone sees the object as it sees it inside a gallery image — with its real
    neighbours instead of zero padding at the crop border — so the templates match
    gallery features far better than those of the crop encoded alone (on tracking_dev,
    untrained: mAP .46 → .66). ``image`` is the source already resized by the gallery
    rule and ``box`` is in its pixels. Template cells are ROIAligned to
    ``round(side · scale / stride)`` cells per level.
    """
    cfg = config or model.config
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    scales = usable_scales(max(1, round(width)), max(1, round(height)), cfg)
    cx0, cy0, cx1, cy1 = context_window(box, image.width, image.height, cfg)
    context = image.crop((cx0, cy0, cx1, cy1))
    sizes, templates, grids = [], [], []
    for s in scales:
        size = (max(1, round(context.width * s)), max(1, round(context.height * s)))
        resized = context if size == context.size else context.resize(size, Image.BICUBIC)
        maps = model.encode_query(to_tensor(resized).unsqueeze(0).to(device))
        roi = ((x0 - cx0) * s, (y0 - cy0) * s, (x1 - cx0) * s, (y1 - cy0) * s)
        templates.append({level: box_cells(fmap, roi, LEVEL_STRIDES[level], template_cells(width, height, s, level))
                          for level, fmap in maps.items()})
        sizes.append((max(1, round(width * s)), max(1, round(height * s))))
        grids.append(box_cells(maps["p3"], roi, FINE_STRIDE, cfg.refine_grid))
    descriptor = model.describe(templates[reference_scale(scales)]["p3"].unsqueeze(0))[0]
    return QueryEncoding((max(1, round(width)), max(1, round(height))), scales, sizes, templates, descriptor,
                         torch.stack(grids))


def stack_maps(maps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Zero-pad per-image maps ``{level: (C, H_l, W_l)}`` to a batch ``{level: (B, C, H_max, W_max)}``.

    Zero cells correlate to 0 and are excluded from peaks, so padding does not change
    any image's result inside its own extent.
    """
    out = {}
    for level in maps[0]:
        h = max(m[level].shape[-2] for m in maps)
        w = max(m[level].shape[-1] for m in maps)
        batch = maps[0][level].new_zeros(len(maps), maps[0][level].shape[0], h, w)
        for i, m in enumerate(maps):
            batch[i, :, : m[level].shape[-2], : m[level].shape[-1]] = m[level]
        out[level] = batch
    return out


@dataclass
class MatchBatch:
    """Fine-stage output for B gallery images (all tensors on the CPU).

    ``fused``/``per_level`` live on the P3 grid (cell i centred at pixel 8·(i + 0.5)).
    """

    score: torch.Tensor          # (B,) final fine score
    peak_score: torch.Tensor     # (B,) max of the fused heatmap
    region_score: torch.Tensor   # (B,) eq. 5
    fused: torch.Tensor          # (B, 1, H3, W3) fused heatmap, best scale per cell
    per_level: torch.Tensor      # (B, L, H3, W3) per-level heatmaps at each image's best scale
    level_used: torch.Tensor     # (B, L) bool: levels matched at that scale (False: template too large, map is 0)
    boxes: torch.Tensor          # (B, K, 4) pixel boxes, best first (the first ``config.refine_top`` refined)
    box_scores: torch.Tensor     # (B, K) w·peak + (1−w)·<z, r_k>, descending (-inf where fewer than K boxes)
    best_scale: torch.Tensor     # (B,) query scale of the top box
    level_names: tuple[str, ...] = field(default=("p3", "p4", "p5"))


def _parabola_vertex(values: torch.Tensor, xs: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Sub-step refinement of an argmax on a 1-D grid by a 3-point parabola.

    Args:
        values: ``(N, S)`` samples; xs: ``(S,)`` their abscissae (increasing); best: ``(N,)`` argmax.

    Returns:
        ``(N,)`` refined abscissae, clamped to the neighbouring samples; ends stay put.
    """
    s = values.shape[1]
    x_best = xs[best]
    if s < 3:
        return x_best
    inner = (best > 0) & (best < s - 1)
    i0, i2 = (best - 1).clamp(0, s - 1), (best + 1).clamp(0, s - 1)
    x0, x1, x2 = xs[i0], x_best, xs[i2]
    y0 = values.gather(1, i0[:, None])[:, 0]
    y1 = values.gather(1, best[:, None])[:, 0]
    y2 = values.gather(1, i2[:, None])[:, 0]
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 ** 2 * (y0 - y1) + x1 ** 2 * (y2 - y0) + x0 ** 2 * (y1 - y2)) / denom
    vertex = torch.where(a < 0, -b / (2 * a), x1)
    vertex = torch.minimum(torch.maximum(vertex, (x0 + x1) / 2), (x1 + x2) / 2)
    return torch.where(inner & torch.isfinite(vertex), vertex, x_best)


def match_query(model: RetrievalModel, query: QueryEncoding, gallery: dict[str, torch.Tensor],
                image_sizes: torch.Tensor, config: RetrievalConfig | None = None,
                gamma: float | None = None) -> MatchBatch:
    """Eq. 3–5 of one query against a batch of gallery images.

    Args:
        gallery: ``{level: (B, C, H_l, W_l)}`` ψ maps (zero-padded to a common size).
        image_sizes: ``(B, 2)`` (height, width) in pixels of each gallery image.
        gamma: overrides the model's learned γ of eq. 4 (a search-time control).

    Gradients flow to φ, ψ, α, γ, the MLP and GeM p (peak positions are chosen without).
    """
    cfg = config or model.config
    levels = model.levels
    p3 = gallery["p3"]
    b, _, h3, w3 = p3.shape
    device = p3.device
    dtype = p3.dtype
    gamma_t = model.gamma if gamma is None else torch.tensor(float(gamma), device=device)
    n_scales = len(query.templates)
    # per scale, per level: (B, 1, H3, W3) on the P3 grid, or None when the template is too large
    grids: list[list[torch.Tensor | None]] = [[None] * len(levels) for _ in range(n_scales)]
    for li, level in enumerate(levels):
        todo = [s for s in range(n_scales)
                if max(query.templates[s][level].shape[-2:]) <= cfg.max_template_cells]
        if not todo:
            continue
        templates = [query.templates[s][level].to(dtype) for s in todo]
        heats = cosine_cross_correlation_many(gallery[level], templates, padding="same", eps=cfg.eps)
        # each image's own cells at this level (the backbone rounds every stride-2 step up)
        own_cells = torch.ceil(image_sizes.to(device=device, dtype=torch.float64) / LEVEL_STRIDES[level])
        for s, t, heat in zip(todo, templates, heats):
            grids[s][li] = resample_heatmap(heat, LEVEL_STRIDES[level], (h3, w3), FINE_STRIDE,
                                            (window_offset(t.shape[-2]), window_offset(t.shape[-1])), own_cells)
    fused_scales, level_scales, used_scales = [], [], []
    for s in range(n_scales):
        usable = [g is not None for g in grids[s]]
        used_scales.append(usable)
        per_level = torch.cat([g if g is not None else p3.new_zeros(b, 1, h3, w3) for g in grids[s]], dim=1)
        mask = torch.tensor(usable, device=device)
        fused_scales.append(lse_fusion(per_level, model.alpha, gamma_t, mask))
        level_scales.append(per_level)
    fused_all = torch.cat(fused_scales, dim=1)                       # (B, S, H3, W3)
    cell_h = torch.ceil(image_sizes[:, 0].to(device) / FINE_STRIDE).long()
    cell_w = torch.ceil(image_sizes[:, 1].to(device) / FINE_STRIDE).long()
    rows = torch.arange(h3, device=device).view(1, 1, -1, 1)
    cols = torch.arange(w3, device=device).view(1, 1, 1, -1)
    valid = (rows < cell_h.view(-1, 1, 1, 1)) & (cols < cell_w.view(-1, 1, 1, 1))
    fused_all = fused_all.masked_fill(~valid, -1.0)
    fused, scale_idx = fused_all.max(dim=1, keepdim=True)             # (B, 1, H3, W3)

    k = cfg.top_k
    with torch.no_grad():
        peak_vals, ys, xs = find_peaks(fused.detach(), 4 * k, valid=valid)
        at_peak = scale_idx[:, 0].flatten(1).gather(1, ys * w3 + xs)  # (B, 4k) scale index
        log_scales = torch.tensor([math.log(s) for s in query.scales], device=device, dtype=dtype)
        per_scale = fused_all.detach().flatten(2)                      # (B, S, H3·W3)
        flat = (ys * w3 + xs).unsqueeze(1).expand(-1, per_scale.shape[1], -1)
        at_peak_values = per_scale.gather(2, flat).permute(0, 2, 1).reshape(-1, len(query.scales))
        refined = _parabola_vertex(at_peak_values, log_scales, at_peak.reshape(-1)).view(b, -1).exp()
        sizes = torch.tensor(query.patch_size, device=device, dtype=dtype)
        fy, fx = subcell_peaks(fused.detach(), ys, xs, valid)
        boxes = peak_boxes(fy, fx, FINE_STRIDE, sizes[0] * refined, sizes[1] * refined, image_sizes.to(device))
        boxes, peak_box_scores, box_valid, kept = suppress_overlaps(boxes, peak_vals, cfg.nms_iou, k)
        box_scale_idx = at_peak.gather(1, kept.clamp_min(0))           # (B, K) scale index of each box
    regions = model.head.embed(pool_regions(p3, boxes, FINE_STRIDE, cfg.roi_size, model.head.gem_p))
    sims = torch.einsum("d,bkd->bk", query.descriptor.to(dtype), regions)    # (B, K) <z, r_k>
    regional = region_score(sims, box_valid, cfg.region_beta)
    with torch.no_grad():  # the best box: its peak and how much its region looks like the query
        box_scores, order = rank_boxes(peak_box_scores, sims.detach(), box_valid, cfg.box_weight_peak)
        boxes = boxes.gather(1, order.unsqueeze(-1).expand(-1, -1, 4))
        box_valid = box_valid.gather(1, order)
        best_scale_idx = box_scale_idx.gather(1, order)[:, 0]
        top = min(cfg.refine_top, k)
        # each box is compared with the query at the scale its peak was found at
        box_grids = query.box_grids.to(dtype)[box_scale_idx.gather(1, order)[:, :top]]   # (B, top, C, g, g)
        refined = refine_boxes(model.box_refiner, box_grids, p3, boxes[:, :top], image_sizes, FINE_STRIDE,
                               cfg.refine_context, cfg.refine_steps)
        boxes = torch.cat([torch.where(box_valid[:, :top, None], refined, boxes[:, :top]), boxes[:, top:]], dim=1)
    peak = fused.flatten(1).amax(dim=1)
    w = cfg.score_weight_peak
    score = w * peak + (1.0 - w) * regional
    chosen = best_scale_idx.view(-1, 1, 1, 1, 1).expand(-1, 1, len(levels), h3, w3)
    per_level = torch.stack(level_scales, dim=1).gather(1, chosen)[:, 0]
    scales_t = torch.tensor(query.scales, device=device)
    level_used = torch.tensor(used_scales, device=device)[best_scale_idx]            # (B, L)
    return MatchBatch(score=score, peak_score=peak, region_score=regional, fused=fused, per_level=per_level,
                      level_used=level_used,
                      boxes=boxes, box_scores=box_scores, best_scale=scales_t[best_scale_idx],
                      level_names=tuple(levels))
