"""Named galleries: safe names, uploads that stay inside the data dir, incremental adds,
no broken gallery after a bad upload, the demo rebuilt when its model differs."""
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval import galleries
from retrieval.galleries import (DEMO, GalleryError, GalleryStore, cropped_query, locate_crop, progress_text,
                                 safe_file_name, safe_gallery_name, save_uploads, skipped_summary, with_time_left)
from retrieval.images import ImageLoadError

torch.set_num_threads(1)


def _photo(path: Path, seed: int, size=(96, 72)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _all_files(folder: Path) -> set[Path]:
    return {p.resolve() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name,expect", [("Holiday 2024", "holiday-2024"), ("cats_1", "cats_1"), ("A", "a")])
def test_gallery_names_accepted(name, expect):
    assert safe_gallery_name(name) == expect


@pytest.mark.parametrize("name", ["", "  ", "../etc", "a/b", "..", ".hidden", "_demo", "-x", "a.b", "x" * 49,
                                  "é\x00"])
def test_gallery_names_refused(name):
    with pytest.raises(GalleryError):
        safe_gallery_name(name)


@pytest.mark.parametrize("name,expect", [
    ("../../etc/passwd", "passwd"), ("..\\..\\evil.jpg", "evil.jpg"), (".hidden.jpg", "hidden.jpg"),
    ("my photo (1).JPG", "my_photo_1_.JPG"), ("", "file"), ("...", "file"), ("/abs/x.png", "x.png"),
])
def test_file_names_stay_plain(name, expect):
    assert safe_file_name(name) == expect


def test_long_file_names_keep_their_extension():
    out = safe_file_name("a" * 300 + ".jpeg")
    assert out.endswith(".jpeg") and len(out) <= 120


def test_save_uploads_dedupes_skips_and_rejects_traversal(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    a = _photo(src / "a.jpg", 0)
    (src / "other").mkdir()
    a2 = _photo(src / "other" / "a.jpg", 1)         # same name, other content
    notes = src / "notes.txt"
    notes.write_text("hello")
    archive = src / "pack.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(_photo(tmp_path / "z.png", 2), "inner/z.png")
        zf.writestr("../../escape.jpg", b"\xff\xd8 not really")
        zf.writestr("readme.md", "text")
    files = tmp_path / "data" / "g" / "files"
    saved, skipped = save_uploads([a, a2, a, notes, archive, src / "missing.jpg"], files)
    names = [p.resolve().relative_to(files.resolve()).as_posix() for p in saved]
    assert names[0] == names[2] == "a.jpg" and names[1].startswith("a-") and names[3] == "pack/inner/z.png"
    assert len(names) == 4
    reasons = {s["path"]: s["reason"] for s in skipped}
    assert "not an image file type" in reasons["notes.txt"]
    assert "unsafe" in reasons["pack.zip/../../escape.jpg"]
    assert reasons["missing.jpg"] == "not a file"
    assert all(files.resolve() in p.parents for p in _all_files(tmp_path / "data"))
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path / "data" / "escape.jpg").exists()


def test_cropped_query_uses_the_source_pictures_resize_factor():
    patch = Image.new("RGB", (200, 100))
    img, box = cropped_query(patch, (1280, 960), None, max_side=640)
    assert img.size == (100, 50) and box is None                         # factor 640 / 1280
    img, box = cropped_query(patch, (1280, 960), (20, 10, 120, 90), max_side=640)
    assert img.size == (100, 50) and box == [10, 5, 60, 45]
    img, _ = cropped_query(patch, (400, 300), None, max_side=640)        # small source: untouched
    assert img is patch
    img, _ = cropped_query(patch, (150, 80), None, max_side=640)         # not a crop of that source
    assert img is patch
    with pytest.raises(ImageLoadError, match="crop a larger region"):
        cropped_query(Image.new("RGB", (10, 10)), (6400, 4800), None, max_side=640)


def test_locate_crop_finds_a_crop_at_any_resolution_and_only_a_real_one():
    scene = Image.open(Path(__file__).resolve().parents[1] / "assets" / "demo" / "queries" / "scenes"
                       / "cat_face_1.jpg").convert("RGB")
    assert locate_crop(scene, scene.crop((109, 88, 259, 232)), max_side=640) == [109, 88, 259, 232]
    big = scene.resize((scene.width * 8, scene.height * 8))                     # matched at 1/6 scale
    buf = io.BytesIO()
    big.crop((872, 704, 2072, 1856)).save(buf, "WEBP", quality=80)             # lossy, as a browser sends it
    x0, y0, x1, y1 = locate_crop(big, Image.open(buf).convert("RGB"), max_side=640)
    assert abs(x0 - 872) <= 6 and abs(y0 - 704) <= 6 and (x1 - x0, y1 - y0) == (1200, 1152)
    assert locate_crop(scene, scene, max_side=640) is None                       # not cropped
    other = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8))
    assert locate_crop(scene, other, max_side=640) is None                       # not from this picture
    assert locate_crop(big, big.crop((0, 0, 16, 16)), max_side=640) is None     # too small at gallery scale


def test_progress_text_and_summary():
    assert progress_text("indexing", 0, 10, 0.0) == "indexing 0/10 images"
    assert progress_text("indexing", 5, 10, 10.0) == "indexing 5/10 images · about 10 s left"
    assert progress_text("indexing", 10, 1000, 60.0).endswith("about 99 min left")
    text = skipped_summary([{"path": f"f{i}", "reason": "bad"} for i in range(7)], limit=2)
    assert text.startswith("Skipped 7 file(s): f0 (bad); f1 (bad); and 5 more")


def test_time_left_counts_a_phase_from_the_end_of_the_previous_one(monkeypatch):
    clock = iter([0.0, 10.0, 20.0])
    monkeypatch.setattr(galleries.time, "perf_counter", lambda: next(clock))
    seen = []
    sink = with_time_left(lambda done, total, text: seen.append((done, total, text)))
    sink(10, 10, "saving uploaded files")            # t = 10
    sink(8, 32, "indexed 8 images")                  # t = 20: 8 images in the 10 s since saving ended
    assert seen == [(10, 10, "saving 10/10 images"), (8, 32, "indexing 8/32 images · about 30 s left")]


@pytest.fixture()
def store(tmp_path, model):
    demo_images = tmp_path / "demo_images"
    demo_images.mkdir()
    for i in range(2):
        _photo(demo_images / f"d{i}.jpg", 10 + i, size=(80, 64))
    return GalleryStore(tmp_path / "data", model, "hash-a", demo_index=tmp_path / "bundled",
                        demo_images=demo_images)


def test_add_search_and_add_more(store, tmp_path):
    up = tmp_path / "up"
    up.mkdir()
    first = [_photo(up / f"p{i}.jpg", i) for i in range(2)]
    broken = up / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    seen = []
    report = store.add_images("Trip", first + [broken, up / "p0.jpg"], progress=lambda d, t, m: seen.append((d, t)))
    assert (report.total_images, report.encoded) == (2, 2)
    assert [s["path"] for s in report.skipped] == ["broken.jpg"]
    assert str(tmp_path) not in report.skipped[0]["reason"]      # no server paths in messages
    assert not (store.data_dir / "trip" / "files" / "broken.jpg").exists()   # not kept, not retried
    assert seen and seen[-1][0] == seen[-1][1]
    assert store.names() == [DEMO, "trip"]
    info = store.info("trip")
    assert (info.images, info.ready) == (2, True)
    engine = store.engine("trip")
    assert store.engine("trip") is engine                                  # cached while unchanged
    result = engine.search(first[1], top=2, rerank=2).results[0]
    assert store.display_path("trip", result.path) == "p1.jpg"
    more = store.add_images("trip", [_photo(up / "p2.jpg", 2), first[0]])
    assert (more.total_images, more.encoded, more.unchanged) == (3, 1, 2)
    assert store.engine("trip") is not engine and len(store.engine("trip").index) == 3


def test_bad_uploads_leave_no_gallery(store, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with pytest.raises(GalleryError, match="No images in the upload.*notes.txt"):
        store.add_images("empty", [notes])
    fake = tmp_path / "fake.png"
    fake.write_text("not a png")
    with pytest.raises(GalleryError, match="None of the uploaded files is a usable image"):
        store.add_images("empty", [fake])
    with pytest.raises(GalleryError, match="Choose a folder"):
        store.add_images("empty", [])
    with pytest.raises(GalleryError, match="read-only"):
        store.add_images("demo", [notes])
    with pytest.raises(GalleryError, match="no gallery named"):
        store.engine("empty")
    assert not (store.data_dir / "empty").exists() and store.names() == [DEMO]


def test_demo_is_rebuilt_when_the_bundled_index_has_another_model(store, tmp_path):
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    (bundled / "manifest.json").write_text(json.dumps({"format": "patch-retrieval-index/1",
                                                       "model_hash": "hash-b", "images": []}))
    assert "rebuilding" in store.prepare_demo(background=False)
    assert store.demo_root() == store.data_dir / "_demo"
    info = store.info(DEMO)
    assert (info.images, info.ready, info.builtin) == (2, True, True)
    assert "_demo" not in store.names()
    assert "using the demo index rebuilt" in store.prepare_demo()
    assert store.display_path(DEMO, store.engine(DEMO).index.image_path(0)) == "d0.jpg"
