"""SIFT baseline (seed 004): OpenCV SIFT on grayscale images, a visual-word shortlist
(tf-idf bag of words or VLAD, cosine), then spatial verification of the shortlist with
Lowe's ratio test and a RANSAC homography, re-ranked by inlier count.

The query patch arrives cropped at gallery scale. A patch whose short side is under
``upscale_below`` (32 px) is enlarged ×2 before detection: SIFT's first octave finds
almost no keypoints on a 16–30 px patch, and the homography maps the enlarged patch's
corners, so boxes stay in gallery pixels either way.
"""
from __future__ import annotations

import time
from typing import Optional

import cv2
import faiss
import numpy as np
from PIL import Image

from retrieval.images import resize_max_side

Box = list[float]


def sift_features(gray: np.ndarray, sift: cv2.SIFT) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints and descriptors of a uint8 ``(H, W)`` image: ``(N, 2)`` float32 xy and
    ``(N, 128)`` uint8 (OpenCV's SIFT values are integers in 0..255, so nothing is lost)."""
    keypoints, desc = sift.detectAndCompute(gray, None)
    if desc is None or len(keypoints) == 0:
        return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8)
    pts = np.array([kp.pt for kp in keypoints], np.float32)
    return pts, np.clip(np.round(desc), 0, 255).astype(np.uint8)


def kmeans(x: np.ndarray, k: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """k-means centroids ``(k, D)`` of ``(N, D)`` float32 points (FAISS, deterministic seed)."""
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids


def assign_words(desc: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid of each descriptor: ``(N, D)`` → ``(N,)`` int64."""
    if len(desc) == 0:
        return np.zeros(0, np.int64)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    _, nearest = index.search(np.ascontiguousarray(desc, dtype=np.float32), 1)
    return nearest[:, 0]


def idf_weights(counts: np.ndarray) -> np.ndarray:
    """``log(N / df)`` of each word from word counts ``(N, K)`` → ``(K,)``; unseen words get ``log N``."""
    df = (counts > 0).sum(axis=0)
    return np.log(len(counts) / np.maximum(df, 1)).astype(np.float32)


def tfidf(counts: np.ndarray, idf: np.ndarray) -> np.ndarray:
    """L2-normalised tf-idf vectors: counts ``(N, K)``, idf ``(K,)`` → ``(N, K)``; empty rows
    stay 0. (Dividing the counts by their sum first would change nothing after the L2.)"""
    v = counts * idf
    return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def vlad(desc: np.ndarray, words: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """VLAD of one image: residuals to the assigned centroid summed per word, each word's
    block L2-normalised (intra-normalisation), then the whole vector.
    desc ``(N, D)``, words ``(N,)``, centroids ``(K, D)`` → ``(K·D,)``."""
    k, d = centroids.shape
    v = np.zeros((k, d), np.float32)
    np.add.at(v, words, desc.astype(np.float32) - centroids[words])
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    v = v.ravel()
    return v / max(float(np.linalg.norm(v)), 1e-12)


def ratio_matches(q_desc: np.ndarray, g_desc: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Lowe's ratio test on nearest neighbours from the query to the gallery image.
    ``(Nq, 128)``, ``(Ng, 128)`` → matched query indices ``(M,)`` and gallery indices ``(M,)``."""
    if len(q_desc) == 0 or len(g_desc) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(q_desc.astype(np.float32), g_desc.astype(np.float32), k=2)
    good = [m[0] for m in knn if len(m) == 2 and m[0].distance < ratio * m[1].distance]
    return (np.array([m.queryIdx for m in good], np.int64), np.array([m.trainIdx for m in good], np.int64))


def polygon_area(pts: np.ndarray) -> float:
    """Shoelace area of a ``(N, 2)`` polygon."""
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def projected_box(h: Optional[np.ndarray], patch_wh: tuple[int, int], query_area: float,
                  max_scale: float) -> Optional[Box]:
    """Bounding box of the patch's corners mapped by homography ``h`` (3, 3), or None when
    ``h`` is degenerate: missing, non-finite, sending part of the patch through infinity
    (which is also the only way a homography folds it into a non-convex shape), or
    changing the area by more than ``max_scale``² either way."""
    if h is None or not np.all(np.isfinite(h)):
        return None
    w, hh = patch_wh
    corners = np.array([[[0, 0]], [[w, 0]], [[w, hh]], [[0, hh]]], np.float32)
    depth = corners[:, 0] @ h[2, :2] + h[2, 2]
    if not (np.all(depth > 0) or np.all(depth < 0)):
        return None
    quad = cv2.perspectiveTransform(corners, h)
    if not np.all(np.isfinite(quad)):
        return None
    area = polygon_area(quad[:, 0])
    if not (query_area / max_scale**2 <= area <= query_area * max_scale**2):
        return None
    xs, ys = quad[:, 0, 0], quad[:, 0, 1]
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


def points_box(pts: np.ndarray) -> Optional[Box]:
    """Bounding box of ``(N, 2)`` points, or None when it has no area."""
    if len(pts) < 2:
        return None
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    return [float(x0), float(y0), float(x1), float(y1)] if x1 > x0 and y1 > y0 else None


def clip_box(box: Optional[Box], width: int, height: int) -> Optional[Box]:
    """``box`` clipped to a ``width × height`` image; None when nothing is left."""
    if box is None:
        return None
    x0, y0 = min(max(box[0], 0.0), width), min(max(box[1], 0.0), height)
    x1, y1 = min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)
    return [x0, y0, x1, y1] if x1 > x0 and y1 > y0 else None


def verify(q_pts: np.ndarray, q_desc: np.ndarray, g_pts: np.ndarray, g_desc: np.ndarray, *,
           patch_wh: tuple[int, int], query_area: float, ratio: float, ransac_px: float,
           max_scale: float) -> tuple[int, Optional[Box]]:
    """Spatial verification of one gallery image: (RANSAC inliers, box in gallery pixels).

    The box is the patch's projected outline, or the inliers' bounding box when the
    homography is degenerate; with fewer than 4 ratio-test matches there is no
    homography: 0 inliers, no box.
    """
    qi, gi = ratio_matches(q_desc, g_desc, ratio)
    if len(qi) < 4:
        return 0, None
    src, dst = q_pts[qi].reshape(-1, 1, 2), g_pts[gi].reshape(-1, 1, 2)
    h, mask = cv2.findHomography(src, dst, cv2.RANSAC, ransac_px)
    if mask is None:
        return 0, None
    inlier = mask.ravel().astype(bool)
    box = projected_box(h, patch_wh, query_area, max_scale)
    return int(inlier.sum()), box if box is not None else points_box(dst[inlier, 0])


class SiftMethod:
    """SIFT + BoW/VLAD shortlist + ratio test + RANSAC re-ranking of the top ``rerank``.

    Scores: a verified image scores ``inliers + shortlist cosine`` (the cosine breaks ties;
    inlier counts under ``min_inliers`` count as 0 — the default 4 accepts any homography,
    6 cost .07 R@1 on tracking_dev, whose small targets rarely give more), the others
    their shortlist cosine, so the ranking covers the whole gallery.
    ``rerank >= len(gallery)`` verifies everything (the exhaustive row of BENCHMARKS.md).
    """

    def __init__(self, shortlist: str = "bow", words: int = 1024, vlad_words: int = 64, rerank: int = 100,
                 ratio: float = 0.8, ransac_px: float = 5.0, min_inliers: int = 4, max_scale: float = 5.0,
                 max_side: int = 640, upscale_below: int = 32, train_descriptors: int = 100_000,
                 seed: int = 0) -> None:
        if shortlist not in ("bow", "vlad"):
            raise ValueError(f"unknown shortlist '{shortlist}'; choose bow or vlad")
        self.name = f"sift-{shortlist}"
        self.shortlist, self.words, self.vlad_words, self.rerank = shortlist, words, vlad_words, rerank
        self.ratio, self.ransac_px, self.min_inliers, self.max_scale = ratio, ransac_px, min_inliers, max_scale
        self.max_side, self.upscale_below = max_side, upscale_below
        self.train_descriptors, self.seed = train_descriptors, seed
        self.config = {"shortlist": shortlist, "words": words if shortlist == "bow" else vlad_words,
                       "rerank": rerank, "ratio": ratio, "ransac_px": ransac_px, "min_inliers": min_inliers,
                       "max_scale": max_scale, "max_side": max_side, "upscale_below": upscale_below}
        self.device = "cpu"
        self._sift = cv2.SIFT_create()

    def _gray_features(self, img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        gray = cv2.cvtColor(np.asarray(img.convert("RGB")), cv2.COLOR_RGB2GRAY)
        return sift_features(gray, self._sift)

    def _encode(self, desc: np.ndarray) -> np.ndarray:
        """Shortlist vector of one image's descriptors ``(N, 128)`` → ``(K,)`` or ``(K·128,)``."""
        words = assign_words(desc, self.centroids)
        if self.shortlist == "vlad":
            return vlad(desc, words, self.centroids) if len(desc) else np.zeros(self.centroids.size, np.float32)
        counts = np.bincount(words, minlength=len(self.centroids)).astype(np.float32)[None]
        return tfidf(counts, self.idf)[0]

    def index(self, gallery: list[tuple[str, Image.Image]]) -> dict:
        start = time.perf_counter()
        self.ids = [gid for gid, _ in gallery]
        self.sizes = [img.size for _, img in gallery]
        self.points, self.descriptors, self.scales = [], [], []
        for _, img in gallery:
            resized, scale = resize_max_side(img, self.max_side)
            pts, desc = self._gray_features(resized)
            self.points.append(pts / scale)  # stored-image pixels
            self.descriptors.append(desc)
            self.scales.append(scale)
        pool = np.concatenate(self.descriptors).astype(np.float32)
        if len(pool) == 0:
            raise ValueError("no SIFT keypoints in any gallery image; nothing to build a vocabulary from")
        rng = np.random.default_rng(self.seed)
        if len(pool) > self.train_descriptors:
            pool = pool[rng.choice(len(pool), self.train_descriptors, replace=False)]
        wanted = self.words if self.shortlist == "bow" else self.vlad_words
        # FAISS wants ≥ 39 points per centroid; tiny galleries get a smaller vocabulary
        self.centroids = kmeans(pool, max(1, min(wanted, len(pool) // 39)), seed=self.seed)
        if self.shortlist == "bow":
            counts = np.stack([np.bincount(assign_words(d, self.centroids), minlength=len(self.centroids))
                               for d in self.descriptors]).astype(np.float32)
            self.idf = idf_weights(counts)
            self.vectors = tfidf(counts, self.idf)
            shortlist_bytes = float((counts > 0).sum()) * 8 / len(gallery)  # sparse (word, weight) pairs
        else:
            self.vectors = np.stack([self._encode(d) for d in self.descriptors])
            shortlist_bytes = self.vectors.shape[1] * 4
        local_bytes = sum(len(d) * (128 + 8) for d in self.descriptors) / len(gallery)
        return {"seconds": time.perf_counter() - start, "bytes_per_image": local_bytes + shortlist_bytes}

    def prepare_patch(self, query: Image.Image) -> tuple[Image.Image, int]:
        """Long side capped at ``max_side``; enlarged ×2 when the short side is under
        ``upscale_below``. Returns the patch and its enlargement factor (1 or 2)."""
        patch, _ = resize_max_side(query.convert("RGB"), self.max_side)
        if min(patch.size) < self.upscale_below:
            return patch.resize((patch.width * 2, patch.height * 2), Image.BICUBIC), 2
        return patch, 1

    def search(self, query: Image.Image) -> tuple[list[dict], dict]:
        patch, factor = self.prepare_patch(query)
        query_area = patch.width * patch.height / factor**2  # the object's area at gallery scale
        q_pts, q_desc = self._gray_features(patch)
        n = len(self.ids)
        if len(q_desc) == 0:
            return [{"id": gid, "score": 0.0, "box": None} for gid in self.ids], {"shortlist": []}
        coarse = self.vectors @ self._encode(q_desc)
        order = np.argsort(-coarse, kind="stable")
        scores = coarse.astype(np.float64)
        boxes: list[Optional[Box]] = [None] * n
        shortlist = order[: self.rerank]
        for i in shortlist:
            inliers, box = verify(q_pts, q_desc, self.points[i], self.descriptors[i], patch_wh=patch.size,
                                  query_area=query_area / self.scales[i] ** 2, ratio=self.ratio, ransac_px=self.ransac_px,
                                  max_scale=self.max_scale)
            scores[i] += inliers if inliers >= self.min_inliers else 0
            boxes[i] = clip_box(box, *self.sizes[i])
        ranked = np.argsort(-scores, kind="stable")
        return ([{"id": self.ids[i], "score": float(scores[i]), "box": boxes[i]} for i in ranked],
                {"shortlist": [self.ids[i] for i in shortlist]})
