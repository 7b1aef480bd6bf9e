"""A persistent gallery index: FAISS over region descriptors + a memory-mapped feature store.

``gallery_index/<name>/`` holds

    manifest.json          format, model hash, config, images (path, sizes, content hash,
                           where their features live), skipped files, counts, coarse type (exact or hnsw)
    chunks/<id>.f16        ψ(P3/P4/P5) maps of a batch of images, fp16, memory-mapped
    chunks/<id>.regions.npy  (R, C) float16 region descriptors of the same images (older indexes: float32)
    regions-<gen>.faiss    FAISS HNSW graph over all region descriptors, only for galleries with more
                           than ``exact_index_max`` of them (rebuilt at each commit); below that the
                           coarse stage ranks every stored vector exactly
    .lock                  held by the process that writes

Writes never modify a file the current manifest points to: new chunks and a new
FAISS file are written and fsynced first, then the manifest is replaced atomically
(temp + fsync + rename), then files no manifest references are deleted. A process
killed at any moment therefore leaves the last committed index loadable.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import faiss
import numpy as np
import torch

from .checkpoint import atomic_write_bytes, file_hash
from .config import RetrievalConfig
from .encoding import EncodedImage

FORMAT = "patch-retrieval-index/1"
MANIFEST = "manifest.json"


class IndexLoadError(RuntimeError):
    """An index that is missing, unreadable, or built with another model."""


class ModelMismatch(IndexLoadError):
    """The index was built with another model (checkpoint or model config)."""


def content_hash(path: str | os.PathLike) -> str:
    """Identifies an image file's content, so unchanged files are never re-encoded."""
    return file_hash(path, digits=20)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


@dataclass
class ImageRecord:
    """One indexed image as the manifest stores it."""

    path: str                       # as given to the index (absolute, or relative to the index root)
    sha: str                        # content hash of the file
    width: int                      # original pixels
    height: int
    stored_width: int               # after the gallery resize rule
    stored_height: int
    chunk: str                      # chunk id holding its maps and regions
    offset: int                     # fp16 element offset of its maps in the chunk
    shapes: dict                    # level → [C, H_l, W_l]
    region_row: int                 # first row of its regions in the chunk's region file
    region_count: int

    @property
    def scale(self) -> float:
        return self.stored_width / self.width

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# float16 products of unit vectors are within this of the float32 ones (rounding to 11 bits, ≤ 2^-11)
_FP16_MARGIN = 2e-3


def first_rows(owners: np.ndarray, n_images: int) -> np.ndarray:
    """``(n_images,)`` row of each image's first region vector, given the ``(N,)`` owner of each
    (sorted: vectors are stored image after image)."""
    return np.searchsorted(owners, np.arange(n_images))


def choose_coarse_type(n_vectors: int, config: RetrievalConfig) -> str:
    """``exact`` (every stored region vector ranked) or ``hnsw`` (a FAISS graph, for very large galleries)."""
    return "exact" if n_vectors <= config.exact_index_max else "hnsw"


def build_faiss(vectors: np.ndarray, kind: str) -> faiss.Index:
    """Inner-product FAISS index of ``(N, D)`` float32 unit vectors: ``flat`` (exact) or ``hnsw``."""
    d = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 256
    else:
        raise ValueError(f"unknown FAISS index type {kind!r}")
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


class GalleryIndex:
    """Open with :meth:`open` (read) or :meth:`create_or_open` (to write); see module doc."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.config = RetrievalConfig.from_dict(manifest["config"])
        self.images = [ImageRecord(**rec) for rec in manifest["images"]]
        self._chunks: dict[str, np.memmap] = {}
        self._faiss: faiss.Index | None = None
        self._region_image: np.ndarray | None = None
        self._exact: tuple[torch.Tensor, np.ndarray] | None = None  # (N, C) fp16 vectors, first row per image
        self._region_boxes: dict[tuple[int, int], torch.Tensor] = {}  # (stored h, w) → coarse region boxes

    # ---- opening ------------------------------------------------------------
    @classmethod
    def exists(cls, root: str | os.PathLike) -> bool:
        return (Path(root) / MANIFEST).is_file()

    @classmethod
    def open(cls, root: str | os.PathLike, model_hash: str | None = None) -> "GalleryIndex":
        """Open a committed index for searching; with ``model_hash``, refuse another model's index."""
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise IndexLoadError(f"no index at '{root}' (no {MANIFEST}); build one with "
                              f"`python -m retrieval index GALLERY --index {root}`")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise IndexLoadError(f"the index manifest '{path}' is unreadable: {exc}") from exc
        if manifest.get("format") != FORMAT:
            raise IndexLoadError(f"'{path}' is not a {FORMAT} manifest")
        index = cls(root, manifest)
        if model_hash is not None and manifest["model_hash"] != model_hash:
            raise ModelMismatch(
                f"the index '{root}' was built with model {manifest['model_hash']}, but the current model is "
                f"{model_hash}; rebuild it (`python -m retrieval index GALLERY --index {root} --rebuild`)")
        return index

    @classmethod
    def empty(cls, root: str | os.PathLike, model_hash: str, config: RetrievalConfig) -> "GalleryIndex":
        manifest = {"format": FORMAT, "model_hash": model_hash, "config": config.to_dict(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "images": [], "skipped": [],
                    "faiss_type": None, "faiss_file": None, "build_seconds": 0.0, "generation": 0}
        return cls(Path(root), manifest)

    # ---- reading ------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.images)

    @property
    def model_hash(self) -> str:
        return self.manifest["model_hash"]

    def image_path(self, i: int) -> Path:
        p = Path(self.images[i].path)
        return p if p.is_absolute() else (self.root / p).resolve()

    def _chunk(self, chunk: str) -> np.memmap:
        if chunk not in self._chunks:
            self._chunks[chunk] = np.memmap(self.root / "chunks" / f"{chunk}.f16", dtype=np.float16, mode="r")
        return self._chunks[chunk]

    def maps(self, i: int) -> dict[str, torch.Tensor]:
        """The stored ψ maps of image ``i``: ``{level: (C, H_l, W_l)}`` float32."""
        rec = self.images[i]
        data = self._chunk(rec.chunk)
        out, offset = {}, rec.offset
        for level, shape in rec.shapes.items():
            n = int(np.prod(shape))
            # copied as float16, widened by torch: about twice as fast as numpy's float16 → float32
            out[level] = torch.from_numpy(np.array(data[offset:offset + n]).reshape(shape)).float()
            offset += n
        return out

    def region_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All region descriptors ``(N, C)`` and the image index of each ``(N,)``."""
        vecs, owners = [], []
        cache: dict[str, np.ndarray] = {}
        for i, rec in enumerate(self.images):
            if rec.chunk not in cache:
                cache[rec.chunk] = np.load(self.root / "chunks" / f"{rec.chunk}.regions.npy", mmap_mode="r")
            vecs.append(np.asarray(cache[rec.chunk][rec.region_row:rec.region_row + rec.region_count]))
            owners.append(np.full(rec.region_count, i, dtype=np.int64))
        d = self.config.fpn_channels
        if not vecs:
            return np.zeros((0, d), np.float32), np.zeros(0, np.int64)
        return np.concatenate(vecs).astype(np.float32), np.concatenate(owners)

    def uses_faiss(self) -> bool:
        """Whether coarse searches go through a FAISS index (HNSW galleries, or one set by a benchmark)."""
        return self._faiss is not None or self.manifest.get("faiss_type") == "hnsw"

    def faiss_index(self) -> tuple[faiss.Index, np.ndarray]:
        """The FAISS index of an HNSW gallery and the image index of each of its vectors (loaded once)."""
        if self._faiss is None:
            name = self.manifest.get("faiss_file")
            if not name or not (self.root / name).is_file():
                raise IndexLoadError(f"the index '{self.root}' lists no readable FAISS file ({name}); "
                                     f"rebuild it (`python -m retrieval index GALLERY --index {self.root} --rebuild`)")
            self._faiss = faiss.read_index(str(self.root / name))
        if self._region_image is None:
            self._region_image = self.region_vectors()[1]
        return self._faiss, self._region_image

    def use_coarse_index(self, index: faiss.Index, owners: np.ndarray) -> None:
        """Search with another FAISS index over ``owners``' vectors (benchmarks compare types)."""
        self._faiss, self._region_image = index, owners

    def use_region_vectors(self, vectors: np.ndarray, owners: np.ndarray) -> None:
        """Rank these ``(N, C)`` vectors of images ``owners`` (sorted) exactly instead of the stored
        ones (benchmarks that simulate a larger gallery)."""
        self._faiss = None
        self._exact = (torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).half(),
                       first_rows(owners, len(self.images)))

    def coarse_search(self, descriptor: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
        """Images ranked by their best region's inner product with ``descriptor`` ``(D,)``.

        Returns ``(image indices (n,), scores (n,))``, best first, n ≤ ``n_images``.
        """
        images, scores, _ = self.coarse_search_regions(descriptor, n_images)
        return images, scores

    def coarse_search_regions(self, descriptor: np.ndarray,
                              n_images: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`coarse_search` plus each image's best region: ``(images (n,), scores (n,),
        region numbers (n,))``, the region numbered within its image as in
        ``encoding.coarse_regions`` (see :meth:`region_box`)."""
        if not self.images or n_images <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
        if n_images >= len(self.images) or not self.uses_faiss():
            # exact unless the gallery is too large for it; every image wanted (a dense search) is
            # ranked exactly too, since an approximate index may not reach them all
            return self._exact_coarse(descriptor, n_images)
        index, owners = self.faiss_index()
        total = index.ntotal
        first_vector = first_rows(owners, len(self.images))
        # the first hit of each image among the top-k vectors is its best region, and an image with no hit
        # ranks below all that have one: grow k until n images are hit
        k = min(total, max(64, 4 * n_images))
        query = np.ascontiguousarray(descriptor.reshape(1, -1), dtype=np.float32)
        while True:
            scores, ids = index.search(query, k)
            valid = ids[0] >= 0
            best: dict[int, tuple[float, int]] = {}
            for vid, s in zip(ids[0][valid], scores[0][valid]):
                img = int(owners[vid])
                if img not in best:
                    best[img] = (float(s), int(vid - first_vector[img]))
            if len(best) >= min(n_images, len(self.images)) or k >= total:
                break
            k = min(total, k * 4)
        if len(best) < min(n_images, len(self.images)) and not isinstance(index, faiss.IndexFlat):
            # HNSW's graph search can end with fewer images than asked for; rank them exactly instead
            return self._exact_coarse(descriptor, n_images)
        ranked = sorted(best.items(), key=lambda kv: -kv[1][0])[:n_images]
        return (np.array([r[0] for r in ranked], np.int64), np.array([r[1][0] for r in ranked], np.float32),
                np.array([r[1][1] for r in ranked], np.int64))

    def _exact_coarse(self, descriptor: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The best ``n_images`` images by their best region, by brute force over every stored region vector.

        The vectors stay in RAM as float16, half of float32's footprint. One float16 product over all
        of them (as fast as float32 on a CPU, but rounded to about 5e-4) picks the candidates: every
        image within ``_FP16_MARGIN`` of the n-th best. The candidates are then re-scored in float32,
        so the ranking, the scores and the best regions are exact.
        """
        if self._exact is None:
            vectors, owners = self.region_vectors()
            self._exact = (torch.from_numpy(vectors).half(), first_rows(owners, len(self.images)))
        vectors, first = self._exact
        query = torch.as_tensor(np.asarray(descriptor, dtype=np.float32).reshape(-1))
        n = min(n_images, len(first))
        candidates = np.arange(len(first))
        if n < len(first):  # (every image wanted: all are candidates, no rough pass needed)
            rough = (vectors @ query.half()).float().numpy()
            # every image has at least its whole-image region, so each slice is non-empty
            rough_best = np.maximum.reduceat(rough, first)
            nth = -np.partition(-rough_best, n - 1)[n - 1]
            candidates = np.nonzero(rough_best >= nth - _FP16_MARGIN)[0]
        counts = (np.r_[first[1:], len(vectors)] - first)[candidates]
        starts = np.r_[0, np.cumsum(counts)[:-1]]                  # each candidate's slice in `rows`
        rows = np.repeat(first[candidates] - starts, counts) + np.arange(counts.sum())
        scores = (vectors[torch.from_numpy(rows)].float() @ query).numpy()
        best = np.maximum.reduceat(scores, starts)
        segment = np.repeat(np.arange(len(candidates)), counts)
        at_max = np.flatnonzero(scores == best[segment])
        _, first_max = np.unique(segment[at_max], return_index=True)  # the first best region of each
        regions = at_max[first_max] - starts
        order = np.argsort(-best, kind="stable")[:n]
        return candidates[order].astype(np.int64), best[order].astype(np.float32), regions[order].astype(np.int64)

    def region_box(self, image: int, region: int) -> list[float]:
        """Box ``[x0, y0, x1, y1]`` in original pixels of coarse region ``region`` of image ``image``."""
        from .encoding import coarse_regions

        rec = self.images[image]
        size = (rec.stored_height, rec.stored_width)
        if size not in self._region_boxes:  # the same windows for every image of a size
            self._region_boxes[size] = coarse_regions(*size, self.config)
        return [float(v) for v in self._region_boxes[size][region] / rec.scale]

    def storage_bytes(self) -> dict[str, int]:
        """Bytes on disk: the feature store (maps), region vectors and the FAISS file."""
        chunks = {rec.chunk for rec in self.images}
        feats = sum((self.root / "chunks" / f"{c}.f16").stat().st_size for c in chunks)
        regions = sum((self.root / "chunks" / f"{c}.regions.npy").stat().st_size for c in chunks)
        name = self.manifest.get("faiss_file")
        faiss_bytes = (self.root / name).stat().st_size if name and (self.root / name).is_file() else 0
        return {"features": feats, "regions": regions, "faiss": faiss_bytes}

    # ---- writing (call inside ``locked``) -----------------------------------------
    @staticmethod
    @contextmanager
    def locked(root: str | os.PathLike, wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the index's write lock; another writer waits until this one is done."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".lock", "a+") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if wait is not None:
                    wait()
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def write_chunk(self, items: list[tuple[str, str, int, int, EncodedImage]]) -> list[ImageRecord]:
        """Store encoded images ``(path, sha, orig width, orig height, encoded)`` as a new chunk.

        The chunk is invisible until :meth:`commit` writes a manifest that lists its records.
        """
        chunk = uuid.uuid4().hex[:16]
        folder = self.root / "chunks"
        folder.mkdir(parents=True, exist_ok=True)
        arrays, records, offset, row = [], [], 0, 0
        regions = []
        for path, sha, width, height, enc in items:
            shapes = {l: list(m.shape) for l, m in enc.maps.items()}
            flat = np.concatenate([m.numpy().astype(np.float16).ravel() for m in enc.maps.values()])
            arrays.append(flat)
            regions.append(enc.regions.numpy().astype(np.float16))
            records.append(ImageRecord(path=path, sha=sha, width=width, height=height,
                                       stored_width=enc.size[0], stored_height=enc.size[1], chunk=chunk,
                                       offset=offset, shapes=shapes, region_row=row,
                                       region_count=len(enc.regions)))
            offset += flat.size
            row += len(enc.regions)
        _write_file(folder / f"{chunk}.f16", np.concatenate(arrays).tobytes())
        buf = io.BytesIO()
        np.save(buf, np.concatenate(regions))
        _write_file(folder / f"{chunk}.regions.npy", buf.getvalue())
        _fsync_dir(folder)
        return records

    def commit(self, images: list[ImageRecord], skipped: list[dict], build_seconds: float = 0.0) -> None:
        """Make ``images`` the index's content: new FAISS file, then the manifest, then clean up."""
        self.images = images
        self._faiss, self._region_image, self._chunks = None, None, {}
        vectors, _ = self.region_vectors()
        kind = choose_coarse_type(len(vectors), self.config)
        generation = int(self.manifest.get("generation", 0)) + 1
        faiss_name, index = None, None
        if kind == "hnsw":  # (indexes written before 2026-11-23 also hold a flat FAISS copy; it is ignored)
            faiss_name = f"regions-{generation}-{uuid.uuid4().hex[:6]}.faiss"
            index = build_faiss(vectors, kind)
            _write_file(self.root / faiss_name, faiss.serialize_index(index).tobytes())
            _fsync_dir(self.root)
        counts = {"images": len(images), "regions": int(len(vectors)), "skipped": len(skipped)}
        self.manifest.update({"images": [r.to_dict() for r in images], "skipped": skipped,
                              "faiss_type": kind, "faiss_file": faiss_name, "generation": generation,
                              "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "counts": counts,
                              "build_seconds": float(self.manifest.get("build_seconds", 0.0)) + build_seconds,
                              "config": self.config.to_dict()})
        atomic_write_bytes(self.root / MANIFEST, json.dumps(self.manifest, indent=1).encode())
        _fsync_dir(self.root)
        self._faiss, self._exact = index, None
        self.collect_garbage()

    def collect_garbage(self) -> None:
        """Delete chunks and FAISS files the committed manifest does not reference."""
        live = {rec.chunk for rec in self.images}
        folder = self.root / "chunks"
        if folder.is_dir():
            for f in folder.iterdir():
                if f.name.split(".")[0] not in live:
                    f.unlink(missing_ok=True)
        for f in self.root.glob("regions-*.faiss"):
            if f.name != self.manifest.get("faiss_file"):
                f.unlink(missing_ok=True)
        for f in self.root.glob(".*.tmp"):
            f.unlink(missing_ok=True)


def remove_paths(records: Iterable[ImageRecord], paths: set[str]) -> list[ImageRecord]:
    return [r for r in records if r.path not in paths]
