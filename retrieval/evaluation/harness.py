"""Run any retrieval method on a benchmark, time it, dump its results and score them.

A method is anything with the :class:`RetrievalMethod` shape; the harness owns image
loading, the query crop, timing and the dump, so every method is measured the same way.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Optional, Protocol, Union

import torch
from PIL import Image
from tqdm import tqdm

from retrieval.evaluation.benchmark import Benchmark, load_manifest, score_run, write_dump
from retrieval.images import crop_box, load_image


class RetrievalMethod(Protocol):
    name: str

    def index(self, gallery: list[tuple[str, Image.Image]]) -> dict:
        """Index ``(id, image)`` pairs; return build stats ``{"seconds", "bytes_per_image" (optional)}``."""

    def search(self, query: Image.Image) -> tuple[list[dict], dict]:
        """Rank the gallery for a query patch: ``[{"id", "score", "box"}]`` best first (box in
        the gallery image's pixels, or ``None``) and extras such as ``{"shortlist": [ids]}``.

        A method with ``uses_context = True`` is called as ``search_in_context(image, box)``
        instead: the query image and its box, as a user cropping in the app provides them."""


def describe_device(device: Union[str, torch.device]) -> str:
    """``"cpu (model name)"`` or ``"cuda (GPU name)"``: what latencies were measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{device.type} ({model}, {os.cpu_count()} cores)"


def load_gallery(bench: Benchmark) -> list[tuple[str, Image.Image]]:
    """Every gallery image as stored, checked against the manifest's size (boxes depend on it)."""
    out = []
    for item in bench.gallery:
        img = load_image(item.path)
        if img.size != (item.width, item.height):
            raise ValueError(f"gallery image '{item.id}' is {img.width}×{img.height} px but the manifest "
                             f"says {item.width}×{item.height}; its boxes would not match")
        out.append((item.id, img))
    return out


def _ranking_entry(entry: dict) -> dict:
    """A method's ranking entry as plain JSON types (scores and boxes may be numpy or torch)."""
    box = entry.get("box")
    return {"id": str(entry["id"]), "score": float(entry["score"]),
            "box": None if box is None else [float(v) for v in box]}


def _config_dict(config: Any) -> dict:
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)


def evaluate(method: RetrievalMethod, manifest: Union[Benchmark, str, os.PathLike], *,
             config: Any = None, out_path: Optional[Union[str, os.PathLike]] = None,
             progress: bool = False) -> tuple[dict, dict]:
    """Index the gallery with ``method``, search every query, and score the run.

    The query patch is the query image cropped to its box. One untimed warm-up search
    (the first query) precedes the timed ones; each latency is the wall time of one
    ``search`` call. ``config`` (a dict or anything with ``to_dict``; default: the
    method's ``config`` attribute) is stored in the dump, as are the device (the
    method's ``device`` attribute, default CPU), torch's thread count and the build rate.
    Writes the dump to ``out_path`` when given. Returns ``(dump, metrics)``.
    """
    bench = manifest if isinstance(manifest, Benchmark) else load_manifest(manifest)
    gallery = load_gallery(bench)
    start = time.perf_counter()
    stats = method.index(gallery) or {}
    wall_seconds = time.perf_counter() - start
    build_seconds = float(stats.get("seconds", wall_seconds))
    del gallery  # the method keeps what it needs; the decoded images can go

    if getattr(method, "uses_context", False):
        inputs = [(load_image(q.image), q.box) for q in bench.queries]
        run = lambda item: method.search_in_context(*item)  # noqa: E731
    else:
        inputs = [crop_box(load_image(q.image), q.box) for q in bench.queries]
        run = method.search
    run(inputs[0])  # warm-up: lazy initialisation and caches are not latency
    records = []
    for query, item in tqdm(list(zip(bench.queries, inputs)), desc=f"{method.name} queries",
                            disable=not progress):
        start = time.perf_counter()
        ranking, extras = run(item)
        latency_ms = (time.perf_counter() - start) * 1000.0
        record = {"id": query.id, "latency_ms": latency_ms, "ranking": [_ranking_entry(e) for e in ranking]}
        if extras and extras.get("shortlist") is not None:
            record["shortlist"] = [str(i) for i in extras["shortlist"]]
        records.append(record)

    meta: dict[str, Any] = {
        "device": describe_device(getattr(method, "device", "cpu")),
        "threads": torch.get_num_threads(),
        "gallery_images": len(bench.gallery),
        "build_seconds": build_seconds,
        "build_images_per_s": len(bench.gallery) / build_seconds if build_seconds > 0 else None,
    }
    if stats.get("bytes_per_image") is not None:
        meta["index_bytes_per_image"] = float(stats["bytes_per_image"])
    dump = {"benchmark": bench.name, "method": method.name,
            "config": _config_dict(config if config is not None else getattr(method, "config", None)),
            "meta": meta, "queries": records}
    if out_path is not None:
        write_dump(dump, out_path)
    return dump, score_run(dump, bench)


_COLUMNS = [  # (row key, header, format); the optional ones appear when some row has them
    ("method", "method", "{}"), ("mAP", "mAP", "{:.3f}"), ("R@1", "R@1", "{:.3f}"), ("R@5", "R@5", "{:.3f}"),
    ("R@10", "R@10", "{:.3f}"), ("loc-mAP@0.5", "loc-mAP@0.5", "{:.3f}"), ("CorLoc@0.5", "CorLoc@0.5", "{:.3f}"),
    ("latency_p50_ms", "p50 ms", "{:.1f}"), ("latency_p95_ms", "p95 ms", "{:.1f}"),
]
_OPTIONAL_COLUMNS = [
    ("shortlist_recall@30", "SR@30", "{:.3f}"), ("shortlist_recall@100", "SR@100", "{:.3f}"),
    ("shortlist_recall@300", "SR@300", "{:.3f}"), ("index_bytes_per_image", "bytes/img", "{:,.0f}"),
    ("build_images_per_s", "build img/s", "{:.1f}"), ("threads", "threads", "{}"), ("device", "device", "{}"),
]


def format_table(rows: list[dict]) -> str:
    """Markdown table of methods × metrics from :func:`score_run`-style dicts ("–" where absent)."""
    columns = _COLUMNS + [c for c in _OPTIONAL_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "–" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
