"""One dataclass holding every tunable of the model and the search.

It is saved inside checkpoints and index manifests so that a stored index can tell
whether it was built with the model a search is about to use.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RetrievalConfig:
    # --- images -------------------------------------------------------------
    max_side: int = 640            # gallery images and query source images: long side resized to this
    min_side: int = 8              # images (or crops) smaller than this on a side are rejected
    max_pixels: int = 80_000_000   # refuse decompression bombs before decoding

    # --- backbone + FPN -----------------------------------------------------
    backbone: str = "efficientnet-lite0"   # or "resnet50" (needs ImageNet weights in the torch cache)
    fpn_channels: int = 64         # C: channels of P3/P4/P5 and of the φ/ψ outputs
    levels: tuple[str, ...] = ("p3", "p4", "p5")

    # --- correlation + fusion (eq. 3, 4) --------------------------------------
    # query patch resized by these before matching; half-octave steps: on tracking_dev (untrained,
    # fine stage over the whole gallery) (0.5, 1, 2) → these: mAP .67 → .74, CorLoc@0.5 .30 → .38, 20 % slower
    query_scales: tuple[float, ...] = (0.5, 0.707, 1.0, 1.414, 2.0)
    # px: a scaled query smaller than this on a side is not tried. 16 keeps scale 1 for objects of
    # 16-32 px (with 32, a 19-px target was only searched at 2x and its box came out twice too big):
    # tracking_dev untrained dense mAP .74 -> .79, CorLoc@0.5 .38 -> .46 (12: .80/.44, 24: .80/.43)
    min_query_side: int = 16
    context_ratio: float = 0.5     # a query box is encoded with this much of its side around it …
    context_min_px: int = 32       # … and at least this many pixels (see matching.encode_query_in_context)
    max_template_cells: int = 24   # a template wider than this many cells at a level is skipped there
    gamma: float = 10.0            # initial LSE temperature of eq. 4 (learned)
    # initial level logits of α (softmax → .79/.11/.11): untrained P4/P5 are random projections of
    # c4/c5 and match worse than P3 (tracking_dev, untrained, dense: mAP .58 uniform vs .66 this)
    alpha_init: tuple[float, ...] = (2.0, 0.0, 0.0)
    eps: float = 1e-6

    # --- regions (eq. 5) ----------------------------------------------------
    top_k: int = 5                 # K peaks of the fused heatmap turned into boxes
    nms_iou: float = 0.3           # boxes overlapping more than this are suppressed
    roi_size: int = 3              # ROIAlign output cells per side before GeM
    gem_p: float = 3.0             # initial GeM exponent (learned)
    region_beta: float = 10.0      # temperature of the LSE over regions in eq. 5
    mlp_hidden: int = 256          # hidden width of the descriptor MLP (residual, starts as identity)
    score_weight_peak: float = 0.75  # fine score = w·max(H) + (1-w)·eq. 5 (w=.75 best untrained on tracking_dev)
    # the best box is the one with the highest w·peak + (1-w)·<z, r_k>, not simply the highest peak:
    # shipped checkpoint, fine stage over all of tracking_dev: CorLoc@0.5 .484 -> .501 (w 1 -> .8; .9: .498,
    # .75: .497); on its held-out sequences .509 -> .519 (w chosen on these numbers)
    box_weight_peak: float = 0.8
    # learned box refinement (retrieval.box_refinement): passes of the refiner over each image's best box
    # (0 = the peak box, the query's size at the best scale). Held-out tracking sequences, fine stage over
    # every image, shipped heads (benchmarks/box_refinement.py): CorLoc@0.5 .521 with 0 passes, .629 with
    # 1, .625 with 2, .637 with 3 (within noise of each other); one pass costs 1-3 % of the fine stage
    refine_steps: int = 1
    refine_top: int = 1            # boxes refined per image, best first (the others stay peak boxes)
    refine_grid: int = 4           # the query box is sampled on g x g cells, its gallery surroundings on 2g x 2g
    refine_context: float = 2.0    # the gallery window is the box scaled by this about its centre

    # --- coarse stage -------------------------------------------------------
    coarse_grid_levels: tuple[int, ...] = (1, 2, 3)   # R-MAC style grids (training's global regions)
    # px: square windows (+ the whole image) whose descriptors the coarse stage ranks images by, at a step
    # of half their side. The 32-px ones (1,131 of the 1,473 regions of a 640x480 image) let a 20-px object
    # through: tracking_dev, 450 images, rerank 100, the heads trained for 64-256 px: positives in the
    # shortlist .81 -> .88, mAP .770 -> .825, CorLoc@0.5 .426 -> .470 (32-px windows at a 32-px step:
    # .85 / .802 / .448); the heads retrained with these windows give .87 / .816 / .467
    coarse_windows: tuple[int, ...] = (32, 64, 128, 256)
    rerank: int = 100              # images passed from the coarse to the fine stage
    # up to this many region vectors (~128 B each in RAM, fp16) the coarse stage ranks them all exactly
    # (1,000 images of 640x480: 1.5 M vectors, ~35 ms on one core); above it a FAISS HNSW graph (slow to build)
    exact_index_max: int = 16_000_000

    # --- bookkeeping --------------------------------------------------------
    extra: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> "RetrievalConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RetrievalConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key not in known:
                continue  # written by a newer version: ignore rather than refuse to load
            if isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)

    def model_fingerprint(self) -> str:
        """The fields that change what the network computes (not search-time knobs)."""
        keys = ("max_side", "backbone", "fpn_channels", "levels", "coarse_windows", "roi_size")
        return json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
