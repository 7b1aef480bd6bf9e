"""``python -m retrieval index|search|info|train|evaluate|score``.

Every failure a user can cause (missing index, bad box, unreadable query, model
mismatch) ends with one line on stderr and a non-zero exit code, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

EXIT_USAGE, EXIT_INPUT, EXIT_INDEX = 2, 3, 4


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="default",
                   help="heads checkpoint: 'default' (assets/checkpoint.pt when present), 'none' "
                        "(untrained heads) or a path")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def cmd_index(args) -> int:
    from .build import build_index, remove_images
    from .checkpoint import load_model

    if args.remove:
        n = remove_images(args.index, args.remove)
        print(f"removed {n} image(s) from {args.index}")
        return 0
    if not args.gallery:
        print("error: give a GALLERY_PATH (folder, zip or image files) or --remove", file=sys.stderr)
        return EXIT_USAGE
    model, model_hash = load_model(args.checkpoint, device=_device(args.device))
    report = build_index(args.index, args.gallery, model, model_hash, add=args.add, rebuild=args.rebuild,
                         device=_device(args.device), batch_size=args.batch_size)
    print(f"{args.index}: {report.total_images} images ({report.encoded} encoded, {report.unchanged} "
          f"unchanged, {report.removed} removed, {len(report.skipped)} skipped) in {report.seconds:.1f} s"
          + (f", {report.images_per_second:.1f} images/s" if report.encoded else ""))
    return 0


def cmd_search(args) -> int:
    from .checkpoint import load_model
    from .images import parse_box
    from .index import GalleryIndex
    from .search import SearchEngine

    box = parse_box(args.box) if args.box else None
    model, model_hash = load_model(args.checkpoint, device=_device(args.device))
    index = GalleryIndex.open(args.index, model_hash=model_hash)
    scales = tuple(float(s) for s in args.scales.split(",")) if args.scales else None
    response = SearchEngine(index, model, _device(args.device)).search(
        args.query, box=box, top=args.top, rerank=args.rerank, query_scales=scales, refine_boxes=not args.no_refine)
    if args.json:
        print(json.dumps([r.to_json() for r in response.results], indent=1))
        return 0
    print(f"query {response.query.width}×{response.query.height} px, scales {response.scales}; "
          f"{len(index)} images; " + ", ".join(f"{k} {v:.0f} ms" for k, v in response.timings_ms.items()))
    for r in response.results:
        box_txt = ",".join(f"{v:.0f}" for v in r.box)
        print(f"{r.rank:3d}  {r.score:.3f}  box {box_txt:>20}  scale {r.best_scale:g}  {r.path}")
    return 0


def cmd_info(args) -> int:
    from .index import GalleryIndex

    index = GalleryIndex.open(args.index)
    m = index.manifest
    sizes = index.storage_bytes()
    n = max(1, len(index))
    print(f"index        {index.root}")
    print(f"images       {len(index)}   skipped {len(m.get('skipped', []))}")
    print(f"model        {m['model_hash']}   backbone {index.config.backbone}")
    print(f"coarse       {m.get('faiss_type')}   {m.get('counts', {}).get('regions', 0)} region vectors")
    print(f"bytes/image  features {sizes['features'] / n:,.0f}   regions {sizes['regions'] / n:,.0f}   "
          f"faiss {sizes['faiss'] / n:,.0f}")
    print(f"created      {m.get('created')}   updated {m.get('updated')}   build {m.get('build_seconds', 0):.1f} s")
    for item in m.get("skipped", [])[:20]:
        print(f"skipped      {item['path']}: {item['reason']}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation.run import evaluate_methods

    return evaluate_methods(args)


def cmd_score(args) -> int:
    from .evaluation.benchmark import read_dump, score_run
    from .evaluation.harness import format_table

    metrics = score_run(read_dump(args.dump), args.manifest)
    print(format_table([metrics]))
    return 0


def cmd_train(args) -> int:
    from . import train

    return train.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m retrieval",
                                     description="Patch-query instance retrieval: index a gallery, search it "
                                                 "with a cropped patch, train, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="build or update a gallery index")
    p.add_argument("gallery", nargs="*", help="folder (recursive), zip file(s) or image files")
    p.add_argument("--index", required=True, help="index directory, e.g. gallery_index/NAME")
    p.add_argument("--add", action="store_true", help="add to the index instead of mirroring GALLERY")
    p.add_argument("--rebuild", action="store_true", help="re-encode everything (after a model change)")
    p.add_argument("--remove", nargs="+", metavar="FILE", help="remove these image files from the index")
    p.add_argument("--batch-size", type=int, default=8)
    _add_model_args(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="search an index with a query image")
    p.add_argument("--index", required=True)
    p.add_argument("--query", required=True, help="query image file")
    p.add_argument("--box", help="x0,y0,x1,y1 crop of the query image (its original pixels)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--rerank", type=int, default=None, help="images re-ranked by the fine stage (default 100)")
    p.add_argument("--scales", help="query scales, e.g. 0.5,1,2")
    p.add_argument("--no-refine", action="store_true",
                   help="report the peak boxes (query size at the best scale), not the learned refiner's")
    p.add_argument("--json", action="store_true", help='print [{"path", "score", "box"}] best first')
    _add_model_args(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("info", help="describe an index")
    p.add_argument("--index", required=True)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("evaluate", help="run methods on a benchmark manifest")
    p.add_argument("manifest", help="benchmark folder or manifest.json")
    p.add_argument("--method", action="append", required=True,
                   help="method name (repeatable); see --method list")
    p.add_argument("--dump", help="results dump path (one method) or folder (several)")
    p.add_argument("--json", help="write the metrics table as JSON here")
    p.add_argument("--index-dir", default=None, help="where `ours` keeps its benchmark index (reused)")
    _add_model_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("score", help="re-score a results dump against a manifest")
    p.add_argument("dump")
    p.add_argument("manifest")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("train", help="train the heads (see retrieval/train.py)")
    try:
        from . import train

        train.add_arguments(p)
    except ImportError:  # pragma: no cover - train.py is part of the package
        pass
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .build import UnsafeArchive
    from .checkpoint import CheckpointError
    from .images import ImageLoadError
    from .index import IndexLoadError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ImageLoadError, UnsafeArchive) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except (IndexLoadError, CheckpointError, FileNotFoundError) as exc:  # before ValueError: subclasses
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INDEX
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
