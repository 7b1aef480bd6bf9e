"""Stress tests of seed 000 §4 (scale, occlusion, clutter) as derived benchmarks.

Every builder writes a benchmark folder — ``manifest.json`` in the format of
BENCHMARKS.md plus the images it changed under ``images/`` (PNG, so pixels are exact);
unchanged images are referenced by absolute path — so the ordinary harness evaluates
any method on it. All variants derive from one small, fixed subset of a source
benchmark (:func:`stress_subset`), which keeps a whole curve affordable on a CPU:

- ``query-scale`` f: a window around each query box (box + 25 % context per side) is
  resized by f and becomes the query image, the box scaled with it; the gallery is
  unchanged, so the query's object has f times its gallery scale.
- ``query-occlusion`` o: a grey rectangle covers the fraction o of each query box.
- ``target-occlusion`` o: the same rectangle on the object box of every gallery image
  (the ground-truth box stays the whole object).
- ``clutter`` N: every gallery image becomes a composite: a background frame of a
  *distractor sequence* (one no query asks for), the image's own target crop pasted at
  its native size at a random place (images of distractor sequences get none), and N
  crops of distractor-sequence objects around it, scaled to 0.5–2× the target's area
  and never covering it. Composite ``i`` draws the same background, target position and
  first distractors for every N, so the curve measures added clutter only. Every pasted
  crop is listed in ``objects``; queries are unchanged.

Queries are picked among those whose box is at least 32 px on both sides, so that the
×0.25 query still leaves the 8-px patch the harness accepts; this leans the subset
towards larger targets (the small-target drone sequences become the distractors).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from retrieval.images import load_image

Box = tuple[float, float, float, float]
Rect = tuple[int, int, int, int]   # integer pixel rectangle x0, y0, x1, y1 (x1/y1 exclusive)

BUILDER_VERSION = 1
FACTORS: dict[str, tuple[float, ...]] = {
    "query-scale": (0.25, 0.5, 1.0, 2.0, 4.0),
    "query-occlusion": (0.0, 0.2, 0.4, 0.6),
    "target-occlusion": (0.0, 0.2, 0.4, 0.6),
    "clutter": (0, 2, 4, 8),
}
DESCRIPTIONS = {
    "query-scale": "the query image (its box plus 25 % context per side) resized by f; the gallery is unchanged",
    "query-occlusion": "a grey rectangle of the box's aspect covers the fraction o of each query box, at a random place",
    "target-occlusion": "the same rectangle covers o of the object box in every gallery image; the ground-truth box "
                        "stays the whole object",
    "clutter": "every gallery image is a composite: a distractor-sequence frame, the image's own target crop "
               "(native size, random place) and N distractor-object crops (0.5–2× the target's area) that never "
               "cover it",
}
FACTOR_LABELS = {"query-scale": "query scale factor f", "query-occlusion": "occluded fraction of the query",
                 "target-occlusion": "occluded fraction of the gallery target",
                 "clutter": "distractor crops N per gallery image"}
GREY = (128, 128, 128)


def sequence_of(item_id: str) -> str:
    """Benchmark ids are ``<sequence>/<frame or query>``; the sequence groups them."""
    return item_id.split("/", 1)[0]


# --------------------------------------------------------------------------- the subset

@dataclass
class StressSource:
    """The fixed subset every variant derives from (a manifest dict with absolute paths)
    and the pool of distractor-sequence gallery items the clutter builder draws from."""

    subset: dict
    pool: list[dict] = field(default_factory=list)

    def fingerprint(self) -> str:
        import hashlib

        text = json.dumps({"subset": self.subset, "pool": self.pool}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _box_sides(box: Sequence[float]) -> tuple[float, float]:
    return float(box[2]) - float(box[0]), float(box[3]) - float(box[1])


def _absolute(item: dict, key: str, root: Path) -> dict:
    return dict(item, **{key: str(root / item[key])})


def stress_subset(manifest: dict, root: Union[str, os.PathLike], n_queries: int = 15,
                  frames_per_sequence: int = 10, min_query_side: float = 32.0, seed: int = 0) -> StressSource:
    """A fixed, seeded subset of a benchmark manifest (dict as read from JSON).

    Queries: ``n_queries`` among those whose box is ≥ ``min_query_side`` px on both sides,
    one per sequence first (sequences drawn at random when there are more than
    ``n_queries``), then more from the same sequences. Gallery: ``frames_per_sequence``
    evenly spaced images of every sequence (query sequences and others alike). Junk lists
    keep the ids that remain. The distractor pool is every gallery item of the sequences
    without a chosen query. Paths become absolute (resolved against ``root``).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    eligible = [q for q in manifest["queries"] if min(_box_sides(q["box"])) >= min_query_side]
    by_seq: dict[str, list[dict]] = {}
    for q in eligible:
        by_seq.setdefault(sequence_of(q["id"]), []).append(q)
    if not by_seq:
        raise ValueError(f"no query has a box of at least {min_query_side} px on both sides")
    seqs = list(by_seq)
    if len(seqs) > n_queries:
        seqs = [seqs[i] for i in sorted(rng.choice(len(seqs), n_queries, replace=False))]
    chosen = [by_seq[s][int(rng.integers(len(by_seq[s])))] for s in seqs]
    rest = [q for s in seqs for q in by_seq[s] if q not in chosen]
    extra = n_queries - len(chosen)
    if extra > 0 and rest:
        chosen += [rest[i] for i in sorted(rng.choice(len(rest), min(extra, len(rest)), replace=False))]
    order = {q["id"]: i for i, q in enumerate(manifest["queries"])}
    chosen.sort(key=lambda q: order[q["id"]])

    gallery_by_seq: dict[str, list[dict]] = {}
    for g in manifest["gallery"]:
        gallery_by_seq.setdefault(sequence_of(g["id"]), []).append(g)
    gallery = []
    for items in gallery_by_seq.values():
        picks = sorted(set(np.linspace(0, len(items) - 1, min(frames_per_sequence, len(items))).round().astype(int)))
        gallery += [_absolute(items[i], "path", root) for i in picks]
    ids = {g["id"] for g in gallery}
    queries = [dict(_absolute(q, "image", root), junk=[j for j in q.get("junk", []) if j in ids]) for q in chosen]
    query_seqs = {sequence_of(q["id"]) for q in queries}
    pool = [_absolute(g, "path", root) for s, items in gallery_by_seq.items() if s not in query_seqs for g in items]
    name = str(manifest.get("name", root.name))
    subset = {"name": f"{name}-stress", "version": 1,
              "description": f"{len(queries)} queries and {len(gallery)} gallery images of {name} "
                             f"(seed {seed}; query boxes ≥ {min_query_side:g} px)",
              "gallery": gallery, "queries": queries}
    return StressSource(subset, pool)


def load_stress_source(manifest_path: Union[str, os.PathLike], **options) -> StressSource:
    """:func:`stress_subset` of a benchmark folder or ``manifest.json``."""
    path = Path(manifest_path)
    path = path / "manifest.json" if path.is_dir() else path
    return stress_subset(json.loads(path.read_text()), path.parent, **options)


# --------------------------------------------------------------------------- pure geometry

def pixel_rect(box: Sequence[float], size: tuple[int, int]) -> Rect:
    """The integer pixels of ``box`` as :func:`retrieval.images.crop_box` takes them."""
    x0, y0 = max(0, int(round(box[0]))), max(0, int(round(box[1])))
    x1, y1 = min(size[0], int(round(box[2]))), min(size[1], int(round(box[3])))
    return x0, y0, x1, y1


def context_window(box: Sequence[float], size: tuple[int, int], margin: float = 0.25) -> Rect:
    """``box`` grown by ``margin`` of its width/height on every side, in whole pixels,
    clipped to an image of ``size`` ``(W, H)``."""
    w, h = _box_sides(box)
    return (max(0, math.floor(box[0] - margin * w)), max(0, math.floor(box[1] - margin * h)),
            min(size[0], math.ceil(box[2] + margin * w)), min(size[1], math.ceil(box[3] + margin * h)))


def scale_query(image: Image.Image, box: Sequence[float], factor: float,
                margin: float = 0.25) -> tuple[Image.Image, Box]:
    """The context window around ``box`` resized by ``factor`` and the box in its pixels.

    The resized size is rounded to whole pixels, so the box uses the factors actually
    applied per axis (``new_w / w``, ``new_h / h``), which equal ``factor`` up to ±0.5 px.
    """
    x0, y0, x1, y1 = context_window(box, image.size, margin)
    window = image.crop((x0, y0, x1, y1))
    new = (max(1, round(window.width * factor)), max(1, round(window.height * factor)))
    sx, sy = new[0] / window.width, new[1] / window.height
    if new != window.size:
        # PIL's bicubic resize widens its kernel when shrinking, i.e. it antialiases
        window = window.resize(new, Image.BICUBIC)
    return window, ((box[0] - x0) * sx, (box[1] - y0) * sy, (box[2] - x0) * sx, (box[3] - y0) * sy)


def occluder_rect(rect: Rect, fraction: float, rng: np.random.Generator) -> Optional[Rect]:
    """A rectangle of the box's aspect covering ``fraction`` of the pixel rectangle
    ``rect`` (as close as whole pixels allow), at a random place inside it; ``None`` for 0."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"occlusion fraction {fraction} is not in [0, 1]")
    x0, y0, x1, y1 = rect
    w, h = x1 - x0, y1 - y0
    if fraction == 0.0 or w <= 0 or h <= 0:
        return None
    ow = min(w, max(1, round(w * math.sqrt(fraction))))
    oh = min(h, max(1, round(fraction * w * h / ow)))
    ox = x0 + int(rng.integers(0, w - ow + 1))
    oy = y0 + int(rng.integers(0, h - oh + 1))
    return ox, oy, ox + ow, oy + oh


def occlude(image: Image.Image, box: Sequence[float], fraction: float, rng: np.random.Generator,
            fill: str = "grey") -> tuple[Image.Image, Optional[Rect]]:
    """A copy of ``image`` with ``fraction`` of ``box`` covered by a ``"grey"`` or
    ``"noise"`` rectangle; returns the image and the rectangle (``None`` when nothing)."""
    rect = occluder_rect(pixel_rect(box, image.size), fraction, rng)
    out = image.convert("RGB").copy()
    if rect is not None:
        w, h = rect[2] - rect[0], rect[3] - rect[1]
        if fill == "grey":
            patch = Image.new("RGB", (w, h), GREY)
        elif fill == "noise":
            patch = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        else:
            raise ValueError(f"unknown occluder fill '{fill}'; choose grey or noise")
        out.paste(patch, rect[:2])
    return out, rect


def overlap_area(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection area of two ``[x0, y0, x1, y1]`` boxes."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def place(size: tuple[int, int], canvas: tuple[int, int], forbidden: Sequence[Sequence[float]],
          avoid: Sequence[Sequence[float]], rng: np.random.Generator, tries: int = 200) -> Optional[Rect]:
    """A random place for a ``size`` crop in ``canvas`` that touches none of ``forbidden``
    and overlaps ``avoid`` as little as found in ``tries`` draws; ``None`` when every draw
    touches ``forbidden`` (or the crop is larger than the canvas)."""
    w, h = size
    if w > canvas[0] or h > canvas[1]:
        return None
    best, best_overlap = None, math.inf
    for _ in range(tries):
        x, y = int(rng.integers(0, canvas[0] - w + 1)), int(rng.integers(0, canvas[1] - h + 1))
        rect = (x, y, x + w, y + h)
        if any(overlap_area(rect, f) > 0 for f in forbidden):
            continue
        overlap = sum(overlap_area(rect, a) for a in avoid)
        if overlap < best_overlap:
            best, best_overlap = rect, overlap
            if overlap == 0:
                break
    return best


def crop_object(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """The pixels of ``box`` (rounded as :func:`pixel_rect` does)."""
    return image.crop(pixel_rect(box, image.size))


def fit_canvas(image: Image.Image, side: int) -> tuple[Image.Image, float]:
    """``image`` resized so that its long side is ``side`` (up or down) and the factor."""
    f = side / max(image.size)
    size = (max(1, round(image.width * f)), max(1, round(image.height * f)))
    return (image.resize(size, Image.BICUBIC) if size != image.size else image), f


def distractor_size(crop: tuple[int, int], target_area: float, rng: np.random.Generator,
                    area_range: tuple[float, float] = (0.5, 2.0), max_upscale: float = 4.0) -> tuple[int, int]:
    """Size of a distractor crop rescaled to ``area_range`` × ``target_area`` (log-uniform),
    aspect kept, never enlarged more than ``max_upscale`` (tiny crops would be mush)."""
    ratio = math.exp(rng.uniform(math.log(area_range[0]), math.log(area_range[1])))
    s = min(max_upscale, math.sqrt(ratio * target_area / (crop[0] * crop[1])))
    return max(4, round(crop[0] * s)), max(4, round(crop[1] * s))


def compose(background: Image.Image, target: Optional[Image.Image], distractors: Sequence[Image.Image],
            rng_target: np.random.Generator, rng_distractors: Sequence[np.random.Generator],
            target_area: float) -> tuple[Image.Image, Optional[Rect], list[Rect]]:
    """Paste ``target`` (native size) and then each distractor into a copy of ``background``.

    Distractors never touch the target (a distractor that finds no room is shrunk by 0.8
    until it does, or dropped after 10 tries) and avoid each other where possible.
    ``target_area`` sets the distractor sizes when there is no target.
    Returns the composite and the pasted rectangles.
    """
    out = background.convert("RGB").copy()
    canvas = out.size
    target_rect = None
    if target is not None:
        target_rect = place(target.size, canvas, (), (), rng_target)
        if target_rect is None:
            raise ValueError(f"target crop {target.size} does not fit in background {canvas}")
        out.paste(target, target_rect[:2])
    rects: list[Rect] = []
    forbidden = [target_rect] if target_rect else []
    for crop, rng in zip(distractors, rng_distractors):
        size = distractor_size(crop.size, target_area, rng)
        rect = None
        for _ in range(10):
            rect = place(size, canvas, forbidden, rects, rng)
            if rect is not None:
                break
            size = (max(4, round(size[0] * 0.8)), max(4, round(size[1] * 0.8)))
        if rect is None:
            continue
        out.paste(crop.resize(size, Image.BICUBIC) if size != crop.size else crop, rect[:2])
        rects.append(rect)
    return out, target_rect, rects


# --------------------------------------------------------------------------- builders

def write_benchmark(manifest: dict, folder: Union[str, os.PathLike]) -> Path:
    """Write ``manifest`` as ``folder/manifest.json`` atomically (the images first)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="manifest.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, folder / "manifest.json")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder


def _save(image: Image.Image, folder: Path, rel: str) -> str:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return rel


def _file_id(item_id: str) -> str:
    return item_id.replace("/", "__")


def _variant(source: StressSource, kind: str, factor: float, seed: int, gallery: list, queries: list,
             note: str) -> dict:
    return {"name": f"{source.subset['name']}-{kind}-{factor:g}", "version": 1,
            "description": f"{source.subset['description']}; {note}",
            "stress": {"kind": kind, "factor": factor, "seed": seed, "builder": BUILDER_VERSION,
                       "source": source.fingerprint()},
            "gallery": gallery, "queries": queries}


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def build_query_scale(source: StressSource, folder: Path, factor: float, seed: int = 0) -> dict:
    """Manifest of the ``query-scale`` point ``factor``; writes its query images under ``folder``."""
    queries = []
    for q in source.subset["queries"]:
        image, box = scale_query(load_image(q["image"]), q["box"], factor)
        rel = _save(image, folder, f"images/queries/{_file_id(q['id'])}.png")
        queries.append(dict(q, image=rel, box=[float(v) for v in box]))
    return _variant(source, "query-scale", factor, seed, source.subset["gallery"], queries,
                    f"query image (box + 25 % context) resized ×{factor:g}")


def build_query_occlusion(source: StressSource, folder: Path, fraction: float, seed: int = 0,
                          fill: str = "grey") -> dict:
    """Manifest of the ``query-occlusion`` point ``fraction``; writes its query images under ``folder``."""
    queries = []
    for i, q in enumerate(source.subset["queries"]):
        image, _ = occlude(load_image(q["image"]), q["box"], fraction, _rng(seed, 1, i), fill)
        rel = _save(image, folder, f"images/queries/{_file_id(q['id'])}.png")
        queries.append(dict(q, image=rel))
    return _variant(source, "query-occlusion", fraction, seed, source.subset["gallery"], queries,
                    f"{fraction:.0%} of each query box covered by a {fill} rectangle")


def build_target_occlusion(source: StressSource, folder: Path, fraction: float, seed: int = 0,
                           fill: str = "grey") -> dict:
    """Manifest of the ``target-occlusion`` point ``fraction``; writes its gallery images under ``folder``."""
    gallery = []
    for i, g in enumerate(source.subset["gallery"]):
        image = load_image(g["path"])
        for j, obj in enumerate(g.get("objects", [])):
            image, _ = occlude(image, obj["box"], fraction, _rng(seed, 2, i, j), fill)
        gallery.append(dict(g, path=_save(image, folder, f"images/gallery/{_file_id(g['id'])}.png")))
    return _variant(source, "target-occlusion", fraction, seed, gallery, source.subset["queries"],
                    f"{fraction:.0%} of each gallery object box covered by a {fill} rectangle")


def build_clutter(source: StressSource, folder: Path, n_distractors: int, seed: int = 0,
                  canvas_side: int = 640) -> dict:
    """Manifest of the ``clutter`` point ``n_distractors``; writes its composites (long side
    ``canvas_side``) under ``folder``."""
    pool = [p for p in source.pool if p.get("objects")]
    if not pool:
        raise ValueError("clutter needs distractor sequences: every sequence of the subset has a query")
    n_distractors = int(n_distractors)
    query_objects = {q["object"] for q in source.subset["queries"]}
    gallery = []
    for i, g in enumerate(source.subset["gallery"]):
        rng = _rng(seed, 3, i)
        bg_item = pool[int(rng.integers(len(pool)))]
        background, f = fit_canvas(load_image(bg_item["path"]), canvas_side)
        objects = [{"object": o["object"], "box": [float(v) * f for v in o["box"]]} for o in bg_item["objects"]]
        targets = [o for o in g.get("objects", []) if o["object"] in query_objects]
        target = crop_object(load_image(g["path"]), targets[0]["box"]) if targets else None
        if target is not None and (target.width > background.width or target.height > background.height):
            target, _ = fit_canvas(target, min(background.size))
        area = target.width * target.height if target is not None else float(np.median(
            [_box_sides(o["box"])[0] * _box_sides(o["box"])[1] for o in g.get("objects", [])] or [48 * 48]))
        # the k-th distractor of composite i is the same for every N, so N=2 ⊂ N=4 ⊂ N=8
        crops, rngs = [], []
        for k in range(n_distractors):
            rk = _rng(seed, 4, i, k)
            d_item = pool[int(rk.integers(len(pool)))]
            d_obj = d_item["objects"][int(rk.integers(len(d_item["objects"])))]
            crops.append((d_obj["object"], crop_object(load_image(d_item["path"]), d_obj["box"])))
            rngs.append(rk)
        image, target_rect, rects = compose(background, target, [c for _, c in crops], _rng(seed, 5, i), rngs, area)
        if target_rect is not None:
            objects.append({"object": targets[0]["object"], "box": [float(v) for v in target_rect]})
        objects += [{"object": name, "box": [float(v) for v in r]} for (name, _), r in zip(crops, rects)]
        rel = _save(image, folder, f"images/gallery/{_file_id(g['id'])}.png")
        gallery.append({"id": g["id"], "path": rel, "width": image.width, "height": image.height,
                        "objects": objects})
    return _variant(source, "clutter", n_distractors, seed, gallery, source.subset["queries"],
                    f"gallery composites: target among {n_distractors} distractor crops on a distractor-sequence frame")


BUILDERS: dict[str, Callable[..., dict]] = {
    "query-scale": build_query_scale, "query-occlusion": build_query_occlusion,
    "target-occlusion": build_target_occlusion, "clutter": build_clutter,
}


def build_variant(source: StressSource, kind: str, factor: float, workdir: Union[str, os.PathLike],
                  seed: int = 0) -> Path:
    """The benchmark folder of one stress point under ``workdir`` (built once: a folder
    whose manifest records the same kind, factor, seed, builder version and subset is
    reused)."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown stress test '{kind}'; choose from {', '.join(BUILDERS)}")
    folder = Path(workdir) / f"{kind}-{factor:g}"
    manifest_file = folder / "manifest.json"
    wanted = {"kind": kind, "factor": factor, "seed": seed, "builder": BUILDER_VERSION, "source": source.fingerprint()}
    if manifest_file.is_file():
        try:
            if json.loads(manifest_file.read_text()).get("stress") == wanted:
                return folder
        except json.JSONDecodeError:
            pass
    manifest_file.unlink(missing_ok=True)
    return write_benchmark(BUILDERS[kind](source, folder, factor, seed=seed), folder)


# --------------------------------------------------------------------------- curves

def stress_curves(source: StressSource, methods: Sequence[str], workdir: Union[str, os.PathLike],
                  evaluate_fn: Callable[[str, Path], dict], kinds: Iterable[str] = tuple(FACTORS),
                  seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Evaluate ``methods`` on every stress point.

    ``evaluate_fn(method name, benchmark folder)`` returns :func:`score_run` metrics
    (the caller decides about caching). Returns ``{kind: {"factors": [...], "label": str,
    "methods": {name: [{"factor", "mAP", "CorLoc@0.5", "loc-mAP@0.5", "R@1"}, ...]}}}``.
    """
    out: dict = {}
    for kind in kinds:
        entry = {"factors": list(FACTORS[kind]), "label": FACTOR_LABELS[kind], "methods": {}}
        for factor in FACTORS[kind]:
            folder = build_variant(source, kind, factor, workdir, seed)
            for name in methods:
                log(f"stress {kind} {factor:g}: {name}")
                m = evaluate_fn(name, folder)
                entry["methods"].setdefault(name, []).append(
                    {"factor": factor, **{k: m[k] for k in ("mAP", "CorLoc@0.5", "loc-mAP@0.5", "R@1")}})
        out[kind] = entry
    return out


def plot_stress(kind: str, entry: dict, path: Union[str, os.PathLike]) -> Path:
    """Two panels (mAP, CorLoc@0.5) against the factor, one line per method, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    for ax, key in zip(axes, ("mAP", "CorLoc@0.5")):
        for name, points in entry["methods"].items():
            ax.plot([p["factor"] for p in points], [p[key] for p in points], marker="o", label=name)
        if kind == "query-scale":
            ax.set_xscale("log", base=2)
        ax.set_xticks(entry["factors"])
        ax.set_xticklabels([f"{f:g}" for f in entry["factors"]])
        ax.set_xlabel(entry["label"])
        ax.set_ylabel(key)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"stress: {kind}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
