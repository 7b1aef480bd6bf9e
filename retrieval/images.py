"""Robust image loading, the resize rule shared by queries and gallery images, crops.

Everything that reads a user's file goes through :func:`load_image`, which either
returns an RGB ``PIL.Image`` or raises :class:`ImageLoadError` with a message a
person can act on. Nothing else in the package opens image files.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class ImageLoadError(ValueError):
    """A file or array that cannot be used as an image (corrupt, not an image, too small, too big)."""


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    if isinstance(source, bytes):
        return f"the uploaded data ({len(source)} bytes)"
    return "the image"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB; transparency is composited onto white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.round().astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(source: ImageSource, min_side: int = 8, max_pixels: int = 80_000_000) -> Image.Image:
    """Open ``source`` as an upright 8-bit RGB image.

    ``source`` may be a path, raw bytes, a PIL image or an ``(H, W)`` / ``(H, W, 3|4)``
    uint8 array. EXIF orientation is applied; grayscale, palette, CMYK, 16-bit and
    alpha images are converted. Raises :class:`ImageLoadError` for anything unusable.
    """
    name = _describe(source)
    try:
        if isinstance(source, np.ndarray):
            if source.ndim not in (2, 3) or source.size == 0:
                raise ImageLoadError(f"{name} has shape {source.shape}; expected (H, W) or (H, W, C)")
            arr = source
            if arr.dtype != np.uint8:
                arr = np.clip(arr, 0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
        elif isinstance(source, Image.Image):
            img = source
        else:
            if isinstance(source, (str, os.PathLike)):
                path = Path(source)
                if not path.is_file():
                    raise ImageLoadError(f"{name} does not exist or is not a file")
                if path.stat().st_size == 0:
                    raise ImageLoadError(f"{name} is empty (0 bytes)")
                data = path.read_bytes()
            else:
                data = source
                if len(data) == 0:
                    raise ImageLoadError("the uploaded data is empty (0 bytes)")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                if img.width * img.height > max_pixels:
                    raise ImageLoadError(
                        f"{name} is {img.width}×{img.height} px, more than the limit of "
                        f"{max_pixels:,} pixels")
                img.load()
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"{name} has more pixels than the limit of {max_pixels:,} pixels") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{name} is not a readable image ({type(exc).__name__})") from exc
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as exc:
        raise ImageLoadError(f"{name} is corrupt or truncated: {exc}") from exc
    if min(img.size) < min_side:
        raise ImageLoadError(
            f"{name} is {img.width}×{img.height} px; both sides must be at least {min_side} px")
    return img


def resize_scale(width: int, height: int, max_side: int) -> float:
    """Factor that brings the long side to ``max_side`` (never enlarges)."""
    return min(1.0, max_side / float(max(width, height)))


def resize_max_side(img: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """The resize rule shared by gallery images and query source images.

    Returns the resized image and the factor (resized px per original px).
    """
    scale = resize_scale(img.width, img.height, max_side)
    if scale >= 1.0:
        return img, 1.0
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.BICUBIC), scale


def parse_box(box: Union[str, Sequence[float], None]) -> tuple[float, float, float, float] | None:
    """``"x0,y0,x1,y1"`` or a 4-sequence → floats; ``None`` stays ``None``."""
    if box is None:
        return None
    if isinstance(box, str):
        parts = [p for p in box.replace(" ", "").split(",") if p]
        try:
            values = [float(p) for p in parts]
        except ValueError as exc:
            raise ValueError(f"box '{box}' is not four numbers x0,y0,x1,y1") from exc
    else:
        values = [float(v) for v in box]
    if len(values) != 4 or not all(np.isfinite(values)):
        raise ValueError(f"box {box!r} is not four finite numbers x0,y0,x1,y1")
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {box!r} is empty: need x0 < x1 and y0 < y1")
    return x0, y0, x1, y1


def crop_box(img: Image.Image, box: Sequence[float], min_side: int = 8) -> Image.Image:
    """Crop ``box`` (x0, y0, x1, y1 in ``img`` pixels), clipped to the image.

    Raises :class:`ImageLoadError` when what remains is smaller than ``min_side``.
    """
    x0, y0, x1, y1 = parse_box(box)
    x0, y0 = max(0, int(round(x0))), max(0, int(round(y0)))
    x1, y1 = min(img.width, int(round(x1))), min(img.height, int(round(y1)))
    if x1 - x0 < min_side or y1 - y0 < min_side:
        raise ImageLoadError(
            f"the crop {x1 - x0}×{y1 - y0} px (box {list(box)} inside a {img.width}×{img.height} image) "
            f"is too small; select at least {min_side}×{min_side} px")
    return img.crop((x0, y0, x1, y1))


def prepare_query_source(source: ImageSource, box: Sequence[float], max_side: int, min_side: int = 8,
                         max_pixels: int = 80_000_000) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """The image a query is cut from, resized by the gallery rule, and the box in its pixels.

    ``box`` is in the source's original pixels. Raises :class:`ImageLoadError` when the box
    covers less than ``min_side`` pixels on a side after clipping to the image.
    """
    img = load_image(source, min_side=1, max_pixels=max_pixels)
    resized, scale = resize_max_side(img, max_side)
    x0, y0, x1, y1 = parse_box(box)
    clipped = (max(0.0, x0 * scale), max(0.0, y0 * scale),
               min(float(resized.width), x1 * scale), min(float(resized.height), y1 * scale))
    crop_box(resized, clipped, min_side=min_side)  # raises with a clear message when too small
    return resized, clipped


def prepare_query(source: ImageSource, box: Sequence[float] | None, max_side: int,
                  min_side: int = 8, max_pixels: int = 80_000_000) -> Image.Image:
    """The query patch as it will be searched.

    With a ``box`` (in the source image's original pixels) the source is first resized by
    the gallery rule, then cropped, so the patch has the scale its object has in a
    gallery image. Without a box the patch is used as given (long side capped at
    ``max_side``).
    """
    if box is not None:
        resized, clipped = prepare_query_source(source, box, max_side, min_side, max_pixels)
        return crop_box(resized, clipped, min_side=min_side)
    img = load_image(source, min_side=min_side, max_pixels=max_pixels)
    resized, _ = resize_max_side(img, max_side)
    if min(resized.size) < min_side:
        raise ImageLoadError(f"the query is {resized.width}×{resized.height} px; "
                             f"both sides must be at least {min_side} px")
    return resized


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → ``(3, H, W)`` float32 tensor in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def size_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices of ``sizes`` grouped by equal size (first-seen order), each group cut into
    batches of at most ``batch_size`` — so a batch stacks without padding."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(i)
    return [group[s:s + batch_size] for group in groups.values() for s in range(0, len(group), batch_size)]


def padded_batches(sizes: Sequence[tuple[int, int]], batch_size: int,
                   max_padding: float = 0.25) -> list[list[int]]:
    """Indices of ``sizes`` (width, height) grouped into batches of similar sizes, for work
    that zero-pads a batch to its largest member (the fine stage, see ``matching.stack_maps``).

    Galleries of photos rarely share one exact size, and one image per batch multiplies the
    per-call overhead; here a batch grows while its padded area (largest width × largest
    height × members) stays within ``1 + max_padding`` of its members' summed area. Images
    of equal size always fit together.
    """
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i][1], sizes[i][0]))
    batches: list[list[int]] = []
    batch: list[int] = []
    max_w = max_h = area = 0
    for i in order:
        w, h = sizes[i]
        padded = max(max_w, w) * max(max_h, h) * (len(batch) + 1)
        if batch and (len(batch) >= batch_size or padded > (1.0 + max_padding) * (area + w * h)):
            batches.append(batch)
            batch, max_w, max_h, area = [], 0, 0, 0
        batch.append(i)
        max_w, max_h, area = max(max_w, w), max(max_h, h), area + w * h
    if batch:
        batches.append(batch)
    return batches


def list_image_files(folder: Union[str, os.PathLike]) -> list[Path]:
    """Files under ``folder`` (recursive) whose extension looks like an image, sorted."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))
