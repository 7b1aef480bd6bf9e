"""Index build and search speed on galleries of 100, 1,000 and 10,000 images.

    python benchmarks/search_speed.py [--sizes 100,1000,10000] [--queries 20] [--threads N]

Gallery images are real photos (the demo gallery, and tracking_dev's frames when
../shared/data is present) with random crops, flips and colour changes, written as
JPEGs and indexed with the real builder. The 10,000 gallery is the encoded 1,000
gallery repeated ten times, each copy's region descriptors perturbed (and
renormalised) so that the coarse stage sees 10,000 distinct images; its feature store points at
the same chunks, so its build rate and bytes per image are those of the 1,000 build.
Prints a table and writes benchmarks/results/search_speed.json.
"""
from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from common import ROOT, SHARED_DATA, environment, p50_p95, table, timed, write_json
from retrieval.build import build_index
from retrieval.checkpoint import load_model
from retrieval.images import list_image_files, load_image
from retrieval.index import GalleryIndex, build_faiss
from retrieval.matching import encode_query
from retrieval.search import SearchEngine


def source_images() -> list[Path]:
    files = list_image_files(ROOT / "assets" / "demo" / "gallery")
    tracking = SHARED_DATA / "tracking_dev" / "images"
    if tracking.is_dir():
        files += list_image_files(tracking)
    return files


def make_gallery(folder: Path, n: int, sources: list[Path], rng: random.Random) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = load_image(sources[i % len(sources)])
        if i >= len(sources):
            w, h = img.size
            s = rng.uniform(0.75, 1.0)
            x0, y0 = rng.uniform(0, w * (1 - s)), rng.uniform(0, h * (1 - s))
            img = img.crop((int(x0), int(y0), int(x0 + w * s), int(y0 + h * s)))
            if rng.random() < 0.5:
                img = ImageOps.mirror(img)
            img = ImageEnhance.Color(ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))).enhance(
                rng.uniform(0.7, 1.3))
        path = folder / f"{i:05d}.jpg"
        img.save(path, quality=90)
        out.append(path)
    return out


def replicate(index: GalleryIndex, times: int, rng: np.random.Generator, noise: float = 0.05) -> GalleryIndex:
    """An in-memory index of ``times`` perturbed copies (shared feature chunks, new region vectors)."""
    vectors, _ = index.region_vectors()
    copies = [vectors] + [vectors + rng.normal(0, noise, vectors.shape).astype(np.float32) for _ in range(times - 1)]
    allv = np.concatenate(copies)
    allv /= np.linalg.norm(allv, axis=1, keepdims=True)
    big = GalleryIndex(index.root, dict(index.manifest))
    big.images = [rec for _ in range(times) for rec in index.images]
    owners = np.repeat(np.arange(len(big.images)), [r.region_count for r in big.images])
    return big, allv, owners


def coarse_recall(exact: faiss.Index, approx: faiss.Index, queries: np.ndarray, k: int = 100) -> float:
    _, e = exact.search(queries, k)
    _, a = approx.search(queries, k)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(e, a)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--rerank", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="keep galleries and indexes here (default: temp)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [int(s) for s in args.sizes.split(",")]
    model, model_hash = load_model("default", device=device)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="search-speed-"))
    rng = random.Random(0)
    sources = source_images()
    encoded_sizes = sorted({s for s in sizes if s <= 1000} | ({1000} if any(s > 1000 for s in sizes) else set()))
    built: dict[int, GalleryIndex] = {}
    build_stats: dict[int, dict] = {}
    for n in encoded_sizes:
        files = make_gallery(work / f"g{n}", n, sources, rng)
        root = work / f"idx{n}"
        shutil.rmtree(root, ignore_errors=True)
        report = build_index(root, files, model, model_hash, device=device, show_bar=False)
        built[n] = GalleryIndex.open(root)
        b = built[n].storage_bytes()
        build_stats[n] = {"build_images_per_s": report.images_per_second,
                          "feature_bytes_per_image": b["features"] / n,
                          "coarse_bytes_per_image": (b["faiss"] + b["regions"]) / n}
    qrng = random.Random(1)
    query_patches = []
    for _ in range(args.queries):
        img = load_image(sources[qrng.randrange(len(sources))])
        side = qrng.randint(40, 140)
        x0, y0 = qrng.randint(0, img.width - side), qrng.randint(0, img.height - side)
        query_patches.append(img.crop((x0, y0, x0 + side, y0 + side)))
    rows = []
    for n in sizes:
        if n in built:
            index = built[n]
            vectors, owners = index.region_vectors()
            stats = build_stats[n]
            note = "encoded"
        else:
            times = n // 1000
            index, vectors, owners = replicate(built[1000], times, np.random.default_rng(0))
            stats = build_stats[1000]
            note = f"1,000 encoded × {times}"
        hnsw = build_faiss(vectors, "hnsw") if len(vectors) > index.config.exact_index_max else None
        kind = "hnsw" if hnsw is not None else "exact"
        if hnsw is not None:
            index.use_coarse_index(hnsw, owners)
        elif note != "encoded":
            index.use_region_vectors(vectors, owners)
        engine = SearchEngine(index, model, device)
        descs = [encode_query(model, p, device=device).descriptor.cpu().numpy() for p in query_patches]
        it = iter(range(10**9))
        coarse = timed(lambda: index.coarse_search(descs[next(it) % len(descs)], args.rerank), len(descs))
        it2 = iter(range(10**9))
        full = timed(lambda: engine.search(query_patches[next(it2) % len(query_patches)], top=20,
                                           rerank=args.rerank), len(query_patches))
        qv = np.stack(descs).astype(np.float32)
        recall = coarse_recall(build_faiss(vectors, "flat"), hnsw, qv) if hnsw is not None else 1.0
        c50, c95 = p50_p95(coarse)
        f50, f95 = p50_p95(full)
        rows.append({"images": n, "gallery": note, "coarse": kind, "regions": len(vectors), **stats,
                     "coarse_p50_ms": c50, "coarse_p95_ms": c95, "search_p50_ms": f50, "search_p95_ms": f95,
                     "approx_recall@100": recall})
        print(f"{n}: coarse p50 {c50:.1f} ms, coarse+fine p50 {f50:.0f} ms", flush=True)
    env = environment(device)
    cols = [("images", "{:,}"), ("gallery", "{}"), ("coarse", "{}"), ("build_images_per_s", "{:.1f}"),
            ("feature_bytes_per_image", "{:,.0f}"), ("coarse_bytes_per_image", "{:,.0f}"),
            ("coarse_p50_ms", "{:.1f}"), ("coarse_p95_ms", "{:.1f}"), ("search_p50_ms", "{:.0f}"),
            ("search_p95_ms", "{:.0f}"), ("approx_recall@100", "{:.3f}")]
    print(f"\n{env['device']} — {env['cpu']}, {env['threads']} threads; rerank {args.rerank}, "
          f"{args.queries} queries of 40–140 px; model {model_hash}")
    print(table(rows, cols))
    print(f"\nwrote {write_json('search_speed', {'environment': env, 'rerank': args.rerank, 'rows': rows})}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
