"""Result pictures: overlays against a per-pixel reference, boxes where they belong, panel and plot sizes."""
import matplotlib
import numpy as np
import pytest
from PIL import Image

from retrieval import viz


def test_normalise_by_hand():
    heat = np.array([[1.0, 3.0], [5.0, np.nan]])
    np.testing.assert_allclose(viz.normalise(heat), [[0.0, 0.5], [1.0, 0.0]])
    np.testing.assert_allclose(viz.normalise(heat, (3.0, 4.0)), [[0.0, 0.0], [1.0, 0.0]])
    assert not viz.normalise(np.full((2, 3), 7.0)).any()
    assert not viz.normalise(np.full((2, 2), -np.inf)).any()


def test_overlay_matches_per_pixel_blend():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    heat = rng.normal(size=(3, 4)).astype(np.float32)
    out = np.asarray(viz.overlay_heatmap(Image.fromarray(base), heat, alpha=0.3, cmap="viridis"), dtype=np.int32)
    lo, hi = heat.min(), heat.max()
    cmap = matplotlib.colormaps["viridis"]
    for y in range(3):
        for x in range(4):
            colour = np.array(cmap(float((heat[y, x] - lo) / (hi - lo)))[:3]) * 255
            expect = 0.7 * base[y, x] + 0.3 * colour
            assert np.abs(out[y, x] - expect).max() <= 1.5, (y, x)
    same = viz.overlay_heatmap(Image.fromarray(base), heat, alpha=0.0)
    np.testing.assert_array_equal(np.asarray(same), base)
    with pytest.raises(ValueError):
        viz.overlay_heatmap(Image.fromarray(base), heat, alpha=1.5)


def test_overlay_resizes_a_small_heatmap():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    heat = np.zeros((2, 4), np.float32)
    heat[:, 3] = 1.0                       # the right quarter is hot
    out = np.asarray(viz.overlay_heatmap(img, heat, alpha=1.0, cmap="gray"))
    assert out.shape == (20, 40, 3)
    assert out[10, 39].min() > 200 and out[10, 0].max() < 30


def test_boxes_are_drawn_on_their_outline_only():
    img = Image.new("RGB", (100, 80), (0, 0, 0))
    out = np.asarray(viz.draw_boxes(img, [[10, 20, 60, 70]], width=2))
    assert tuple(out[20, 30]) == viz.BOX_COLOURS[0]      # top edge
    assert tuple(out[45, 60]) == viz.BOX_COLOURS[0]      # right edge
    assert not out[45, 35].any() and not out[5, 5].any()  # inside and outside untouched
    labelled = np.asarray(viz.draw_boxes(img, [[10, 30, 60, 70]], labels=["#1 0.90"]))
    assert labelled[20:30, 10:40].any()                   # the label sits above the box
    assert viz.box_labels([0.9, 0.25]) == ["#1 0.90", "#2 0.25"]


def test_thumbnail_scales_the_box_with_the_image():
    img = Image.new("RGB", (800, 400), (0, 0, 0))
    tile = viz.thumbnail(img, [400, 200, 600, 300], rank=3, score=0.5, max_side=200)
    assert tile.size == (200, 100)
    arr = np.asarray(tile)
    assert tuple(arr[75, 100]) == viz.BOX_COLOURS[0] or tuple(arr[75, 101]) == viz.BOX_COLOURS[0]
    assert arr[:12, :40].any()                            # the "#3 0.500" banner


def test_level_panel_and_score_plot_sizes():
    img = Image.new("RGB", (64, 32), (90, 90, 90))
    maps = {name: np.random.default_rng(i).normal(size=(32, 64)) for i, name in enumerate(("p3", "p4", "p5"))}
    panel = viz.level_panel(img, maps, height=50, gap=4)
    assert panel.width == 3 * 100 + 2 * 4 and panel.height > 50
    arr = np.asarray(panel)
    assert (arr[-10, 10] != 90).any() and (arr[-10, 210] != 90).any()   # every tile is coloured
    plot = viz.score_plot([0.9, 0.8, 0.2, 0.1], selected=1, size=(300, 120))
    assert plot.size == (300, 120)
    assert viz.score_plot([], size=(200, 100)).size == (200, 100)


def test_level_panel_shows_an_unmatched_level_bare():
    img = Image.new("RGB", (64, 32), (90, 90, 90))
    maps = {"p3": np.full((32, 64), np.nan), "p4": np.random.default_rng(1).normal(size=(32, 64))}
    arr = np.asarray(viz.level_panel(img, maps, height=50, gap=4))
    assert (arr[-10, 10] == 90).all()             # the P3 tile: the image without colour
    assert (arr[-10, 110] != 90).any()            # the P4 tile: coloured
