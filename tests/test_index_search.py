"""Gallery index + coarse-to-fine search: persistence, incremental updates, safety."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import DEMO, ROOT
from retrieval import build as build_module
from retrieval.build import build_index, extract_zip, remove_images
from retrieval.checkpoint import untrained_hash
from retrieval.index import GalleryIndex, ModelMismatch, build_faiss
from retrieval.search import SearchEngine

GALLERY = sorted((DEMO / "gallery").glob("*.jpg"))


@pytest.fixture(scope="module")
def model_hash(model):
    return untrained_hash(model.config)


@pytest.fixture()
def small_gallery(tmp_path):
    folder = tmp_path / "gallery"
    (folder / "sub").mkdir(parents=True)
    for i, src in enumerate(GALLERY[:6]):
        shutil.copy(src, folder / ("sub" if i % 2 else "") / src.name)
    return folder


def _search(engine, top=5):
    resp = engine.search(DEMO / "queries" / "cat_face.jpg", top=top)
    return [(r.path.name, round(r.score, 5), [round(v, 2) for v in r.box]) for r in resp.results]


def test_build_search_reopen_identical(model, model_hash, small_gallery, tmp_path):
    root = tmp_path / "idx"
    report = build_index(root, small_gallery, model, model_hash, show_bar=False)
    assert report.encoded == 6 and report.total_images == 6
    first = _search(SearchEngine(GalleryIndex.open(root), model))
    again = _search(SearchEngine(GalleryIndex.open(root, model_hash=model_hash), model))
    assert first == again and len(first) == 5
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["model_hash"] == model_hash and manifest["faiss_type"] == "exact"
    assert {"path", "sha", "width", "height"} <= set(manifest["images"][0])
    resp = SearchEngine(GalleryIndex.open(root), model).search(DEMO / "queries" / "cat_face.jpg", top=2)
    r = resp.results[0]
    assert r.heatmap().shape == (r.size[1], r.size[0])
    assert set(r.level_heatmaps()) == {"p3", "p4", "p5"}
    assert r.to_json().keys() == {"path", "score", "box"}


def test_coarse_regions_and_their_boxes(model, model_hash, small_gallery, tmp_path):
    """The best region reported per image is the stored vector with the top inner product,
    and its box is that region's window mapped back to original pixels (a naive scan)."""
    import torch

    from retrieval.encoding import coarse_regions

    root = tmp_path / "idx"
    build_index(root, small_gallery, model, model_hash, show_bar=False)
    index = GalleryIndex.open(root)
    vectors, owners = index.region_vectors()
    query = vectors[len(vectors) // 2] + 0.1 * vectors[3]
    query /= np.linalg.norm(query)
    images, scores, regions = index.coarse_search_regions(query, len(index))
    assert sorted(images.tolist()) == list(range(len(index)))
    assert np.array_equal(index.coarse_search(query, len(index))[0], images)
    shortlist = index.coarse_search_regions(query, len(index) - 1)     # all but one image
    assert np.array_equal(shortlist[0], images[:-1]) and np.array_equal(shortlist[2], regions[:-1])
    assert np.allclose(shortlist[1], scores[:-1], atol=1e-5)
    index.use_coarse_index(build_faiss(vectors, "hnsw"), owners)         # the HNSW path of large galleries
    via_hnsw = index.coarse_search_regions(query, len(index) - 1)
    # approximate: distinct images, best first, each score that of the region it names, the top one exact
    assert len(set(via_hnsw[0].tolist())) == len(index) - 1 and np.all(np.diff(via_hnsw[1]) <= 1e-6)
    for img, score, region in zip(*via_hnsw):
        assert abs(float(vectors[owners == img][region] @ query) - float(score)) < 1e-5
    assert via_hnsw[0][0] == images[0] and via_hnsw[2][0] == regions[0]
    for img, score, region in zip(images, scores, regions):
        own = vectors[owners == img] @ query
        assert int(np.argmax(own)) == region and abs(float(own.max()) - float(score)) < 1e-5
        rec = index.images[int(img)]
        expected = coarse_regions(rec.stored_height, rec.stored_width, model.config)[region] / rec.scale
        assert torch.allclose(torch.tensor(index.region_box(int(img), int(region))), expected)
        box = index.region_box(int(img), int(region))
        assert 0 <= box[0] < box[2] <= rec.width + 1e-3 and 0 <= box[1] < box[3] <= rec.height + 1e-3


def test_large_gallery_goes_through_an_hnsw_file(model, model_hash, small_gallery, tmp_path, monkeypatch):
    """Above ``exact_index_max`` region vectors a FAISS HNSW file is written, reopened and searched;
    its best image is the exact ranking's."""
    root = tmp_path / "idx"
    monkeypatch.setattr(model, "config", model.config.replace(exact_index_max=100))
    build_index(root, small_gallery, model, model_hash, show_bar=False)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["faiss_type"] == "hnsw" and (root / manifest["faiss_file"]).is_file()
    index = GalleryIndex.open(root)
    assert index.uses_faiss()
    vectors, _ = index.region_vectors()
    query = vectors[7] / np.linalg.norm(vectors[7])
    images, scores, regions = index.coarse_search_regions(query, 3)
    exact = index._exact_coarse(query, 3)
    assert len(images) == 3 and images[0] == exact[0][0] and regions[0] == exact[2][0]
    assert abs(float(scores[0]) - float(exact[1][0])) < 1e-5


def test_index_with_float32_regions_and_flat_faiss_file_still_searches(model, model_hash, small_gallery, tmp_path):
    """Indexes written before regions were stored as float16 (and flat ones with a FAISS file)
    keep working: same ranking, same best regions."""
    import faiss

    root = tmp_path / "idx"
    build_index(root, small_gallery, model, model_hash, show_bar=False)
    index = GalleryIndex.open(root)
    vectors, owners = index.region_vectors()
    query = vectors[5] / np.linalg.norm(vectors[5])
    expected = index.coarse_search_regions(query, 4)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["faiss_file"] is None and not list(root.glob("*.faiss"))
    for f in (root / "chunks").glob("*.regions.npy"):
        assert np.load(f).dtype == np.float16
        np.save(f, np.load(f).astype(np.float32))
    faiss.write_index(build_faiss(vectors, "flat"), str(root / "regions-1-old.faiss"))
    manifest["faiss_file"] = "regions-1-old.faiss"
    (root / "manifest.json").write_text(json.dumps(manifest))
    old = GalleryIndex.open(root).coarse_search_regions(query, 4)
    assert np.array_equal(old[0], expected[0]) and np.array_equal(old[2], expected[2])
    assert np.allclose(old[1], expected[1], atol=1e-3)


def test_incremental_add_encodes_only_new_files(model, model_hash, small_gallery, tmp_path, monkeypatch):
    root = tmp_path / "idx"
    build_index(root, small_gallery, model, model_hash, show_bar=False)
    calls = []
    real = build_module.encode_gallery_images
    monkeypatch.setattr(build_module, "encode_gallery_images",
                        lambda m, imgs, **kw: calls.append(len(imgs)) or real(m, imgs, **kw))
    extra = tmp_path / "extra"
    extra.mkdir()
    for src in GALLERY[6:9]:
        shutil.copy(src, extra / src.name)
    report = build_index(root, [extra], model, model_hash, add=True, show_bar=False)
    assert sum(calls) == 3 and report.encoded == 3 and len(GalleryIndex.open(root)) == 9
    calls.clear()
    report = build_index(root, small_gallery, model, model_hash, add=True, show_bar=False)
    assert sum(calls) == 0 and report.unchanged == 6
    # a changed file is re-encoded, a vanished one removed when mirroring
    changed = next(small_gallery.glob("*.jpg"))
    shutil.copy(GALLERY[20], changed)
    (small_gallery / "sub" / GALLERY[1].name).unlink()
    report = build_index(root, small_gallery, model, model_hash, show_bar=False)
    assert sum(calls) == 1 and report.removed == 4 and len(GalleryIndex.open(root)) == 5
    assert remove_images(root, [changed]) == 1 and len(GalleryIndex.open(root)) == 4
    live = {r.chunk for r in GalleryIndex.open(root).images}
    assert {p.name.split(".")[0] for p in (root / "chunks").iterdir()} == live   # old chunks collected


def test_model_change_is_detected(model, model_hash, small_gallery, tmp_path):
    root = tmp_path / "idx"
    build_index(root, small_gallery, model, model_hash, show_bar=False)
    with pytest.raises(ModelMismatch, match="rebuild"):
        build_index(root, small_gallery, model, "another-model", show_bar=False)
    with pytest.raises(ModelMismatch):
        GalleryIndex.open(root, model_hash="another-model")
    build_index(root, small_gallery, model, "another-model", rebuild=True, show_bar=False)
    assert GalleryIndex.open(root).model_hash == "another-model"


def test_bad_files_are_skipped_and_listed(model, model_hash, small_gallery, tmp_path):
    (small_gallery / "notes.jpg").write_text("not an image")
    (small_gallery / "truncated.png").write_bytes(GALLERY[0].read_bytes()[:300])
    from PIL import Image
    Image.new("RGB", (3, 3)).save(small_gallery / "tiny.png")
    (small_gallery / "empty.jpg").write_bytes(b"")
    root = tmp_path / "idx"
    report = build_index(root, small_gallery, model, model_hash, show_bar=False)
    assert report.total_images == 6
    skipped = {Path(s["path"]).name for s in GalleryIndex.open(root).manifest["skipped"]}
    assert skipped == {"notes.jpg", "truncated.png", "tiny.png", "empty.jpg"}


def test_empty_gallery_gives_empty_results(model, model_hash, tmp_path):
    (tmp_path / "nothing").mkdir()
    build_index(tmp_path / "idx", tmp_path / "nothing", model, model_hash, show_bar=False)
    resp = SearchEngine(GalleryIndex.open(tmp_path / "idx"), model).search(DEMO / "queries" / "rocket.jpg")
    assert resp.results == []


def test_zip_slip_rejected(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escape.jpg", GALLERY[0].read_bytes())
        zf.writestr("/abs/escape2.jpg", GALLERY[0].read_bytes())
        zf.writestr("ok/fine.jpg", GALLERY[0].read_bytes())
    dest = tmp_path / "out" / "x"
    files, skipped = extract_zip(archive, dest)
    assert [f.name for f in files] == ["fine.jpg"]
    assert len(skipped) == 2 and all("unsafe" in s["reason"] for s in skipped)
    assert not (tmp_path / "out" / "escape.jpg").exists() and not Path("/abs/escape2.jpg").exists()


def test_killed_build_leaves_previous_index_loadable(model, model_hash, small_gallery, tmp_path, monkeypatch):
    root = tmp_path / "idx"
    build_index(root, small_gallery, model, model_hash, show_bar=False)
    before = [r.path for r in GalleryIndex.open(root).images]
    big = tmp_path / "big"
    big.mkdir()
    for i in range(40):
        shutil.copy(GALLERY[i % len(GALLERY)], big / f"{i:03d}.jpg")

    def unchanged():
        index = GalleryIndex.open(root)
        assert [r.path for r in index.images] == before
        assert all(index.maps(i)["p3"].shape[0] == model.config.fpn_channels for i in range(len(index)))
        assert len(SearchEngine(index, model).search(DEMO / "queries" / "rocket.jpg", top=3).results) == 3

    # 1. SIGKILL in the middle of encoding (seen on the progress bar, so the timing cannot race)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "retrieval", "index", str(big), "--index", str(root),
                             "--add", "--checkpoint", "none", "--batch-size", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = b""
    while not re.search(rb"\b([4-9]|[1-3]\d)/40\b", seen):
        byte = proc.stderr.read(1)
        assert byte, f"the build ended before it could be killed: {seen.decode(errors='replace')[-300:]}"
        seen += byte
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    unchanged()

    # 2. a crash after the new chunks are written but before the manifest lists them
    def crash(*args, **kwargs):
        raise RuntimeError("killed before commit")

    with monkeypatch.context() as patch:
        patch.setattr(GalleryIndex, "commit", crash)
        with pytest.raises(RuntimeError, match="killed before commit"):
            build_index(root, [big], model, model_hash, add=True, show_bar=False)
    unchanged()

    # the next build finishes the job and cleans up the orphaned files
    build_index(root, [big], model, model_hash, add=True, show_bar=False)
    assert len(GalleryIndex.open(root)) == 6 + 40


def test_concurrent_builds_do_not_corrupt(small_gallery, tmp_path):
    root = tmp_path / "idx"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "retrieval", "index", str(small_gallery), "--index", str(root),
           "--checkpoint", "none"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    index = GalleryIndex.open(root)
    assert len(index) == 6 and len({r.path for r in index.images}) == 6


def test_tracking_dev_crop_finds_its_sequence(model, model_hash, tracking_dev, tmp_path):
    manifest = json.loads((tracking_dev / "manifest.json").read_text())
    sequences = ["David", "Dog1", "Jumping", "Car1"]
    files = [tracking_dev / g["path"] for g in manifest["gallery"]
             if g["id"].split("/")[0] in sequences and int(g["id"].split("/")[1]) % 3 == 0]
    build_index(tmp_path / "idx", files, model, model_hash, show_bar=False)
    engine = SearchEngine(GalleryIndex.open(tmp_path / "idx"), model)
    for q in manifest["queries"]:
        if q["object"] in sequences and q["id"].endswith("q50"):
            resp = engine.search(tracking_dev / q["image"], box=q["box"], top=3)
            assert resp.results[0].path.parent.name == q["object"], (q["id"], resp.results[0].path)


def test_padded_fine_batches_match_one_image_at_a_time(model, model_hash, tmp_path):
    """Images of slightly different sizes share a zero-padded fine-stage batch; each image's
    score, boxes and heatmap must be what it gets alone."""
    from PIL import Image

    from retrieval.images import padded_batches

    folder = tmp_path / "gallery"
    folder.mkdir()
    for i, src in enumerate(GALLERY[:5]):
        Image.open(src).convert("RGB").resize((600 - 7 * i, 450 - 5 * i)).save(folder / f"{i}.png")
    root = tmp_path / "idx"
    build_index(root, folder, model, model_hash, show_bar=False)
    index = GalleryIndex.open(root)
    sizes = {(rec.stored_width, rec.stored_height) for rec in index.images}
    assert len(sizes) == 5 and len(padded_batches(sorted(sizes), 32)) == 1
    engine = SearchEngine(index, model)
    query = DEMO / "queries" / "cat_face.jpg"
    alone = {r.path.name: r for r in engine.search(query, top=5, batch_size=1).results}
    batched = engine.search(query, top=5, batch_size=32).results
    assert len(batched) == 5
    for r in batched:
        ref = alone[r.path.name]
        assert abs(r.score - ref.score) <= 1e-5
        assert all(abs(a - b) <= 1e-2 for a, b in zip(r.box, ref.box))
        assert (r.fused_cells - ref.fused_cells).abs().max() <= 1e-4


def test_untrained_model_is_the_same_in_every_process():
    """The untrained heads include random (orthogonal) FPN projections: they must not depend on
    the global RNG or the process, or an index built in one process would be searched with
    other weights in the next under the same model hash."""
    import torch

    from retrieval.model import RetrievalModel

    torch.manual_seed(1)
    first = RetrievalModel()
    torch.manual_seed(2)
    second = RetrievalModel()
    a, b = first.head_state_dict(), second.head_state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert untrained_hash(first.config) == untrained_hash(second.config)
    # another process with another thread count builds the same model (up to QR's last bits)
    script = ("import torch; from retrieval.model import RetrievalModel; "
              "m = RetrievalModel(); torch.set_grad_enabled(False); print(float(m.fpn.inner_blocks[1][0].weight.sum()), "
              "float(m.fpn.inner_blocks[2][0].weight.abs().sum()), float(m.head.fc1.weight.sum()))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    there = [float(v) for v in out.stdout.split()]
    with torch.no_grad():
        here = [float(first.fpn.inner_blocks[1][0].weight.sum()), float(first.fpn.inner_blocks[2][0].weight.abs().sum()),
                float(first.head.fc1.weight.sum())]
    assert np.allclose(there, here, rtol=1e-4, atol=1e-5), (there, here)
