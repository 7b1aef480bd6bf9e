"""Pictures of search results: heatmap overlays, labelled boxes, per-level panels,
result thumbnails and the score-down-the-ranking plot.

Pure functions on PIL images and numpy arrays; nothing here knows about Gradio.
Matplotlib is used through its object API (``Figure`` + Agg canvas), never
``pyplot``, because the app renders from several threads at once.
"""
from __future__ import annotations

import io
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BOX_COLOURS = ((255, 64, 32), (255, 200, 0), (0, 200, 255), (160, 255, 80), (255, 96, 255))


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


def normalise(heat: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """``(H, W)`` scores → ``(H, W)`` float32 in [0, 1].

    ``value_range`` (lo, hi) maps lo → 0 and hi → 1; by default the map's own finite
    min and max. Non-finite values (a level that was skipped) become 0; a constant map
    becomes all zeros.
    """
    heat = np.asarray(heat, dtype=np.float32)
    finite = np.isfinite(heat)
    if value_range is None:
        if not finite.any():
            return np.zeros(heat.shape, np.float32)
        lo, hi = float(heat[finite].min()), float(heat[finite].max())
    else:
        lo, hi = map(float, value_range)
    if hi <= lo:
        return np.zeros(heat.shape, np.float32)
    out = (np.where(finite, heat, lo) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def colorize(heat01: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """``(H, W)`` values in [0, 1] → ``(H, W, 3)`` uint8 RGB through a matplotlib colormap."""
    import matplotlib

    rgba = matplotlib.colormaps[cmap](np.asarray(heat01, dtype=np.float32))
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def overlay_heatmap(image: Image.Image, heat: np.ndarray, alpha: float = 0.45, cmap: str = "jet",
                    value_range: tuple[float, float] | None = None) -> Image.Image:
    """Blend a colormapped heatmap over ``image``.

    ``heat`` is ``(H, W)``; it is resized (bilinear) to the image when sizes differ.
    Each output pixel is ``(1 − alpha) · image + alpha · colour(heat)``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = image.convert("RGB")
    heat01 = normalise(heat, value_range)
    if heat01.shape != (base.height, base.width):
        heat01 = np.asarray(Image.fromarray(heat01, mode="F").resize(base.size, Image.BILINEAR))
    colour = colorize(heat01, cmap).astype(np.float32)
    mixed = (1.0 - alpha) * np.asarray(base, dtype=np.float32) + alpha * colour
    return Image.fromarray(np.clip(mixed + 0.5, 0, 255).astype(np.uint8), "RGB")


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour, size: int) -> None:
    """Text on a filled background, kept inside the image."""
    font = _font(size)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    w, h = x1 - x0 + 4, y1 - y0 + 4
    width, height = draw.im.size
    x = min(max(0, xy[0]), max(0, width - w))
    y = xy[1] - h if xy[1] - h >= 0 else min(xy[1], max(0, height - h))
    draw.rectangle((x, y, x + w, y + h), fill=colour)
    draw.text((x + 2 - x0, y + 2 - y0), text, fill=(0, 0, 0), font=font)


def draw_boxes(image: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str] | None = None,
               width: int | None = None, colours: Sequence[tuple[int, int, int]] = BOX_COLOURS) -> Image.Image:
    """Draw ``boxes`` ``[[x0, y0, x1, y1], …]`` (image pixels) with optional labels.

    The first box, the best one, is drawn thickest. Returns a new RGB image.
    """
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    base = width or max(2, round(max(out.size) / 200))
    size = max(10, round(max(out.size) / 40))
    for i, box in enumerate(boxes):
        colour = colours[i % len(colours)]
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=base + (1 if i == 0 else 0))
        if labels is not None and i < len(labels) and labels[i]:
            _label(draw, (x0, y0), labels[i], colour, size)
    return out


def box_labels(scores: Sequence[float]) -> list[str]:
    """``["#1 0.83", "#2 0.41", …]`` for boxes listed best first."""
    return [f"#{i + 1} {s:.2f}" for i, s in enumerate(scores)]


def thumbnail(image: Image.Image, box: Sequence[float] | None, rank: int, score: float,
              max_side: int = 320) -> Image.Image:
    """A result tile: the image shrunk to ``max_side``, its best box drawn, and a
    ``#rank  score`` banner in the top-left corner."""
    img = image.convert("RGB")
    factor = min(1.0, max_side / max(img.size))
    if factor < 1.0:
        img = img.resize((max(1, round(img.width * factor)), max(1, round(img.height * factor))), Image.BILINEAR)
    if box is not None:
        img = draw_boxes(img, [[v * factor for v in box]], width=max(2, round(max_side / 110)))
    draw = ImageDraw.Draw(img)
    _label(draw, (0, 0), f"#{rank}  {score:.3f}", (255, 255, 255), max(11, round(max_side / 18)))
    return img


def level_panel(image: Image.Image, level_maps: dict[str, np.ndarray], alpha: float = 0.5, cmap: str = "jet",
                height: int = 240, gap: int = 6) -> Image.Image:
    """Per-level heatmaps side by side, each overlaid on the image at ``height`` px,
    titled with the level name and its peak value; every level has its own colour range.
    An all-NaN map (a level the query was not matched on) shows the bare image, titled so."""
    img = image.convert("RGB")
    w = max(1, round(img.width * height / img.height))
    small = img.resize((w, height), Image.BILINEAR)
    names = list(level_maps)
    title_h = max(14, height // 12)
    panel = Image.new("RGB", (len(names) * w + gap * max(0, len(names) - 1), height + title_h + 4), "white")
    draw = ImageDraw.Draw(panel)
    font = _font(title_h - 2)
    for i, name in enumerate(names):
        heat = np.asarray(level_maps[name], dtype=np.float32)
        x = i * (w + gap)
        finite = heat[np.isfinite(heat)]
        if finite.size:
            panel.paste(overlay_heatmap(small, heat, alpha=alpha, cmap=cmap), (x, title_h + 4))
            title = f"{name.upper()}  max {float(finite.max()):.2f}"
        else:
            panel.paste(small, (x, title_h + 4))
            title = f"{name.upper()}  not matched (query too large here)"
        draw.text((x + 2, 1), title, fill=(0, 0, 0), font=font)
    return panel


def score_plot(scores: Sequence[float], selected: int | None = None, size: tuple[int, int] = (520, 200)) -> Image.Image:
    """Scores down the ranking (rank 1 first) as a small line plot, so the drop where
    matches end is visible. ``selected`` (a 0-based position) is marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ranks = np.arange(1, len(scores) + 1)
    if len(scores):
        ax.plot(ranks, scores, "o-", color="#d9480f", markersize=3, linewidth=1.5)
        if selected is not None and 0 <= selected < len(scores):
            ax.plot([selected + 1], [scores[selected]], "o", markersize=9, markerfacecolor="none",
                    markeredgecolor="black")
        ax.set_xlim(0.5, len(scores) + 0.5)
    else:
        ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("rank", fontsize=8)
    ax.set_ylabel("fine score", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout(pad=0.4)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
