"""Generate the bundled demo gallery: composite scenes built only from public-domain / CC0 photos.

DEV-TIME DEPENDENCY: scikit-image. Only this script needs it (the app and its tests do
not): the source photos are the sample images shipped inside the scikit-image wheel, so
nothing is downloaded. Install it into the project venv and run::

    .venv/bin/pip install scikit-image
    .venv/bin/python assets/make_demo_gallery.py          # writes assets/demo/

The output is deterministic (fixed seed). It is a benchmark in the format of
BENCHMARKS.md, written to ``annotations.json``:

- ``gallery/NNNN.jpg``: 640x480 scenes, each a texture or photo-collage background with
  random distractor patches (crops of photo areas that contain no object) and 0-3 of
  the objects below pasted at different sizes, positions, rotations and brightness;
- ``queries/scenes/<object>_<k>.jpg``: query photos, the object on a plain or textured
  background at yet another size; the query entry's ``box`` is the object in it;
- ``queries/<object>.jpg``: the first query photo cropped to its box, a ready-made patch.

Every source and its licence is listed in ``SOURCES`` and in ``assets/LICENSES.md``; the
composites are released under CC0 like their sources.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SEED = 20240607
CANVAS = (640, 480)
QUERY_CANVAS = (480, 360)
N_GALLERY = 56
N_EMPTY = 5  # pure-distractor images: negatives for every query
MIN_SIDE, MAX_SIDE = 44, 220  # long side of a pasted object before rotation, in pixels
MAX_UPSCALE = 2.2  # beyond this, small source crops turn to mush
MAX_ANGLE = 15.0
EXCLUSION_MARGIN = 16  # keeps distractor crops from catching the rim of an object
JPEG_QUALITY = 90
OUT_DIR = Path(__file__).resolve().parent / "demo"

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Source:
    """A scikit-image sample photo: ``skimage.data.<loader>()``, shipped as ``file``."""

    loader: str
    file: str
    credit: str
    license: str
    texture: bool = False  # grayscale texture that gets colourised when used


@dataclass(frozen=True)
class ObjectSpec:
    """An object instance: ``box`` cut out of ``source``, pasted through a ``shape`` mask.

    ``exclude`` is the source area distractors must avoid (defaults to ``box``), for objects
    whose crop shows only part of a larger thing that must not reappear elsewhere.
    """

    source: str
    box: Box
    shape: str  # "rect" or "ellipse"
    exclude: Box | None = None


SOURCES: dict[str, Source] = {
    "astronaut": Source("astronaut", "astronaut.png",
                        "NASA (Eileen Collins portrait, NASA Great Images database)",
                        "public domain"),
    "rocket": Source("rocket", "rocket.jpg", "SpaceX (DSCOVR launch on Falcon 9)", "public domain"),
    "hubble_deep_field": Source("hubble_deep_field", "hubble_deep_field.jpg",
                                "NASA / HubbleSite (Hubble eXtreme Deep Field)", "public domain"),
    "chelsea": Source("chelsea", "chelsea.png", "Stefan van der Walt", "CC0"),
    "coffee": Source("coffee", "coffee.png", "Rachel Michetti, courtesy of Pikolo Espresso Bar", "CC0"),
    "camera": Source("camera", "camera.png", "Lav Varshney", "CC0"),
    "retina": Source("retina", "retina.jpg", "Mikael Häggström (Wikimedia Commons)", "CC0"),
    "clock": Source("clock", "clock_motion.png", "Stefan van der Walt", "public domain"),
    "brick": Source("brick", "brick.png", "CC0Textures (Bricks25)", "CC0", texture=True),
    "grass": Source("grass", "grass.png", "linolafett (DeviantArt, Grass-01)", "CC0", texture=True),
    "gravel": Source("gravel", "gravel.png", "CC0Textures (Gravel04)", "CC0", texture=True),
}

OBJECTS: dict[str, ObjectSpec] = {
    "cat_face": ObjectSpec("chelsea", (115, 40, 375, 290), "rect"),
    "coffee_cup": ObjectSpec("coffee", (165, 15, 428, 332), "rect"),
    "rocket": ObjectSpec("rocket", (288, 122, 352, 290), "rect", exclude=(288, 122, 352, 410)),
    "mission_patch": ObjectSpec("astronaut", (130, 344, 214, 428), "ellipse"),
    "astronaut_face": ObjectSpec("astronaut", (150, 12, 305, 195), "rect"),
    "shuttle_model": ObjectSpec("astronaut", (352, 0, 470, 290), "rect"),
    "hubble_field": ObjectSpec("hubble_deep_field", (680, 430, 830, 620), "rect"),
    "cameraman": ObjectSpec("camera", (150, 60, 340, 225), "rect"),
    "optic_disc": ObjectSpec("retina", (95, 530, 345, 780), "ellipse"),
}


def load_sources() -> dict[str, np.ndarray]:
    """Every source as an ``(H, W, 3)`` uint8 array; grayscale ones are stacked to 3 channels."""
    try:
        import skimage.data
    except ImportError:
        sys.exit("make_demo_gallery.py needs scikit-image (a dev-time dependency, used only to "
                 "read its bundled public-domain/CC0 sample photos).\n"
                 "Install it with:  .venv/bin/pip install scikit-image")
    arrays = {}
    for name, src in SOURCES.items():
        arr = np.asarray(getattr(skimage.data, src.loader)())
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        arrays[name] = np.ascontiguousarray(arr[:, :, :3].astype(np.uint8))
    return arrays


# ---------------------------------------------------------------- pure helpers

def expand_box(box: Box, margin: int) -> Box:
    return (box[0] - margin, box[1] - margin, box[2] + margin, box[3] + margin)


def boxes_intersect(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def exclusions_by_source() -> dict[str, list[Box]]:
    """Source name → the areas (object crops plus margin) that distractors must not touch."""
    out: dict[str, list[Box]] = {name: [] for name in SOURCES}
    for spec in OBJECTS.values():
        out[spec.source].append(expand_box(spec.exclude or spec.box, EXCLUSION_MARGIN))
    return out


def sample_free_crop(rng: np.random.Generator, hw: tuple[int, int], avoid: list[Box],
                     side: tuple[int, int], aspect: float, tries: int = 200) -> Box | None:
    """A crop of an ``(H, W)`` image with long side in ``side`` and width/height ``aspect``
    that touches none of ``avoid``; None when rejection sampling finds none."""
    h, w = hw
    for _ in range(tries):
        long_side = rng.uniform(*side)
        cw, ch = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
        cw, ch = int(round(cw)), int(round(ch))
        if cw < 8 or ch < 8 or cw > w or ch > h:
            continue
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        box = (x0, y0, x0 + cw, y0 + ch)
        if not any(boxes_intersect(box, a) for a in avoid):
            return box
    return None


def colourise(rgb: np.ndarray, dark: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Map the luminance of an ``(H, W, 3)`` uint8 image onto the ramp ``dark`` → ``light``."""
    lum = rgb.astype(np.float32).mean(axis=2, keepdims=True) / 255.0
    out = dark[None, None, :] * (1.0 - lum) + light[None, None, :] * lum
    return np.clip(out, 0, 255).astype(np.uint8)


def jitter_colour(rgb: np.ndarray, gain: float, channel_gains: np.ndarray) -> np.ndarray:
    """Brightness × per-channel gain on an ``(H, W, 3)`` uint8 image."""
    out = rgb.astype(np.float32) * (gain * channel_gains[None, None, :])
    return np.clip(out, 0, 255).astype(np.uint8)


def shape_mask(size: tuple[int, int], shape: str) -> Image.Image:
    """An ``L`` mask of ``size`` = (w, h): full rectangle or inscribed ellipse, edges softened."""
    w, h = size
    if shape == "rect":
        return Image.new("L", size, 255)
    mask = Image.new("L", (w * 4, h * 4), 0)  # drawn large then shrunk: antialiased rim
    ImageDraw.Draw(mask).ellipse((0, 0, w * 4 - 1, h * 4 - 1), fill=255)
    return mask.resize(size, Image.LANCZOS)


def render_patch(rgb: np.ndarray, shape: str, long_side: int, angle: float) -> Image.Image:
    """An ``(h, w, 3)`` crop resized to ``long_side``, masked and rotated: an RGBA patch
    whose alpha marks exactly the pasted pixels (the box is read off it)."""
    h, w = rgb.shape[:2]
    scale = long_side / max(h, w)
    size = (max(8, int(round(w * scale))), max(8, int(round(h * scale))))
    img = Image.fromarray(rgb).resize(size, Image.LANCZOS).convert("RGBA")
    img.putalpha(shape_mask(size, shape))
    if angle:
        img = img.rotate(angle, resample=Image.BICUBIC, expand=True)
    return img


def alpha_box(patch: Image.Image, x: int, y: int) -> Box:
    """Tight box ``[x0, y0, x1, y1)`` of the patch's opaque-ish (alpha ≥ 128) pixels at (x, y)."""
    alpha = np.asarray(patch.getchannel("A")) >= 128
    ys, xs = np.nonzero(alpha)
    return (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1)


def find_spot(rng: np.random.Generator, canvas: tuple[int, int], patch: Image.Image,
              taken: list[Box], gap: int = 6, tries: int = 300) -> tuple[int, int] | None:
    """Top-left corner putting the whole patch inside the canvas, clear of ``taken`` boxes."""
    cw, ch = canvas
    pw, ph = patch.size
    if pw > cw or ph > ch:
        return None
    for _ in range(tries):
        x, y = int(rng.integers(0, cw - pw + 1)), int(rng.integers(0, ch - ph + 1))
        box = alpha_box(patch, x, y)
        if not any(boxes_intersect(expand_box(box, gap), t) for t in taken):
            return x, y
    return None


def stratified_sides(rng: np.random.Generator, n: int, lo: float, hi: float) -> list[int]:
    """``n`` long sides log-spread over [lo, hi] (one per stratum, shuffled), so each object
    shows up both small and large."""
    u = (np.arange(n) + rng.uniform(size=n)) / n
    sides = np.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    return [int(round(s)) for s in rng.permutation(sides)]


def plan_gallery(rng: np.random.Generator) -> list[list[tuple[str, int]]]:
    """Per gallery image, the (object, long side) pairs to paste; objects are drawn
    least-used first so every object lands in about the same number of images."""
    names = list(OBJECTS)
    counts = {n: 0 for n in names}
    empty = set(rng.choice(N_GALLERY, size=N_EMPTY, replace=False).tolist())
    chosen: list[list[str]] = []
    for i in range(N_GALLERY):
        k = 0 if i in empty else int(rng.choice([1, 1, 2, 2, 3]))
        order = sorted(names, key=lambda n: (counts[n], rng.uniform()))
        chosen.append(order[:k])
        for n in order[:k]:
            counts[n] += 1
    sides = {n: iter(stratified_sides(rng, counts[n], MIN_SIDE, max_side(n))) for n in names}
    return [[(n, next(sides[n])) for n in objs] for objs in chosen]


def max_side(name: str) -> float:
    x0, y0, x1, y1 = OBJECTS[name].box
    return min(MAX_SIDE, MAX_UPSCALE * max(x1 - x0, y1 - y0))


# ---------------------------------------------------------------- scene rendering

class SceneMaker:
    """Draws backgrounds, distractors and objects from the loaded sources with one RNG."""

    def __init__(self, sources: dict[str, np.ndarray], rng: np.random.Generator):
        self.sources = sources
        self.rng = rng
        self.avoid = exclusions_by_source()

    def random_colours(self) -> tuple[np.ndarray, np.ndarray]:
        dark = self.rng.uniform(0, 110, size=3)
        light = np.clip(dark + self.rng.uniform(90, 200, size=3), 0, 255)
        return dark.astype(np.float32), light.astype(np.float32)

    def free_crop(self, side: tuple[int, int], aspect: float) -> np.ndarray:
        """An ``(h, w, 3)`` object-free crop of a random source, colour-shifted."""
        rng = self.rng
        names = list(SOURCES)
        while True:
            name = names[int(rng.integers(len(names)))]
            arr = self.sources[name]
            box = sample_free_crop(rng, arr.shape[:2], self.avoid[name], side, aspect)
            if box is not None:
                break
        crop = arr[box[1]:box[3], box[0]:box[2]]
        if SOURCES[name].texture:
            return colourise(crop, *self.random_colours())
        return jitter_colour(crop, rng.uniform(0.8, 1.2), rng.uniform(0.85, 1.15, size=3))

    def background(self, canvas: tuple[int, int]) -> Image.Image:
        """A colourised texture, or a collage of 2-4 object-free photo/texture crops."""
        rng = self.rng
        cw, ch = canvas
        if rng.uniform() < 0.5:
            tex = list(n for n, s in SOURCES.items() if s.texture)
            arr = self.sources[tex[int(rng.integers(len(tex)))]]
            box = sample_free_crop(rng, arr.shape[:2], [], (260, 512), cw / ch)
            crop = colourise(arr[box[1]:box[3], box[0]:box[2]], *self.random_colours())
            return Image.fromarray(crop).resize(canvas, Image.BICUBIC)
        tiles = [(0, 0, cw, ch)]
        for _ in range(int(rng.integers(1, 4))):
            x0, y0, x1, y1 = tiles.pop(int(np.argmax([(t[2] - t[0]) * (t[3] - t[1]) for t in tiles])))
            if (x1 - x0) >= (y1 - y0):
                cut = int(rng.uniform(0.3, 0.7) * (x1 - x0)) + x0
                tiles += [(x0, y0, cut, y1), (cut, y0, x1, y1)]
            else:
                cut = int(rng.uniform(0.3, 0.7) * (y1 - y0)) + y0
                tiles += [(x0, y0, x1, cut), (x0, cut, x1, y1)]
        img = Image.new("RGB", canvas)
        for x0, y0, x1, y1 in tiles:
            tw, th = x1 - x0, y1 - y0
            crop = self.free_crop((120, 420), tw / th)
            img.paste(Image.fromarray(crop).resize((tw, th), Image.BICUBIC), (x0, y0))
        return img

    def add_distractors(self, img: Image.Image, n: int) -> None:
        """Paste ``n`` object-free patches, shaped and jittered like objects, anywhere."""
        rng = self.rng
        cw, ch = img.size
        for _ in range(n):
            crop = self.free_crop((40, 260), float(np.exp(rng.uniform(-0.7, 0.7))))
            side = int(np.exp(rng.uniform(math.log(40), math.log(MAX_SIDE))))
            shape = "ellipse" if rng.uniform() < 0.3 else "rect"
            patch = render_patch(crop, shape, side, rng.uniform(-MAX_ANGLE, MAX_ANGLE))
            x = int(rng.integers(-patch.width // 4, cw - 3 * patch.width // 4))
            y = int(rng.integers(-patch.height // 4, ch - 3 * patch.height // 4))
            img.paste(patch, (x, y), patch)

    def object_crop(self, name: str) -> np.ndarray:
        x0, y0, x1, y1 = OBJECTS[name].box
        return self.sources[OBJECTS[name].source][y0:y1, x0:x1]

    def add_object(self, img: Image.Image, name: str, side: int, angle: float,
                   taken: list[Box], jitter: bool = True) -> Box:
        """Paste object ``name`` clear of ``taken`` (shrinking it if the scene is too
        crowded); returns its box and appends it to ``taken``."""
        rng = self.rng
        crop = self.object_crop(name)
        if jitter:
            crop = jitter_colour(crop, rng.uniform(0.75, 1.25), rng.uniform(0.93, 1.07, size=3))
        while True:
            patch = render_patch(crop, OBJECTS[name].shape, side, angle)
            spot = find_spot(rng, img.size, patch, taken)
            if spot is not None:
                break
            if side <= MIN_SIDE:
                raise RuntimeError(f"no room for {name} in a {img.size} scene")
            side = max(MIN_SIDE, int(side * 0.85))
        img.paste(patch, spot, patch)
        box = alpha_box(patch, *spot)
        taken.append(box)
        return box

    def gallery_image(self, objects: list[tuple[str, int]]) -> tuple[Image.Image, list[dict]]:
        rng = self.rng
        img = self.background(CANVAS)
        self.add_distractors(img, int(rng.integers(4, 8)) if not objects else int(rng.integers(2, 7)))
        taken: list[Box] = []
        annotated = []
        for name, side in sorted(objects, key=lambda o: -o[1]):  # big first: they need the room
            box = self.add_object(img, name, side, rng.uniform(-MAX_ANGLE, MAX_ANGLE), taken)
            annotated.append({"object": name, "box": [float(v) for v in box]})
        return img, annotated

    def query_image(self, name: str, plain: bool) -> tuple[Image.Image, Box]:
        """The object alone on a plain, noisy background (``plain``) or on a texture among
        distractors, at a size and angle of its own."""
        rng = self.rng
        if plain:
            colour = rng.uniform(60, 200, size=3)
            noise = rng.normal(0, 6, size=(QUERY_CANVAS[1], QUERY_CANVAS[0], 1))
            arr = np.clip(colour[None, None, :] + noise, 0, 255).astype(np.uint8)
            img = Image.fromarray(arr).filter(ImageFilter.GaussianBlur(1.5))
            side, angle = int(min(max_side(name), 150)), 0.0
        else:
            img = self.background(QUERY_CANVAS)
            self.add_distractors(img, 2)
            side, angle = int(rng.uniform(70, max_side(name))), rng.uniform(-8, 8)
        box = self.add_object(img, name, side, angle, [], jitter=not plain)
        return img, box


# ---------------------------------------------------------------- output

def save_jpeg(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.convert("RGB").save(path, "JPEG", quality=JPEG_QUALITY, optimize=True)


def build(sources: dict[str, np.ndarray], out: Path) -> dict:
    """Write every image under ``out`` and return the manifest (also written there)."""
    for old in [*out.glob("gallery/*.jpg"), *out.glob("queries/*.jpg"), *out.glob("queries/scenes/*.jpg")]:
        old.unlink()
    rng = np.random.default_rng(SEED)
    maker = SceneMaker(sources, rng)
    gallery = []
    for i, objects in enumerate(plan_gallery(rng)):
        img, annotated = maker.gallery_image(objects)
        rel = f"gallery/{i + 1:04d}.jpg"
        save_jpeg(img, out / rel)
        gallery.append({"id": f"{i + 1:04d}", "path": rel, "width": img.width, "height": img.height,
                        "objects": annotated})
    queries = []
    for name in OBJECTS:
        for k, plain in enumerate((True, False), start=1):
            img, box = maker.query_image(name, plain)
            rel = f"queries/scenes/{name}_{k}.jpg"
            save_jpeg(img, out / rel)
            if plain:
                save_jpeg(img.crop(box), out / f"queries/{name}.jpg")
            queries.append({"id": f"{name}/q{k}", "object": name, "image": rel,
                            "box": [float(v) for v in box], "junk": []})
    manifest = {
        "name": "demo", "version": 1,
        "description": ("Synthetic demo gallery composited by assets/make_demo_gallery.py from "
                        "public-domain and CC0 photos bundled with scikit-image; released under "
                        "CC0 (see assets/LICENSES.md)."),
        "gallery": gallery, "queries": queries,
    }
    (out / "annotations.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: assets/demo)")
    args = parser.parse_args(argv)
    manifest = build(load_sources(), args.out)
    per_object = {n: sum(any(o["object"] == n for o in g["objects"]) for g in manifest["gallery"])
                  for n in OBJECTS}
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{len(manifest['gallery'])} gallery images, {len(manifest['queries'])} queries, "
          f"{size / 1e6:.2f} MB in {args.out}")
    print("images per object: " + ", ".join(f"{n}={c}" for n, c in per_object.items()))


if __name__ == "__main__":
    main()
