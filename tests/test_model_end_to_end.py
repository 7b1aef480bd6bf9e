"""Real pixels through the real pretrained backbone: a pasted object is found and boxed."""
import pytest
import torch
from PIL import Image

from conftest import DEMO
from retrieval.images import load_image, to_tensor
from retrieval.matching import encode_query, match_query
from retrieval.evaluation.metrics import box_iou


@pytest.fixture(scope="module")
def scene_and_object():
    clutter = load_image(DEMO / "gallery" / "0003.jpg")          # 640×480 textured collage
    obj = load_image(DEMO / "queries" / "coffee_cup.jpg").resize((80, 96))
    return clutter, obj


@pytest.mark.parametrize("scale,where", [(0.5, (420, 300)), (1.0, (120, 260)), (2.0, (300, 40))])
def test_pasted_object_is_boxed(model, scene_and_object, scale, where):
    clutter, obj = scene_and_object
    size = (round(obj.width * scale), round(obj.height * scale))
    scene = clutter.copy()
    scene.paste(obj.resize(size, Image.BICUBIC), where)
    truth = [where[0], where[1], where[0] + size[0], where[1] + size[1]]
    with torch.no_grad():
        query = encode_query(model, obj)
        maps = model.encode_gallery(to_tensor(scene).unsqueeze(0))
        out = match_query(model, query, maps, torch.tensor([[scene.height, scene.width]]))
    top = out.boxes[0, 0].tolist()
    assert box_iou(top, truth) >= 0.5, (top, truth, float(out.best_scale[0]))
    assert float(out.best_scale[0]) == pytest.approx(scale)
    assert out.fused.shape[-2:] == maps["p3"].shape[-2:]
    assert out.per_level.shape[1] == 3


def test_object_image_outscores_image_without_it(model, scene_and_object):
    clutter, obj = scene_and_object
    with_obj = clutter.copy()
    with_obj.paste(obj, (200, 200))
    batch = torch.stack([to_tensor(with_obj), to_tensor(clutter)])
    with torch.no_grad():
        out = match_query(model, encode_query(model, obj), model.encode_gallery(batch),
                          torch.tensor([[480, 640], [480, 640]]))
    assert out.score[0] > out.score[1] + 0.05


def test_tiny_and_huge_queries_still_match(model, scene_and_object):
    clutter, _ = scene_and_object
    maps = model.encode_gallery(to_tensor(clutter).unsqueeze(0))
    sizes = torch.tensor([[480, 640]])
    for patch in (clutter.crop((10, 10, 18, 18)), clutter.crop((0, 0, 640, 480)), clutter.crop((5, 5, 6, 6))):
        with torch.no_grad():
            out = match_query(model, encode_query(model, patch), maps, sizes)
        assert torch.isfinite(out.score).all() and torch.isfinite(out.boxes).all()


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_query_box_encoded_in_context_is_boxed(model, scene_and_object, scale):
    """The app/CLI path: the query is a box inside a photo, encoded with its surroundings."""
    from retrieval.matching import encode_query_in_context

    clutter, obj = scene_and_object
    source = load_image(DEMO / "gallery" / "0010.jpg")
    source.paste(obj, (300, 200))
    query_box = (300, 200, 300 + obj.width, 200 + obj.height)
    size = (round(obj.width * scale), round(obj.height * scale))
    scene = clutter.copy()
    scene.paste(obj.resize(size, Image.BICUBIC), (150, 120))
    truth = [150, 120, 150 + size[0], 120 + size[1]]
    with torch.no_grad():
        query = encode_query_in_context(model, source, query_box)
        out = match_query(model, query, model.encode_gallery(to_tensor(scene).unsqueeze(0)),
                          torch.tensor([[scene.height, scene.width]]))
    assert query.patch_size == obj.size
    assert box_iou(out.boxes[0, 0].tolist(), truth) >= 0.5
