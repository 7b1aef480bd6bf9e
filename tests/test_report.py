"""benchmarks/report.py helpers: coarse-ranking recall, index reuse and the dump cache."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.evaluation.benchmark import load_manifest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402


def _write_bench(root: Path, n_gallery: int, positives: list[int], images: bool = False) -> Path:
    gallery = []
    for i in range(n_gallery):
        rel = f"images/{i}.png"
        if images:
            (root / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((12, 16, 3), i * 20 % 256, np.uint8)).save(root / rel)
        gallery.append({"id": f"g{i}", "path": rel, "width": 16, "height": 12,
                        "objects": [{"object": "x", "box": [2, 2, 10, 10]}] if i in positives else []})
    query = {"id": "q", "object": "x", "image": "images/0.png", "box": [0, 0, 16, 12], "junk": []}
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"name": root.name, "gallery": gallery, "queries": [query]}))
    return root


def test_coarse_order_appends_the_unseen_images():
    record = {"shortlist": ["b", "a"], "ranking": [{"id": "a"}, {"id": "b"}, {"id": "d"}, {"id": "c"}]}
    assert report.coarse_order(record) == ["b", "a", "d", "c"]


def test_coarse_recall_counts_positives_past_the_shortlist(tmp_path):
    bench = load_manifest(_write_bench(tmp_path / "b", 40, positives=[10, 35]))
    coarse = [f"g{i}" for i in range(40)]                  # coarse order = id order
    shortlist = coarse[:20]
    fine = list(reversed(shortlist))                        # the fine stage reorders its 20
    dump = {"queries": [{"id": "q", "shortlist": shortlist,
                         "ranking": [{"id": i} for i in fine + coarse[20:35]]}]}  # g35.. never listed
    out = report.coarse_recall(dump, bench)
    assert out["coarse_recall@30"] == 0.5                   # g10 in, g35 beyond 30
    assert out["coarse_recall@100"] == 0.5                  # g35 was never ranked: a miss
    assert out["ranked_share"] == 35 / 40


class CountingMethod:
    name = "count"
    config = {"k": 1}
    device = "cpu"
    built = 0

    def __init__(self):
        self.indexed = 0
        CountingMethod.built += 1

    def index(self, gallery):
        self.indexed += 1
        self.ids = [gid for gid, _ in gallery]
        return {"seconds": 1.0}

    def search(self, query):
        return [{"id": gid, "score": -i, "box": None} for i, gid in enumerate(self.ids)], {}


def test_reusable_index_skips_the_same_gallery_and_renews_the_method_otherwise():
    CountingMethod.built = 0
    wrapped = report.ReusableIndex(CountingMethod)
    a = [("x", Image.new("RGB", (8, 8), (1, 2, 3)))]
    same = [("x", Image.new("RGB", (8, 8), (1, 2, 3)))]
    changed = [("x", Image.new("RGB", (8, 8), (9, 2, 3)))]   # same id, other pixels
    wrapped.index(a)
    first = wrapped.method
    wrapped.index(same)
    assert wrapped.method is first and first.indexed == 1
    wrapped.index(changed)
    assert wrapped.method is not first and wrapped.method.indexed == 1 and CountingMethod.built == 2


class ContextMethod(CountingMethod):
    uses_context = True

    def search_in_context(self, image, box):
        return [{"id": gid, "score": 0.0, "box": list(box)} for gid in self.ids], {"seen": image.size}


def test_reusable_index_looks_like_the_method_to_the_harness():
    wrapped = report.ReusableIndex(ContextMethod)
    wrapped.index([("x", Image.new("RGB", (8, 8)))])
    assert wrapped.uses_context and wrapped.config == {"k": 1} and wrapped.device == "cpu"
    ranking, extras = wrapped.search_in_context(Image.new("RGB", (20, 10)), (1, 2, 3, 4))
    assert ranking[0]["box"] == [1, 2, 3, 4] and extras == {"seen": (20, 10)}
    assert not getattr(report.ReusableIndex(CountingMethod), "uses_context", False)


def test_runner_caches_dumps_and_shares_identical_configs(tmp_path, monkeypatch):
    bench = _write_bench(tmp_path / "tiny", 3, positives=[1], images=True)
    monkeypatch.setattr(report, "make_method", lambda name, *a: CountingMethod())
    runner = report.Runner(tmp_path / "work", "none", "cpu", threads=1)
    m = runner.metrics("first", bench)
    assert runner.ran == 1 and m["mAP"] == 0.5 and m["method"] == "count"
    runner2 = report.Runner(tmp_path / "work", "none", "cpu", threads=1)  # a new process: from disk
    assert runner2.metrics("first", bench)["mAP"] == 0.5 and runner2.ran == 0
    other = runner2.dump("second", bench)                   # same class and config → same run
    assert runner2.ran == 0 and other["method"] == "second"
    assert len(list((tmp_path / "work" / "dumps" / "tiny").glob("*.json"))) == 2
    runner3 = report.Runner(tmp_path / "work", "none", "cpu", threads=2)  # another thread count: a new run
    runner3.dump("first", bench)
    assert runner3.ran == 1


@pytest.mark.parametrize("option, expected", [("Jumping,bag", ["Jumping", "bag"])])
def test_heldout_option_wins(option, expected):
    assert report.heldout_sequences(option, None) == (expected, "--heldout")
