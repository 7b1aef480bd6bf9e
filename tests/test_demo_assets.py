"""The bundled demo gallery: manifest format, files, coverage, licences, and that it is
exactly what assets/make_demo_gallery.py generates."""
from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO = ASSETS / "demo"


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_demo_gallery", ASSETS / "make_demo_gallery.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through it
    spec.loader.exec_module(module)  # needs only numpy + PIL; skimage is imported in load_sources()
    return module


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((DEMO / "annotations.json").read_text())


@pytest.fixture(scope="module")
def generator():
    return _load_generator()


def _check_box(box, width, height):
    assert isinstance(box, list) and len(box) == 4 and all(isinstance(v, float) for v in box), box
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (box, width, height)


def test_manifest_has_the_benchmark_format(manifest):
    assert set(manifest) == {"name", "version", "description", "gallery", "queries"}
    assert manifest["name"] == "demo" and manifest["version"] == 1
    for g in manifest["gallery"]:
        assert set(g) == {"id", "path", "width", "height", "objects"}
        assert isinstance(g["id"], str) and isinstance(g["path"], str)
        assert isinstance(g["width"], int) and isinstance(g["height"], int)
        for o in g["objects"]:
            assert set(o) == {"object", "box"} and isinstance(o["object"], str)
            _check_box(o["box"], g["width"], g["height"])
    for q in manifest["queries"]:
        assert set(q) == {"id", "object", "image", "box", "junk"}
        assert isinstance(q["junk"], list)
    ids = [g["id"] for g in manifest["gallery"]] + [q["id"] for q in manifest["queries"]]
    assert len(ids) == len(set(ids))


def test_gallery_files_exist_with_declared_sizes(manifest):
    assert len(manifest["gallery"]) >= 40
    for g in manifest["gallery"]:
        path = DEMO / g["path"]
        assert path.is_file(), path
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.size == (g["width"], g["height"]), path


def test_objects_cover_the_gallery_at_many_sizes(manifest):
    images_per_object = Counter(o for g in manifest["gallery"] for o in {x["object"] for x in g["objects"]})
    assert len(images_per_object) >= 6
    assert min(images_per_object.values()) >= 5, images_per_object
    assert sum(not g["objects"] for g in manifest["gallery"]) >= 2  # pure-distractor images
    for name in images_per_object:
        sides = [max(b[2] - b[0], b[3] - b[1]) for g in manifest["gallery"]
                 for b in (o["box"] for o in g["objects"] if o["object"] == name)]
        assert min(sides) >= 30 and max(sides) <= 300, (name, sides)
        assert max(sides) >= 2 * min(sides), (name, sides)  # small and large instances


def test_queries_reference_existing_files_and_gallery_objects(manifest):
    gallery_objects = {o["object"] for g in manifest["gallery"] for o in g["objects"]}
    query_objects = {q["object"] for q in manifest["queries"]}
    assert query_objects == gallery_objects  # a query per object, each with positives
    for q in manifest["queries"]:
        path = DEMO / q["image"]
        assert path.is_file(), path
        with Image.open(path) as img:
            _check_box(q["box"], *img.size)
    for name in query_objects:
        assert (DEMO / "queries" / f"{name}.jpg").is_file(), name


def test_query_patch_is_the_first_query_photo_cropped_to_its_box(manifest):
    for q in manifest["queries"]:
        if not q["id"].endswith("/q1"):
            continue
        with Image.open(DEMO / q["image"]) as scene, Image.open(DEMO / "queries" / f"{q['object']}.jpg") as patch:
            crop = np.asarray(scene.convert("RGB").crop(tuple(int(v) for v in q["box"])), dtype=np.float32)
            patch = np.asarray(patch.convert("RGB"), dtype=np.float32)
        assert crop.shape == patch.shape, q["id"]
        assert np.abs(crop - patch).mean() < 4.0, q["id"]  # only JPEG re-encoding differs


def test_demo_folder_is_small():
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) < 8 * 1024 * 1024


def test_licenses_name_every_source(generator, manifest):
    text = (ASSETS / "LICENSES.md").read_text()
    for name, source in generator.SOURCES.items():
        assert f"`{source.loader}()`" in text, name
        assert f"skimage/data/{source.file}" in text, name
        assert source.license.lower() in text.lower(), name
        assert source.license in ("public domain", "CC0"), name
    for name, spec in generator.OBJECTS.items():
        assert spec.source in generator.SOURCES and f"`{name}`" in text, name
    assert "make_demo_gallery.py" in text and "CC0" in text


def test_committed_demo_is_what_the_generator_writes(generator, manifest, tmp_path):
    pytest.importorskip("skimage", reason="scikit-image (dev-time dependency of the generator) absent")
    fresh = generator.build(generator.load_sources(), tmp_path)
    assert fresh == manifest
    for rel in [g["path"] for g in manifest["gallery"]] + [q["image"] for q in manifest["queries"]]:
        with Image.open(DEMO / rel) as a, Image.open(tmp_path / rel) as b:
            diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.mean() < 0.5, rel  # exact with the same libjpeg, near-exact across versions
