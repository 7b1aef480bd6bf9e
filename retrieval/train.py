"""Training of the heads (FPN, φ, ψ, descriptor MLP + GeM p, fusion α and γ, box refiner) — seed 000, section 3.

    L = λ1·InfoNCE + λ2·(focal + Dice) + λ3·triplet (eq. 8) + λ4·KL(per level ‖ fused) + λ5·box

A step draws B triples (query box, positive image with its box, negative image) from
real tracking pairs and synthetic copy-paste pairs (``retrieval.data``) and runs them
the way a search runs them: the query box is encoded with its surroundings at its
usable query scales (``matching.encode_query_in_context``), the images as gallery maps
(windows of them, see ``TrainConfig.window``), and ``matching.match_query`` does eq. 3–5.

* InfoNCE (coarse/global stage): the query descriptor z against two positive keys —
  the positive's region descriptor at the gt box and, of the coarse regions the index
  stores for it (whole image + sliding windows), the one that overlaps the box most —
  with negatives: every coarse region and every peak region of the batch's images that
  do not show the query object, and the other queries' box regions.
* dense: focal + Dice of the fused heatmap vs the box mask on the positive; on the
  negative image the same loss against an empty mask (weight ``dense_negative_weight``),
  which pushes its peak — the fine score's first half — below the sigmoid bias.
* triplet (eq. 8): regions at the positive's heatmap peaks plus its gt box vs the
  regions at the negative's peaks.
* scale consistency: KL(per level ‖ fused) on the positive at its chosen query scale,
  the fused map detached (a teacher), levels too small for the template left out.
* box (beyond the seed): smooth-L1 of the box refiner's deltas on boxes jittered around
  the positive's gt box the way peak boxes miss it (in position and size), so that the
  fine stage's boxes take the object's place and extent rather than the query's size.

Validation ranks the held-out sequences' gallery (``manifest.json`` restricted to them)
by the fine score of every query against every image and scores the dump with the
benchmark code (mAP, CorLoc@0.5, …); the best step by mAP + CorLoc is kept.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from . import data as D
from .checkpoint import ASSETS, load_model, save_checkpoint
from .config import RetrievalConfig
from .encoding import coarse_regions
from .images import size_batches
from .box_refinement import box_deltas, jitter_boxes, refiner_deltas
from .losses import (box_mask, box_regression_loss, dense_loss, info_nce, peak_loss, scale_consistency_loss,
                     total_loss, triplet_region_loss)
from .matching import FINE_STRIDE, QueryEncoding, box_cells, match_query, reference_scale, stack_maps
from .model import LEVEL_STRIDES, TOP_DOWN_DAMPING, RetrievalModel
from .regions import pool_regions

REPO = ASSETS.parent
TERMS = ("nce", "dense", "peak", "trip", "scale", "box")
ALL_HEADS = ("fpn", "phi", "psi", "alpha_logits", "log_gamma", "head", "box_refiner")   # every trainable head of the model


@dataclass
class TrainConfig:
    name: str = "heads"                       # run folder: <runs_dir>/<name>
    # --- loss (eq. 6) --------------------------------------------------------
    lambda_nce: float = 1.0                   # λ1 InfoNCE on z vs box/grid region descriptors
    lambda_dense: float = 1.0                 # λ2 focal + Dice of the fused heatmap
    lambda_trip: float = 1.0                  # λ3 triplet over best regions (eq. 8)
    lambda_scale: float = 0.1                 # λ4 KL(per level ‖ fused)
    lambda_peak: float = 1.0                  # part of λ2's dense term: the argmax on the object (losses.peak_loss)
    peak_temperature: float = 20.0            # spatial softmax sharpness of the peak term
    peak_box_fraction: float = 0.5            # the peak target is the box's central part of this side fraction
    tau: float = 0.1                          # InfoNCE temperature
    margin: float = 0.1                       # m of eq. 8
    lambda_box: float = 1.0                   # λ5 box refiner's smooth-L1 on jittered gt boxes
    box_samples: int = 32                     # jittered boxes per positive
    box_synthetic: bool = True                # synthetic pairs train the refiner too (else real pairs only)
    box_scale_std: float = 0.3                # their log-size spread (peak boxes' measured error: .28)
    box_shift_std: float = 0.15               # their centre spread, a fraction of their size
    box_aspect_std: float = 0.1               # log aspect spread of the half that does not keep the query's aspect
    box_beta: float = 0.1                     # smooth-L1 β of the box term
    dense_temperature: float = 10.0           # heatmap → probability: sigmoid((H − bias)·temperature)
    dense_bias: float = 0.5
    dense_negative_weight: float = 0.5        # weight of the negative image's all-background dense term
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    scale_temperature: float = 10.0           # softmax sharpness of the KL's spatial distributions
    gamma: float | None = None                # initial fusion γ of eq. 4 (None: the model config's)
    learn_gamma: bool = True                  # γ is trained with the rest, else kept at its start value
    # --- optimisation --------------------------------------------------------
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 20                          # linear warm-up steps, then cosine decay to 0
    grad_clip: float = 1.0                    # max global gradient norm
    val_every: int = 25                       # steps between validations (and at step 0 and the end)
    seed: int = 0
    device: str = "auto"                      # auto: CUDA when available, else CPU
    amp: bool = True                          # bf16 autocast on CUDA (ignored on CPU)
    threads: int = 2                          # torch CPU threads
    unfreeze_last_blocks: int = 0             # backbone stages trained with the heads (0: frozen)
    init_checkpoint: str = "none"             # heads to start from: none (untrained), default or a path
    # which heads learn; the others keep their start values. The default leaves the FPN, φ and ψ
    # at their pass-through init: on tracking_dev, training them on the 9 training sequences
    # lowered the held-out fine-stage mAP (see assets/MODEL_CARD.md); add "fpn", "phi", "psi" to train them
    trained_modules: tuple[str, ...] = ("head", "alpha_logits", "log_gamma", "box_refiner")
    model_config: dict = field(default_factory=dict)  # RetrievalConfig fields to change (stored in the checkpoint)
    # --- data ----------------------------------------------------------------
    train_json: str = "../shared/data/tracking_dev/train.json"   # relative to the repository root
    manifest: str = "../shared/data/tracking_dev/manifest.json"  # the benchmark validated on
    heldout: tuple[str, ...] = D.HELDOUT_SEQUENCES
    synthetic_dirs: tuple[str, ...] = ("assets/demo",)           # folders of any images for copy-paste pairs
    synthetic_from_train_frames: bool = True  # training frames also give objects and backgrounds
    synthetic_count: int = 256                # composites precomputed at start
    synthetic_fraction: float = 0.5           # share of each batch from synthetic pairs
    hard_negatives: bool = False              # mine negatives with the coarse index after a first pass
    mine_after: float = 0.5                   # … at this fraction of the steps
    hard_negative_pool: int = 8               # mined negatives kept per query
    hard_negative_prob: float = 0.5           # chance a triple uses a mined negative
    window: tuple[int, ...] = (320, 256)      # train on windows of about this (width, height) px; () = whole images
    # --- output --------------------------------------------------------------
    runs_dir: str = "runs"                    # git-ignored; curves, logs, dumps, best.pt
    tap_cache: str = "runs/tap_cache"         # backbone taps kept between runs, keyed by their inputs ("" = off)
    checkpoint_out: str = "assets/checkpoint.pt"   # where the best heads are published ("" to skip)
    model_card: str = "assets/MODEL_CARD.md"       # written next to it ("" to skip)
    gem_baseline: bool = True                 # also score the global GeM baseline on the held-out set
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def weights(self) -> dict[str, float]:
        return {"nce": self.lambda_nce, "dense": self.lambda_dense, "peak": self.lambda_peak,
                "trip": self.lambda_trip, "scale": self.lambda_scale, "box": self.lambda_box}


def repo_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO / p


# --------------------------------------------------------------------------- CLI

def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config file.json`` plus one flag per :class:`TrainConfig` field, overriding it."""
    parser.add_argument("--config", dest="train_config", help="JSON file of TrainConfig fields")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"dest": f"train_{f.name}", "default": None, "help": f"(default {default!r})"}
        if isinstance(default, bool):
            kwargs.update(type=_parse_bool, metavar="BOOL")
        elif isinstance(default, tuple):
            kwargs.update(nargs="*")
        elif f.name == "gamma":
            kwargs.update(type=float)
        elif isinstance(default, dict):
            kwargs.update(type=json.loads, metavar="JSON")
        else:
            kwargs.update(type=type(default))
        parser.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    if getattr(args, "train_config", None):
        values.update(json.loads(Path(args.train_config).read_text()))
    for f in dataclasses.fields(TrainConfig):
        given = getattr(args, f"train_{f.name}", None)
        if given is not None:
            values[f.name] = tuple(given) if isinstance(given, list) else given
    return TrainConfig.from_dict(values)


def command_line() -> str:
    """The command as typed, with the interpreter written as ``python``."""
    argv0 = sys.argv[0].replace(os.sep, "/")
    if argv0.endswith("retrieval/__main__.py"):
        prog = ["python", "-m", "retrieval"]
    elif argv0.endswith("retrieval/train.py"):
        prog = ["python", "-m", "retrieval.train"]
    else:
        prog = [argv0]
    return shlex.join(prog + sys.argv[1:])


# --------------------------------------------------------------------------- encoding with gradients

def query_encoding(model: RetrievalModel, split: D.TapSplit, query: D.CachedQuery,
                   device: torch.device | str) -> QueryEncoding:
    """``matching.encode_query_in_context`` from cached taps, with gradients: per scale, the
    box's cells ROIAligned out of φ(P^l) of the context window → ``{level: (C, h_l, w_l)}``;
    z from the scale nearest 1."""
    templates, grids = [], []
    for taps, roi, cells in zip(query.taps, query.rois, query.cells):
        pyramid = D.pyramid_from_taps(model, split.live(D._to(taps, device)))
        maps = {level: model.phi(x) for level, x in pyramid.items()}
        templates.append({level: box_cells(fmap, roi, LEVEL_STRIDES[level], cells[level])
                          for level, fmap in maps.items()})
        grids.append(box_cells(maps["p3"], roi, FINE_STRIDE, model.config.refine_grid))
    descriptor = model.describe(templates[reference_scale(query.scales)]["p3"].unsqueeze(0))[0]
    return QueryEncoding(query.patch_size, list(query.scales), list(query.sizes), templates, descriptor,
                         torch.stack(grids))


def gallery_maps(model: RetrievalModel, split: D.TapSplit, image: D.CachedImage,
                 device: torch.device | str) -> dict[str, torch.Tensor]:
    """``model.encode_gallery`` from cached taps: ``{level: (C, H_l, W_l)}`` ψ maps."""
    pyramid = D.pyramid_from_taps(model, split.live(image.cached(device)))
    return {level: model.psi(x)[0] for level, x in pyramid.items()}


def p3_cells(size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of an image's P3 grid; ``size`` is (width, height)."""
    return math.ceil(size[1] / FINE_STRIDE), math.ceil(size[0] / FINE_STRIDE)


def embed_regions(model: RetrievalModel, p3: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Region descriptors as the index and eq. 5 make them: ``(C, H, W)`` map, ``(R, 4)`` boxes → ``(R, C)``."""
    cfg = model.config
    pooled = pool_regions(p3.unsqueeze(0), boxes.to(p3).unsqueeze(0), FINE_STRIDE, cfg.roi_size, model.head.gem_p)
    return model.head.embed(pooled[0])


def usable_levels(model: RetrievalModel, templates: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(L,)`` bool: levels where ``match_query`` correlates this template (not too wide)."""
    limit = model.config.max_template_cells
    return torch.tensor([max(templates[l].shape[-2:]) <= limit for l in model.levels])


def nearest_scales(boxes: torch.Tensor, query: QueryEncoding) -> torch.Tensor:
    """``(N,)`` index of the query scale nearest (in log) to each ``(N, 4)`` box's size over the query's,
    the scale whose peak such a box would have come from."""
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp_min(1e-6)
    scale = (area / (query.patch_size[0] * query.patch_size[1])).sqrt()
    log_scales = torch.tensor([math.log(s) for s in query.scales], device=boxes.device, dtype=boxes.dtype)
    return (scale.log().unsqueeze(1) - log_scales).abs().argmin(dim=1)


# --------------------------------------------------------------------------- the loss of one batch

def batch_losses(model: RetrievalModel, split: D.TapSplit, batch: list[D.Triple], cfg: TrainConfig,
                 device: torch.device | str) -> dict[str, torch.Tensor]:
    """The loss terms (unweighted scalars) of a batch of triples: the seed's four, the peak and box terms."""
    rcfg = model.config
    images = {}
    for t in batch:
        images.setdefault(t.positive.key, t.positive)
        images.setdefault(t.negative.key, t.negative)
    maps = {k: gallery_maps(model, split, im, device) for k, im in images.items()}
    coarse_boxes = {k: coarse_regions(im.size[1], im.size[0], rcfg) for k, im in images.items()}
    coarse_desc = {k: embed_regions(model, maps[k]["p3"], coarse_boxes[k]) for k in images}
    queries = [query_encoding(model, split, t.query, device) for t in batch]

    dense, peak, scale, trip, box = [], [], [], [], []
    box_regions, peak_regions = [], []
    for t, q in zip(batch, queries):
        pos, neg = images[t.positive.key], images[t.negative.key]
        sizes = torch.tensor([[pos.size[1], pos.size[0]], [neg.size[1], neg.size[0]]])
        match = match_query(model, q, stack_maps([maps[pos.key], maps[neg.key]]), sizes)
        (hp, wp), (hn, wn) = p3_cells(pos.size), p3_cells(neg.size)
        fused_pos, fused_neg = match.fused[0:1, :, :hp, :wp], match.fused[1:2, :, :hn, :wn]
        gt = torch.tensor([t.box], dtype=torch.float32, device=fused_pos.device)
        mask = box_mask(gt, hp, wp, FINE_STRIDE)
        d = dense_loss(fused_pos, mask, cfg.dense_temperature, cfg.dense_bias, cfg.focal_alpha, cfg.focal_gamma)
        if cfg.dense_negative_weight:
            d = d + cfg.dense_negative_weight * dense_loss(
                fused_neg, torch.zeros_like(fused_neg), cfg.dense_temperature, cfg.dense_bias,
                cfg.focal_alpha, cfg.focal_gamma)
        dense.append(d)
        if cfg.lambda_peak:
            cx, cy = (t.box[0] + t.box[2]) / 2, (t.box[1] + t.box[3]) / 2
            hw, hh = (t.box[2] - t.box[0]) * cfg.peak_box_fraction / 2, (t.box[3] - t.box[1]) * cfg.peak_box_fraction / 2
            centre = box_mask(torch.tensor([[cx - hw, cy - hh, cx + hw, cy + hh]], device=fused_pos.device),
                              hp, wp, FINE_STRIDE)
            peak.append(peak_loss(fused_pos, centre, cfg.peak_temperature))

        if cfg.lambda_box and (cfg.box_synthetic or not D.is_synthetic(pos)):
            jittered = jitter_boxes(gt, torch.tensor([q.patch_size[0] / q.patch_size[1]]), cfg.box_samples,
                                    cfg.box_scale_std, cfg.box_shift_std, cfg.box_aspect_std)[0]
            predicted = refiner_deltas(model.box_refiner, q.box_grids[nearest_scales(jittered, q)],
                                       maps[pos.key]["p3"].unsqueeze(0), jittered,
                                       torch.zeros(len(jittered), dtype=torch.long, device=gt.device),
                                       FINE_STRIDE, rcfg.refine_context)
            box.append(box_regression_loss(predicted, box_deltas(jittered, gt.expand_as(jittered)), cfg.box_beta))

        scale_idx = min(range(len(q.scales)), key=lambda i: abs(q.scales[i] - float(match.best_scale[0])))
        valid = usable_levels(model, q.templates[scale_idx]).to(fused_pos.device).unsqueeze(0)
        scale.append(scale_consistency_loss(match.per_level[0:1, :, :hp, :wp], fused_pos.detach(),
                                            cfg.scale_temperature, valid))

        pos_boxes = torch.cat([match.boxes[0][torch.isfinite(match.box_scores[0])], gt.to(match.boxes)])
        neg_boxes = match.boxes[1][torch.isfinite(match.box_scores[1])]
        if len(neg_boxes) == 0:  # a blank image without peaks: its coarse regions stand in
            neg_boxes = coarse_boxes[neg.key]
        pos_r = embed_regions(model, maps[pos.key]["p3"], pos_boxes)
        neg_r = embed_regions(model, maps[neg.key]["p3"], neg_boxes)
        z = q.descriptor
        trip.append(triplet_region_loss((pos_r @ z).unsqueeze(0), (neg_r @ z).unsqueeze(0), cfg.margin))
        box_regions.append(pos_r[-1])
        peak_regions.append(neg_r)

    nce = []
    for i, (t, q) in enumerate(zip(batch, queries)):
        best_region = int(box_iou(torch.tensor([t.box]), coarse_boxes[t.positive.key]).argmax())
        keys = torch.stack([box_regions[i], coarse_desc[t.positive.key][best_region]]).unsqueeze(0)
        negatives = [coarse_desc[k] for k, im in images.items() if not D.shows(im, t.query)]
        negatives += [peak_regions[j] for j, tj in enumerate(batch) if not D.shows(tj.negative, t.query)]
        negatives += [box_regions[j].unsqueeze(0) for j, tj in enumerate(batch)
                      if not D.shows(tj.positive, t.query)]
        nce.append(info_nce(q.descriptor.unsqueeze(0), keys, cfg.tau, negatives=torch.cat(negatives)))

    mean = lambda xs: torch.stack(xs).mean()  # noqa: E731
    terms = {"nce": mean(nce), "dense": mean(dense), "trip": mean(trip), "scale": mean(scale)}
    if peak:
        terms["peak"] = mean(peak)
    if box:
        terms["box"] = mean(box)
    return terms


# --------------------------------------------------------------------------- model and optimiser

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def param_groups(model: RetrievalModel, split: D.TapSplit,
                 trained_modules: tuple[str, ...] = TrainConfig.trained_modules) -> list[dict[str, Any]]:
    """The trained parameters (those of ``trained_modules``), each group with an ``lr_scale``.

    Adam moves every weight by about lr per step whatever its size. The FPN's lateral
    convs start ``TOP_DOWN_DAMPING ** depth`` smaller (so each level first carries its own
    tap, the top-down path weak), and P4/P5 and their biases live at that scale: their
    learning rate is scaled the same way, or the first steps would overwrite P4/P5.
    The φ/ψ biases stay at zero: one bias shared by levels whose features differ 400× in
    magnitude would swamp the coarse levels' correlation.
    """
    for name, p in model.named_parameters():
        if not name.startswith("backbone."):
            p.requires_grad_(name.split(".")[0] in trained_modules)
    model.phi.bias.requires_grad_(False)
    model.psi.bias.requires_grad_(False)
    scaled: list[tuple[float, list[torch.nn.Parameter]]] = []
    in_scaled: set[int] = set()
    for depth, (inner, layer) in enumerate(zip(model.fpn.inner_blocks, model.fpn.layer_blocks)):
        params = [p for p in list(inner.parameters()) + [layer[0].bias] if p.requires_grad]
        scaled.append((TOP_DOWN_DAMPING ** depth, params))
        in_scaled.update(id(p) for p in params)
    plain = [p for n, p in model.named_parameters()
             if not n.startswith("backbone.") and p.requires_grad and id(p) not in in_scaled]
    groups = [{"params": plain, "lr_scale": 1.0}]
    groups += [{"params": ps, "lr_scale": scale} for scale, ps in scaled if ps]
    backbone = split.trainable_parameters()
    if backbone:
        groups.append({"params": backbone, "lr_scale": 0.1})  # pretrained weights move gently
    return groups


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[RetrievalModel, D.TapSplit, list[dict[str, Any]]]:
    """The model to train, its backbone split and the optimiser's parameter groups."""
    base = RetrievalConfig()
    if cfg.init_checkpoint.lower() != "none":
        from .checkpoint import read_checkpoint, resolve_checkpoint

        path = resolve_checkpoint(cfg.init_checkpoint)
        base = RetrievalConfig.from_dict(read_checkpoint(path)["config"]) if path else base
    unknown = sorted(set(cfg.model_config) - set(base.to_dict()))
    if unknown:
        raise ValueError(f"model_config: {unknown} are not RetrievalConfig fields")
    overrides = RetrievalConfig.from_dict({**base.to_dict(), **cfg.model_config})
    model, _ = load_model(cfg.init_checkpoint, device="cpu", config=overrides)
    if cfg.gamma is not None:
        with torch.no_grad():
            model.log_gamma.fill_(math.log(cfg.gamma))
    model.log_gamma.requires_grad_(cfg.learn_gamma)
    model = model.to(device)
    split = D.TapSplit(model.backbone, cfg.unfreeze_last_blocks)
    unknown = sorted(set(cfg.trained_modules) - {n.split(".")[0] for n, _ in model.named_parameters()})
    if unknown:
        raise ValueError(f"trained_modules: the model has no {unknown}")
    modules = tuple(m for m in cfg.trained_modules if m != "log_gamma" or cfg.learn_gamma)
    return model, split, param_groups(model, split, modules)


@dataclass
class TrainedWeights:
    """What ``checkpoint.save_checkpoint`` stores: the heads, plus the backbone stages that
    were unfrozen (``load_model`` loads any key the model has, so those come back too)."""

    model: RetrievalModel
    backbone_keys: tuple[str, ...] = ()

    @property
    def config(self) -> RetrievalConfig:
        return self.model.config

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        state = self.model.head_state_dict()
        full = self.model.state_dict()
        state.update({k: full[k] for k in self.backbone_keys})
        return state


def trained_backbone_keys(model: RetrievalModel) -> tuple[str, ...]:
    return tuple(n for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay to 0 at ``cfg.steps``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_steps(model: RetrievalModel, split: D.TapSplit, groups: list[dict[str, Any]],
                sampler: D.PairSampler | None, cfg: TrainConfig, device: torch.device,
                fixed_batch: list[D.Triple] | None = None, start: int = 0, stop: int | None = None,
                optimizer: torch.optim.Optimizer | None = None,
                on_step=None) -> tuple[torch.optim.Optimizer, list[dict[str, float]]]:
    """Optimise from step ``start`` to ``stop`` (default ``cfg.steps``); one log dict per step.

    ``fixed_batch`` replaces sampling (for tests). ``on_step(step, log)`` is called after
    each update.
    """
    if optimizer is None:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    use_amp = cfg.amp and device.type == "cuda"
    logs = []
    model.train()
    for step in range(start, cfg.steps if stop is None else stop):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * group["lr_scale"] * lr_factor(step, cfg)
        batch = fixed_batch if fixed_batch is not None else sampler.sample(cfg.batch_size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            terms = batch_losses(model, split, batch, cfg, device)
        loss, log = total_loss({k: v.float() for k, v in terms.items()}, cfg.weights())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        log["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        optimizer.step()
        log.update(step=step + 1, lr=optimizer.param_groups[0]["lr"])
        logs.append(log)
        if on_step is not None:
            on_step(step + 1, log)
    return optimizer, logs


# --------------------------------------------------------------------------- validation

@dataclass
class ValidationSet:
    bench: Any                                  # evaluation.benchmark.Benchmark of the held-out sequences
    gallery: list[D.CachedImage]                # in manifest order, keys = gallery ids
    queries: list[D.CachedQuery]                # in manifest order, keys = query ids


def build_validation_set(manifest_path: Path, sequences: tuple[str, ...], split: D.TapSplit,
                         config: RetrievalConfig, run_dir: Path, device: torch.device,
                         cache=lambda build: build()) -> ValidationSet:
    """The benchmark restricted to ``sequences`` (written to ``run_dir``), its taps cached.

    ``cache(build)`` returns ``build()``'s ``(gallery images, {"queries": [...]})`` or a stored copy.
    """
    from .evaluation.benchmark import load_manifest
    from .images import load_image, resize_max_side

    manifest = json.loads(manifest_path.read_text())
    held = D.heldout_manifest(manifest, sequences, root=manifest_path.parent)
    path = run_dir / "heldout_manifest.json"
    path.write_text(json.dumps(held, indent=1))
    bench = load_manifest(path)

    def build():
        images = [load_image(item.path) for item in bench.gallery]
        taps = D.encode_images(split, images, device)
        gallery = [D.CachedImage(item.id, img.size, frozenset({D.sequence_of(item.id)}), entry)
                   for item, img, entry in zip(bench.gallery, images, taps)]
        queries = []
        for q in bench.queries:  # as the search engine prepares a query given as (image, box)
            source, scale = resize_max_side(load_image(q.image), config.max_side)
            box = tuple(v * scale for v in q.box)
            queries.append(D.encode_query_context(split, source, box, config, q.id, D.sequence_of(q.id), device))
        return gallery, {"queries": queries}

    gallery, queries = cache(build)
    return ValidationSet(bench, gallery, queries["queries"])


@torch.no_grad()
def rank_heldout(model: RetrievalModel, split: D.TapSplit, val: ValidationSet, device: torch.device,
                 chunk: int = 30) -> tuple[dict, dict]:
    """Results dumps (BENCHMARKS.md format) of the fine stage over the whole held-out gallery
    (``ours-dense``) and of the coarse stage alone (``ours-coarse``: max over grid regions)."""
    model.eval()
    cfg = model.config
    maps = [gallery_maps(model, split, im, device) for im in val.gallery]
    coarse = [embed_regions(model, m["p3"], coarse_regions(im.size[1], im.size[0], cfg))
              for m, im in zip(maps, val.gallery)]
    batches = size_batches([im.size for im in val.gallery], chunk)
    fine_records, coarse_records = [], []
    for query in val.queries:
        q = query_encoding(model, split, query, device)
        scores = torch.empty(len(val.gallery))
        boxes: list[list[float] | None] = [None] * len(val.gallery)
        for part in batches:
            w, h = val.gallery[part[0]].size
            match = match_query(model, q, stack_maps([maps[i] for i in part]), torch.tensor([[h, w]] * len(part)))
            scores[part] = match.score.float().cpu()
            for j, i in enumerate(part):
                if torch.isfinite(match.box_scores[j, 0]):
                    boxes[i] = [float(v) for v in match.boxes[j, 0]]
        coarse_scores = torch.stack([(r @ q.descriptor).max() for r in coarse]).float().cpu()
        for records, values, with_boxes in ((fine_records, scores, True), (coarse_records, coarse_scores, False)):
            order = torch.argsort(values, descending=True, stable=True).tolist()
            records.append({"id": query.key, "ranking": [
                {"id": val.gallery[i].key, "score": float(values[i]), "box": boxes[i] if with_boxes else None}
                for i in order]})
    make = lambda method, records: {"benchmark": val.bench.name, "method": method,  # noqa: E731
                                    "config": cfg.to_dict(), "meta": {}, "queries": records}
    return make("ours-dense", fine_records), make("ours-coarse", coarse_records)


def validate(model: RetrievalModel, split: D.TapSplit, val: ValidationSet, device: torch.device) -> dict[str, float]:
    """mAP, R@K, loc-mAP and CorLoc@0.5 of the fine stage, and mAP of the coarse stage alone."""
    from .evaluation.benchmark import score_run

    was_training = model.training
    fine, coarse = rank_heldout(model, split, val, device)
    model.train(was_training)
    out = {k: v for k, v in score_run(fine, val.bench).items() if isinstance(v, float)}
    out["coarse_mAP"] = score_run(coarse, val.bench)["mAP"]
    return out


def selection_score(metrics: dict[str, float]) -> float:
    """What "best" means when keeping a checkpoint: the fine stage's retrieval and
    localisation, and the coarse stage's mAP (it decides which images the fine stage sees)."""
    return metrics["mAP"] + metrics["CorLoc@0.5"] + metrics.get("coarse_mAP", 0.0)


def gem_baseline(backbone: torch.nn.Module, bench: Any) -> dict[str, float]:
    """The global GeM baseline (backbone c5, p = 3) on the same benchmark and backbone."""
    from .evaluation.global_baselines import GlobalDescriptorMethod
    from .evaluation.harness import evaluate

    _, metrics = evaluate(GlobalDescriptorMethod("gem", backbone=backbone), bench)
    return {k: v for k, v in metrics.items() if k in ("mAP", "R@1", "R@10", "loc-mAP@0.5", "CorLoc@0.5")}


# --------------------------------------------------------------------------- hard negatives

@torch.no_grad()
def mine_hard_negatives(model: RetrievalModel, split: D.TapSplit, sampler: D.PairSampler,
                        device: torch.device, pool: int) -> dict[str, list[str]]:
    """For each query, the ``pool`` images not showing it that the coarse index scores highest."""
    was_training = model.training
    model.eval()
    cfg = model.config
    keys = sorted(sampler.images)
    regions, owner = [], []
    for n, key in enumerate(keys):
        im = sampler.images[key]
        r = embed_regions(model, gallery_maps(model, split, im, device)["p3"],
                          coarse_regions(im.size[1], im.size[0], cfg))
        regions.append(r)
        owner.append(torch.full((len(r),), n))
    regions_t, owner_t = torch.cat(regions), torch.cat(owner).to(device)
    hard = {}
    for query in sampler.real + sampler.synthetic:
        z = query_encoding(model, split, query, device).descriptor
        per_image = torch.full((len(keys),), -2.0, device=device).scatter_reduce(
            0, owner_t, (regions_t @ z).float(), reduce="amax")
        allowed = torch.tensor([query.tag not in sampler.images[k].tags for k in keys], device=device)
        per_image = per_image.masked_fill(~allowed, -3.0)
        top = per_image.topk(min(pool, int(allowed.sum()))).indices.tolist()
        hard[query.key] = [keys[i] for i in top]
    model.train(was_training)
    return hard


# --------------------------------------------------------------------------- curves, card

def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(path: Path, train_rows: list[dict[str, Any]], val_rows: list[dict[str, Any]]) -> None:
    """Loss terms (smoothed) and validation metrics against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    if train_rows:
        for name in (n for n in (*TERMS, "total") if any(n in r for r in train_rows)):
            # a term can be absent from a step (the box term on a batch of synthetic pairs only)
            steps = np.array([r["step"] for r in train_rows if name in r])
            values = np.array([r[name] for r in train_rows if name in r], dtype=float)
            k = max(1, len(values) // 25)
            smooth = np.convolve(values, np.ones(k) / k, mode="valid")
            ax_loss.plot(steps[k - 1:], smooth, label=name)
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel(f"loss (unweighted terms, running mean)")
        ax_loss.set_yscale("log")
        ax_loss.legend()
    if val_rows:
        steps = [r["step"] for r in val_rows]
        for name in ("mAP", "CorLoc@0.5", "loc-mAP@0.5", "coarse_mAP"):
            ax_val.plot(steps, [r[name] for r in val_rows], marker="o", label=name)
        ax_val.set_xlabel("step")
        ax_val.set_ylabel("held-out sequences")
        ax_val.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_model_card(path: Path, meta: dict[str, Any]) -> None:
    """``assets/MODEL_CARD.md`` from a checkpoint's meta."""
    before, after = meta["validation_untrained"], meta["validation_best"]
    rows = [("GeM global baseline (c5, p = 3, same backbone)", meta.get("gem_baseline")),
            ("untrained heads (`--checkpoint none`), fine stage over the whole held-out gallery", before),
            (f"trained heads (this checkpoint, step {meta['best_step']}), same", after)]
    table = ["| model | mAP | R@1 | R@10 | loc-mAP@0.5 | CorLoc@0.5 | coarse mAP |", "|---|---|---|---|---|---|---|"]
    for label, m in rows:
        if m:
            cells = [f"{m[k]:.3f}" if k in m else "–" for k in ("mAP", "R@1", "R@10", "loc-mAP@0.5", "CorLoc@0.5",
                                                                "coarse_mAP")]
            table.append(f"| {label} | " + " | ".join(cells) + " |")
    rel = (after["mAP"] / before["mAP"] - 1.0) * 100.0 if before["mAP"] else float("nan")
    curve = [r for r in meta.get("validation_curve", []) if r["step"] > 0]
    spread = ""
    if curve:
        last, later = curve[-1], [r for r in curve if r["step"] >= meta["steps"] / 3]   # past the early steps
        spread = (f" The last step ({last['step']}) gives mAP {last['mAP']:.3f} and CorLoc@0.5 "
                  f"{last['CorLoc@0.5']:.3f} ({(last['mAP'] / before['mAP'] - 1.0) * 100.0:+.1f} %, "
                  f"{last['CorLoc@0.5'] - before['CorLoc@0.5']:+.3f}); from step {later[0]['step']} on, CorLoc@0.5 "
                  f"stays within {min(r['CorLoc@0.5'] for r in later):.3f}–"
                  f"{max(r['CorLoc@0.5'] for r in later):.3f} and mAP within "
                  f"{min(r['mAP'] for r in later):.3f}–{max(r['mAP'] for r in later):.3f}.")
    cfg = meta["train_config"]
    text = f"""# Model card: trained retrieval heads (`assets/checkpoint.pt`)

**What it is.** The heads of the patch-query retrieval model (seed 000): FPN
(P3/P4/P5, {meta['model_config']['fpn_channels']} channels), the 1×1 convolutions φ (query) and ψ
(gallery), the descriptor MLP with its GeM exponent, the fusion weights α and
temperature γ of eq. 4, and the box refiner (`retrieval/box_refinement.py`: from the
cosines between the query box's cells and the cells around a peak box, the shift and size
change that put the box on the object) — {meta['checkpoint_bytes'] / 1e6:.1f} MB. Trained here: **{', '.join(cfg.get('trained_modules', ALL_HEADS))}**
({meta['parameters']:,} parameters); the other heads keep their initialisation (FPN as a
pass-through of each backbone tap, φ = ψ = identity), so the fine stage correlates the
pretrained features. Why: see `docs/training.md` — training the FPN, φ and ψ on the nine
training sequences lowered the held-out fine-stage mAP on a CPU budget.
The pretrained backbone ({meta['model_config']['backbone']}, ImageNet) is
{'frozen and not stored' if not cfg['unfreeze_last_blocks'] else f"frozen except its last {cfg['unfreeze_last_blocks']} stages, which are stored"};
it comes from its own package. The app, the CLI and the evaluator load this file by
default; `--checkpoint none` gives the untrained heads.

**Intended use.** Instance search with a cropped patch (find the images that show
this object, where, ranked), on everyday photos and video frames. It is not a
face-recognition or identification system and was not evaluated as one.

## Training data
- Real pairs: the frames of {len(meta['split']['train'])} training sequences of `tracking_dev`
  (`../shared/data/tracking_dev/train.json`): {', '.join(meta['split']['train'])}.
  **Research use only** (OTB-2015, VOT-2015, DTB70, UAV123, UAVDT via public GitHub demo
  copies; see that folder's README). The images are not shipped, only the weights
  trained on them — whoever redistributes the weights should check that this fits the
  terms of those benchmarks.
- Synthetic copy-paste pairs ({cfg['synthetic_count']} composites, fixed seed {cfg['seed']}): object
  crops from {', '.join(cfg['synthetic_dirs']) or 'no folder'}{' and the training frames' if cfg['synthetic_from_train_frames'] else ''}
  pasted into other images at 0.25–4× scale, ±30° rotation, colour jitter, blur and up to 50 %
  occlusion. `assets/demo` holds only public-domain / CC0 material (see `assets/LICENSES.md`).
- Held out, never seen in training (not even as synthetic backgrounds):
  **{', '.join(meta['split']['validation'])}**.

## Results on the held-out sequences
`manifest.json` restricted to the held-out sequences: {meta['heldout_gallery']} gallery images,
{meta['heldout_queries']} queries. Fine stage = eq. 3–5 of every query against every held-out
image; coarse mAP = ranking by the best coarse-region descriptor alone (whole image + {'/'.join(str(w) for w in meta['model_config']['coarse_windows'])} px windows, as the index stores them).

{chr(10).join(table)}

mAP changes by {rel:+.1f} % relative, CorLoc@0.5 by {after['CorLoc@0.5'] - before['CorLoc@0.5']:+.3f} absolute.
The kept step was chosen on these same sequences (best mAP + CorLoc + coarse mAP among
{meta['validations']} validations), so the trained row is slightly optimistic.{spread} `docs/results.md`
has the coarse-to-fine pipeline on these sequences and on COIL-20, which training never saw.

## Training run
- command: `{meta['command']}`
- steps: {meta['steps']} (batch {cfg['batch_size']}, AdamW lr {cfg['lr']}, weight decay {cfg['weight_decay']}),
  kept step {meta['best_step']}
- loss: {cfg['lambda_nce']}·InfoNCE (τ = {cfg['tau']}) + {cfg['lambda_dense']}·(focal + Dice) +
  {cfg.get('lambda_peak', 0.0)}·peak (spatial-softmax mass on the box centre) +
  {cfg['lambda_trip']}·triplet (m = {cfg['margin']}) + {cfg['lambda_scale']}·KL +
  {cfg.get('lambda_box', 0.0)}·box (smooth-L1 of the refiner's deltas on {cfg.get('box_samples', 0)} boxes per positive,
  jittered around its gt box: log-size σ {cfg.get('box_scale_std', 0.0)}, shift σ {cfg.get('box_shift_std', 0.0)})
- wall time: {meta['wall_seconds'] / 60:.1f} min on {meta['device']} ({meta['threads']} threads), torch {meta['torch']}
- full configuration: `meta["train_config"]` inside the checkpoint
  (`python -c "from retrieval.checkpoint import read_checkpoint; print(read_checkpoint('assets/checkpoint.pt')['meta'])"`)

## Reproduce
```
{meta['command']}
```
from the repository root, with `../shared/data/tracking_dev` present. Curves, logs and
results dumps go to `runs/{cfg['name']}/` (`curves.png`, `train_log.csv`, `validation.csv`).
"""
    path.write_text(text)


# --------------------------------------------------------------------------- the run

def cache_key(cfg: TrainConfig, config: RetrievalConfig, sequences: tuple[str, ...]) -> str:
    """Hash of everything the cached taps depend on."""
    import hashlib

    files = []
    for p in (repo_path(cfg.train_json), repo_path(cfg.manifest)):
        files.append([str(p), p.stat().st_size, p.stat().st_mtime_ns] if p.exists() else [str(p)])
    for folder in cfg.synthetic_dirs:
        listing = [str(f) for f in D.list_image_files(repo_path(folder))] if repo_path(folder).is_dir() else []
        files.append([str(folder), listing, [f.stat().st_size for f in map(Path, listing)]])
    key = {"format": 1, "sequences": list(sequences), "files": files, "unfreeze": cfg.unfreeze_last_blocks,
           "seed": cfg.seed, "synthetic": [cfg.synthetic_count, cfg.synthetic_from_train_frames],
           "model": config.model_fingerprint(),
           "query": [list(config.query_scales), config.min_query_side, config.max_template_cells,
                     config.context_ratio, config.context_min_px, config.min_side]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def with_tap_cache(cfg: TrainConfig, name: str, key: str, build):
    """``build()`` → ``(images, {name: queries})``, stored under ``cfg.tap_cache`` and reused."""
    if not cfg.tap_cache:
        return build()
    path = repo_path(cfg.tap_cache) / f"{name}-{key}.pt"
    if path.is_file():
        return D.load_cache(path)
    images, queries = build()
    D.save_cache(path, images, queries)
    return images, queries


def synthetic_sources(cfg: TrainConfig, frames: dict[str, list[D.TrackFrame]]) -> list[D.SourceImage]:
    sources: list[D.SourceImage] = []
    for folder in cfg.synthetic_dirs:
        sources += D.folder_sources(repo_path(folder))
    if cfg.synthetic_from_train_frames:
        sources += [D.SourceImage(fr.key, fr.sequence, fr.path, fr.box) for seq in frames.values() for fr in seq]
    return sources


def train(cfg: TrainConfig, command: str = "") -> dict[str, Any]:
    """The whole run; returns the meta dict stored with the checkpoint."""
    from tqdm import tqdm

    start_time = time.perf_counter()
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run_dir = repo_path(cfg.runs_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    model, split_bb, groups = build_model(cfg, device)
    all_frames = D.load_train_json(repo_path(cfg.train_json))
    split = D.split_sequences(all_frames, cfg.heldout)
    (run_dir / "split.json").write_text(json.dumps(split.to_dict(), indent=1))
    frames = {name: all_frames[name] for name in split.train}

    def build_train_cache():
        composites = D.make_composites(synthetic_sources(cfg, frames), cfg.synthetic_count, cfg.seed,
                                       max_side=model.config.max_side) if cfg.synthetic_count else []
        images, real, synthetic = D.cache_training_set(split_bb, frames, composites, model.config, device,
                                                       cfg.progress)
        return list(images.values()), {"real": real, "synthetic": synthetic}

    cached, queries = with_tap_cache(cfg, "train", cache_key(cfg, model.config, split.train), build_train_cache)
    images, real, synthetic = {im.key: im for im in cached}, queries["real"], queries["synthetic"]
    val = build_validation_set(repo_path(cfg.manifest), split.validation, split_bb, model.config, run_dir, device,
                               cache=lambda build: with_tap_cache(
                                   cfg, "heldout", cache_key(cfg, model.config, split.validation), build))
    cache_mb = D.cache_bytes(list(images.values()) + val.gallery, real + synthetic + val.queries) / 1e6
    print(f"cached {len(images)} training images, {len(real)} real + {len(synthetic)} synthetic queries, "
          f"{len(val.gallery)} + {len(val.queries)} held-out ({cache_mb:.0f} MB) in "
          f"{time.perf_counter() - start_time:.0f} s", flush=True)
    sampler = D.PairSampler(images, real, synthetic, cfg.synthetic_fraction, cfg.seed,
                            hard_prob=cfg.hard_negative_prob, window=tuple(cfg.window) or None)

    train_rows: list[dict[str, Any]] = []
    val_rows: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    best_path = run_dir / "best.pt"

    def run_validation(step: int) -> None:
        t0 = time.perf_counter()
        metrics = validate(model, split_bb, val, device)
        row = {"step": step, **metrics, "seconds": time.perf_counter() - t0}
        val_rows.append(row)
        write_csv(run_dir / "validation.csv", val_rows)
        print(f"\nstep {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
        if not best or selection_score(metrics) > selection_score(best["metrics"]):
            best.update(step=step, metrics=metrics)
            save_checkpoint(TrainedWeights(model, backbone_keys), best_path, {"step": step, "validation": metrics})

    backbone_keys = trained_backbone_keys(model)
    run_validation(0)
    untrained = dict(val_rows[0])
    bar = tqdm(total=cfg.steps, desc="training", disable=not cfg.progress, dynamic_ncols=True)

    def on_step(step: int, log: dict[str, float]) -> None:
        train_rows.append(log)
        bar.update(1)
        bar.set_postfix({k: f"{log[k]:.3f}" for k in (*TERMS, "total") if k in log})
        if step % cfg.val_every == 0 or step == cfg.steps:
            run_validation(step)
            write_csv(run_dir / "train_log.csv", train_rows)
            plot_curves(run_dir / "curves.png", train_rows, val_rows)

    mine_at = int(cfg.mine_after * cfg.steps) if cfg.hard_negatives else cfg.steps
    optimizer, _ = train_steps(model, split_bb, groups, sampler, cfg, device, stop=mine_at, on_step=on_step)
    if mine_at < cfg.steps:
        sampler.hard = mine_hard_negatives(model, split_bb, sampler, device, cfg.hard_negative_pool)
        train_steps(model, split_bb, groups, sampler, cfg, device, start=mine_at, optimizer=optimizer,
                    on_step=on_step)
    bar.close()
    write_csv(run_dir / "train_log.csv", train_rows)
    plot_curves(run_dir / "curves.png", train_rows, val_rows)

    best_model, _ = load_model(best_path, device=device)
    baseline = gem_baseline(best_model.backbone, val.bench) if cfg.gem_baseline else None
    wall = time.perf_counter() - start_time
    from .evaluation.harness import describe_device

    meta = {
        "command": command, "train_config": cfg.to_dict(), "model_config": model.config.to_dict(),
        "split": split.to_dict(), "steps": cfg.steps, "best_step": best["step"], "wall_seconds": wall,
        "device": describe_device(device), "threads": torch.get_num_threads(), "torch": str(torch.__version__),
        "python": platform.python_version(), "validations": len(val_rows),
        "heldout_gallery": len(val.gallery), "heldout_queries": len(val.queries),
        "train_images": len(images), "train_queries": {"real": len(real), "synthetic": len(synthetic)},
        "validation_untrained": {k: v for k, v in untrained.items() if k not in ("step", "seconds")},
        "validation_best": best["metrics"], "validation_curve": val_rows, "gem_baseline": baseline,
        "parameters": sum(p.numel() for g in groups for p in g["params"]),
    }
    save_checkpoint(TrainedWeights(best_model, backbone_keys), best_path, meta)
    meta["checkpoint_bytes"] = best_path.stat().st_size
    if cfg.checkpoint_out:
        out = repo_path(cfg.checkpoint_out)
        save_checkpoint(TrainedWeights(best_model, backbone_keys), out, meta)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
        if cfg.model_card:
            write_model_card(repo_path(cfg.model_card), meta)
            print(f"wrote {repo_path(cfg.model_card)}")
    (run_dir / "summary.json").write_text(json.dumps({k: meta[k] for k in (
        "best_step", "wall_seconds", "validation_untrained", "validation_best", "gem_baseline")}, indent=1))
    return meta


def run(args: argparse.Namespace) -> int:
    """Entry point of ``python -m retrieval train``."""
    cfg = config_from_args(args)
    meta = train(cfg, command_line())
    before, after = meta["validation_untrained"], meta["validation_best"]
    print(f"held-out mAP {before['mAP']:.3f} → {after['mAP']:.3f}, "
          f"CorLoc@0.5 {before['CorLoc@0.5']:.3f} → {after['CorLoc@0.5']:.3f} "
          f"(step {meta['best_step']}, {meta['wall_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m retrieval.train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
