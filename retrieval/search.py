"""Coarse-to-fine search over a :class:`GalleryIndex`.

1. coarse: the query descriptor z against every stored region vector (exactly; a FAISS
   HNSW graph for very large galleries); an image scores its best region; the best
   ``rerank`` images go on;
2. fine: eq. 3–5 against those images' stored ψ maps (memory-mapped, no backbone pass
   on the gallery), in batches of similar size; results sorted by the fine score.
Heatmaps stay on the P3 grid until a caller asks for them at image size.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import RetrievalConfig
from .fusion import resample_heatmap
from .images import ImageSource, crop_box, padded_batches, prepare_query, prepare_query_source
from .index import GalleryIndex, ModelMismatch
from .matching import FINE_STRIDE, encode_query, encode_query_in_context, match_query, stack_maps
from .model import RetrievalModel


@dataclass
class SearchResult:
    """One ranked gallery image. Boxes are in the image's original pixels."""

    rank: int
    index: int                        # position in the gallery index
    path: Path
    score: float                      # fine score (the ranking key)
    coarse_score: float               # best region similarity in the coarse stage
    peak_score: float                 # max of the fused heatmap
    region_score: float               # eq. 5
    box: list[float]                  # best box [x0, y0, x1, y1]
    boxes: list[list[float]]          # top-K boxes, best first
    box_scores: list[float]
    best_scale: float
    size: tuple[int, int]             # (width, height) original pixels
    stored_size: tuple[int, int]      # (width, height) after the gallery resize rule
    level_names: tuple[str, ...]
    fused_cells: torch.Tensor = field(repr=False)       # (H3, W3) fused map on the P3 grid
    level_cells: torch.Tensor = field(repr=False)       # (L, H3, W3)
    levels_used: tuple[bool, ...]                       # per level: matched at best_scale

    def _to_pixels(self, cells: torch.Tensor, size: tuple[int, int] | None) -> np.ndarray:
        width, height = size or self.size
        out_stride = self.stored_size[0] / width
        up = resample_heatmap(cells.unsqueeze(0), FINE_STRIDE, (height, width), out_stride)
        return up[0].numpy()

    def heatmap(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """Fused heatmap ``(H, W)`` at ``size`` = (width, height), the original size by default."""
        return self._to_pixels(self.fused_cells.unsqueeze(0), size)[0]

    def level_heatmaps(self, size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """Per-level heatmaps ``{level: (H, W)}`` at the best query scale; a level where the
        query was too large to be matched at that scale is all NaN (it took no part in the fusion)."""
        maps = self._to_pixels(self.level_cells, size)
        return {name: maps[i] if self.levels_used[i] else np.full_like(maps[i], np.nan)
                for i, name in enumerate(self.level_names)}

    def to_json(self) -> dict:
        return {"path": str(self.path), "score": round(self.score, 6),
                "box": [round(v, 1) for v in self.box]}


@dataclass
class SearchResponse:
    results: list[SearchResult]
    query: Image.Image                # the patch as it was searched
    shortlist: list[int]              # image indices passed to the fine stage, coarse order
    timings_ms: dict[str, float]
    scales: list[float]
    descriptor: np.ndarray            # (D,) the query descriptor z used by the coarse stage


def _fine_batches(index: GalleryIndex, ids: list[int], batch_size: int) -> list[list[int]]:
    """Group shortlisted images of similar stored size so batches need little padding."""
    sizes = [(index.images[i].stored_width, index.images[i].stored_height) for i in ids]
    return [[ids[j] for j in batch] for batch in padded_batches(sizes, batch_size)]


class SearchEngine:
    """A model bound to an index. Stateless between calls, so one engine serves many users."""

    def __init__(self, index: GalleryIndex, model: RetrievalModel, device: str | torch.device = "cpu") -> None:
        self.index = index
        self.model = model
        self.device = torch.device(device)

    @torch.no_grad()
    def search(self, query_image: ImageSource, box=None, top: int = 20, rerank: int | None = None,
               query_scales: tuple[float, ...] | None = None, top_k: int | None = None,
               gamma: float | None = None, refine_boxes: bool = True, batch_size: int = 32) -> SearchResponse:
        """Search the index with a query image (cropped to ``box`` when given, original pixels).

        ``refine_boxes=False`` reports the peak boxes as they are (the query's size at the best
        scale) instead of the learned refiner's boxes (``retrieval.box_refinement``).
        """
        t0 = time.perf_counter()
        cfg: RetrievalConfig = self.model.config
        changes = {}
        if query_scales:
            changes["query_scales"] = tuple(float(s) for s in query_scales)
        if top_k:
            changes["top_k"] = int(top_k)
        if not refine_boxes:
            changes["refine_steps"] = 0
        cfg = replace(cfg, **changes) if changes else cfg
        rerank = cfg.rerank if rerank is None else int(rerank)
        if box is None:
            patch = prepare_query(query_image, None, cfg.max_side, min_side=cfg.min_side, max_pixels=cfg.max_pixels)
            query = encode_query(self.model, patch, cfg, self.device)
        else:  # the box's surroundings are known: encode them too (see encode_query_in_context)
            source, box_px = prepare_query_source(query_image, box, cfg.max_side, cfg.min_side, cfg.max_pixels)
            patch = crop_box(source, box_px, min_side=cfg.min_side)
            query = encode_query_in_context(self.model, source, box_px, cfg, self.device)
        z = query.descriptor.float().cpu().numpy()
        t1 = time.perf_counter()
        n = len(self.index)
        if n == 0:
            return SearchResponse([], patch, [], {"encode": (t1 - t0) * 1e3}, query.scales, z)
        shortlist_n = min(n, max(1, rerank))
        ids, coarse = self.index.coarse_search(z, shortlist_n)
        coarse_of = {int(i): float(s) for i, s in zip(ids, coarse)}
        t2 = time.perf_counter()
        results = []
        for group in _fine_batches(self.index, [int(i) for i in ids], batch_size):
            maps = stack_maps([self.index.maps(i) for i in group])
            maps = {l: m.to(self.device) for l, m in maps.items()}
            sizes = torch.tensor([[self.index.images[i].stored_height, self.index.images[i].stored_width]
                                  for i in group])
            out = match_query(self.model, query, maps, sizes.to(self.device), cfg, gamma=gamma)
            results.extend(self._results(group, out, coarse_of))
        results.sort(key=lambda r: -r.score)
        for rank, r in enumerate(results[:top], start=1):
            r.rank = rank
        t3 = time.perf_counter()
        timings = {"encode": (t1 - t0) * 1e3, "coarse": (t2 - t1) * 1e3, "fine": (t3 - t2) * 1e3,
                   "total": (t3 - t0) * 1e3}
        return SearchResponse(results[:top], patch, [int(i) for i in ids], timings, query.scales, z)

    def _results(self, group: list[int], out, coarse_of: dict[int, float]) -> list[SearchResult]:
        results = []
        for j, i in enumerate(group):
            rec = self.index.images[i]
            h3 = -(-rec.stored_height // FINE_STRIDE)
            w3 = -(-rec.stored_width // FINE_STRIDE)
            inv = 1.0 / rec.scale
            valid = torch.isfinite(out.box_scores[j])
            boxes = (out.boxes[j][valid] * inv).cpu()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, rec.width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, rec.height)
            box_list = boxes.tolist()
            results.append(SearchResult(
                rank=0, index=i, path=self.index.image_path(i), score=float(out.score[j]),
                coarse_score=coarse_of.get(i, float("nan")), peak_score=float(out.peak_score[j]),
                region_score=float(out.region_score[j]),
                box=box_list[0] if box_list else [0.0, 0.0, float(rec.width), float(rec.height)],
                boxes=box_list, box_scores=out.box_scores[j][valid].cpu().tolist(),
                best_scale=float(out.best_scale[j]), size=(rec.width, rec.height),
                stored_size=(rec.stored_width, rec.stored_height), level_names=out.level_names,
                fused_cells=out.fused[j, 0, :h3, :w3].float().cpu(),
                level_cells=out.per_level[j, :, :h3, :w3].float().cpu(),
                levels_used=tuple(bool(u) for u in out.level_used[j])))
        return results


def search(index: GalleryIndex, query_image: ImageSource, box=None, top: int = 20, rerank: int = 100,
           model: RetrievalModel | None = None, device: str | torch.device = "cpu", **options) -> list[SearchResult]:
    """One-call search: ranked results, best first (see :meth:`SearchEngine.search`)."""
    if model is None:
        from .checkpoint import load_model

        model, model_hash = load_model("default", device=device)
        if model_hash != index.model_hash:
            raise ModelMismatch(f"the index '{index.root}' was built with model {index.model_hash}, "
                                f"the default model is {model_hash}; rebuild the index")
    return SearchEngine(index, model, device).search(query_image, box, top=top, rerank=rerank, **options).results
