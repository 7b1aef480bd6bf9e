"""Baselines: pooling functions against direct formulas, helpers against hand-computed
values, and each method end to end on a generated gallery where a textured patch is
pasted into 6 of 12 background images at known places."""
import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.backbones import build_backbone
from retrieval.evaluation import global_baselines as gb
from retrieval.evaluation import sift_baseline as sb
from retrieval.evaluation.dasr_baseline import DasrMethod, local_maxima, peak_regions, saliency_map

torch.set_num_threads(1)


def _unit(v):
    return v / v.norm()


# --- pooling -----------------------------------------------------------------------

def test_mac_is_channel_max():
    x = torch.randn(2, 5, 4, 6)
    expected = torch.stack([_unit(torch.tensor([float(x[b, c].max()) for c in range(5)])) for b in range(2)])
    assert torch.allclose(gb.mac(x), expected, atol=1e-6)


def test_spoc_is_centre_weighted_sum():
    x = torch.randn(2, 3, 5, 7)
    h, w, sigma = 5, 7, 5 / 6
    expected = torch.zeros(2, 3)
    for i in range(h):
        for j in range(w):
            weight = math.exp(-((i + 0.5 - h / 2) ** 2 + (j + 0.5 - w / 2) ** 2) / (2 * sigma**2))
            expected += weight * x[:, :, i, j]
    assert torch.allclose(gb.spoc(x), torch.stack([_unit(e) for e in expected]), atol=1e-5)
    prior = gb.center_prior(5, 7)
    assert prior.argmax() == 2 * 7 + 3 and torch.allclose(prior, prior.flip(0).flip(1))


def test_gem_formula_and_limits():
    x = torch.rand(2, 4, 3, 5) + 0.1
    assert torch.allclose(gb.gem(x, p=1.0), torch.stack([_unit(v) for v in x.mean(dim=(2, 3))]), atol=1e-6)
    cubes = torch.stack([_unit((x[b] ** 3).mean(dim=(1, 2)) ** (1 / 3)) for b in range(2)])
    assert torch.allclose(gb.gem(x, p=3.0), cubes, atol=1e-6)
    assert torch.allclose(gb.gem(x, p=200.0), gb.mac(x), atol=2e-2)
    assert torch.all(gb.gem(-torch.rand(1, 3, 2, 2)) >= 0)  # clamped: negative maps do not give NaN


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (7, 10), (10, 7), (11, 20), (12, 12)])
def test_rmac_regions_cover_the_map(h, w):
    regions = gb.rmac_regions(h, w, levels=3)
    covered = torch.zeros(h, w, dtype=torch.bool)
    for x0, y0, x1, y1 in regions:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert x1 - x0 == y1 - y0  # squares
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    largest = max(x1 - x0 for x0, _, x1, _ in regions)
    assert largest == min(h, w)


def test_rmac_is_sum_of_regional_maxima():
    x = torch.randn(2, 6, 7, 10)
    regions = gb.rmac_regions(7, 10)
    assert len(regions) > 5  # three levels on a 7×10 map
    expected = torch.zeros(2, 6)
    for x0, y0, x1, y1 in regions:
        for b in range(2):
            expected[b] += _unit(x[b, :, y0:y1, x0:x1].amax(dim=(1, 2)))
    assert torch.allclose(gb.rmac(x), torch.stack([_unit(e) for e in expected]), atol=1e-5)


def test_crow_matches_loop_formula():
    x = torch.randn(2, 4, 3, 5).clamp_min(0)
    for b in range(2):
        s = x[b].sum(0)
        s = (s / math.sqrt(float((s**2).sum()))) ** 0.5
        q = [(x[b, k] > 0).float().mean().item() for k in range(4)]
        omega = [math.log(sum(q) / (1e-6 + qk)) for qk in q]
        f = torch.tensor([omega[k] * float((s * x[b, k]).sum()) for k in range(4)])
        assert torch.allclose(gb.crow(x)[b], _unit(f), atol=1e-5)


def test_cgd_cosine_is_mean_of_parts():
    a, b = torch.rand(1, 8, 4, 4), torch.rand(1, 8, 4, 4)
    parts = sum(float((f(a) * f(b)).sum()) for f in (gb.spoc, gb.mac, gb.gem)) / 3
    assert float((gb.cgd(a) * gb.cgd(b)).sum()) == pytest.approx(parts, abs=1e-6)


def test_best_regions_ignores_padding():
    regions, valid = gb.pad_regions([torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.6, -0.8]])])
    assert regions.shape == (2, 2, 2) and valid.tolist() == [[True, True], [True, False]]
    scores, best = gb.best_regions(regions, valid, torch.tensor([0.0, 1.0]))
    assert scores.tolist() == pytest.approx([1.0, -0.8]) and best.tolist() == [1, 0]  # not the padded 0


# --- SIFT and DASR helpers -----------------------------------------------------------

def test_tfidf_by_hand():
    counts = np.array([[2, 0, 1], [0, 3, 1]], np.float32)
    idf = sb.idf_weights(counts)
    assert idf.tolist() == pytest.approx([math.log(2), math.log(2), 0.0])
    v = sb.tfidf(counts, idf)
    assert v[0].tolist() == pytest.approx([1.0, 0.0, 0.0]) and v[1].tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_vlad_by_hand():
    centroids = np.array([[0.0, 0.0], [10.0, 0.0]], np.float32)
    desc = np.array([[1.0, 0.0], [0.0, 2.0], [10.0, 3.0]], np.float32)
    v = sb.vlad(desc, sb.assign_words(desc, centroids), centroids)
    block0, block1 = np.array([1.0, 2.0]) / math.sqrt(5), np.array([0.0, 1.0])
    assert v.tolist() == pytest.approx((np.concatenate([block0, block1]) / math.sqrt(2)).tolist(), abs=1e-6)


def test_projected_box_and_degenerate_homographies():
    shift = np.array([[1, 0, 30], [0, 1, 20], [0, 0, 1]], np.float64)
    assert sb.projected_box(shift, (40, 30), 1200.0, 5.0) == pytest.approx([30, 20, 70, 50])
    through_infinity = np.array([[1, 0, 0], [0, 1, 0], [-0.05, 0, 1]], np.float64)  # w < 0 past x = 20
    assert sb.projected_box(through_infinity, (40, 30), 1200.0, 5.0) is None
    corners = np.array([[[0, 0]], [[40, 0]], [[40, 30]], [[0, 30]]], np.float32)
    crossed = np.array([[[0, 0]], [[40, 30]], [[40, 0]], [[0, 30]]], np.float32)
    bow_tie, _ = cv2.findHomography(corners, crossed)  # folds the patch, through infinity too
    assert sb.projected_box(bow_tie, (40, 30), 1200.0, 5.0) is None
    assert sb.projected_box(np.diag([20.0, 20.0, 1.0]), (40, 30), 1200.0, 5.0) is None  # 400× the area
    assert sb.clip_box([-5, 10, 50, 300], 40, 100) == [0.0, 10, 40, 100]


def test_local_maxima_and_blob_regions():
    yy, xx = np.mgrid[0:20, 0:30]
    sal = 3 * np.exp(-((yy - 5) ** 2 + (xx - 6) ** 2) / 4.0) + 2 * np.exp(-((yy - 14) ** 2 + (xx - 22) ** 2) / 8.0)
    peaks = local_maxima(torch.tensor(sal, dtype=torch.float32), max_peaks=5)
    assert peaks == [(5, 6), (14, 22)]
    boxes, values = peak_regions(sal.astype(np.float32), peaks, (0.5,))
    # half-maximum of exp(-d²/4) is at d² < 4·ln 2 ≈ 2.77 → |d| ≤ 1
    assert boxes.tolist() == [[5, 4, 8, 7], [20, 12, 25, 17]] and values.tolist() == pytest.approx([3, 2], abs=1e-3)
    diagonal = np.array([[1.0, 0.0, 0.0], [0.0, 0.9, 0.0], [0.0, 0.0, 0.2]], np.float32)
    boxes, _ = peak_regions(diagonal, [(0, 0)], (0.8, 0.1))  # blobs are 8-connected
    assert boxes.tolist() == [[0, 0, 2, 2], [0, 0, 3, 3]]


def test_saliency_is_relative_to_median():
    fmap = torch.ones(1, 4, 3, 3)
    fmap[0, :, 1, 2] = 5.0
    sal = saliency_map(fmap)
    assert sal[0, 1, 2] == pytest.approx(16.0) and float(sal.sum()) == pytest.approx(16.0)


# --- end to end ------------------------------------------------------------------------

PATCH = 56


def _textured_patch(rng):
    """Saturated 8-px colour blocks with a dark ring: many corners for SIFT, distinct for a CNN."""
    blocks = rng.integers(0, 6, size=(PATCH // 8, PATCH // 8))
    palette = np.array([[230, 30, 30], [30, 200, 40], [30, 40, 230], [250, 220, 20], [250, 250, 250], [20, 20, 20]])
    img = palette[blocks].repeat(8, 0).repeat(8, 1).astype(np.uint8)
    yy, xx = np.mgrid[0:PATCH, 0:PATCH]
    ring = np.abs(np.hypot(yy - PATCH / 2, xx - PATCH / 2) - PATCH / 3) < 2.5
    img[ring] = (200, 0, 200)
    return img


def _background(rng, kind):
    h, w = 128, 176
    if kind == 0:  # grey smooth noise
        noise = rng.normal(128, 40, size=(h // 8, w // 8))
        img = np.array(Image.fromarray(noise.clip(0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC))
    else:  # grey stripes with fine noise
        yy, xx = np.mgrid[0:h, 0:w]
        img = 128 + 50 * np.sin((xx * math.cos(kind) + yy * math.sin(kind)) / 3.0) + rng.normal(0, 10, (h, w))
    return np.repeat(img.clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(0)
    patch = _textured_patch(rng)
    gallery, boxes = [], {}
    for i in range(12):
        img = _background(rng, i % 3)
        if i < 6:
            x0, y0 = int(rng.integers(0, 176 - PATCH)), int(rng.integers(0, 128 - PATCH))
            img[y0:y0 + PATCH, x0:x0 + PATCH] = patch
            boxes[f"img{i}"] = [x0, y0, x0 + PATCH, y0 + PATCH]
        gallery.append((f"img{i}", Image.fromarray(img)))
    return gallery, Image.fromarray(patch), boxes


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("efficientnet-lite0")


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _check_ranking(ranking, gallery, positives):
    assert sorted(r["id"] for r in ranking) == sorted(gid for gid, _ in gallery)
    scores = [r["score"] for r in ranking]
    assert scores == sorted(scores, reverse=True)
    assert ranking[0]["id"] in positives


@pytest.mark.parametrize("pooling", sorted(gb.POOLINGS))
def test_global_method_finds_the_patch(synthetic, backbone, pooling):
    gallery, query, boxes = synthetic
    method = gb.GlobalDescriptorMethod(pooling, backbone=backbone)
    assert method.device == torch.device("cpu")  # a shared backbone stays where it is
    stats = method.index(gallery)
    assert stats["seconds"] > 0 and stats["bytes_per_image"] >= 320 * 4
    ranking, _ = method.search(query)
    _check_ranking(ranking, gallery, boxes)
    for r in ranking:
        w, h = dict(gallery)[r["id"]].size
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        if pooling != "rmac":
            assert r["box"] == [0, 0, w, h]


def test_global_method_accepts_tiny_query(synthetic, backbone):
    gallery, query, _ = synthetic
    method = gb.GlobalDescriptorMethod("gem", backbone=backbone)
    method.index(gallery[:3])
    ranking, _ = method.search(query.crop((0, 0, 12, 20)))  # under EfficientNet's 32 px minimum
    assert len(ranking) == 3


@pytest.mark.parametrize("shortlist", ["bow", "vlad"])
def test_sift_finds_and_localises_the_patch(synthetic, shortlist):
    gallery, query, boxes = synthetic
    method = sb.SiftMethod(shortlist=shortlist, rerank=8)
    method.index(gallery)
    ranking, extras = method.search(query)
    _check_ranking(ranking, gallery, boxes)
    assert len(extras["shortlist"]) == 8
    top = ranking[0]
    assert top["box"] is not None and _iou(top["box"], boxes[top["id"]]) >= 0.5
    verified = [r for r in ranking if r["id"] in boxes and r["id"] in extras["shortlist"]]
    assert all(_iou(r["box"], boxes[r["id"]]) >= 0.5 for r in verified)


def test_sift_handles_featureless_images(synthetic):
    gallery, query, _ = synthetic
    flat = [("flat", Image.new("RGB", (64, 48), (90, 90, 90)))]
    method = sb.SiftMethod(rerank=100)
    method.index(gallery[:4] + flat)
    ranking, _ = method.search(query)
    flat_entry = next(r for r in ranking if r["id"] == "flat")
    assert flat_entry["score"] == 0.0 and flat_entry["box"] is None
    ranking, extras = method.search(Image.new("RGB", (40, 40), (90, 90, 90)))  # featureless query
    assert all(r["score"] == 0.0 and r["box"] is None for r in ranking) and extras["shortlist"] == []


def test_dasr_finds_the_patch(synthetic, backbone):
    gallery, query, boxes = synthetic
    method = DasrMethod(backbone=backbone)
    stats = method.index(gallery)
    assert stats["bytes_per_image"] > 0
    ranking, _ = method.search(query)
    _check_ranking(ranking, gallery, boxes)
    for r in ranking:
        w, h = dict(gallery)[r["id"]].size
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 < x1 <= w + 1e-3 and 0 <= y0 < y1 <= h + 1e-3
