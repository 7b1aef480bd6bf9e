"""Training: data split, synthetic pairs, tap cache ≡ inference path, optimisation, checkpoints."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval import data as D
from retrieval import train as T
from retrieval.checkpoint import load_model, save_checkpoint
from retrieval.config import RetrievalConfig
from retrieval.images import load_image, resize_max_side
from retrieval.matching import encode_query, encode_query_in_context, match_query
from retrieval.model import RetrievalModel

torch.set_num_threads(1)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model() -> RetrievalModel:
    torch.manual_seed(0)
    return RetrievalModel(RetrievalConfig()).eval()


@pytest.fixture(scope="module")
def demo_images() -> list[Image.Image]:
    files = sorted((DEMO / "gallery").glob("*.jpg"))[:4]
    if len(files) < 4:
        pytest.skip("assets/demo/gallery absent")
    return [resize_max_side(load_image(f), 160)[0] for f in files]


# --------------------------------------------------------------------------- split

def test_split_is_deterministic_and_disjoint():
    names = [f"s{i}" for i in range(15)]
    split = D.split_sequences(reversed(names), heldout=("s3", "s7"))
    assert split == D.split_sequences(names, heldout=("s7", "s3"))
    assert set(split.train).isdisjoint(split.validation)
    assert set(split.train) | set(split.validation) == set(names)
    assert split.validation == ("s3", "s7")
    with pytest.raises(ValueError, match="not in the data"):
        D.split_sequences(names, heldout=("nope",))


def test_heldout_manifest_keeps_only_heldout_sequences():
    manifest = {"name": "b", "gallery": [{"id": f"{s}/{i:04d}", "path": f"images/{s}/{i:04d}.jpg"}
                                         for s in ("A", "B") for i in range(3)],
                "queries": [{"id": "A/q1", "image": "images/A/0009.jpg", "junk": ["A/0001", "B/0000"]},
                            {"id": "B/q1", "image": "images/B/0009.jpg", "junk": []}]}
    held = D.heldout_manifest(manifest, ["A"], root="/data")
    assert [g["id"] for g in held["gallery"]] == ["A/0000", "A/0001", "A/0002"]
    assert [q["id"] for q in held["queries"]] == ["A/q1"]
    assert held["queries"][0]["junk"] == ["A/0001"]
    assert held["gallery"][0]["path"] == "/data/images/A/0000.jpg"
    assert manifest["gallery"][0]["path"] == "images/A/0000.jpg"  # the input is not modified


def test_tracking_split_has_no_sequence_overlap():
    train_json = DATA / "tracking_dev" / "train.json"
    if not train_json.is_file():
        pytest.skip("../shared/data/tracking_dev absent")
    frames = D.load_train_json(train_json)
    split = D.split_sequences(frames)
    assert len(frames) == 15 and len(split.validation) == 6 and len(split.train) == 9
    assert set(split.train).isdisjoint(split.validation)
    manifest = json.loads((DATA / "tracking_dev" / "manifest.json").read_text())
    held = D.heldout_manifest(manifest, split.validation)
    assert {D.sequence_of(g["id"]) for g in held["gallery"]} == set(split.validation)
    # no held-out image is reachable from the training frames
    train_paths = {fr.path for name in split.train for fr in frames[name]}
    assert not any((DATA / "tracking_dev" / g["path"]) in train_paths for g in held["gallery"])


# --------------------------------------------------------------------------- synthetic pairs

def test_paste_identity_puts_the_crop_exactly_at_the_box():
    bg, obj = noise_image(120, 90, 1), noise_image(30, 20, 2)
    out, box = D.paste_object(bg, obj, D.PasteParams(position=(0.25, 0.75)))
    x0, y0, x1, y1 = map(int, box)
    assert (x1 - x0, y1 - y0) == (30, 20)
    assert (x0, y0) == (round(0.25 * 90), round(0.75 * 70))
    assert np.array_equal(np.asarray(out.crop((x0, y0, x1, y1))), np.asarray(obj))
    a, b = np.asarray(out).copy(), np.asarray(bg).copy()
    a[y0:y1, x0:x1] = b[y0:y1, x0:x1] = 0
    assert np.array_equal(a, b)  # nothing changed outside the box


def test_paste_transformed_box_is_tight():
    bg, obj = noise_image(200, 150, 3), noise_image(40, 24, 4)
    params = D.PasteParams(scale=1.7, angle=25.0, brightness=1.2, contrast=0.8, blur=1.0, occlusion=0.3,
                           position=(0.6, 0.3), occluder_corner=2)
    out, box = D.paste_object(bg, obj, params)
    x0, y0, x1, y1 = map(int, box)
    changed = np.any(np.asarray(out) != np.asarray(bg), axis=2)
    rows, cols = np.nonzero(changed)
    assert rows.min() >= y0 and rows.max() < y1 and cols.min() >= x0 and cols.max() < x1
    # tight: every side of the box touches a pasted pixel
    assert changed[y0].any() and changed[y1 - 1].any() and changed[:, x0].any() and changed[:, x1 - 1].any()
    w, h = D.rotated_size(40 * 1.7, 24 * 1.7, 25.0)
    assert abs((x1 - x0) - w) <= 3 and abs((y1 - y0) - h) <= 3


def test_fit_scale_keeps_the_object_inside():
    params = D.PasteParams(scale=4.0, angle=30.0)
    s = D.fit_scale((100, 60), (160, 120), params)
    w, h = D.rotated_size(100 * s, 60 * s, 30.0)
    assert w <= 0.9 * 160 + 1e-6 and h <= 0.9 * 120 + 1e-6
    assert D.fit_scale((100, 60), (160, 120), D.PasteParams(scale=0.01)) == pytest.approx(8 / 60)
    assert D.fit_scale((10, 300), (100, 100), D.PasteParams()) is None


def test_make_composites_labels_the_pasted_object(tmp_path):
    for i in range(3):
        noise_image(160, 120, 10 + i).save(tmp_path / f"a{i}.png")
    sources = D.folder_sources(tmp_path)
    comps = D.make_composites(sources, 4, seed=5, crop_sides=(24, 48))
    again = D.make_composites(sources, 4, seed=5, crop_sides=(24, 48))
    assert len(comps) == 4
    for c, d in zip(comps, again):
        assert c.box == d.box and np.array_equal(np.asarray(c.image), np.asarray(d.image))
        x0, y0, x1, y1 = c.box
        assert 0 <= x0 < x1 <= c.image.width and 0 <= y0 < y1 <= c.image.height
        p = c.params
        assert 0.25 * 0.999 <= p.scale <= 4.0 * 1.001
        assert p.occlusion <= 0.5 and abs(p.angle) <= 30


# --------------------------------------------------------------------------- taps ≡ inference

def test_cached_taps_reproduce_the_search_encoders(model, demo_images):
    split = D.TapSplit(model.backbone)
    img = demo_images[0]
    box = (40.5, 30.0, 90.0, 71.5)
    cached_q = D.encode_query_context(split, img, box, model.config, "q", "t")
    with torch.no_grad():
        ours = T.query_encoding(model, split, cached_q, "cpu")
        ref = encode_query_in_context(model, img, box)
        assert ours.scales == ref.scales and ours.sizes == ref.sizes
        for a, b in zip(ours.templates, ref.templates):
            for level in a:
                torch.testing.assert_close(a[level], b[level])
        torch.testing.assert_close(ours.descriptor, ref.descriptor)
        taps = D.encode_images(split, [img])[0]
        maps = T.gallery_maps(model, split, D.CachedImage("g", img.size, frozenset(), taps), "cpu")
        from retrieval.images import to_tensor
        ref_maps = model.encode_gallery(to_tensor(img)[None])
        for level in maps:
            torch.testing.assert_close(maps[level], ref_maps[level][0])


def test_window_crop_equals_slicing_the_maps(model, demo_images):
    split = D.TapSplit(model.backbone)
    img = demo_images[1]                                  # 160 × 120
    full = D.CachedImage("g", img.size, frozenset({"t"}), D.encode_images(split, [img])[0], (70.0, 40.0, 100.0, 70.0))
    rng = np.random.default_rng(0)
    for _ in range(5):
        window = D.crop_window(full.size, full.box, (64, 64), rng)
        x0, y0, x1, y1 = window
        assert x0 % 32 == 0 and y0 % 32 == 0
        assert x0 <= 70 and y0 <= 40 and x1 >= 100 and y1 >= 70
        crop = D.crop_image(full, window)
        assert crop.size == (x1 - x0, y1 - y0)
        assert crop.box == (70.0 - x0, 40.0 - y0, 100.0 - x0, 70.0 - y0)
        for name, stride in (("c3", 8), ("c4", 16), ("c5", 32)):
            h, w = crop.taps[name].shape[-2:]
            assert (h, w) == (-(-crop.size[1] // stride), -(-crop.size[0] // stride))
            torch.testing.assert_close(crop.taps[name], full.taps[name][..., y0 // stride:y0 // stride + h,
                                                                          x0 // stride:x0 // stride + w])


def test_unfrozen_split_recomputes_the_same_taps(model, demo_images):
    from retrieval.images import to_tensor

    x = to_tensor(demo_images[2])[None]
    split = D.TapSplit(model.backbone, unfreeze_last=2)
    with torch.no_grad():
        ref = model.backbone(x)
        live = split.live(split.frozen(x))
    for name in ("c3", "c4", "c5"):
        torch.testing.assert_close(live[name], ref[name])
    assert set(split.frozen(x)) == {"c3", "c4", "x"}   # c5 comes from the last two blocks


# --------------------------------------------------------------------------- optimisation, checkpoint

def _fixed_batch(model, demo_images) -> tuple[D.TapSplit, list[D.Triple]]:
    split = D.TapSplit(model.backbone)
    triples = []
    for i, (obj_img, bg, neg) in enumerate(((0, 1, 2), (2, 3, 0))):
        query = demo_images[obj_img].crop((30, 20, 70, 60))
        comp, box = D.paste_object(demo_images[bg], query, D.PasteParams(scale=1.2, angle=10.0,
                                                                          position=(0.3 + 0.3 * i, 0.5)))
        taps = D.encode_images(split, [comp, demo_images[neg]])
        pos = D.CachedImage(f"pos{i}", comp.size, frozenset({f"o{i}", "bg"}), taps[0], box)
        neg_im = D.CachedImage(f"neg{i}", demo_images[neg].size, frozenset({"bg"}), taps[1])
        q = D.encode_query_context(split, demo_images[obj_img], (30.0, 20.0, 70.0, 60.0), model.config,
                                   f"q{i}", f"o{i}", positives=(pos.key,))
        triples.append(D.Triple(q, pos, neg_im))
    return split, triples


def test_twenty_steps_on_a_fixed_batch_lower_the_loss(demo_images):
    torch.manual_seed(0)
    model = RetrievalModel(RetrievalConfig())
    split, batch = _fixed_batch(model, demo_images)
    cfg = T.TrainConfig(steps=20, warmup=1, lr=3e-3, batch_size=2, window=(), lambda_peak=1.0)
    groups = T.param_groups(model, split, T.ALL_HEADS)

    def total() -> float:
        with torch.no_grad():
            return T.total_loss(T.batch_losses(model, split, batch, cfg, "cpu"), cfg.weights())[1]["total"]

    before = total()
    _, logs = T.train_steps(model, split, groups, None, cfg, torch.device("cpu"), fixed_batch=batch)
    after = total()
    assert len(logs) == 20 and all(set(T.TERMS) <= set(log) for log in logs)
    assert after < 0.9 * before, (before, after)
    assert not model.phi.bias.requires_grad and float(model.phi.bias.abs().max()) == 0.0


def test_saved_then_loaded_checkpoint_gives_identical_outputs(demo_images, tmp_path):
    torch.manual_seed(1)
    model = RetrievalModel(RetrievalConfig())
    split, batch = _fixed_batch(model, demo_images)
    cfg = T.TrainConfig(steps=2, warmup=1, lr=1e-2, batch_size=2, window=())
    T.train_steps(model, split, T.param_groups(model, split, T.ALL_HEADS), None, cfg, torch.device("cpu"),
                  fixed_batch=batch)
    model.eval()
    path = tmp_path / "heads.pt"
    save_checkpoint(T.TrainedWeights(model), path, {"note": "test", "torch": torch.__version__})  # not a str
    loaded, model_hash = load_model(path)
    assert not model_hash.startswith("untrained") and not loaded.training
    patch = demo_images[0].crop((30, 20, 70, 60))
    from retrieval.images import to_tensor
    gallery = torch.stack([to_tensor(im) for im in demo_images[:3]])
    sizes = torch.tensor([[im.height, im.width] for im in demo_images[:3]])
    with torch.no_grad():
        outs = [match_query(m, encode_query(m, patch), m.encode_gallery(gallery), sizes) for m in (model, loaded)]
    for name in ("score", "fused", "per_level", "boxes", "box_scores"):
        torch.testing.assert_close(getattr(outs[0], name), getattr(outs[1], name), rtol=0, atol=0)
    # training did change the heads, so the comparison is not between two untrained models
    untrained = RetrievalModel(RetrievalConfig())
    assert not torch.equal(untrained.fpn.inner_blocks[0][0].weight, loaded.fpn.inner_blocks[0][0].weight)
    assert not torch.equal(untrained.box_refiner.fc2.weight, loaded.box_refiner.fc2.weight)


def test_checkpoint_from_before_the_box_refiner_loads_with_boxes_unrefined(demo_images, tmp_path):
    from retrieval.checkpoint import read_checkpoint
    from retrieval.images import to_tensor

    torch.manual_seed(2)
    model = RetrievalModel(RetrievalConfig())
    with torch.no_grad():
        model.head.fc2.weight.normal_(0, 0.01)            # some trained descriptor head
        model.box_refiner.fc2.bias.fill_(0.3)              # a refiner that would move every box
    path = tmp_path / "old.pt"
    save_checkpoint(T.TrainedWeights(model), path, {})
    data = read_checkpoint(path)
    data["state"] = {k: v for k, v in data["state"].items() if not k.startswith("box_refiner.")}
    torch.save(data, path)
    loaded, _ = load_model(path)
    assert torch.equal(loaded.head.fc2.weight, model.head.fc2.weight)
    refiner = loaded.box_refiner.fc2
    assert float(refiner.weight.detach().abs().max()) == 0.0 and float(refiner.bias.detach().abs().max()) == 0.0
    patch = demo_images[0].crop((30, 20, 70, 60))
    gallery = torch.stack([to_tensor(im) for im in demo_images[:2]])
    sizes = torch.tensor([[im.height, im.width] for im in demo_images[:2]])
    with torch.no_grad():
        query = encode_query(loaded, patch)
        refined = match_query(loaded, query, loaded.encode_gallery(gallery), sizes)
        peak_boxes = match_query(loaded, query, loaded.encode_gallery(gallery), sizes,
                                 config=loaded.config.replace(refine_steps=0))
    torch.testing.assert_close(refined.boxes, peak_boxes.boxes, rtol=0, atol=1e-3)   # px: float rounding only


def test_config_file_and_flags(tmp_path):
    parser = argparse.ArgumentParser()
    T.add_arguments(parser)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"steps": 7, "lr": 0.5, "heldout": ["a", "b"]}))
    args = parser.parse_args(["--config", str(cfg_file), "--lr", "0.25", "--amp", "false",
                              "--synthetic-dirs", "x", "y", "--gamma", "4", "--model-config", '{"top_k": 3}'])
    cfg = T.config_from_args(args)
    assert (cfg.steps, cfg.lr, cfg.amp, cfg.heldout, cfg.synthetic_dirs, cfg.gamma, cfg.model_config) == \
        (7, 0.25, False, ("a", "b"), ("x", "y"), 4.0, {"top_k": 3})
    assert T.config_from_args(parser.parse_args([])) == T.TrainConfig()
    with pytest.raises(ValueError, match="unknown training option"):
        T.TrainConfig.from_dict({"stepz": 1})


def test_curves_plot_terms_missing_from_some_steps(tmp_path):
    """The box term is absent from a step whose batch has no pair that trains the refiner."""
    rows = [{"step": i + 1, "nce": 1.0 / (i + 1), "total": 2.0, **({"box": 0.5} if i % 2 else {})} for i in range(30)]
    val = [{"step": 0, "mAP": 0.5, "CorLoc@0.5": 0.4, "loc-mAP@0.5": 0.3, "coarse_mAP": 0.2}]
    T.plot_curves(tmp_path / "curves.png", rows, val)
    T.write_csv(tmp_path / "log.csv", rows)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "log.csv").read_text().splitlines()[0] == "step,nce,total,box"


def test_box_term_compares_each_box_with_the_query_at_its_scale():
    from retrieval.matching import QueryEncoding

    query = QueryEncoding((20, 20), [0.5, 1.0, 2.0], [(10, 10), (20, 20), (40, 40)], [], torch.zeros(4),
                          torch.zeros(3, 4, 2, 2))
    boxes = torch.tensor([[0.0, 0.0, s, s] for s in (10.0, 14.0, 21.0, 30.0, 40.0, 90.0)])
    # side 14 is x0.7: log-nearer 0.5 (|log 1.4| = .336) than 1 (.357); 30 is x1.5: nearer 2 (.288) than 1 (.405)
    assert T.nearest_scales(boxes, query).tolist() == [0, 0, 1, 2, 2, 2]


def test_lr_schedule_warms_up_then_decays():
    cfg = T.TrainConfig(steps=100, warmup=10)
    assert T.lr_factor(0, cfg) == pytest.approx(0.1) and T.lr_factor(9, cfg) == pytest.approx(1.0)
    assert T.lr_factor(10, cfg) == pytest.approx(1.0) and T.lr_factor(100, cfg) == pytest.approx(0.0)
    assert T.lr_factor(55, cfg) == pytest.approx(0.5)


def test_trained_modules_limit_what_learns(demo_images):
    torch.manual_seed(0)
    model = RetrievalModel(RetrievalConfig())
    split, batch = _fixed_batch(model, demo_images)
    cfg = T.TrainConfig(steps=3, warmup=1, lr=1e-2, batch_size=2, window=())
    before = {k: v.clone() for k, v in model.head_state_dict().items()}
    groups = T.param_groups(model, split, ("head",))
    T.train_steps(model, split, groups, None, cfg, torch.device("cpu"), fixed_batch=batch)
    changed = {k for k, v in model.head_state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("head.") for k in changed), changed
