"""Stress-test builders (derived benchmarks) and the evaluate → score CLI round trip.

A tiny source benchmark is generated: five "sequences", each a textured block pasted on
noise; A–C have queries with boxes ≥ 32 px, D and E have none (they become the clutter
distractors). The builders' outputs are checked pixel by pixel against the source.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.evaluation import stress
from retrieval.evaluation.benchmark import load_manifest, read_dump, score_run

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
W, H = 160, 120
SIZES = {"A": (40, 36), "B": (48, 40), "C": (36, 44), "D": (20, 24), "E": (26, 18)}  # block w, h


def _block(name, w, h):
    """A block with structure (four quadrants of different colours), distinct per sequence."""
    rng = np.random.default_rng(ord(name))
    colours = rng.integers(30, 226, size=(4, 3))
    block = np.empty((h, w, 3), np.uint8)
    block[: h // 2, : w // 2], block[: h // 2, w // 2:] = colours[0], colours[1]
    block[h // 2:, : w // 2], block[h // 2:, w // 2:] = colours[2], colours[3]
    return block


def _frame(rng, name):
    img = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    w, h = SIZES[name]
    x, y = int(rng.integers(0, W - w)), int(rng.integers(0, H - h))
    img[y:y + h, x:x + w] = _block(name, w, h)
    return img, [float(x), float(y), float(x + w), float(y + h)]


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("source")
    rng = np.random.default_rng(0)
    gallery, queries = [], []
    for name in SIZES:
        for i in range(4):
            img, box = _frame(rng, name)
            rel = f"images/{name}/{i}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / rel)
            gallery.append({"id": f"{name}/{i}", "path": rel, "width": W, "height": H,
                            "objects": [{"object": name, "box": box}]})
        for j in range(2):
            img, box = _frame(rng, name)
            rel = f"images/{name}/q{j}.png"
            Image.fromarray(img).save(root / rel)
            queries.append({"id": f"{name}/q{j}", "object": name, "image": rel, "box": box,
                            "junk": [f"{name}/0"] if j == 0 else []})
    (root / "manifest.json").write_text(json.dumps({"name": "blocks", "version": 1, "gallery": gallery,
                                                    "queries": queries}))
    return root


@pytest.fixture(scope="module")
def source(source_dir):
    return stress.load_stress_source(source_dir, n_queries=4, frames_per_sequence=3, seed=0)


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_subset_is_seeded_and_valid(source_dir, source, tmp_path):
    subset = source.subset
    assert len(subset["queries"]) == 4
    assert {stress.sequence_of(q["id"]) for q in subset["queries"]} == {"A", "B", "C"}  # one per sequence first
    assert all(min(q["box"][2] - q["box"][0], q["box"][3] - q["box"][1]) >= 32 for q in subset["queries"])
    assert [g["id"] for g in subset["gallery"] if g["id"].startswith("A/")] == ["A/0", "A/2", "A/3"]  # linspace(0, 3, 3)
    assert {stress.sequence_of(p["id"]) for p in source.pool} == {"D", "E"}
    ids = {g["id"] for g in subset["gallery"]}
    assert all(set(q["junk"]) <= ids for q in subset["queries"])
    again = stress.load_stress_source(source_dir, n_queries=4, frames_per_sequence=3, seed=0)
    assert again.fingerprint() == source.fingerprint()
    bench = load_manifest(stress.write_benchmark(subset, tmp_path / "subset"))
    assert len(bench.gallery) == 15 and all(bench.object_boxes(q) for q in bench.queries)


def test_scale_query_hand_computed():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 200, 3), dtype=np.uint8))
    out, box = stress.scale_query(img, (40, 20, 120, 60), 2.0)
    # window = box ± 25 % = (20, 10, 140, 70): 120 × 60 → 240 × 120
    assert out.size == (240, 120) and box == (40.0, 20.0, 200.0, 100.0)
    out, box = stress.scale_query(img, (40, 20, 120, 60), 0.25)
    assert out.size == (30, 15) and box == (5.0, 2.5, 25.0, 12.5)
    out, box = stress.scale_query(img, (0, 0, 40, 40), 1.0)  # clipped at the image corner
    assert out.size == (50, 50) and box == (0.0, 0.0, 40.0, 40.0)
    assert np.array_equal(np.asarray(out), np.asarray(img)[:50, :50])


@pytest.mark.parametrize("factor", stress.FACTORS["query-scale"])
def test_query_scale_benchmark(source, tmp_path, factor):
    bench = load_manifest(stress.build_variant(source, "query-scale", factor, tmp_path))
    for q_src, q in zip(source.subset["queries"], bench.queries):
        w, h = q_src["box"][2] - q_src["box"][0], q_src["box"][3] - q_src["box"][1]
        x0, y0, x1, y1 = q.box
        assert x1 - x0 == pytest.approx(w * factor, abs=0.6) and y1 - y0 == pytest.approx(h * factor, abs=0.6)
        # the block's top-left quadrant colour sits at the same relative place
        src = _pixels(q_src["image"])
        out = _pixels(q.image)
        u, v = 0.25, 0.25
        expected = src[int(q_src["box"][1] + v * h), int(q_src["box"][0] + u * w)]
        got = out[int(y0 + v * (y1 - y0)), int(x0 + u * (x1 - x0))]
        assert np.abs(got - expected).max() <= 12
    assert [g.path for g in bench.gallery] == [Path(g["path"]) for g in source.subset["gallery"]]


@pytest.mark.parametrize("fraction", stress.FACTORS["query-occlusion"])
def test_query_occlusion_fraction(source, tmp_path, fraction):
    bench = load_manifest(stress.build_variant(source, "query-occlusion", fraction, tmp_path))
    for q_src, q in zip(source.subset["queries"], bench.queries):
        changed = (_pixels(q.image) != _pixels(q_src["image"])).any(-1)
        x0, y0, x1, y1 = stress.pixel_rect(q.box, (W, H))
        inside = changed[y0:y1, x0:x1]
        assert inside.mean() == pytest.approx(fraction, abs=0.03)
        assert changed.sum() == inside.sum()  # nothing outside the box
        assert (_pixels(q.image)[changed] == stress.GREY).all()


def test_target_occlusion_fraction(source, tmp_path):
    fraction = 0.4
    bench = load_manifest(stress.build_variant(source, "target-occlusion", fraction, tmp_path))
    assert [q.image for q in bench.queries] == [Path(q["image"]) for q in source.subset["queries"]]
    for g_src, g in zip(source.subset["gallery"], bench.gallery):
        assert g.objects[0].box == tuple(g_src["objects"][0]["box"])  # the truth stays the whole object
        changed = (_pixels(g.path) != _pixels(g_src["path"])).any(-1)
        x0, y0, x1, y1 = stress.pixel_rect(g.objects[0].box, (W, H))
        assert changed[y0:y1, x0:x1].mean() == pytest.approx(fraction, abs=0.03)
        assert changed.sum() == changed[y0:y1, x0:x1].sum()


def test_clutter_pastes_target_exactly_among_distractors(source, tmp_path):
    query_objects = {q["object"] for q in source.subset["queries"]}
    boxes = {}
    for n in (0, 2, 4):
        bench = load_manifest(stress.build_variant(source, "clutter", n, tmp_path))
        assert all(bench.object_boxes(q) for q in bench.queries)
        for g_src, g in zip(source.subset["gallery"], bench.gallery):
            assert g.id == g_src["id"]
            out = _pixels(g.path)
            assert out.shape[:2] == (g.height, g.width)
            targets = [o for o in g.objects if o.object in query_objects]
            src_obj = g_src["objects"][0]
            distractors = [o for o in g.objects if o.object not in query_objects]
            if src_obj["object"] in query_objects:
                assert len(targets) == 1 and targets[0].object == src_obj["object"]
                tx0, ty0, tx1, ty1 = (int(v) for v in targets[0].box)
                sx0, sy0, sx1, sy1 = stress.pixel_rect(src_obj["box"], (W, H))
                assert np.array_equal(out[ty0:ty1, tx0:tx1], _pixels(g_src["path"])[sy0:sy1, sx0:sx1])
                pasted = distractors[-n:] if n else []
                assert all(stress.overlap_area(d.box, targets[0].box) == 0 for d in pasted)
            else:
                assert not targets
            # the background frame's own object, then the n pasted crops, all inside the image
            assert len(distractors) == 1 + n
            assert all(0 <= o.box[0] < o.box[2] <= g.width and 0 <= o.box[1] < o.box[3] <= g.height
                       for o in g.objects)
            boxes[n, g.id] = [o.box for o in distractors[1:]]
    # composite i draws the same first distractors for every N
    for (n, gid), b in boxes.items():
        if n == 2:
            assert boxes[4, gid][:2] == b


def test_build_variant_is_reused_until_its_parameters_change(source, tmp_path):
    folder = stress.build_variant(source, "query-occlusion", 0.2, tmp_path)
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert stress.build_variant(source, "query-occlusion", 0.2, tmp_path) == folder
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp
    stress.build_variant(source, "query-occlusion", 0.2, tmp_path, seed=1)
    assert json.loads((folder / "manifest.json").read_text())["stress"]["seed"] == 1


def test_curves_and_plot(source, tmp_path):
    def fake(name, folder):  # a method whose mAP falls with the occluded fraction
        f = json.loads((folder / "manifest.json").read_text())["stress"]["factor"]
        base = 0.9 if name == "good" else 0.5
        return {"mAP": base - f / 2, "CorLoc@0.5": base - f, "loc-mAP@0.5": 0.0, "R@1": 1.0}

    curves = stress.stress_curves(source, ["good", "bad"], tmp_path, fake, kinds=["query-occlusion"], log=lambda m: None)
    entry = curves["query-occlusion"]
    assert entry["factors"] == list(stress.FACTORS["query-occlusion"])
    assert [p["mAP"] for p in entry["methods"]["good"]] == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert [p["CorLoc@0.5"] for p in entry["methods"]["bad"]] == pytest.approx([0.5, 0.3, 0.1, -0.1])
    png = stress.plot_stress("query-occlusion", entry, tmp_path / "plot.png")
    assert Image.open(png).size[0] > 500


def test_cli_evaluate_then_score_round_trip(source_dir, tmp_path):
    """`python -m retrieval score` on the dump reproduces the table `evaluate` printed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    dump, table_json = tmp_path / "gem.json", tmp_path / "metrics.json"

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "retrieval", *args], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    printed = cli("evaluate", str(source_dir), "--method", "gem", "--dump", str(dump), "--json", str(table_json),
                  "--device", "cpu")
    rescored = cli("score", str(dump), str(source_dir / "manifest.json"))
    # the backbone package prints a "Loaded pretrained weights" line to stdout; compare the tables
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert [line for line in rescored.splitlines() if line.startswith("|")] == table
    assert len(table) == 3 and table[2].startswith("| gem |")
    metrics = score_run(read_dump(dump), source_dir)
    assert json.loads(table_json.read_text()) == [metrics]
    assert 0.0 <= metrics["mAP"] <= 1.0 and metrics["queries"] == 10
