"""The app through its named API, as a ``gradio_client`` user sees it.

``python app.py`` runs in a subprocess on a free port with a temporary data dir.
Covers: the one-click examples find their object at rank 1 (4 at once, from 4
clients), bad inputs get a clear message and never a traceback, uploads are indexed
incrementally and stay inside the data dir, a 2,000-image upload does not hold up a
search, and no file outside the galleries and assets is served.
"""
import io
import json
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app_server import ROOT, AppServer

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from app import EXAMPLES  # noqa: E402

DEMO = ROOT / "assets" / "demo"
FAST = dict(top=3, rerank=5)      # settings for searches whose ranking is not under test


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("app_data")
    app = AppServer(data / "galleries", data / "app.log").start()
    app.wait_for_demo()
    yield app
    app.stop()
    assert "Traceback" not in app.log(), app.log()


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False, download_files=False)


def search(client, image, box="", gallery="demo", top=10, rerank=100, top_k=5, scales="", gamma=0):
    return client.predict(handle_file(str(image)), box, gallery, top, rerank, top_k, scales, gamma,
                          api_name="/search")


def images_with(obj: str) -> set[str]:
    ann = json.loads((DEMO / "annotations.json").read_text())
    return {Path(g["path"]).name for g in ann["gallery"] if any(o["object"] == obj for o in g["objects"])}


def _jpeg(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, "JPEG", quality=90, **kw)
    return path


def test_api_lists_its_endpoints_and_the_demo(client):
    assert {"/search", "/galleries", "/index"} <= set(client.view_api(print_info=False, return_format="dict")
                                                       ["named_endpoints"])
    galleries = client.predict(api_name="/galleries")
    demo = next(g for g in galleries if g["name"] == "demo")
    assert demo["ready"] and demo["images"] == 56, galleries


def test_examples_find_their_object_at_rank_1_four_at_a_time(server):
    """Each example from its own client, four running at once: right object at rank 1 and
    each answer belongs to its own query (no state shared between users)."""
    assert len(EXAMPLES) >= 3

    def run(example):
        obj, path, box = example
        c = Client(server.url, verbose=False, download_files=False)
        return example, search(c, ROOT / path, box)

    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(run, EXAMPLES))
    elapsed = time.perf_counter() - started
    for (obj, path, box), out in answers:
        expected = Image.open(ROOT / path).size if not box else tuple(
            round(b - a) for a, b in zip(map(float, box.split(",")[:2]), map(float, box.split(",")[2:])))
        assert tuple(out["query_size"]) == expected, (obj, out["query_size"])
        top = out["results"][0]
        assert top["rank"] == 1 and top["name"] in images_with(obj), (obj, out["results"][:3])
        assert [r["score"] for r in out["results"]] == sorted((r["score"] for r in out["results"]), reverse=True)
        assert len(top["boxes"]) == len(top["box_scores"]) >= 1 and top["box"] == top["boxes"][0]
    print(f"{len(EXAMPLES)} example searches, 4 at a time: {elapsed:.1f} s")


def test_refine_switch_changes_the_boxes_not_the_ranking(client):
    """``refine`` False gives the peak boxes; a call that leaves it out gets the refined ones."""
    obj, path, box = EXAMPLES[0]
    refined = search(client, ROOT / path, box, top=5, rerank=20)
    peak = client.predict(handle_file(str(ROOT / path)), box, "demo", 5, 20, 5, "", 0, False, api_name="/search")
    assert [r["name"] for r in refined["results"]] == [r["name"] for r in peak["results"]]
    assert [r["score"] for r in refined["results"]] == pytest.approx([r["score"] for r in peak["results"]])
    assert any(r["box"] != p["box"] for r, p in zip(refined["results"], peak["results"])), "the refiner moved no box"
    # the boxes after the first are peak boxes either way
    assert all(r["boxes"][1:] == p["boxes"][1:] for r, p in zip(refined["results"], peak["results"]))


@pytest.mark.parametrize("kind", ["grayscale", "cmyk", "rgba_png", "palette_png", "exif_rotated", "large"])
def test_unusual_but_valid_images_are_searched(client, tmp_path, kind):
    base = Image.open(DEMO / "queries" / "coffee_cup.jpg").convert("RGB")
    path = tmp_path / f"{kind}.png"
    if kind == "grayscale":
        path = _jpeg(base.convert("L"), tmp_path / "g.jpg")
    elif kind == "cmyk":
        path = _jpeg(base.convert("CMYK"), tmp_path / "c.jpg")
    elif kind == "rgba_png":
        rgba = base.convert("RGBA")
        rgba.putalpha(Image.new("L", base.size, 128))
        rgba.save(path)
    elif kind == "palette_png":
        base.convert("P", palette=Image.ADAPTIVE).save(path)
    elif kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6                     # rotate 90° clockwise to display
        path = _jpeg(base, tmp_path / "r.jpg", exif=exif.tobytes())
    else:
        path = _jpeg(base.resize((base.width * 20, base.height * 20)), tmp_path / "big.jpg")
    out = search(client, path, **FAST)
    assert len(out["results"]) == 3
    w, h = out["query_size"]
    if kind == "exif_rotated":
        assert (w, h) == (base.height, base.width)
    elif kind == "large":
        assert max(w, h) == 640              # the query source follows the gallery resize rule
    else:
        assert (w, h) == base.size


def _expect_error(fn, *needles):
    with pytest.raises(AppError) as err:
        fn()
    text = str(err.value)
    assert "Traceback" not in text and "/tmp/" not in text and all(n in text for n in needles), text
    return text


def test_bad_queries_get_a_clear_message(client, tmp_path):
    good = DEMO / "queries" / "rocket.jpg"
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:400])
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (4, 4)).save(tiny)
    huge = tmp_path / "huge.png"
    Image.new("1", (9500, 9000)).save(huge)        # 85.5 Mpx, more than the limit, a small file
    _expect_error(lambda: search(client, truncated), "'truncated.jpg' is corrupt or truncated")
    _expect_error(lambda: search(client, notes), "not a readable image")
    _expect_error(lambda: search(client, tiny), "4×4 px", "at least 8 px")
    _expect_error(lambda: search(client, huge), "more than the limit")
    _expect_error(lambda: search(client, good, box="10,10,11,11"), "1×1 px", "too small")
    _expect_error(lambda: search(client, good, box="5,5,5,9"), "is empty")
    _expect_error(lambda: search(client, good, box="1,2,3"), "four")
    _expect_error(lambda: search(client, good, gallery="nope"), "no gallery named 'nope'")
    _expect_error(lambda: search(client, good, gallery="../../etc"), "not a usable gallery name")
    _expect_error(lambda: search(client, good, scales="big"), "query scales")
    _expect_error(lambda: client.predict(None, "", "demo", 3, 5, 5, "", 0, api_name="/search"), "query image")


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_upload_index_add_more_and_bad_uploads(client, server, tmp_path):
    gallery_imgs = sorted((DEMO / "gallery").glob("*.jpg"))
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 nothing more")
    first = client.predict([handle_file(str(p)) for p in gallery_imgs[:2]] + [handle_file(str(notes)),
                           handle_file(str(broken))], "Trip", api_name="/index")
    assert (first["gallery"], first["total_images"], first["encoded"]) == ("trip", 2, 2)
    assert sorted(s["path"] for s in first["skipped"]) == ["broken.jpg", "notes.txt"]
    more = client.predict([handle_file(str(p)) for p in gallery_imgs[1:4]], "trip", api_name="/index")
    assert (more["total_images"], more["encoded"], more["unchanged"]) == (4, 2, 2)
    out = search(client, gallery_imgs[2], gallery="trip", top=4, rerank=4)
    assert out["results"][0]["name"] == gallery_imgs[2].name
    assert {g["name"] for g in client.predict(api_name="/galleries")} == {"demo", "trip"}

    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../../escaped.jpg", gallery_imgs[0].read_bytes())
        zf.writestr("/abs/escaped2.jpg", gallery_imgs[0].read_bytes())
        zf.write(gallery_imgs[5], "ok/inside.jpg")
    before = _files_under(server.data_dir.parent)
    report = client.predict([handle_file(str(archive))], "zipped", api_name="/index")
    assert report["total_images"] == 1
    assert sum("unsafe" in s["reason"] for s in report["skipped"]) == 2
    new = _files_under(server.data_dir.parent) - before
    assert new and all((server.data_dir / "zipped") in p.parents or p.name == "app.log" for p in new), new

    _expect_error(lambda: client.predict([handle_file(str(notes))], "empty", api_name="/index"),
                  "No images in the upload", "notes.txt")
    _expect_error(lambda: client.predict([handle_file(str(broken))], "empty", api_name="/index"),
                  "None of the uploaded files is a usable image")
    _expect_error(lambda: client.predict([handle_file(str(gallery_imgs[0]))], "../outside", api_name="/index"),
                  "not a usable gallery name")
    _expect_error(lambda: client.predict([handle_file(str(gallery_imgs[0]))], "demo", api_name="/index"),
                  "read-only")
    _expect_error(lambda: client.predict([], "never-made", api_name="/index"), "Choose a folder")
    assert not (server.data_dir / "empty").exists() and not (server.data_dir / "never-made").exists()
    assert not (server.data_dir.parent / "outside").exists()


def test_a_2000_image_upload_does_not_hold_up_searches(server, tmp_path):
    rng = np.random.default_rng(0)
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(2000):
            img = Image.new("RGB", (64, 48), tuple(int(v) for v in rng.integers(0, 256, 3)))
            img.paste(tuple(int(v) for v in rng.integers(0, 256, 3)), (8, 8, 40, 40))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=80)
            zf.writestr(f"shots/{i:04d}.jpg", buf.getvalue())
    uploader = Client(server.url, verbose=False, download_files=False)
    job = uploader.submit([handle_file(str(archive))], "many", api_name="/index")
    deadline = time.perf_counter() + 60
    while not (server.data_dir / "many").exists() and time.perf_counter() < deadline:
        time.sleep(0.2)                                    # the upload has reached the indexer
    searcher = Client(server.url, verbose=False, download_files=False)
    started = time.perf_counter()
    out = search(searcher, DEMO / "queries" / "cat_face.jpg", **FAST)
    took = time.perf_counter() - started
    assert out["results"] and not job.done(), "the search should finish while the upload is still indexing"
    report = job.result(timeout=240)
    assert report["total_images"] == 2000 and report["encoded"] == 2000
    print(f"search during a 2,000-image indexing run: {took:.1f} s; indexing took {report['seconds']:.0f} s")


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_no_file_outside_galleries_and_assets_is_served(server):
    base = server.url + "gradio_api/file="
    assert _status(base + str(DEMO / "gallery" / "0001.jpg")) == 200
    assert _status(base + str(ROOT / "app.py")) == 403
    assert _status(base + str(ROOT / "gallery_index" / "demo" / "manifest.json")) == 403
    assert _status(base + "/etc/passwd") == 403
    inside = next(iter(_files_under(server.data_dir)), None)
    if inside is not None:
        assert _status(base + str(inside)) == 403
