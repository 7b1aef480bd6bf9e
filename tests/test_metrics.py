"""Metrics against hand-computed values and slow obvious references."""
import random

import numpy as np
import pytest

from retrieval.evaluation import metrics as M


# --------------------------------------------------------------------------- IoU

@pytest.mark.parametrize("a, b, expected", [
    ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),          # identical
    ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),        # disjoint
    ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),         # touching edges share no area
    ([0, 0, 10, 10], [2, 2, 7, 7], 25 / 100),       # contained
    ([2, 2, 7, 7], [0, 0, 10, 10], 25 / 100),       # symmetric
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7),            # partial overlap
    ([0, 0, 10, 10], [0, 0, 10, 5], 0.5),           # exactly one half
])
def test_box_iou_hand_values(a, b, expected):
    assert M.box_iou(a, b) == pytest.approx(expected, abs=1e-12)
    assert M.box_iou_matrix(np.array([a]), np.array([b]))[0, 0] == pytest.approx(expected, abs=1e-12)


def test_box_iou_matrix_matches_scalar_loop():
    rng = np.random.default_rng(0)
    def boxes(n):
        xy = rng.uniform(0, 50, size=(n, 2))
        wh = rng.uniform(1, 30, size=(n, 2))
        return np.concatenate([xy, xy + wh], axis=1)
    a, b = boxes(17), boxes(23)
    got = M.box_iou_matrix(a, b)
    assert got.shape == (17, 23)
    ref = np.array([[M.box_iou(x, y) for y in b] for x in a])
    np.testing.assert_allclose(got, ref, atol=1e-12)
    assert (got > 0).any() and (got == 0).any()  # the random boxes exercise both branches


def test_is_localized_threshold_is_inclusive():
    gt = [[0, 0, 10, 10]]
    assert M.is_localized([0, 0, 10, 5], gt)            # IoU exactly 0.5: a hit
    assert not M.is_localized([0, 0, 10, 4.9], gt)      # 0.49: a miss
    # 0.5 on paper, 0.49999999999999994 in floating point: still a hit
    assert M.box_iou([0.3, 0.3, 0.9, 0.6], [0.3, 0.3, 0.6, 0.6]) < 0.5
    assert M.is_localized([0.3, 0.3, 0.9, 0.6], [[0.3, 0.3, 0.6, 0.6]])
    assert not M.is_localized(None, gt)
    assert not M.is_localized([0, 0, 10, 10], [])
    # any one of several object boxes is enough
    assert M.is_localized([50, 50, 60, 60], [[0, 0, 10, 10], [50, 50, 60, 61]])


# --------------------------------------------------------------------------- AP

def test_average_precision_hand_value():
    # positives at ranks 1, 3, 5 → (1/1 + 2/3 + 3/5) / 3
    assert M.average_precision(list("axbyc"), set("abc")) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert M.average_precision(list("abcxy"), set("abc")) == 1.0
    assert M.average_precision(list("xyabc"), set("abc")) == pytest.approx((1 / 3 + 2 / 4 + 3 / 5) / 3)


def test_average_precision_removes_junk_before_ranking():
    # without junk removal: (1/2 + 2/4) / 2 = 0.5; with it the ranking is a, x, b
    assert M.average_precision(list("jaxb"), set("ab"), junk_ids={"j"}) == pytest.approx((1 + 2 / 3) / 2)
    # a junk image is never a positive, even when listed as one
    assert M.average_precision(list("xa"), set("aj"), junk_ids={"j"}) == pytest.approx(0.5)


def test_positives_never_returned_count_as_missed():
    assert M.average_precision(list("ax"), set("ab")) == pytest.approx(0.5)
    assert M.average_precision(list("xy"), set("ab")) == 0.0
    assert M.average_precision([], set("ab")) == 0.0


def test_ranking_order_is_authoritative_for_ties_and_duplicates():
    # equal scores are not re-sorted: whichever comes first in the list ranks first
    assert M.average_precision(["x", "a"], {"a"}) == 0.5
    assert M.average_precision(["a", "x"], {"a"}) == 1.0
    # a repeated id counts at its first position only
    assert M.average_precision(["a", "a", "x", "b"], {"a", "b"}) == pytest.approx((1 + 2 / 3) / 2)


def test_average_precision_needs_positives():
    with pytest.raises(ValueError):
        M.average_precision(list("abc"), set())
    with pytest.raises(ValueError):
        M.average_precision(list("abc"), {"j"}, junk_ids={"j"})


def _slow_ap(ranking, positives, junk):
    """The textbook definition: mean over positives of precision at the positive's rank."""
    ranked = []
    for item in ranking:
        if item not in junk and item not in ranked:
            ranked.append(item)
    positives = [p for p in positives if p not in junk]
    total = 0.0
    for p in positives:
        if p in ranked:
            r = ranked.index(p) + 1
            total += sum(1 for i in ranked[:r] if i in positives) / r
    return total / len(positives)


def test_average_precision_matches_slow_reference_on_random_rankings():
    rng = random.Random(0)
    ids = [f"g{i}" for i in range(40)]
    for _ in range(200):
        ranking = rng.sample(ids, rng.randint(0, 40)) + rng.choices(ids, k=rng.randint(0, 3))
        positives = set(rng.sample(ids, rng.randint(1, 10)))
        junk = set(rng.sample(ids, rng.randint(0, 4))) - set(list(positives)[:1])
        assert M.average_precision(ranking, positives, junk) == pytest.approx(_slow_ap(ranking, positives, junk))


# --------------------------------------------------------------------------- loc-AP

GOOD = [0, 0, 10, 10]
HALF = [0, 0, 10, 5]     # IoU 0.5 with GOOD
BAD = [20, 20, 30, 30]


def test_localized_average_precision_hand_value():
    boxes = {k: [GOOD] for k in "abcd"}
    ranking = [("a", GOOD), ("x", GOOD), ("b", BAD), ("c", None), ("d", HALF)]
    # hits only at ranks 1 and 5 (b mislocalised, c without box), four positives
    assert M.localized_average_precision(ranking, boxes) == pytest.approx((1 + 2 / 5) / 4)
    # with perfect boxes it equals plain AP
    perfect = [(i, GOOD) for i, _ in ranking]
    assert M.localized_average_precision(perfect, boxes) == pytest.approx(M.average_precision(list("axbcd"), boxes))


def test_localized_average_precision_junk_and_threshold():
    boxes = {"a": [GOOD], "b": [GOOD], "j": [GOOD]}
    ranking = [("j", GOOD), ("a", GOOD), ("b", HALF)]
    assert M.localized_average_precision(ranking, boxes, junk_ids={"j"}) == 1.0
    assert M.localized_average_precision(ranking, boxes, junk_ids={"j"}, iou_threshold=0.6) == pytest.approx(0.5)


# --------------------------------------------------------------------------- R@K, CorLoc, shortlist

def test_recall_at_k_after_junk_removal():
    ranking, positives = list("jxa"), {"a"}
    assert M.recall_at_k(ranking, positives, 1, {"j"}) == 0.0
    assert M.recall_at_k(ranking, positives, 2, {"j"}) == 1.0   # a moves up to rank 2
    assert M.recall_at_k(ranking, positives, 2) == 0.0
    assert M.recall_at_k(ranking, {"j"} | positives, 1, {"j"}) == 0.0
    assert M.recall_at_k([], positives, 10) == 0.0


def test_corloc_pairs():
    gt = [GOOD]
    pairs = [(GOOD, gt), (None, gt), (BAD, gt), (HALF, gt), (BAD, [GOOD, BAD])]
    assert M.corloc(pairs) == pytest.approx(3 / 5)
    assert M.corloc(pairs, iou_threshold=0.75) == pytest.approx(2 / 5)
    with pytest.raises(ValueError):
        M.corloc([])


def test_shortlist_recall_counts_positives_in_the_first_n():
    shortlist, positives = list("jaxbc"), set("abcd")
    assert M.shortlist_recall(shortlist, positives, 2) == 0.25      # junk still takes a place
    assert M.shortlist_recall(shortlist, positives, 3) == 0.25
    assert M.shortlist_recall(shortlist, positives, 4) == 0.5
    assert M.shortlist_recall(shortlist, positives, 300) == 0.75    # shorter than n: all of it


def test_latency_percentiles():
    assert M.percentile([4, 1, 3, 2], 50) == 2.5
    assert M.percentile(list(range(1, 101)), 95) == pytest.approx(95.05)
    summary = M.latency_summary([10.0] * 19 + [100.0])
    assert summary["latency_p50_ms"] == 10.0
    assert summary["latency_p95_ms"] == pytest.approx(10.0 + 0.05 * 90.0)
    with pytest.raises(ValueError):
        M.percentile([], 50)
    assert M.percentile([7.0], 95) == 7.0
