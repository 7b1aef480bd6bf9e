"""Benchmark manifests, results dumps and their scoring (formats of BENCHMARKS.md).

A manifest is read into :class:`Benchmark`; a method's output is a *dump* (plain dict,
JSON on disk) that anyone can re-score with :func:`score_run` without running the
method again.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from retrieval.evaluation import metrics
from retrieval.images import parse_box

RECALL_KS = (1, 5, 10)
SHORTLIST_NS = (30, 100, 300)
IOU_THRESHOLD = 0.5

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ObjectBox:
    object: str
    box: Box


@dataclass(frozen=True)
class GalleryItem:
    id: str
    path: Path            # absolute: the manifest's relative path resolved against its folder
    width: int
    height: int
    objects: tuple[ObjectBox, ...]


@dataclass(frozen=True)
class Query:
    id: str
    object: str
    image: Path           # absolute, like GalleryItem.path
    box: Box              # the query patch, in ``image``'s stored pixels
    junk: tuple[str, ...]


@dataclass
class Benchmark:
    name: str
    root: Path
    gallery: list[GalleryItem]
    queries: list[Query]
    description: str = ""

    def __post_init__(self) -> None:
        self._items = {item.id: item for item in self.gallery}

    def item(self, gallery_id: str) -> GalleryItem:
        return self._items[gallery_id]

    def object_boxes(self, query: Query) -> dict[str, list[Box]]:
        """Each positive's boxes of the query object: ``{gallery id: [box, ...]}`` (junk excluded)."""
        junk = set(query.junk)
        out: dict[str, list[Box]] = {}
        for item in self.gallery:
            boxes = [o.box for o in item.objects if o.object == query.object]
            if boxes and item.id not in junk:
                out[item.id] = boxes
        return out


def _manifest_file(path: Union[str, os.PathLike]) -> Path:
    p = Path(path)
    return p / "manifest.json" if p.is_dir() else p


def load_manifest(path: Union[str, os.PathLike]) -> Benchmark:
    """Read a benchmark ``manifest.json`` (or the folder holding it) and check it.

    Raises ``ValueError`` for duplicate ids, junk ids that are not gallery ids, bad
    boxes, or a query without any positive (its AP would be undefined).
    """
    file = _manifest_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"no benchmark manifest at '{file}'")
    data = json.loads(file.read_text())
    root = file.parent
    gallery = [
        GalleryItem(id=str(g["id"]), path=root / g["path"], width=int(g["width"]), height=int(g["height"]),
                    objects=tuple(ObjectBox(str(o["object"]), parse_box(o["box"])) for o in g.get("objects", ())))
        for g in data["gallery"]]
    queries = [
        Query(id=str(q["id"]), object=str(q["object"]), image=root / q["image"], box=parse_box(q["box"]),
              junk=tuple(str(j) for j in q.get("junk", ())))
        for q in data["queries"]]
    bench = Benchmark(name=str(data.get("name", root.name)), root=root, gallery=gallery, queries=queries,
                      description=str(data.get("description", "")))
    _check_benchmark(bench, file)
    return bench


def _check_benchmark(bench: Benchmark, file: Path) -> None:
    for kind, ids in (("gallery", [g.id for g in bench.gallery]), ("query", [q.id for q in bench.queries])):
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"{file}: duplicate {kind} ids {dup[:5]}")
    for q in bench.queries:
        unknown = [j for j in q.junk if j not in bench._items]
        if unknown:
            raise ValueError(f"{file}: query '{q.id}' lists junk ids that are not gallery ids: {unknown[:5]}")
        if not bench.object_boxes(q):
            raise ValueError(f"{file}: query '{q.id}' (object '{q.object}') has no positive gallery image")


# --------------------------------------------------------------------------- dumps

def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_dump(dump: dict) -> None:
    """Raise ``ValueError`` when ``dump`` does not follow the results-dump format."""
    for key, kind in (("benchmark", str), ("method", str), ("queries", list)):
        if not isinstance(dump.get(key), kind):
            raise ValueError(f"results dump: '{key}' missing or not a {kind.__name__}")
    if not isinstance(dump.get("config", {}), dict) or not isinstance(dump.get("meta", {}), dict):
        raise ValueError("results dump: 'config' and 'meta' must be objects")
    for q in dump["queries"]:
        qid = q.get("id")
        if not isinstance(qid, str) or not isinstance(q.get("ranking"), list):
            raise ValueError(f"results dump: query {qid!r} needs a string 'id' and a 'ranking' list")
        if "latency_ms" in q and not _is_number(q["latency_ms"]):
            raise ValueError(f"results dump: query '{qid}' latency_ms {q['latency_ms']!r} is not a number")
        if "shortlist" in q and not (isinstance(q["shortlist"], list)
                                     and all(isinstance(i, str) for i in q["shortlist"])):
            raise ValueError(f"results dump: query '{qid}' shortlist must be a list of ids")
        for r in q["ranking"]:
            if not isinstance(r, dict) or not isinstance(r.get("id"), str) or not _is_number(r.get("score")):
                raise ValueError(f"results dump: query '{qid}' has a ranking entry {r!r} without "
                                 f"a string id and a finite score")
            box = r.get("box")
            if box is not None and not (isinstance(box, list) and len(box) == 4 and all(map(_is_number, box))):
                raise ValueError(f"results dump: query '{qid}', image '{r['id']}': box {box!r} "
                                 f"is neither null nor four numbers")


def write_dump(dump: dict, path: Union[str, os.PathLike]) -> Path:
    """Check ``dump`` and write it as JSON atomically (a reader never sees half a file)."""
    check_dump(dump)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(dump, f, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_dump(path: Union[str, os.PathLike]) -> dict:
    dump = json.loads(Path(path).read_text())
    check_dump(dump)
    return dump


# --------------------------------------------------------------------------- scoring

def _check_against(dump: dict, bench: Benchmark) -> None:
    dump_ids = [q["id"] for q in dump["queries"]]
    if len(set(dump_ids)) != len(dump_ids):
        raise ValueError("results dump: a query id occurs twice")
    missing = sorted({q.id for q in bench.queries} - set(dump_ids))
    extra = sorted(set(dump_ids) - {q.id for q in bench.queries})
    if missing or extra:
        raise ValueError(f"results dump does not match benchmark '{bench.name}': "
                         f"missing queries {missing[:5]}, unknown queries {extra[:5]}")
    for q in dump["queries"]:
        ids = [r["id"] for r in q["ranking"]]
        unknown = [i for i in ids if i not in bench._items]
        if unknown:
            raise ValueError(f"results dump: query '{q['id']}' ranks ids that are not in the gallery: {unknown[:5]}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"results dump: query '{q['id']}' ranks the same image twice")


def _score(dump: dict, bench: Benchmark) -> tuple[list[dict], list[tuple]]:
    """Per-query rows and every (predicted box, object boxes) pair for CorLoc."""
    check_dump(dump)
    _check_against(dump, bench)
    records = {q["id"]: q for q in dump["queries"]}
    rows, all_pairs = [], []
    for query in bench.queries:
        rec = records[query.id]
        ranked = [r["id"] for r in rec["ranking"]]
        pred_box = {r["id"]: r["box"] for r in rec["ranking"]}
        boxes = bench.object_boxes(query)
        # a positive the method did not return has no box: a CorLoc miss
        pairs = [(pred_box.get(i), b) for i, b in boxes.items()]
        row: dict[str, Any] = {
            "id": query.id, "object": query.object,
            "AP": metrics.average_precision(ranked, boxes, query.junk),
            "loc-AP@0.5": metrics.localized_average_precision(
                [(r["id"], r["box"]) for r in rec["ranking"]], boxes, query.junk, IOU_THRESHOLD),
        }
        for k in RECALL_KS:
            row[f"R@{k}"] = metrics.recall_at_k(ranked, boxes, k, query.junk)
        row["CorLoc@0.5"] = metrics.corloc(pairs, IOU_THRESHOLD)
        row["positives"] = len(pairs)
        if "latency_ms" in rec:
            row["latency_ms"] = float(rec["latency_ms"])
        if "shortlist" in rec:
            for n in SHORTLIST_NS:
                row[f"shortlist_recall@{n}"] = metrics.shortlist_recall(rec["shortlist"], boxes, n)
        rows.append(row)
        all_pairs.extend(pairs)
    return rows, all_pairs


def score_queries(dump: dict, bench: Benchmark) -> list[dict]:
    """Per-query scores in manifest order: ``{"id", "object", "AP", "loc-AP@0.5", "R@1",
    "R@5", "R@10", "CorLoc@0.5", "positives"}``, plus ``"latency_ms"`` and
    ``"shortlist_recall@N"`` when the dump has them.

    Raises ``ValueError`` when the dump does not follow the format or does not fit
    ``bench`` (missing or unknown queries, ids outside the gallery, an image ranked twice).
    """
    return _score(dump, bench)[0]


def _all_or_none(rows: list[dict], key: str) -> bool:
    present = sum(key in r for r in rows)
    if 0 < present < len(rows):
        raise ValueError(f"results dump: '{key}' is given for {present} of {len(rows)} queries")
    return present == len(rows)


def score_run(dump: dict, manifest: Union[Benchmark, str, os.PathLike]) -> dict:
    """Metrics of a results dump on a benchmark (BENCHMARKS.md).

    Returns ``{"benchmark", "method", "queries", "mAP", "R@1", "R@5", "R@10",
    "loc-mAP@0.5", "CorLoc@0.5"}``; ``"latency_p50_ms"``/``"latency_p95_ms"`` when the
    queries carry ``latency_ms``; ``"shortlist_recall@{30,100,300}"`` when they carry a
    ``shortlist``; and the dump's ``meta`` entries (device, threads, build rate, ...).
    CorLoc is pooled over all (query, positive) pairs, the others are means over queries.
    """
    bench = manifest if isinstance(manifest, Benchmark) else load_manifest(manifest)
    rows, pairs = _score(dump, bench)
    n = len(rows)
    result: dict[str, Any] = {"benchmark": dump["benchmark"], "method": dump["method"], "queries": n,
                              "mAP": sum(r["AP"] for r in rows) / n}
    for k in RECALL_KS:
        result[f"R@{k}"] = sum(r[f"R@{k}"] for r in rows) / n
    result["loc-mAP@0.5"] = sum(r["loc-AP@0.5"] for r in rows) / n
    result["CorLoc@0.5"] = metrics.corloc(pairs, IOU_THRESHOLD)
    if _all_or_none(rows, "latency_ms"):
        result.update(metrics.latency_summary([r["latency_ms"] for r in rows]))
    if _all_or_none(rows, f"shortlist_recall@{SHORTLIST_NS[0]}"):
        for n_short in SHORTLIST_NS:
            key = f"shortlist_recall@{n_short}"
            result[key] = sum(r[key] for r in rows) / n
    for key, value in dump.get("meta", {}).items():
        if key in result:
            raise ValueError(f"results dump: meta entry '{key}' would overwrite a metric")
        result[key] = value
    return result
