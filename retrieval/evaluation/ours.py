"""Our method behind the evaluation harness's ``RetrievalMethod`` interface.

``ours`` — coarse-to-fine with the shipped checkpoint; ``ours-untrained`` — the same
with untrained heads; ``ours-dense`` — the fine stage over the whole gallery (no
shortlist), which measures what the coarse stage costs.
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import torch
from PIL import Image

from ..build import build_index_from_images
from ..checkpoint import load_model
from ..index import GalleryIndex
from ..search import SearchEngine


class OursMethod:
    def __init__(self, name: str = "ours", checkpoint: str = "default", dense: bool = False,
                 rerank: int | None = None, index_dir: str | None = None, device: str | torch.device = "cpu") -> None:
        self.name = name
        self.device = torch.device(device)
        self.model, self.model_hash = load_model(checkpoint, device=self.device)
        self.dense = dense
        self.rerank = rerank if rerank is not None else self.model.config.rerank
        self._tmp = None if index_dir else tempfile.TemporaryDirectory(prefix="ours-index-")
        self.index_dir = Path(index_dir or self._tmp.name)
        self.config = {**self.model.config.to_dict(), "model_hash": self.model_hash, "dense": dense,
                       "rerank": self.rerank}
        self.engine: SearchEngine | None = None

    def index(self, gallery: list[tuple[str, Image.Image]]) -> dict:
        key = hashlib.sha256("\n".join(k for k, _ in gallery).encode()).hexdigest()[:10]
        root = self.index_dir / f"{key}-{self.model_hash}"
        index, report = build_index_from_images(root, gallery, self.model, self.model_hash, self.device)
        self.engine = SearchEngine(index, self.model, self.device)
        sizes = index.storage_bytes()
        stats = {"seconds": report.seconds, "bytes_per_image": sum(sizes.values()) / max(1, len(index)),
                 "feature_bytes_per_image": sizes["features"] / max(1, len(index)),
                 "coarse_bytes_per_image": (sizes["faiss"] + sizes["regions"]) / max(1, len(index))}
        if report.unchanged:
            stats["reused_index"] = True
        return stats

    uses_context = True   # queries come as (image, box), as in the app and the CLI

    def search_in_context(self, image: Image.Image, box) -> tuple[list[dict], dict]:
        return self._search(image, box)

    def search(self, query: Image.Image) -> tuple[list[dict], dict]:
        return self._search(query, None)

    def _search(self, image: Image.Image, box) -> tuple[list[dict], dict]:
        assert self.engine is not None, "index() first"
        index: GalleryIndex = self.engine.index
        n = len(index)
        rerank = n if self.dense else self.rerank
        response = self.engine.search(image, box=box, top=n, rerank=rerank)
        ranking = [{"id": index.images[r.index].path, "score": r.score, "box": r.box} for r in response.results]
        shortlisted = {r.index for r in response.results}
        if len(shortlisted) < n:
            # the rest in coarse order, below every re-ranked image; the fine stage never saw
            # them, so their box is the best-matching coarse region's (a window of 32–256 px)
            rest, coarse, regions = index.coarse_search_regions(response.descriptor, n)
            floor = min((r["score"] for r in ranking), default=0.0) - 1.0
            ranking += [{"id": index.images[int(i)].path, "score": floor - 1.0 + float(s) / 10,
                         "box": index.region_box(int(i), int(r))}
                        for i, s, r in zip(rest, coarse, regions) if int(i) not in shortlisted]
        return ranking, {"shortlist": [index.images[i].path for i in response.shortlist]}
