"""Every method on every benchmark, plus the stress curves → docs/results.md.

    python benchmarks/report.py [--checkpoint default] [--methods ours,gem,...]
        [--benchmarks tracking_dev,tracking_dev-heldout,coil20] [--skip-stress]
        [--workdir /tmp/report-work] [--threads 1] [--device cpu] [--heldout SEQ,SEQ]
        [--skip METHOD@BENCHMARK ...] [--stress-methods ours,gem,rmac,sift-bow]

Benchmarks come from ../shared/data (absent ones are left out and said so):
``tracking_dev``; ``tracking_dev-heldout``, the same restricted to the sequences the
checkpoint never trained on (``--heldout``, else the checkpoint's ``meta.split.validation``,
else ``retrieval.data.HELDOUT_SEQUENCES``); ``coil20``. The stress tests
(``retrieval/evaluation/stress.py``) run on a 15-query / 150-image subset of tracking_dev.

Resumable: each (method, benchmark) run is a results dump in ``--workdir`` named by a
hash of the method's class and config (which includes the model hash), the manifest's
bytes, the device and the thread count; a dump with the same hash is reused, so an
interrupted report resumes where it stopped and a new checkpoint re-runs only the
methods that use it. Without a checkpoint ``ours`` and ``ours-untrained`` are the same
model and share one run. An index is never reused across runs, so every build rate is
measured; stress points that change only the queries share the gallery index in-process.

Writes docs/results.md (plots under docs/stress/) and benchmarks/results/report.json,
and prints the tables.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from common import RESULTS, ROOT, SHARED_DATA, environment
from retrieval.checkpoint import CheckpointError, file_hash, read_checkpoint, resolve_checkpoint
from retrieval.evaluation import metrics, stress
from retrieval.evaluation.benchmark import (SHORTLIST_NS, load_manifest, read_dump, score_queries, score_run,
                                            write_dump)
from retrieval.evaluation.harness import evaluate
from retrieval.evaluation.run import METHODS, make_method

CACHE_VERSION = 1
DOCS = ROOT / "docs"
STRESS_METHODS = ("ours", "ours-untrained", "gem", "rmac", "sift-bow")
COARSE_TO_FINE = ("ours", "ours-untrained", "sift-bow", "sift-vlad")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- running with a cache

def gallery_fingerprint(gallery: list[tuple[str, Image.Image]]) -> str:
    """Hash of the ids and pixels of a loaded gallery."""
    digest = hashlib.sha256()
    for gid, img in gallery:
        digest.update(gid.encode())
        digest.update(f"{img.size}{img.mode}".encode())
        digest.update(img.tobytes())
    return digest.hexdigest()


class ReusableIndex:
    """A method that indexes a gallery once: a second ``index`` call with the same ids and
    pixels keeps the existing index (stress points that change only the queries). Any
    other gallery gets a fresh method from ``factory`` — a fresh instance, because
    ``OursMethod`` reuses an on-disk index keyed by image ids alone, which would be stale
    for a gallery whose pixels changed under the same ids."""

    def __init__(self, factory: Callable[[], object]) -> None:
        self.factory = factory
        self.method = factory()
        self.name = self.method.name
        self._key: Optional[str] = None
        self._stats: dict = {}

    def __getattr__(self, attr: str):
        # everything else (config, device, uses_context, search_in_context, …) is the method's,
        # so the harness treats the wrapper exactly as the method
        if attr in ("method", "factory"):
            raise AttributeError(attr)
        return getattr(self.method, attr)

    def index(self, gallery: list[tuple[str, Image.Image]]) -> dict:
        key = gallery_fingerprint(gallery)
        if key == self._key:
            return self._stats
        if self._key is not None:
            self.method = self.factory()
        self._stats = self.method.index(gallery) or {}
        self._key = key
        return self._stats

    def search(self, query: Image.Image):
        return self.method.search(query)


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Runner:
    """Evaluates methods on benchmark folders, caching one results dump per run."""

    def __init__(self, workdir: Path, checkpoint: str, device: torch.device, threads: int) -> None:
        self.workdir, self.checkpoint, self.device, self.threads = workdir, checkpoint, device, threads
        self._methods: dict[str, ReusableIndex] = {}
        self._dumps: dict[tuple[str, Path], dict] = {}
        self.reused = 0
        self.ran = 0

    def method(self, name: str) -> ReusableIndex:
        if name not in self._methods:
            self._methods[name] = ReusableIndex(
                lambda: make_method(name, self.checkpoint, self.device, None))
        return self._methods[name]

    def run_key(self, name: str, manifest_file: Path) -> str:
        method = self.method(name).method
        config = getattr(method, "config", None)
        config = config.to_dict() if hasattr(config, "to_dict") else config
        payload = {"class": type(method).__name__, "config": config, "manifest": file_sha(manifest_file),
                   "device": str(self.device), "threads": self.threads, "cache": CACHE_VERSION}
        if getattr(method, "uses_context", False):  # the harness hands it (image, box), not the patch
            payload["inputs"] = "image+box"
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def dump(self, name: str, bench_dir: Path) -> dict:
        """The results dump of ``name`` on the benchmark folder (cached in memory and on disk)."""
        if (name, bench_dir) not in self._dumps:
            self._dumps[name, bench_dir] = self._load_or_run(name, bench_dir)
        return self._dumps[name, bench_dir]

    def _load_or_run(self, name: str, bench_dir: Path) -> dict:
        manifest_file = bench_dir / "manifest.json"
        key = self.run_key(name, manifest_file)
        folder = self.workdir / "dumps" / bench_dir.name
        path = folder / f"{name}-{key}.json"
        if path.is_file():
            self.reused += 1
            return read_dump(path)
        same = sorted(folder.glob(f"*-{key}.json"))  # the same model and config under another name
        if same:
            dump = dict(read_dump(same[0]), method=name)
            write_dump(dump, path)
            self.reused += 1
            return dump
        log(f"run {name} on {bench_dir.name}")
        started = time.perf_counter()
        dump, _ = evaluate(self.method(name), manifest_file, out_path=path)
        self.ran += 1
        log(f"  {name} on {bench_dir.name}: {time.perf_counter() - started:.0f} s")
        return dump

    def metrics(self, name: str, bench_dir: Path) -> dict:
        """:func:`score_run` metrics, plus ``coarse_recall@N`` for methods with a shortlist."""
        dump = self.dump(name, bench_dir)
        result = score_run(dump, bench_dir)
        if all("shortlist" in q for q in dump["queries"]):
            result.update(coarse_recall(dump, load_manifest(bench_dir)))
        return result


def coarse_order(record: dict) -> list[str]:
    """A query's whole coarse ranking: its shortlist, then the images the fine stage never
    saw, in the order the dump ranks them (``ours`` and ``sift-*`` rank those by their
    coarse score alone, so this is the coarse order past the shortlist)."""
    shortlist = record["shortlist"]
    seen = set(shortlist)
    return shortlist + [r["id"] for r in record["ranking"] if r["id"] not in seen]


def coarse_recall(dump: dict, bench) -> dict:
    """Mean over queries of the share of positives in the first N of the coarse ranking,
    N = 30, 100, 300 (equal to the shortlist recall while N ≤ the shortlist's length)."""
    records = {q["id"]: q for q in dump["queries"]}
    out = {}
    for n in SHORTLIST_NS:
        values = [metrics.shortlist_recall(coarse_order(records[q.id]), list(bench.object_boxes(q)), n)
                  for q in bench.queries]
        out[f"coarse_recall@{n}"] = float(np.mean(values))
    out["ranked_share"] = float(np.mean([len(r["ranking"]) for r in dump["queries"]])) / len(bench.gallery)
    return out


# --------------------------------------------------------------------------- benchmarks

def heldout_sequences(option: Optional[str], checkpoint: Optional[Path]) -> tuple[list[str], str]:
    """The held-out sequence names and where they came from."""
    if option:
        return [s for s in option.split(",") if s], "--heldout"
    if checkpoint is not None:
        try:
            split = read_checkpoint(checkpoint).get("meta", {}).get("split", {})
            if split.get("validation"):
                return list(split["validation"]), f"the checkpoint's meta.split.validation ({checkpoint.name})"
        except CheckpointError as exc:
            log(f"cannot read the split from {checkpoint}: {exc}")
    from retrieval.data import HELDOUT_SEQUENCES

    return list(HELDOUT_SEQUENCES), "retrieval.data.HELDOUT_SEQUENCES"


def write_heldout_benchmark(source: Path, sequences: list[str], workdir: Path) -> Path:
    from retrieval.data import heldout_manifest

    manifest = heldout_manifest(json.loads((source / "manifest.json").read_text()), sequences, root=source)
    return stress.write_benchmark(manifest, workdir / "benchmarks" / "tracking_dev-heldout")


def find_benchmarks(names: list[str], heldout: list[str], workdir: Path) -> tuple[dict[str, Path], list[str]]:
    """``{name: folder}`` of the requested benchmarks that exist, and notes on the absent ones."""
    found, notes = {}, []
    for name in names:
        base = SHARED_DATA / name.replace("-heldout", "")
        if not (base / "manifest.json").is_file():
            notes.append(f"`{name}` was not run: no manifest at `{base}`.")
            continue
        found[name] = write_heldout_benchmark(base, heldout, workdir) if name.endswith("-heldout") else base
    return found, notes


# --------------------------------------------------------------------------- tables

def md_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; ``columns`` = [(key, header, format)], "–" where a value is absent."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [fmt.format(row[k]) if row.get(k) is not None else "–" for k, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


QUALITY = [("method", "method", "{}"), ("mAP", "mAP", "{:.3f}"), ("R@1", "R@1", "{:.3f}"), ("R@5", "R@5", "{:.3f}"),
           ("R@10", "R@10", "{:.3f}"), ("loc-mAP@0.5", "loc-mAP@0.5", "{:.3f}"), ("CorLoc@0.5", "CorLoc@0.5", "{:.3f}")]
SPEED = [("method", "method", "{}"), ("latency_p50_ms", "p50 ms", "{:.1f}"), ("latency_p95_ms", "p95 ms", "{:.1f}"),
         ("index_bytes_per_image", "index bytes/image", "{:,.0f}"), ("build_images_per_s", "build images/s", "{:.1f}"),
         ("threads", "threads", "{}"), ("device", "device", "{}")]
SHORTLIST = [("method", "method", "{}"), ("benchmark", "benchmark", "{}"), ("gallery_images", "gallery", "{}"),
             ("coarse_recall@30", "recall@30", "{:.3f}"), ("coarse_recall@100", "recall@100", "{:.3f}"),
             ("coarse_recall@300", "recall@300", "{:.3f}"), ("shortlist_recall@100", "SR@100", "{:.3f}"),
             ("mAP", "mAP", "{:.3f}"), ("ranked_share", "ranked", "{:.0%}")]


def per_sequence(dumps: dict[str, dict], bench_dir: Path, heldout: list[str]) -> list[dict]:
    """Per-sequence AP, R@1 and CorLoc (pooled over the sequence's positives) of each dump."""
    bench = load_manifest(bench_dir)
    rows: dict[str, dict] = {}
    for name, dump in dumps.items():
        for q in score_queries(dump, bench):
            seq = stress.sequence_of(q["id"])
            row = rows.setdefault(seq, {"sequence": seq, "split": "held out" if seq in heldout else "train",
                                        "queries": 0, "positives": 0, "_acc": {}})
            acc = row["_acc"].setdefault(name, {"AP": [], "R@1": [], "hits": 0.0, "pairs": 0})
            acc["AP"].append(q["AP"])
            acc["R@1"].append(q["R@1"])
            acc["hits"] += q["CorLoc@0.5"] * q["positives"]
            acc["pairs"] += q["positives"]
    out = []
    for row in rows.values():
        first = next(iter(row["_acc"].values()))
        row["queries"], row["positives"] = len(first["AP"]), first["pairs"]
        for name, acc in row.pop("_acc").items():
            row[f"{name} AP"] = float(np.mean(acc["AP"]))
            row[f"{name} R@1"] = float(np.mean(acc["R@1"]))
            row[f"{name} CorLoc"] = acc["hits"] / acc["pairs"]
        out.append(row)
    return out


def stress_table(entry: dict) -> str:
    columns = [("method", "method", "{}")] + [(f"{f:g}", f"{f:g}", "{}") for f in entry["factors"]]
    rows = [{"method": name, **{f"{p['factor']:g}": f"{p['mAP']:.3f} / {p['CorLoc@0.5']:.3f}" for p in points}}
            for name, points in entry["methods"].items()]
    return md_table(rows, columns)


# --------------------------------------------------------------------------- report

def render(report: dict) -> str:
    env, ck = report["environment"], report["checkpoint"]
    lines = ["# Results", "",
             f"Generated by `{report['command']}` on {env['date']} in {report['wall_seconds'] / 60:.0f} min "
             f"({report['runs']['ran']} runs, {report['runs']['reused']} reused from the cache). "
             "Every number below comes from `benchmarks/report.py`; re-scoring any dump with "
             "`python -m retrieval score DUMP MANIFEST` gives the same metrics.", "",
             f"- checkpoint: {ck['description']}",
             f"- device: {report['device']}, {report['threads']} thread(s); torch {env['torch']}. "
             "Latencies were taken on a shared 2-core machine with other jobs running: read them as "
             "orders of magnitude.",
             f"- held-out sequences ({ck['heldout_source']}): {', '.join(ck['heldout'])}",
             "- metrics and formats: `../shared/BENCHMARKS.md`; methods: `python -m retrieval evaluate --method list`.",
             ""]
    if not ck["path"]:
        lines += ["**No trained checkpoint existed when this report was generated, so `ours` is the same "
                  "model as `ours-untrained` (the same run is reported under both names).**", ""]
    lines += [f"- {note}" for note in report["notes"]] + ([""] if report["notes"] else [])
    for name, bench in report["benchmarks"].items():
        lines += [f"## Quality — {name} ({bench['gallery']} gallery images, {bench['queries']} queries)", ""]
        if name.endswith("-heldout"):
            lines += ["Only the sequences the checkpoint never trained on: their gallery images and queries.", ""]
        lines += [md_table(bench["rows"], QUALITY), ""]
        if bench["skipped"]:
            lines += [f"Not run here (too slow for this gallery on one CPU thread; `--skip`): "
                      f"{', '.join(bench['skipped'])}.", ""]
    main = next(iter(report["benchmarks"]), None)
    if main:
        lines += [f"## Speed and index size — {main}", "",
                  "Latency: wall time of one search call (model + index, warm), per query. "
                  "Index: bytes per gallery image as the method stores it; build: gallery images "
                  "indexed per second.", "", md_table(report["benchmarks"][main]["rows"], SPEED), ""]
    sl_rows = [dict(r, benchmark=b) for b, bench in report["benchmarks"].items() for r in bench["rows"]
               if r["method"] in COARSE_TO_FINE and r.get("shortlist_recall@30") is not None]
    if sl_rows:
        lines += ["## Shortlist recall of the coarse-to-fine methods", "",
                  "recall@N: the mean share of a query's positives among the first N images of the coarse "
                  "ranking (the shortlist, then the images the fine stage never saw, in coarse order). "
                  "SR@100: the same for the shortlist actually handed to the fine stage — `ours` re-ranks "
                  f"the first {report['rerank']}, `sift-*` verify the first 100 — so a positive outside it can "
                  "only rank below every re-ranked image. ranked: the share of the gallery the method's ranking lists "
                  "(an image it does not list counts as a miss for every metric). SPEC §2: the shortlist is the risk.", "",
                  md_table(sl_rows, SHORTLIST), ""]
        for b, bench in report["benchmarks"].items():
            by = {r["method"]: r for r in bench["rows"]}
            pairs = [(c, d) for c, d in (("ours", "ours-dense"), ("ours-untrained", "ours-untrained-dense"))
                     if c in by and d in by]
            if pairs:
                lines.append(f"- {b}: " + "; ".join(
                    f"`{c}` mAP {by[c]['mAP']:.3f} / CorLoc {by[c]['CorLoc@0.5']:.3f} against `{d}` (fine stage "
                    f"over every image) {by[d]['mAP']:.3f} / {by[d]['CorLoc@0.5']:.3f}" for c, d in pairs) + ".")
        lines.append("")
    if report.get("per_sequence"):
        names = report["per_sequence_methods"]
        cols = [("sequence", "sequence", "{}"), ("split", "split", "{}"), ("queries", "queries", "{}"),
                ("positives", "positives", "{}")]
        for key in ("AP", "R@1", "CorLoc"):
            cols += [(f"{n} {key}", f"{n} {key}", "{:.3f}") for n in names]
        lines += [f"## Per sequence — {' vs '.join(names)} on {main}", "",
                  "AP and R@1 are means over the sequence's queries, CorLoc@0.5 is pooled over its "
                  "(query, positive) pairs; `held out` sequences were never trained on.", "",
                  md_table(report["per_sequence"], cols), ""]
    if report.get("stress"):
        st = report["stress"]
        lines += ["## Stress tests", "",
                  f"Derived benchmarks (`retrieval/evaluation/stress.py`) built from a fixed subset of "
                  f"{st['source']}: {st['subset']}. Queries: {', '.join(st['queries'])}. Clutter distractors come "
                  f"from the sequences without a query: {', '.join(st['distractor_sequences'])}. "
                  "Cells are mAP / CorLoc@0.5.", ""]
        for kind, entry in st["curves"].items():
            lines += [f"### {kind}", "", f"{stress.DESCRIPTIONS[kind][0].upper()}{stress.DESCRIPTIONS[kind][1:]}.", "",
                      f"![{kind}](stress/{kind}.png)", "", stress_table(entry), ""]
    return "\n".join(lines).rstrip() + "\n"


def checkpoint_info(option: str) -> dict:
    path = resolve_checkpoint(option)
    if path is None:
        return {"path": None, "hash": None, "description": f"none (`--checkpoint {option}`): untrained heads"}
    rel = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
    return {"path": str(rel), "hash": file_hash(path), "description": f"`{rel}` (sha256 {file_hash(path)})"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="default", help="'default' (assets/checkpoint.pt if present), 'none' or a path")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    p.add_argument("--benchmarks", default="tracking_dev,tracking_dev-heldout,coil20")
    p.add_argument("--skip", action="append", default=[], metavar="METHOD@BENCHMARK",
                   help="a run to leave out (repeatable), e.g. sift-exhaustive@coil20")
    p.add_argument("--heldout", default=None, help="held-out sequences, comma-separated (default: from the checkpoint)")
    p.add_argument("--skip-stress", action="store_true")
    p.add_argument("--stress-methods", default=None,
                   help=f"default: {','.join(STRESS_METHODS)} (ours-untrained only with a checkpoint)")
    p.add_argument("--per-sequence", default="ours,gem", help="methods compared per sequence on the first benchmark")
    p.add_argument("--workdir", default="/tmp/report-work", help="dumps, derived benchmarks (reused between runs)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--out", default=str(DOCS / "results.md"), help="the markdown report (plots go to its folder's stress/)")
    p.add_argument("--json", default=str(RESULTS / "report.json"))
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    import cv2
    import faiss

    cv2.setNumThreads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    workdir = Path(args.workdir)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    skips = set(args.skip)
    ck = checkpoint_info(args.checkpoint)
    heldout, heldout_source = heldout_sequences(args.heldout, resolve_checkpoint(args.checkpoint))
    ck.update(heldout=heldout, heldout_source=heldout_source)
    benches, notes = find_benchmarks([b for b in args.benchmarks.split(",") if b], heldout, workdir)
    runner = Runner(workdir, args.checkpoint, device, args.threads)

    argv = sys.argv[1:] if argv is None else argv
    report: dict = {"command": " ".join(["python benchmarks/report.py", *map(shlex.quote, argv)]),
                    "environment": environment(device), "checkpoint": ck, "threads": args.threads,
                    "notes": notes, "benchmarks": {}}
    for name, folder in benches.items():
        bench = load_manifest(folder)
        rows, skipped = [], []
        for m in methods:
            if f"{m}@{name}" in skips:
                skipped.append(m)
                continue
            rows.append(runner.metrics(m, folder))
        report["benchmarks"][name] = {"manifest": str(folder), "gallery": len(bench.gallery),
                                      "queries": len(bench.queries), "rows": rows, "skipped": skipped}
        print(f"\n## {name}\n" + md_table(rows, QUALITY + SPEED[1:5]), flush=True)
    report["device"] = next((r["device"] for b in report["benchmarks"].values() for r in b["rows"]), str(device))

    out = Path(args.out)
    main_bench = next(iter(benches), None)
    compare = [m for m in args.per_sequence.split(",") if m]
    if main_bench and all(m in methods and f"{m}@{main_bench}" not in skips for m in compare):
        dumps = {m: runner.dump(m, benches[main_bench]) for m in compare}
        report["per_sequence"] = per_sequence(dumps, benches[main_bench], heldout)
        report["per_sequence_methods"] = compare
    report["rerank"] = getattr(runner.method("ours").method, "rerank", None) if "ours" in methods else None

    source_dir = SHARED_DATA / "tracking_dev"
    if not args.skip_stress and (source_dir / "manifest.json").is_file():
        stress_methods = ([m for m in args.stress_methods.split(",") if m] if args.stress_methods else
                          [m for m in STRESS_METHODS if m != "ours-untrained" or ck["path"]])
        source = stress.load_stress_source(source_dir)
        curves = stress.stress_curves(source, stress_methods, workdir / "stress",
                                      lambda m, folder: runner.metrics(m, folder), log=log)
        for kind, entry in curves.items():
            stress.plot_stress(kind, entry, out.parent / "stress" / f"{kind}.png")
            print(f"\n## stress {kind} (mAP / CorLoc@0.5)\n" + stress_table(entry), flush=True)
        report["stress"] = {"source": "tracking_dev", "subset": source.subset["description"],
                            "queries": [q["id"] for q in source.subset["queries"]],
                            "distractor_sequences": sorted({stress.sequence_of(p["id"]) for p in source.pool}),
                            "curves": curves}
    elif not args.skip_stress:
        notes.append(f"The stress tests were not run: no tracking_dev at `{source_dir}`.")

    report["wall_seconds"] = time.perf_counter() - started
    report["runs"] = {"ran": runner.ran, "reused": runner.reused}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(report))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    log(f"wrote {out} and {args.json} in {report['wall_seconds'] / 60:.1f} min "
        f"({runner.ran} runs, {runner.reused} reused)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
