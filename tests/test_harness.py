"""The evaluation harness end to end on a tiny generated benchmark.

Coloured blocks are pasted on noise; a test-only method that slides a window of the
query's size and compares mean colours finds them exactly, so its scores are known.
"""
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.evaluation.benchmark import load_manifest, read_dump, score_run
from retrieval.evaluation.harness import evaluate, format_table, load_gallery
from retrieval.images import load_image

torch.set_num_threads(1)

W, H = 120, 90
OBJECTS = {  # name → (height, width, RGB per half): left and right halves differ
    "red": (14, 20, [(230, 40, 40), (230, 40, 40)]),
    "green": (22, 16, [(40, 200, 60), (250, 250, 250)]),
    "blue": (18, 24, [(30, 40, 220), (240, 220, 20)]),
}


def _object_pixels(name):
    h, w, (left, right) = OBJECTS[name]
    block = np.empty((h, w, 3), dtype=np.uint8)
    block[:, : w // 2] = left
    block[:, w // 2:] = right
    return block


def _scene(rng, name=None):
    """A noise image, with ``name`` pasted at a random place; returns (pixels, box or None)."""
    img = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    if name is None:
        return img, None
    block = _object_pixels(name)
    y = int(rng.integers(0, H - block.shape[0] + 1))
    x = int(rng.integers(0, W - block.shape[1] + 1))
    img[y:y + block.shape[0], x:x + block.shape[1]] = block
    return img, [float(x), float(y), float(x + block.shape[1]), float(y + block.shape[0])]


def build_benchmark(root):
    """3 objects × 3 gallery images + 3 noise images; a query per object from an unseen
    image, and one whose source image is a gallery image (listed as junk)."""
    rng = np.random.default_rng(0)
    gallery, queries = [], []

    def save(rel, pixels):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / rel)  # PNG: the blocks keep exact colours

    for name in OBJECTS:
        for i in range(3):
            pixels, box = _scene(rng, name)
            gid = f"{name}/{i}"
            save(f"images/{gid}.png", pixels)
            gallery.append({"id": gid, "path": f"images/{gid}.png", "width": W, "height": H,
                            "objects": [{"object": name, "box": box}]})
        pixels, box = _scene(rng, name)
        save(f"queries/{name}.png", pixels)
        queries.append({"id": f"{name}/q", "object": name, "image": f"queries/{name}.png", "box": box, "junk": []})
    for i in range(3):
        pixels, _ = _scene(rng)
        save(f"images/noise/{i}.png", pixels)
        gallery.append({"id": f"noise/{i}", "path": f"images/noise/{i}.png", "width": W, "height": H,
                        "objects": []})
    queries.append({"id": "red/q-self", "object": "red", "image": gallery[0]["path"],
                    "box": gallery[0]["objects"][0]["box"], "junk": [gallery[0]["id"]]})
    manifest = {"name": "blocks", "version": 1, "description": "test", "gallery": gallery, "queries": queries}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


class MeanColourWindow:
    """Test-only method: best window of the query's size by mean-colour distance.

    ``box_shift`` moves every returned box right by that fraction of its width, to
    check that the harness scores localisation rather than assuming it.
    """

    def __init__(self, box_shift=0.0, name="mean-colour"):
        self.name = name
        self.box_shift = box_shift
        self.config = {"box_shift": box_shift}
        self.seen_queries = []

    def index(self, gallery):
        start = time.perf_counter()
        self.ids = [gid for gid, _ in gallery]
        self.sizes = [img.size for _, img in gallery]
        # integral images make every window's mean an O(1) lookup
        self.integrals = []
        for _, img in gallery:
            arr = np.asarray(img, dtype=np.float64)
            self.integrals.append(np.pad(arr.cumsum(0).cumsum(1), ((1, 0), (1, 0), (0, 0))))
        return {"seconds": time.perf_counter() - start,
                "bytes_per_image": sum(i.nbytes for i in self.integrals) / len(self.integrals)}

    def search(self, query):
        self.seen_queries.append(query)
        target = np.asarray(query, dtype=np.float64).reshape(-1, 3).mean(0)
        w, h = query.size
        results = []
        for gid, s in zip(self.ids, self.integrals):
            sums = s[h:, w:] - s[:-h, w:] - s[h:, :-w] + s[:-h, :-w]
            dist = np.linalg.norm(sums / (w * h) - target, axis=-1)
            y, x = np.unravel_index(np.argmin(dist), dist.shape)
            dx = self.box_shift * w
            results.append({"id": gid, "score": np.float32(-dist[y, x]),
                            "box": np.array([x + dx, y, x + w + dx, y + h])})
        results.sort(key=lambda r: -r["score"])
        return results, {"shortlist": [r["id"] for r in results[:4]]}


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return build_benchmark(tmp_path_factory.mktemp("blocks"))


def test_end_to_end_perfect_method(bench_dir, tmp_path):
    method = MeanColourWindow()
    dump, metrics = evaluate(method, bench_dir, out_path=tmp_path / "run.json")
    assert metrics["mAP"] == 1.0 and metrics["R@1"] == 1.0 and metrics["R@10"] == 1.0
    assert metrics["loc-mAP@0.5"] == 1.0 and metrics["CorLoc@0.5"] == 1.0
    # shortlist of 4 holds the 3 positives (2 for the self query: its source image is junk)
    assert metrics["shortlist_recall@30"] == 1.0
    assert metrics["queries"] == 4 and metrics["method"] == "mean-colour" and metrics["benchmark"] == "blocks"

    # the dump: every gallery image ranked, plain JSON types, timings and meta
    assert len(dump["queries"]) == 4 and dump["config"] == {"box_shift": 0.0}
    for q in dump["queries"]:
        assert len(q["ranking"]) == 12 and q["latency_ms"] > 0
        assert all(type(r["score"]) is float and all(type(v) is float for v in r["box"]) for r in q["ranking"])
    meta = dump["meta"]
    assert meta["threads"] == torch.get_num_threads() == 1
    assert meta["device"].startswith("cpu") and meta["gallery_images"] == 12
    assert meta["build_images_per_s"] == pytest.approx(12 / meta["build_seconds"])
    assert meta["index_bytes_per_image"] == (H + 1) * (W + 1) * 3 * 8
    assert metrics["latency_p95_ms"] >= metrics["latency_p50_ms"] > 0

    # re-scoring the written dump reproduces the returned metrics exactly
    assert read_dump(tmp_path / "run.json") == dump
    assert score_run(read_dump(tmp_path / "run.json"), bench_dir / "manifest.json") == metrics


def test_search_gets_the_cropped_query_patch_after_one_warm_up(bench_dir):
    method = MeanColourWindow()
    evaluate(method, bench_dir)
    bench = load_manifest(bench_dir)
    assert len(method.seen_queries) == len(bench.queries) + 1      # one untimed warm-up
    for patch, query in zip(method.seen_queries[1:], bench.queries):
        x0, y0, x1, y1 = (int(v) for v in query.box)
        expected = np.asarray(load_image(query.image))[y0:y1, x0:x1]
        np.testing.assert_array_equal(np.asarray(patch), expected)
    np.testing.assert_array_equal(np.asarray(method.seen_queries[0]), np.asarray(method.seen_queries[1]))


def test_mislocalised_boxes_lose_localisation_but_not_retrieval(bench_dir):
    _, metrics = evaluate(MeanColourWindow(box_shift=0.5), bench_dir)   # IoU 1/3 everywhere
    assert metrics["mAP"] == 1.0 and metrics["R@1"] == 1.0
    assert metrics["loc-mAP@0.5"] == 0.0 and metrics["CorLoc@0.5"] == 0.0
    _, metrics = evaluate(MeanColourWindow(box_shift=0.25), bench_dir)  # IoU 0.6: still a hit
    assert metrics["loc-mAP@0.5"] == 1.0 and metrics["CorLoc@0.5"] == 1.0


def test_gallery_size_must_match_manifest(bench_dir, tmp_path):
    manifest = json.loads((bench_dir / "manifest.json").read_text())
    manifest["gallery"][0]["width"] = W + 1
    manifest["gallery"] = [dict(g, path=str(bench_dir / g["path"])) for g in manifest["gallery"]]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="121"):
        load_gallery(load_manifest(tmp_path))


def test_format_table():
    rows = [
        {"method": "ours", "mAP": 0.91234, "R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "loc-mAP@0.5": 0.5,
         "CorLoc@0.5": 0.25, "latency_p50_ms": 12.345, "latency_p95_ms": 20.0, "device": "cpu (x)", "threads": 1},
        {"method": "gem", "mAP": 0.4, "R@1": 0.42, "R@5": 0.5, "R@10": 0.62, "loc-mAP@0.5": 0.0, "CorLoc@0.5": 0.0},
    ]
    lines = format_table(rows).splitlines()
    assert lines[0] == ("| method | mAP | R@1 | R@5 | R@10 | loc-mAP@0.5 | CorLoc@0.5 | p50 ms | p95 ms "
                        "| threads | device |")
    assert lines[1].count("---") == 11
    assert lines[2] == "| ours | 0.912 | 1.000 | 1.000 | 1.000 | 0.500 | 0.250 | 12.3 | 20.0 | 1 | cpu (x) |"
    assert lines[3] == "| gem | 0.400 | 0.420 | 0.500 | 0.620 | 0.000 | 0.000 | – | – | – | – |"
    assert len(lines) == 4
