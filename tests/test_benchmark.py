"""Manifest loading, results dumps and score_run against hand-computed values."""
import copy
import json
import math

import pytest

from retrieval.evaluation.benchmark import (Benchmark, ObjectBox, check_dump, load_manifest, read_dump,
                                            score_queries, score_run, write_dump)

DISTRACTORS = [f"d{i:02d}" for i in range(40)]


def _manifest_dict():
    def g(gid, *objects):
        return {"id": gid, "path": f"images/{gid}.jpg", "width": 100, "height": 80,
                "objects": [{"object": o, "box": b} for o, b in objects]}
    gallery = [
        g("g1", ("A", [0, 0, 10, 10])),
        g("g2", ("A", [10, 10, 20, 20])),
        g("g3", ("A", [30, 30, 40, 40]), ("B", [50, 50, 70, 70])),
        g("g4", ("B", [0, 0, 20, 20])),
        g("g5"),
        g("g6", ("B", [0, 0, 10, 10])),
    ] + [g(d) for d in DISTRACTORS]
    queries = [
        {"id": "qA", "object": "A", "image": "queries/a.jpg", "box": [1, 2, 11, 12], "junk": ["g2"]},
        {"id": "qB", "object": "B", "image": "images/g4.jpg", "box": [0, 0, 20, 20], "junk": []},
    ]
    return {"name": "toy", "version": 1, "description": "hand-made", "gallery": gallery, "queries": queries}


@pytest.fixture
def bench(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(_manifest_dict()))
    return load_manifest(tmp_path)


def _entry(gid, score, box=None):
    return {"id": gid, "score": score, "box": box}


def _dump():
    """Rankings whose metrics are worked out by hand in test_score_run_hand_values."""
    q_a = [_entry("g2", 0.5, [10, 10, 20, 20]),   # junk: removed before scoring
           _entry("g4", 0.1, [0, 0, 20, 20]),     # negative for A
           _entry("g1", 0.9, [0, 0, 10, 10]),     # positive, localised
           _entry("g3", 0.2, [50, 50, 70, 70]),   # positive, box on the other object
           _entry("g5", 0.3)]
    q_b = [_entry("g4", 0.9, [0, 0, 20, 10]),     # IoU exactly 0.5: localised
           _entry("g3", 0.8),                     # positive without a box
           _entry("g6", 0.7, [0, 0, 10, 10]),     # positive, localised
           _entry("g1", 0.6, [0, 0, 10, 10]),
           _entry("g2", 0.5, [0, 0, 10, 10])]
    return {"benchmark": "toy", "method": "hand", "config": {"k": 1},
            "meta": {"device": "cpu (test)", "threads": 1, "build_images_per_s": 123.0},
            "queries": [
                {"id": "qA", "latency_ms": 10.0, "ranking": q_a, "shortlist": ["g2"] + DISTRACTORS[:30] + ["g1", "g3"]},
                {"id": "qB", "latency_ms": 30.0, "ranking": q_b, "shortlist": ["g4"]},
            ]}


def test_load_manifest_resolves_paths_and_positives(bench, tmp_path):
    assert isinstance(bench, Benchmark) and bench.name == "toy"
    assert len(bench.gallery) == 46 and [q.id for q in bench.queries] == ["qA", "qB"]
    g3 = bench.item("g3")
    assert g3.path == tmp_path / "images" / "g3.jpg" and (g3.width, g3.height) == (100, 80)
    assert g3.objects == (ObjectBox("A", (30.0, 30.0, 40.0, 40.0)), ObjectBox("B", (50.0, 50.0, 70.0, 70.0)))
    q_a, q_b = bench.queries
    assert q_a.image == tmp_path / "queries" / "a.jpg" and q_a.box == (1.0, 2.0, 11.0, 12.0)
    assert q_a.junk == ("g2",)
    assert bench.object_boxes(q_a) == {"g1": [(0.0, 0.0, 10.0, 10.0)], "g3": [(30.0, 30.0, 40.0, 40.0)]}
    assert set(bench.object_boxes(q_b)) == {"g3", "g4", "g6"}
    assert load_manifest(tmp_path / "manifest.json").queries == bench.queries


def test_score_run_hand_values(bench):
    m = score_run(_dump(), bench)
    # qA after junk removal: g4, g1, g3, g5 → positives at 2, 3; only g1 localised
    ap_a, loc_a = (1 / 2 + 2 / 3) / 2, (1 / 2) / 2
    # qB: positives at 1, 2, 3; g4 (IoU 0.5) and g6 localised, g3 has no box
    ap_b, loc_b = 1.0, (1 + 2 / 3) / 3
    assert m["benchmark"] == "toy" and m["method"] == "hand" and m["queries"] == 2
    assert m["mAP"] == pytest.approx((ap_a + ap_b) / 2)
    assert m["loc-mAP@0.5"] == pytest.approx((loc_a + loc_b) / 2)
    assert (m["R@1"], m["R@5"], m["R@10"]) == (0.5, 1.0, 1.0)
    # pooled over the 5 (query, positive) pairs: g1, g4, g6 localised — not the mean of 1/2 and 2/3
    assert m["CorLoc@0.5"] == pytest.approx(3 / 5)
    assert m["shortlist_recall@30"] == pytest.approx((0 + 1 / 3) / 2)
    assert m["shortlist_recall@100"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["shortlist_recall@300"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["latency_p50_ms"] == 20.0 and m["latency_p95_ms"] == pytest.approx(29.0)
    assert (m["device"], m["threads"], m["build_images_per_s"]) == ("cpu (test)", 1, 123.0)


def test_score_queries_per_query(bench):
    rows = {r["id"]: r for r in score_queries(_dump(), bench)}
    assert rows["qA"]["AP"] == pytest.approx(7 / 12) and rows["qB"]["AP"] == 1.0
    assert rows["qA"]["CorLoc@0.5"] == 0.5 and rows["qA"]["positives"] == 2
    assert rows["qB"]["CorLoc@0.5"] == pytest.approx(2 / 3) and rows["qB"]["positives"] == 3
    assert rows["qA"]["R@1"] == 0.0 and rows["qB"]["R@1"] == 1.0


def test_ranking_order_wins_over_scores(bench):
    dump = _dump()
    # qA's scores are out of order; re-sorting them would put g1 first and give AP (1 + 2/3) / 2
    assert score_queries(dump, bench)[0]["AP"] == pytest.approx(7 / 12)
    for entry in dump["queries"][0]["ranking"]:
        entry["score"] = 1.0   # all tied: still the order given
    assert score_queries(dump, bench)[0]["AP"] == pytest.approx(7 / 12)
    ranking = dump["queries"][0]["ranking"]
    ranking[1], ranking[2] = ranking[2], ranking[1]   # g1 before g4, same scores
    assert score_queries(dump, bench)[0]["AP"] == pytest.approx((1 + 2 / 3) / 2)


def test_positive_missing_from_ranking_and_optional_fields(bench):
    dump = _dump()
    for q in dump["queries"]:
        del q["shortlist"], q["latency_ms"]
    del dump["meta"]
    dump["queries"][1]["ranking"] = [_entry("g4", 1.0, [0, 0, 20, 20])]   # g3, g6 never returned
    m = score_run(dump, bench)
    assert "shortlist_recall@30" not in m and "latency_p50_ms" not in m and "device" not in m
    rows = score_queries(dump, bench)
    assert rows[1]["AP"] == pytest.approx(1 / 3) and rows[1]["CorLoc@0.5"] == pytest.approx(1 / 3)


def test_dump_round_trip(bench, tmp_path):
    dump = _dump()
    path = write_dump(dump, tmp_path / "runs" / "hand.json")
    assert json.loads(path.read_text()) == dump
    again = read_dump(path)
    assert again == dump
    assert score_run(again, bench) == score_run(dump, bench)
    assert score_run(again, tmp_path) == score_run(dump, bench)   # a manifest path works too
    assert not list(path.parent.glob("*.tmp"))


def _broken(change):
    dump = _dump()
    change(dump)
    return dump


@pytest.mark.parametrize("change, message", [
    (lambda d: d["queries"].pop(), "missing queries"),
    (lambda d: d["queries"][0].update(id="qZ"), "unknown queries"),
    (lambda d: d["queries"][0]["ranking"].append(_entry("nope", 0.0)), "not in the gallery"),
    (lambda d: d["queries"][0]["ranking"].append(_entry("g1", 0.0)), "twice"),
    (lambda d: d["queries"].append(copy.deepcopy(d["queries"][0])), "twice"),
    (lambda d: d["queries"][0]["ranking"][0].update(score=math.nan), "finite score"),
    (lambda d: d["queries"][0]["ranking"][0].update(box=[0, 0, 1]), "box"),
    (lambda d: d["queries"][0].pop("latency_ms"), "latency_ms"),
    (lambda d: d["queries"][0].pop("shortlist"), "shortlist"),
    (lambda d: d.pop("method"), "method"),
    (lambda d: d["meta"].update({"mAP": 1.0}), "overwrite"),
])
def test_score_run_refuses_bad_dumps(bench, change, message):
    with pytest.raises(ValueError, match=message):
        score_run(_broken(change), bench)


def test_write_dump_refuses_non_finite_scores(tmp_path):
    dump = _broken(lambda d: d["queries"][0]["ranking"][0].update(score=math.inf))
    with pytest.raises(ValueError):
        write_dump(dump, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()
    check_dump(_dump())


@pytest.mark.parametrize("change, message", [
    (lambda m: m["queries"][0].update(object="Z"), "no positive"),
    (lambda m: m["queries"][1].update(junk=["g3", "g4", "g6"]), "no positive"),
    (lambda m: m["queries"][0].update(junk=["nope"]), "not gallery ids"),
    (lambda m: m["gallery"].append(dict(m["gallery"][0])), "duplicate gallery"),
    (lambda m: m["gallery"][0]["objects"][0].update(box=[5, 5, 1, 1]), "empty"),
])
def test_load_manifest_refuses_bad_manifests(tmp_path, change, message):
    data = _manifest_dict()
    change(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_manifest(tmp_path)


def test_load_manifest_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_manifest(tmp_path)


def test_tracking_dev_manifest_scores_an_oracle_perfectly():
    from pathlib import Path
    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tracking_dev"
    if not (data / "manifest.json").is_file():
        pytest.skip("tracking_dev benchmark absent (../shared/data/tracking_dev)")
    bench = load_manifest(data)
    assert len(bench.gallery) == 450 and len(bench.queries) == 45
    assert all(item.path.is_file() for item in bench.gallery) and all(q.image.is_file() for q in bench.queries)
    queries = []
    for q in bench.queries:
        boxes = bench.object_boxes(q)
        others = [g.id for g in bench.gallery if g.id not in boxes]
        oracle = [_entry(i, 1.0, list(b[0])) for i, b in boxes.items()] + [_entry(i, 0.0) for i in others]
        queries.append({"id": q.id, "ranking": oracle})
    dump = {"benchmark": bench.name, "method": "oracle", "config": {}, "queries": queries}
    m = score_run(dump, bench)
    assert all(m[k] == 1.0 for k in ("mAP", "R@1", "R@5", "R@10", "loc-mAP@0.5", "CorLoc@0.5"))
    for q in dump["queries"]:
        q["ranking"].reverse()   # positives last, junk in between: far from perfect
    m = score_run(dump, bench)
    assert m["mAP"] < 0.2 and m["R@10"] == 0.0 and m["CorLoc@0.5"] == 1.0
