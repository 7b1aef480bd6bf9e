"""What the learned box refiner does: localisation and cost by number of refiner passes.

    python benchmarks/box_refinement.py [--checkpoint default] [--passes 0,1,2,3] [--threads 1]

On the held-out tracking sequences of the checkpoint (its ``meta.split.validation``; never
trained on), every query against every held-out image (the fine stage over the whole
held-out gallery, as training validates): mAP, loc-mAP@0.5, CorLoc@0.5 overall and per
sequence, and the scale error of the best box of each (query, positive) pair — the median
|log| of sqrt(predicted area / true area). Passes = ``config.refine_steps`` (0: the peak
boxes, the query's size at the best scale). The cost is the fine stage's time on a batch of
32 held-out images with and without refinement, measured in the same run.
Prints a table and writes benchmarks/results/box_refinement.json.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict

import numpy as np
import torch

from common import ROOT, SHARED_DATA, environment, p50_p95, table, timed, write_json
from retrieval import data as D
from retrieval import train as T
from retrieval.checkpoint import load_model, read_checkpoint, resolve_checkpoint
from retrieval.evaluation.benchmark import score_run
from retrieval.evaluation.metrics import box_iou, is_localized
from retrieval.matching import match_query, stack_maps


def pair_stats(dump: dict, bench) -> tuple[dict[str, float], float]:
    """CorLoc@0.5 per sequence and the median scale error of the best boxes over all pairs."""
    hits, errors = defaultdict(list), []
    records = {q["id"]: q for q in dump["queries"]}
    for query in bench.queries:
        boxes = {r["id"]: r["box"] for r in records[query.id]["ranking"]}
        for image_id, truths in bench.object_boxes(query).items():
            pred = boxes.get(image_id)
            hits[D.sequence_of(query.id)].append(is_localized(pred, truths, 0.5))
            if pred is not None:
                truth = max(truths, key=lambda t: box_iou(pred, t))
                area = lambda b: max(1e-6, (b[2] - b[0]) * (b[3] - b[1]))  # noqa: E731
                errors.append(abs(0.5 * math.log(area(pred) / area(truth))))
    return {s: float(np.mean(v)) for s, v in sorted(hits.items())}, float(np.median(errors))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--passes", default="0,1,2,3")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manifest = SHARED_DATA / "tracking_dev" / "manifest.json"
    if not manifest.is_file():
        print(f"skipped: {manifest} is absent (research data, not shipped)")
        return 0
    path = resolve_checkpoint(args.checkpoint)
    meta = read_checkpoint(path)["meta"] if path else {}
    sequences = tuple(meta.get("split", {}).get("validation", D.HELDOUT_SEQUENCES))
    model, model_hash = load_model(args.checkpoint)
    device = torch.device("cpu")
    split = D.TapSplit(model.backbone)
    cfg = T.TrainConfig()
    run_dir = ROOT / "runs" / "box_refinement"
    run_dir.mkdir(parents=True, exist_ok=True)
    val = T.build_validation_set(manifest, sequences, split, model.config, run_dir, device,
                                 cache=lambda build: T.with_tap_cache(
                                     cfg, "heldout", T.cache_key(cfg, model.config, sequences), build))
    base = model.config
    rows = []
    for passes in (int(p) for p in args.passes.split(",")):
        model.config = base.replace(refine_steps=passes)
        fine, _ = T.rank_heldout(model, split, val, device)
        scores = score_run(fine, val.bench)
        per_sequence, scale_error = pair_stats(fine, val.bench)
        rows.append({"passes": passes, "mAP": scores["mAP"], "loc-mAP@0.5": scores["loc-mAP@0.5"],
                     "CorLoc@0.5": scores["CorLoc@0.5"], "median |log scale error|": scale_error,
                     **{f"CorLoc {s}": v for s, v in per_sequence.items()}})
        print(f"{passes} passes: CorLoc@0.5 {scores['CorLoc@0.5']:.3f}", file=sys.stderr, flush=True)

    # cost: the fine stage over 32 held-out images with and without the refiner, same run
    with torch.no_grad():
        query = T.query_encoding(model, split, val.queries[0], device)
        images = val.gallery[:32]
        maps = stack_maps([T.gallery_maps(model, split, im, device) for im in images])
        sizes = torch.tensor([[im.size[1], im.size[0]] for im in images])
        cost = {}
        for passes in (0, base.refine_steps):
            config = base.replace(refine_steps=passes)
            cost[passes] = p50_p95(timed(lambda: match_query(model, query, maps, sizes, config), repeat=15, warmup=2))
    model.config = base

    columns = [("passes", "{}"), ("mAP", "{:.3f}"), ("loc-mAP@0.5", "{:.3f}"), ("CorLoc@0.5", "{:.3f}"),
               ("median |log scale error|", "{:.3f}")] + [(f"CorLoc {s}", "{:.3f}") for s in sorted(sequences)]
    print(table(rows, columns))
    p0, pn = cost[0][0], cost[base.refine_steps][0]
    print(f"\nfine stage, 32 images of {images[0].size[0]}x{images[0].size[1]}, p50: {p0:.1f} ms without, "
          f"{pn:.1f} ms with {base.refine_steps} refiner passes on the best box ({pn / p0 - 1:+.1%})")
    out = write_json("box_refinement", {
        "environment": environment(device), "checkpoint": str(path), "model_hash": model_hash,
        "sequences": list(sequences), "gallery": len(val.gallery), "queries": len(val.queries), "rows": rows,
        "fine_stage_ms_p50_p95": {str(k): v for k, v in cost.items()}, "command": " ".join(sys.argv)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
