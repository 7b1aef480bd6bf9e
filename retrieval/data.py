"""Training data: the sequence split, real and synthetic pairs, and the cache of backbone taps.

The backbone is frozen (or frozen up to its last stages), so what it computes for a
training image never changes: every image and every query patch goes through it once,
at start, and a training step only runs the FPN, φ/ψ, the descriptor head and the
correlation. That is what makes training on two CPU cores a matter of minutes.

Pairs
-----
* real: the query is the tracked object's box in one frame of a training sequence
  (encoded with its surroundings, as a search encodes a box a user drew), the positive
  another frame of the same sequence with its box, the negative a frame that shows
  nothing of that sequence;
* synthetic: a crop of any image (an annotated object when the source has one, else a
  random textured window) pasted into another image at random scale (0.25–4× the
  crop), rotation, colour jitter, blur and partial occlusion; the pasted box is the
  label and the crop's box in its source image is the query.

Every cached image carries ``tags``: the sources whose content it shows (a tracking
sequence, or a synthetic source folder). An image is a negative for a query only when
it does not carry the query's tag, which keeps frames of the query's own video — and
composites built from them — out of its negatives.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter
from torch import nn

from .backbones import EfficientNetLite0Taps, ResNet50Taps
from .config import RetrievalConfig
from .images import (ImageLoadError, crop_box, list_image_files, load_image, resize_max_side, size_batches,
                     to_tensor)
from .matching import context_window, template_cells, usable_scales
from .model import _TAP_OF_LEVEL, RetrievalModel

Box = tuple[float, float, float, float]

# Held out of training, reported on: two easy close-range sequences (a blurred face, a
# deforming bag), one of people walking, and three small-target drone sequences (a surfer,
# a small car, a mountain biker). The nine others (faces, a toy, a motorbike, a car, a
# person, a gull and two traffic scenes from drones) train.
HELDOUT_SEQUENCES = ("Jumping", "bag", "Couple", "Surfing06", "car10", "MountainBike6")
SYNTHETIC_PREFIX = "synthetic/"   # keys of copy-paste composites


# --------------------------------------------------------------------------- split

@dataclass(frozen=True)
class SequenceSplit:
    train: tuple[str, ...]
    validation: tuple[str, ...]

    def to_dict(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "validation": list(self.validation)}


def split_sequences(names: Iterable[str], heldout: Sequence[str] = HELDOUT_SEQUENCES) -> SequenceSplit:
    """Deterministic split: ``heldout`` validates, every other name trains (both sorted).

    Raises ``ValueError`` when a held-out name is not among ``names`` (a typo would
    otherwise silently train on everything).
    """
    names = sorted(set(names))
    missing = sorted(set(heldout) - set(names))
    if missing:
        raise ValueError(f"held-out sequences {missing} are not in the data ({', '.join(names)})")
    held = set(heldout)
    return SequenceSplit(tuple(n for n in names if n not in held), tuple(sorted(held)))


@dataclass(frozen=True)
class TrackFrame:
    sequence: str
    path: Path          # absolute
    box: Box            # the tracked object, stored-image pixels
    frame: int

    @property
    def key(self) -> str:
        return f"{self.sequence}/{self.frame:04d}"


def load_train_json(path: str | os.PathLike) -> dict[str, list[TrackFrame]]:
    """``train.json`` → ``{sequence: [frames]}``; paths resolved against the file's folder."""
    path = Path(path)
    data = json.loads(path.read_text())
    out: dict[str, list[TrackFrame]] = {}
    for seq in data["sequences"]:
        out[str(seq["name"])] = [TrackFrame(str(seq["name"]), path.parent / f["path"],
                                            tuple(float(v) for v in f["box"]), int(f["frame"]))
                                 for f in seq["frames"]]
    return out


def sequence_of(item_id: str) -> str:
    """Benchmark ids are ``<sequence>/<frame or query>``."""
    return item_id.split("/", 1)[0]


def heldout_manifest(manifest: dict, sequences: Iterable[str], root: str | os.PathLike | None = None) -> dict:
    """The benchmark restricted to ``sequences``: their gallery images and queries only.

    ``root`` (the original manifest's folder) makes every path absolute, so the result
    can be written anywhere and still be read by ``load_manifest``. Junk lists keep only
    ids that remain in the gallery.
    """
    keep = set(sequences)
    gallery = [dict(g) for g in manifest["gallery"] if sequence_of(g["id"]) in keep]
    ids = {g["id"] for g in gallery}
    queries = [dict(q, junk=[j for j in q.get("junk", []) if j in ids])
               for q in manifest["queries"] if sequence_of(q["id"]) in keep]
    if root is not None:
        for g in gallery:
            g["path"] = str(Path(root) / g["path"])
        for q in queries:
            q["image"] = str(Path(root) / q["image"])
    out = {k: v for k, v in manifest.items() if k not in ("gallery", "queries", "sources")}
    out.update(name=f"{manifest.get('name', 'benchmark')}-heldout", gallery=gallery, queries=queries,
               description=f"{manifest.get('name', 'benchmark')} restricted to the held-out sequences "
                           f"{', '.join(sorted(keep))}")
    return out


# --------------------------------------------------------------------------- backbone taps

class TapSplit:
    """A backbone cut in two: a frozen front whose output is cached, and trainable last stages.

    ``frozen(images)`` → what to cache: the taps the front produces, plus ``"x"``, the
    input of the first trainable stage, when there is one. ``live(cached)`` → the full
    taps ``{"c3", "c4", "c5"}`` (the trainable stages run here, with gradients).
    With ``unfreeze_last = 0`` the cache holds the taps themselves and ``live`` is a
    lookup.
    """

    def __init__(self, backbone: nn.Module, unfreeze_last: int = 0) -> None:
        if isinstance(backbone, EfficientNetLite0Taps):
            names = {idx: name for name, idx in backbone.tap_blocks.items()}
            self._prepare: Callable[[torch.Tensor], torch.Tensor] = \
                lambda im: backbone.stem(im * 255.0 / 128.0 - 127.0 / 128.0)  # as in its forward
            self.stages = [(block, names.get(i)) for i, block in enumerate(backbone.blocks)]
        elif isinstance(backbone, ResNet50Taps):
            self._prepare = lambda im: backbone.stem((im - backbone.mean) / backbone.std)
            self.stages = [(backbone.layer2, "c3"), (backbone.layer3, "c4"), (backbone.layer4, "c5")]
        elif unfreeze_last:
            raise ValueError(f"unfreezing is implemented for EfficientNet-Lite0 and ResNet-50, "
                             f"not {type(backbone).__name__}")
        else:
            self._prepare, self.stages = None, []
        if not 0 <= unfreeze_last < max(len(self.stages), 1):
            raise ValueError(f"unfreeze_last must be in [0, {len(self.stages) - 1}], got {unfreeze_last}")
        self.backbone = backbone
        self.unfreeze_last = unfreeze_last
        self.cut = len(self.stages) - unfreeze_last

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the unfrozen stages, switched to ``requires_grad``."""
        params = [p for module, _ in self.stages[self.cut:] for p in module.parameters()]
        for p in params:
            p.requires_grad_(True)
        return params

    @torch.no_grad()
    def frozen(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` in [0, 1] → cache entries ``{tap: (B, C, h, w)}`` (+ ``"x"``)."""
        if self.unfreeze_last == 0:
            return dict(self.backbone(images))
        x = self._prepare(images)
        out = {}
        for module, tap in self.stages[: self.cut]:
            x = module(x)
            if tap:
                out[tap] = x
        out["x"] = x
        return out

    def live(self, cached: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cache entries → taps ``{"c3", "c4", "c5"}``, running the unfrozen stages."""
        if self.unfreeze_last == 0:
            return cached
        taps = {k: v for k, v in cached.items() if k != "x"}
        x = cached["x"]
        for module, tap in self.stages[self.cut:]:
            x = module(x)
            if tap:
                taps[tap] = x
        return taps


def pyramid_from_taps(model: RetrievalModel, taps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``model.pyramid`` computes after the backbone: ``{"c3": (B, C3, …), …}`` → ``{"p3": (B, C, …), …}``."""
    feats = OrderedDict((level, taps[_TAP_OF_LEVEL[level]]) for level in model.levels)
    return dict(model.fpn(feats))


def _to(cached: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in cached.items()}


@dataclass
class CachedImage:
    """A gallery-side training image: its cached taps and the object box it is a positive for."""

    key: str
    size: tuple[int, int]                  # (width, height) px
    tags: frozenset[str]                   # sources whose content it shows
    taps: dict[str, torch.Tensor]          # (1, C, h, w) per entry, CPU
    box: Box | None = None                 # object box when it is someone's positive

    def cached(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return _to(self.taps, device)


@dataclass
class CachedQuery:
    """A query box with its surroundings at each usable query scale, exactly as
    ``matching.encode_query_in_context`` resizes and cuts it."""

    key: str
    tag: str                               # the source it was cut from
    patch_size: tuple[int, int]            # (width, height) of the box at scale 1
    scales: list[float]
    sizes: list[tuple[int, int]]           # (width, height) of the box at each scale
    taps: list[dict[str, torch.Tensor]]    # per scale: the context window's cache entries, (1, C, h, w)
    rois: list[tuple[float, float, float, float]]   # per scale: the box in the resized window's pixels
    cells: list[dict[str, tuple[int, int]]]         # per scale: template (rows, cols) per level
    positives: tuple[str, ...] = ()        # keys of the images that show it


def encode_images(split: TapSplit, images: Sequence[Image.Image], device: torch.device | str = "cpu",
                  batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Cache entries for each image (same-size images batched): ``[{tap: (1, C, h, w)}]`` on the CPU."""
    out: list[dict[str, torch.Tensor] | None] = [None] * len(images)
    for chunk in size_batches([img.size for img in images], batch_size):
        taps = split.frozen(torch.stack([to_tensor(images[i]) for i in chunk]).to(device))
        for j, i in enumerate(chunk):
            out[i] = {k: v[j:j + 1].float().cpu() for k, v in taps.items()}
    return out  # type: ignore[return-value]


def encode_query_context(split: TapSplit, image: Image.Image, box: Box, config: RetrievalConfig, key: str,
                         tag: str, device: torch.device | str = "cpu", positives: tuple[str, ...] = ()) -> CachedQuery:
    """Cache a query box the way ``matching.encode_query_in_context`` encodes it: the box plus
    its context window, resized by each usable query scale, through the frozen backbone.
    ``image`` is the source already resized by the gallery rule, ``box`` in its pixels."""
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    scales = usable_scales(max(1, round(width)), max(1, round(height)), config)
    cx0, cy0, cx1, cy1 = context_window(box, image.width, image.height, config)
    context = image.crop((cx0, cy0, cx1, cy1))
    sizes, taps, rois, cells = [], [], [], []
    for s in scales:
        size = (max(1, round(context.width * s)), max(1, round(context.height * s)))
        resized = context if size == context.size else context.resize(size, Image.BICUBIC)
        entry = split.frozen(to_tensor(resized).unsqueeze(0).to(device))
        taps.append({k: v.float().cpu() for k, v in entry.items()})
        rois.append(((x0 - cx0) * s, (y0 - cy0) * s, (x1 - cx0) * s, (y1 - cy0) * s))
        cells.append({level: template_cells(width, height, s, level) for level in config.levels})
        sizes.append((max(1, round(width * s)), max(1, round(height * s))))
    return CachedQuery(key, tag, (max(1, round(width)), max(1, round(height))), list(scales), sizes, taps,
                       rois, cells, positives)


def cache_bytes(images: Iterable[CachedImage], queries: Iterable[CachedQuery]) -> int:
    total = sum(t.numel() * t.element_size() for im in images for t in im.taps.values())
    total += sum(t.numel() * t.element_size() for q in queries for entry in q.taps for t in entry.values())
    return total


# --------------------------------------------------------------------------- synthetic pairs

@dataclass(frozen=True)
class PasteParams:
    """How one object crop is pasted (all ``identity`` values leave it untouched)."""

    scale: float = 1.0          # pasted size / crop size, before rotation
    angle: float = 0.0          # degrees, counter-clockwise
    brightness: float = 1.0     # PIL ImageEnhance factors, 1 = unchanged
    contrast: float = 1.0
    saturation: float = 1.0
    blur: float = 0.0           # Gaussian radius in px, 0 = none
    occlusion: float = 0.0      # fraction of the pasted box hidden by background texture (≤ 0.5)
    position: tuple[float, float] = (0.5, 0.5)   # where the pasted box lies, as fractions of the free room
    occluder_corner: int = 0    # which corner of the box the occluder starts from (0–3)


def sample_paste_params(rng: np.random.Generator, scale_range: tuple[float, float] = (0.25, 4.0),
                        max_angle: float = 30.0, jitter: float = 0.3, blur_prob: float = 0.3,
                        max_blur: float = 1.5, occlusion_prob: float = 0.5,
                        max_occlusion: float = 0.5) -> PasteParams:
    """Random :class:`PasteParams`: scale log-uniform in ``scale_range``, the rest uniform."""
    lo, hi = np.log(scale_range[0]), np.log(scale_range[1])
    return PasteParams(
        scale=float(np.exp(rng.uniform(lo, hi))),
        angle=float(rng.uniform(-max_angle, max_angle)),
        brightness=float(rng.uniform(1 - jitter, 1 + jitter)),
        contrast=float(rng.uniform(1 - jitter, 1 + jitter)),
        saturation=float(rng.uniform(1 - jitter, 1 + jitter)),
        blur=float(rng.uniform(0.3, max_blur)) if rng.random() < blur_prob else 0.0,
        occlusion=float(rng.uniform(0.1, max_occlusion)) if rng.random() < occlusion_prob else 0.0,
        position=(float(rng.random()), float(rng.random())),
        occluder_corner=int(rng.integers(4)),
    )


def rotated_size(width: float, height: float, angle: float) -> tuple[float, float]:
    """Bounding size of a ``width × height`` rectangle rotated by ``angle`` degrees."""
    c, s = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    return width * c + height * s, width * s + height * c


def fit_scale(obj_size: tuple[int, int], background_size: tuple[int, int], params: PasteParams,
              min_side: int = 8, max_fraction: float = 0.9) -> float | None:
    """``params.scale`` clamped so the pasted (rotated) object fits in ``max_fraction`` of the
    background and keeps ``min_side`` px on its short side; ``None`` when no scale does."""
    rw, rh = rotated_size(obj_size[0], obj_size[1], params.angle)
    s_max = min(max_fraction * background_size[0] / rw, max_fraction * background_size[1] / rh)
    s_min = min_side / min(obj_size)
    if s_min > s_max:
        return None
    return min(max(params.scale, s_min), s_max)


def paste_object(background: Image.Image, obj: Image.Image, params: PasteParams) -> tuple[Image.Image, Box]:
    """Paste a transformed copy of ``obj`` into ``background``.

    The crop is resized by ``params.scale`` (call :func:`fit_scale` first so it fits),
    colour-jittered, blurred and rotated (its corners stay transparent), pasted at
    ``params.position``, and then a rectangle of ``params.occlusion`` of its box is
    covered by background texture taken from elsewhere in the image.

    Returns the composite (a new RGB image of the background's size) and the pasted box
    ``(x0, y0, x1, y1)``: the tight box of the pasted pixels, occluded part included.
    """
    size = (max(1, round(obj.width * params.scale)), max(1, round(obj.height * params.scale)))
    patch = obj.convert("RGB")
    if size != patch.size:
        patch = patch.resize(size, Image.BICUBIC)
    for enhance, factor in ((ImageEnhance.Brightness, params.brightness), (ImageEnhance.Contrast, params.contrast),
                            (ImageEnhance.Color, params.saturation)):
        if factor != 1.0:
            patch = enhance(patch).enhance(factor)
    if params.blur > 0:
        patch = patch.filter(ImageFilter.GaussianBlur(params.blur))
    alpha = Image.new("L", patch.size, 255)
    if params.angle:
        patch = patch.rotate(params.angle, resample=Image.BICUBIC, expand=True)
        alpha = alpha.rotate(params.angle, resample=Image.BILINEAR, expand=True)
    bbox = alpha.getbbox()
    if bbox is None:
        raise ValueError("the pasted object has no visible pixel")
    if patch.width > background.width or patch.height > background.height:
        raise ValueError(f"object {patch.size} does not fit in background {background.size}")
    x = round(params.position[0] * (background.width - patch.width))
    y = round(params.position[1] * (background.height - patch.height))
    out = background.convert("RGB").copy()
    out.paste(patch, (x, y), alpha)
    x0, y0, x1, y1 = x + bbox[0], y + bbox[1], x + bbox[2], y + bbox[3]
    if params.occlusion > 0:
        bw, bh = x1 - x0, y1 - y0
        # a rectangle of the box's aspect and the requested area, anchored at one corner
        ow, oh = max(1, round(bw * math.sqrt(params.occlusion))), max(1, round(bh * math.sqrt(params.occlusion)))
        ox = x0 if params.occluder_corner in (0, 3) else x1 - ow
        oy = y0 if params.occluder_corner in (0, 1) else y1 - oh
        # texture from the diametrically opposite part of the background
        sx = (background.width - ow) - min(max(ox, 0), background.width - ow)
        sy = (background.height - oh) - min(max(oy, 0), background.height - oh)
        out.paste(background.convert("RGB").crop((sx, sy, sx + ow, sy + oh)), (ox, oy))
    return out, (float(x0), float(y0), float(x1), float(y1))


@dataclass(frozen=True)
class SourceImage:
    """An image synthetic pairs may cut objects from and paste into."""

    key: str
    tag: str                    # what content it shows (a sequence, a source folder)
    path: Path
    box: Box | None = None      # an annotated object, preferred as the crop when present

    def load(self, max_side: int) -> Image.Image:
        return resize_max_side(load_image(self.path), max_side)[0]


def folder_sources(folder: str | os.PathLike) -> list[SourceImage]:
    """Every image under ``folder``, all tagged with the folder: images of one folder may
    show the same things (the demo scenes reuse the same photos), so none of them is
    another's negative."""
    folder = Path(folder)
    tag = f"folder:{folder.resolve().name}"
    return [SourceImage(f"{tag}/{p.relative_to(folder)}", tag, p) for p in list_image_files(folder)]


def random_crop_box(rng: np.random.Generator, width: int, height: int, side_range: tuple[int, int] = (24, 128),
                    aspect_range: tuple[float, float] = (0.5, 2.0)) -> Box:
    """A window of log-uniform size (geometric mean side in ``side_range``) and aspect, inside the image."""
    side = float(np.exp(rng.uniform(np.log(side_range[0]), np.log(side_range[1]))))
    aspect = float(np.exp(rng.uniform(np.log(aspect_range[0]), np.log(aspect_range[1]))))
    w = min(width, max(8, round(side * math.sqrt(aspect))))
    h = min(height, max(8, round(side / math.sqrt(aspect))))
    x0 = int(rng.integers(0, width - w + 1))
    y0 = int(rng.integers(0, height - h + 1))
    return float(x0), float(y0), float(x0 + w), float(y0 + h)


def textured(patch: Image.Image, min_std: float = 0.08) -> bool:
    """Whether a crop has enough contrast to be findable (flat sky or wall is not an instance)."""
    gray = np.asarray(patch.convert("L"), dtype=np.float32) / 255.0
    return float(gray.std()) >= min_std


@dataclass
class Composite:
    """One synthetic pair: the clean query crop (and the image and box it was cut from, whose
    surroundings encode it), the composite and the pasted box in it."""

    key: str
    query: Image.Image
    source: Image.Image
    source_box: Box
    image: Image.Image
    box: Box
    object_tag: str
    tags: frozenset[str]
    params: PasteParams


def make_composites(sources: Sequence[SourceImage], count: int, seed: int, max_side: int = 640,
                    object_box_prob: float = 0.5, crop_sides: tuple[int, int] = (24, 128),
                    scale_range: tuple[float, float] = (0.25, 4.0), max_tries: int = 20) -> list[Composite]:
    """``count`` synthetic pairs from ``sources`` (deterministic for a seed).

    The object comes from one source image (its annotated box with probability
    ``object_box_prob`` when it has one, else a random textured window), the background
    from a source with another tag when there is one — so the pasted object is, as far
    as the tags know, the only instance of itself there — or else from another image.
    """
    if len(sources) < 2:
        raise ValueError("synthetic pairs need at least two source images")
    rng = np.random.default_rng(seed)
    tags = sorted({s.tag for s in sources})
    out: list[Composite] = []
    cache: dict[str, Image.Image] = {}

    def load(src: SourceImage) -> Image.Image:
        if src.key not in cache:
            if len(cache) > 64:
                cache.pop(next(iter(cache)))
            cache[src.key] = src.load(max_side)
        return cache[src.key]

    for n in range(count):
        for _ in range(max_tries):
            src = sources[int(rng.integers(len(sources)))]
            others = [s for s in sources if s.tag != src.tag] if len(tags) > 1 else \
                [s for s in sources if s.key != src.key]
            bg_src = others[int(rng.integers(len(others)))]
            try:
                img, background = load(src), load(bg_src)
            except ImageLoadError:
                continue
            if src.box is not None and rng.random() < object_box_prob:
                box = src.box
            else:
                box = random_crop_box(rng, img.width, img.height, crop_sides)
            try:
                query = crop_box(img, box, min_side=8)
            except ImageLoadError:
                continue
            left, top = max(0, round(box[0])), max(0, round(box[1]))
            box = (float(left), float(top), float(left + query.width), float(top + query.height))  # pixels cut
            if not textured(query):
                continue
            params = sample_paste_params(rng, scale_range)
            scale = fit_scale(query.size, background.size, params)
            if scale is None:
                continue
            params = PasteParams(**{**params.__dict__, "scale": scale})
            image, pasted = paste_object(background, query, params)
            out.append(Composite(f"{SYNTHETIC_PREFIX}{n:05d}", query, img, box, image, pasted, src.tag,
                                 frozenset({src.tag, bg_src.tag}), params))
            break
    return out


def is_synthetic(image: "CachedImage") -> bool:
    """Whether a training image is a copy-paste composite (else a real frame)."""
    return image.key.startswith(SYNTHETIC_PREFIX)


# --------------------------------------------------------------------------- windows

ALIGN = 32  # px: a window starting on the coarsest stride cuts every tap at a cell boundary


def tap_stride(width: int, cells: int) -> int:
    """Stride (a power of two) of a map with ``cells`` columns over an image ``width`` px wide."""
    return 2 ** round(math.log2(width / cells))


def crop_window(size: tuple[int, int], box: Box | None, target: tuple[int, int],
                rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random window ``(x0, y0, x1, y1)`` of about ``target`` (width, height) px inside an
    image of ``size``, containing ``box`` when given (grown to hold it), with ``x0, y0``
    multiples of 32 so it cuts every backbone tap on cell boundaries."""
    out = []
    for axis in (0, 1):
        full = size[axis]
        lo_box = box[axis] if box is not None else float(full)
        hi_box = box[axis + 2] if box is not None else 0.0
        span = min(full, max(target[axis], math.ceil((hi_box - lo_box) / ALIGN + 1) * ALIGN))
        if span >= full:
            out.append((0, full))
            continue
        lo = max(0.0, hi_box - span)            # start early enough to reach the box's far side
        hi = min(lo_box, float(full - span))    # … and late enough to include its near side
        start = int(rng.uniform(lo, max(lo, hi)) // ALIGN) * ALIGN
        end = min(full, max(start + span, math.ceil(hi_box / ALIGN) * ALIGN))
        out.append((start, end))
    (x0, x1), (y0, y1) = out
    return x0, y0, x1, y1


def crop_image(image: "CachedImage", window: tuple[int, int, int, int]) -> "CachedImage":
    """The cached image cut to ``window`` (from :func:`crop_window`): the taps behave like those
    of a smaller image whose pixel (0, 0) is the window's corner; the box moves with it."""
    x0, y0, x1, y1 = window
    if (x0, y0, x1, y1) == (0, 0, *image.size):
        return image
    taps = {}
    for name, t in image.taps.items():
        stride = tap_stride(image.size[0], t.shape[-1])
        taps[name] = t[..., y0 // stride: math.ceil(y1 / stride), x0 // stride: math.ceil(x1 / stride)]
    box = None
    if image.box is not None:
        bx0, by0, bx1, by1 = image.box
        box = (max(bx0 - x0, 0.0), max(by0 - y0, 0.0), min(bx1 - x0, x1 - x0), min(by1 - y0, y1 - y0))
    return CachedImage(f"{image.key}@{x0},{y0},{x1},{y1}", (x1 - x0, y1 - y0), image.tags, taps, box)


# --------------------------------------------------------------------------- batches

@dataclass
class Triple:
    """A query, an image that shows it (with the box), and one that does not."""

    query: CachedQuery
    positive: CachedImage
    negative: CachedImage

    @property
    def box(self) -> Box:
        assert self.positive.box is not None
        return self.positive.box


@dataclass
class PairSampler:
    """Draws batches of :class:`Triple` from cached images and queries.

    ``synthetic_fraction`` of each batch comes from synthetic queries (when there are
    any). Within a batch, queries have distinct tags as long as there are enough, so
    in-batch negatives are true negatives. ``hard`` maps a query key to mined negative
    image keys, drawn with probability ``hard_prob``. With a ``window`` (width, height),
    positives are cut to a random window around their box and negatives to a random
    window (the cost of a step scales with the image area).
    """

    images: dict[str, CachedImage]
    real: list[CachedQuery]
    synthetic: list[CachedQuery]
    synthetic_fraction: float = 0.5
    seed: int = 0
    hard: dict[str, list[str]] = field(default_factory=dict)
    hard_prob: float = 0.5
    window: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self._negatives: dict[str, list[str]] = {}
        for q in self.real + self.synthetic:
            if q.tag not in self._negatives:
                self._negatives[q.tag] = sorted(k for k, im in self.images.items() if q.tag not in im.tags)
            if not self._negatives[q.tag]:
                raise ValueError(f"no negative image for queries tagged '{q.tag}'")
            if not q.positives:
                raise ValueError(f"query '{q.key}' has no positive image")

    def negatives_for(self, query: CachedQuery) -> list[str]:
        return self._negatives[query.tag]

    def sample(self, batch_size: int) -> list[Triple]:
        n_syn = 0
        if self.synthetic:
            n_syn = int(self.rng.binomial(batch_size, self.synthetic_fraction)) if self.real else batch_size
        batch: list[Triple] = []
        used: set[str] = set()
        for i in range(batch_size):
            pool = self.synthetic if i < n_syn else self.real
            query = pool[int(self.rng.integers(len(pool)))]
            for _ in range(10):  # prefer a tag not yet in the batch
                if query.tag not in used:
                    break
                query = pool[int(self.rng.integers(len(pool)))]
            used.add(query.tag)
            positive = self.images[query.positives[int(self.rng.integers(len(query.positives)))]]
            hard = self.hard.get(query.key)
            if hard and self.rng.random() < self.hard_prob:
                negative = self.images[hard[int(self.rng.integers(len(hard)))]]
            else:
                keys = self._negatives[query.tag]
                negative = self.images[keys[int(self.rng.integers(len(keys)))]]
            if self.window:
                positive = crop_image(positive, crop_window(positive.size, positive.box, self.window, self.rng))
                negative = crop_image(negative, crop_window(negative.size, None, self.window, self.rng))
            batch.append(Triple(query, positive, negative))
        return batch


def shows(image: CachedImage, query: CachedQuery) -> bool:
    """Whether ``image`` may show ``query``'s object (then it is no negative for it)."""
    return query.tag in image.tags


def cache_training_set(split: TapSplit, frames: dict[str, list[TrackFrame]], composites: Sequence[Composite],
                       config: RetrievalConfig, device: torch.device | str = "cpu",
                       progress: bool = False) -> tuple[dict[str, CachedImage], list[CachedQuery], list[CachedQuery]]:
    """Run the frozen backbone once over everything a training step can touch.

    Returns ``(images, real_queries, synthetic_queries)``: every training frame and
    composite by key; a query per frame whose box crop is at least 8 px (its positives:
    the other frames of its sequence); a query per composite (its positive: the composite).
    """
    from tqdm import tqdm

    images: dict[str, CachedImage] = {}
    real: list[CachedQuery] = []
    bar = tqdm(total=sum(len(f) for f in frames.values()) + len(composites), desc="caching backbone taps",
               unit="img", disable=not progress)
    for sequence, seq_frames in frames.items():
        loaded = []
        for fr in seq_frames:
            img, scale = resize_max_side(load_image(fr.path), config.max_side)
            loaded.append((fr, img, tuple(v * scale for v in fr.box)))
        taps = encode_images(split, [img for _, img, _ in loaded], device)
        for (fr, img, box), entry in zip(loaded, taps):
            images[fr.key] = CachedImage(fr.key, img.size, frozenset({sequence}), entry, box)
        keys = [fr.key for fr, _, _ in loaded]
        for fr, img, box in loaded:
            try:
                crop_box(img, box, min_side=config.min_side)
            except ImageLoadError:
                continue  # too small to be searched for; still a positive for the others
            real.append(encode_query_context(split, img, box, config, f"{fr.key}/q", sequence, device,
                                             positives=tuple(k for k in keys if k != fr.key)))
        bar.update(len(seq_frames))
    synthetic: list[CachedQuery] = []
    taps = encode_images(split, [c.image for c in composites], device)
    for c, entry in zip(composites, taps):
        images[c.key] = CachedImage(c.key, c.image.size, c.tags, entry, c.box)
        synthetic.append(encode_query_context(split, c.source, c.source_box, config, f"{c.key}/q", c.object_tag,
                                              device, positives=(c.key,)))
        bar.update(1)
    bar.close()
    return images, real, synthetic


# --------------------------------------------------------------------------- cache on disk

def _image_record(im: CachedImage) -> dict:
    return {"key": im.key, "size": list(im.size), "tags": sorted(im.tags), "taps": im.taps,
            "box": None if im.box is None else list(im.box)}


def _query_record(q: CachedQuery) -> dict:
    return {"key": q.key, "tag": q.tag, "patch_size": list(q.patch_size), "scales": list(q.scales),
            "sizes": [list(s) for s in q.sizes], "taps": q.taps, "rois": [list(r) for r in q.rois],
            "cells": [{k: list(v) for k, v in c.items()} for c in q.cells], "positives": list(q.positives)}


def save_cache(path: str | os.PathLike, images: Iterable[CachedImage], queries: dict[str, list[CachedQuery]]) -> None:
    """Write cached images and named query lists to one ``torch.save`` file (atomically)."""
    from .checkpoint import atomic_write_bytes
    import io

    buffer = io.BytesIO()
    torch.save({"images": [_image_record(im) for im in images],
                "queries": {name: [_query_record(q) for q in qs] for name, qs in queries.items()}}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_cache(path: str | os.PathLike) -> tuple[list[CachedImage], dict[str, list[CachedQuery]]]:
    """Inverse of :func:`save_cache`."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    images = [CachedImage(r["key"], tuple(r["size"]), frozenset(r["tags"]), r["taps"],
                          None if r["box"] is None else tuple(r["box"])) for r in data["images"]]
    queries = {name: [CachedQuery(r["key"], r["tag"], tuple(r["patch_size"]), list(r["scales"]),
                                  [tuple(s) for s in r["sizes"]], r["taps"], [tuple(b) for b in r["rois"]],
                                  [{k: tuple(v) for k, v in c.items()} for c in r["cells"]], tuple(r["positives"]))
                      for r in records] for name, records in data["queries"].items()}
    return images, queries
