"""Retrieval and localisation metrics of BENCHMARKS.md, as pure functions.

Conventions shared by every function here:

- A ranking is a sequence of gallery ids, best first. Its order is authoritative:
  scores are never re-sorted, so ties are broken by whoever produced the ranking.
- Junk ids are deleted from a ranking before anything is measured (ROxford protocol);
  the images after them move up.
- An id that occurs twice in a ranking counts only at its first position.
- Positives that the ranking never returns count as missed: AP is divided by the
  number of positives, not by the number of positives found.
- Boxes are ``[x0, y0, x1, y1]`` in continuous pixel coordinates, so a box's area is
  ``(x1 - x0) * (y1 - y0)`` (no "+1"). A predicted box localises an object when its
  IoU with one of the object's boxes is at least the threshold; ``IOU_TOLERANCE``
  keeps an IoU that is 0.5 on paper but 0.4999999999 in floating point a hit.
"""
from __future__ import annotations

from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np

Box = Sequence[float]

IOU_TOLERANCE = 1e-9


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes; 0 when the union is empty."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``a`` ``(N, 4)`` and ``b`` ``(M, 4)`` boxes → ``(N, M)`` float64."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where((inter > 0) & (union > 0), inter / union, 0.0)
    return iou


def is_localized(box: Box | None, object_boxes: Sequence[Box], iou_threshold: float = 0.5) -> bool:
    """Whether ``box`` overlaps one of ``object_boxes`` with IoU ≥ ``iou_threshold``.

    A missing box (``None``) never localises anything.
    """
    if box is None or len(object_boxes) == 0:
        return False
    best = box_iou_matrix(np.asarray([box]), np.asarray(object_boxes)).max()
    return bool(best >= iou_threshold - IOU_TOLERANCE)


def clean_ranking(ranked_ids: Iterable[Hashable], junk_ids: Iterable[Hashable] = ()) -> list:
    """The ranking with junk ids and repeated ids removed, order kept."""
    junk = set(junk_ids)
    seen: set = set()
    out = []
    for item in ranked_ids:
        if item in junk or item in seen:
            continue
        seen.add(item)
        out.append(item)
    return out


def ap_from_hits(hits: Sequence[bool], n_positives: int) -> float:
    """Non-interpolated AP of a ranked hit/miss list: mean over the ``n_positives``
    of the precision at each hit's rank (a positive never hit contributes 0)."""
    if n_positives <= 0:
        raise ValueError("average precision is undefined for a query without positives")
    hits_arr = np.asarray(hits, dtype=bool)
    if hits_arr.sum() > n_positives:
        raise ValueError(f"{int(hits_arr.sum())} hits but only {n_positives} positives")
    ranks = np.flatnonzero(hits_arr) + 1          # 1-based rank of each hit
    precision_at_hits = np.arange(1, len(ranks) + 1) / ranks
    return float(precision_at_hits.sum() / n_positives)


def average_precision(ranked_ids: Sequence[Hashable], positive_ids: Iterable[Hashable],
                      junk_ids: Iterable[Hashable] = ()) -> float:
    """AP of ``ranked_ids`` (best first) against ``positive_ids``, junk removed first."""
    junk = set(junk_ids)
    positives = set(positive_ids) - junk
    ranking = clean_ranking(ranked_ids, junk)
    return ap_from_hits([item in positives for item in ranking], len(positives))


def localized_average_precision(ranking: Sequence[tuple[Hashable, Box | None]],
                                object_boxes: Mapping[Hashable, Sequence[Box]],
                                junk_ids: Iterable[Hashable] = (),
                                iou_threshold: float = 0.5) -> float:
    """loc-AP: AP where a returned image is a hit only when it is a positive and its box
    localises the query object there.

    ``ranking`` is ``(id, box or None)`` best first; ``object_boxes`` maps each positive
    id to the query object's boxes in that image (its keys are the positives).
    The denominator is the number of positives (junk excluded).
    """
    junk = set(junk_ids)
    positives = set(object_boxes) - junk
    box_of = {}
    for item, box in ranking:
        box_of.setdefault(item, box)   # a repeated id keeps its first box, as it keeps its first rank
    hits = [item in positives and is_localized(box_of[item], object_boxes[item], iou_threshold)
            for item in clean_ranking((item for item, _ in ranking), junk)]
    return ap_from_hits(hits, len(positives))


def recall_at_k(ranked_ids: Sequence[Hashable], positive_ids: Iterable[Hashable],
                k: int, junk_ids: Iterable[Hashable] = ()) -> float:
    """1.0 when a positive is among the first ``k`` ids after junk removal, else 0.0."""
    junk = set(junk_ids)
    positives = set(positive_ids) - junk
    return float(any(item in positives for item in clean_ranking(ranked_ids, junk)[:k]))


def corloc(pairs: Iterable[tuple[Box | None, Sequence[Box]]], iou_threshold: float = 0.5) -> float:
    """CorLoc pooled over (query, positive image) pairs.

    Each pair is ``(predicted box or None, the query object's boxes in that image)``;
    a pair without a predicted box is a miss. Returns the fraction localised.
    """
    outcomes = [is_localized(box, boxes, iou_threshold) for box, boxes in pairs]
    if not outcomes:
        raise ValueError("CorLoc needs at least one (query, positive) pair")
    return float(np.mean(outcomes))


def shortlist_recall(shortlist_ids: Sequence[Hashable], positive_ids: Iterable[Hashable], n: int) -> float:
    """Fraction of ``positive_ids`` among the first ``n`` ids of a coarse shortlist.

    The shortlist is taken as the coarse stage emitted it: junk is not removed, because
    a junk image does take one of the ``n`` places the fine stage sees. ``positive_ids``
    should already exclude junk.
    """
    positives = set(positive_ids)
    if not positives:
        raise ValueError("shortlist recall is undefined for a query without positives")
    return len(positives.intersection(shortlist_ids[:n])) / len(positives)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) with linear interpolation between samples."""
    if len(values) == 0:
        raise ValueError("percentile of no values")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    """``{"latency_p50_ms", "latency_p95_ms"}`` of per-query wall times."""
    return {"latency_p50_ms": percentile(latencies_ms, 50), "latency_p95_ms": percentile(latencies_ms, 95)}
