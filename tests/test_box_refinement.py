"""The learned box refiner: box deltas, the local correlation against a naive loop, the
untrained refiner changes nothing, the training boxes, and its loss term."""
import math

import pytest
import torch
import torch.nn.functional as F

from retrieval.box_refinement import (BoxRefiner, apply_box_deltas, box_deltas, box_grid, clip_boxes, expand_boxes,
                                      jitter_boxes, local_correlation, refine_boxes)
from retrieval.losses import box_regression_loss


def test_deltas_move_a_box_onto_its_target_and_back():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 8.0, 16.0]])
    targets = torch.tensor([[15.0, 10.0, 95.0, 50.0], [2.0, 4.0, 6.0, 12.0]])
    deltas = box_deltas(boxes, targets)
    # hand values for the first: centre (30, 30) -> (55, 30) over a 40 x 20 box, twice the width and height
    assert torch.allclose(deltas[0], torch.tensor([25 / 40, 0.0, math.log(2), math.log(2)]))
    assert torch.allclose(apply_box_deltas(boxes, deltas), targets, atol=1e-5)
    assert torch.allclose(apply_box_deltas(boxes, torch.zeros(2, 4)), boxes)


def test_size_changes_are_clamped_per_pass():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    out = apply_box_deltas(box, torch.tensor([[0.0, 0.0, 5.0, -5.0]]))
    w, h = out[0, 2] - out[0, 0], out[0, 3] - out[0, 1]
    assert torch.isclose(w, torch.tensor(10 * math.e)) and torch.isclose(h, torch.tensor(10 / math.e))


def test_expand_and_clip():
    box = torch.tensor([[10.0, 10.0, 20.0, 30.0]])
    assert torch.equal(expand_boxes(box, 2.0), torch.tensor([[5.0, 0.0, 25.0, 40.0]]))
    clipped = clip_boxes(torch.tensor([[-5.0, 3.0, 50.0, 70.0]]), torch.tensor([[60, 40]]))
    assert torch.equal(clipped, torch.tensor([[0.0, 3.0, 40.0, 60.0]]))


def test_local_correlation_matches_a_loop():
    torch.manual_seed(0)
    query, window = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 6, 4)
    fast = local_correlation(query, window)
    assert fast.shape == (2, 9, 6, 4)
    for n in range(2):
        for i in range(3):
            for j in range(3):
                for y in range(6):
                    for x in range(4):
                        expected = F.cosine_similarity(query[n, :, i, j], window[n, :, y, x], dim=0)
                        assert torch.isclose(fast[n, i * 3 + j, y, x], expected, atol=1e-5)


def test_box_grid_samples_each_box_on_its_own_map():
    maps = torch.zeros(2, 1, 10, 10)
    maps[1] = 1.0
    grids = box_grid(maps, torch.tensor([[8.0, 8.0, 40.0, 40.0]] * 2), torch.tensor([1, 0]), 8.0, 4)
    assert grids.shape == (2, 1, 4, 4)
    assert torch.all(grids[0] == 1.0) and torch.all(grids[1] == 0.0)


def test_untrained_refiner_leaves_boxes_unchanged():
    torch.manual_seed(0)
    refiner = BoxRefiner(grid=4)
    boxes = torch.tensor([[[10.0, 12.0, 40.0, 30.0], [50.0, 5.0, 70.0, 45.0]]])
    out = refine_boxes(refiner, torch.randn(8, 4, 4), torch.randn(1, 8, 12, 12), boxes, torch.tensor([[96, 96]]),
                       8.0, 2.0, steps=2)
    torch.testing.assert_close(out, boxes, rtol=0, atol=1e-4)


def test_refiner_output_is_applied_each_pass_and_clipped():
    refiner = BoxRefiner(grid=2)
    with torch.no_grad():  # a refiner that always doubles the width and height
        refiner.fc2.bias.copy_(torch.tensor([0.0, 0.0, math.log(2), math.log(2)]))
    boxes = torch.tensor([[[40.0, 40.0, 50.0, 50.0]]])
    sizes = torch.tensor([[100, 100]])
    once = refine_boxes(refiner, torch.randn(3, 2, 2), torch.randn(1, 3, 13, 13), boxes, sizes, 8.0, 2.0, 1)
    twice = refine_boxes(refiner, torch.randn(3, 2, 2), torch.randn(1, 3, 13, 13), boxes, sizes, 8.0, 2.0, 2)
    assert torch.allclose(once, torch.tensor([[[35.0, 35.0, 55.0, 55.0]]]))
    assert torch.allclose(twice, torch.tensor([[[25.0, 25.0, 65.0, 65.0]]]))
    many = refine_boxes(refiner, torch.randn(3, 2, 2), torch.randn(1, 3, 13, 13), boxes, sizes, 8.0, 2.0, 5)
    assert torch.equal(many, torch.tensor([[[0.0, 0.0, 100.0, 100.0]]]))   # clipped to the image
    assert torch.equal(refine_boxes(refiner, torch.randn(3, 2, 2), torch.randn(1, 3, 13, 13), boxes, sizes,
                                    8.0, 2.0, 0), boxes)


def test_jittered_boxes_spread_around_the_target():
    gen = torch.Generator().manual_seed(0)
    target = torch.tensor([[100.0, 100.0, 140.0, 120.0]])
    boxes = jitter_boxes(target, torch.tensor([1.0]), 4000, 0.3, 0.15, 0.1, generator=gen)[0]
    deltas = box_deltas(boxes, target.expand_as(boxes))
    log_area = (deltas[:, 2] + deltas[:, 3]) / 2
    assert abs(float(log_area.mean())) < 0.02 and abs(float(log_area.std()) - 0.3) < 0.03
    assert abs(float(deltas[:, 0].mean())) < 0.02 and 0.1 < float(deltas[:, 0].std()) < 0.25
    aspect = (boxes[:, 2] - boxes[:, 0]) / (boxes[:, 3] - boxes[:, 1])
    assert 0.4 < float((aspect - 1.0).abs().lt(1e-4).float().mean()) < 0.6   # half keep the query's aspect


def test_box_regression_loss_hand_values():
    target = torch.zeros(2, 4)
    assert float(box_regression_loss(target, target, 0.1)) == 0.0
    predicted = torch.tensor([[0.05, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, -2.0]])
    # 0.5·0.05²/0.1 for the first box; (1 − 0.05) + (2 − 0.05) for the second; mean of the two
    expected = (0.5 * 0.05 ** 2 / 0.1 + 0.95 + 1.95) / 2
    assert math.isclose(float(box_regression_loss(predicted, target, 0.1)), expected, rel_tol=1e-6)
    with pytest.raises(ValueError):
        box_regression_loss(torch.zeros(3), torch.zeros(3), 0.1)


def test_refiner_learns_a_constant_scale_error():
    """A refiner trained on boxes that are all 1.5x too large learns to shrink them."""
    torch.manual_seed(0)
    refiner = BoxRefiner(grid=2, hidden=8, fc_hidden=16)
    opt = torch.optim.Adam(refiner.parameters(), lr=1e-2)
    gt = torch.tensor([[20.0, 20.0, 40.0, 40.0]])
    boxes = expand_boxes(gt, 1.5).expand(8, 4)
    target = box_deltas(boxes, gt.expand(8, 4))
    query, window = torch.randn(8, 4, 2, 2), torch.randn(8, 4, 4, 4)
    first = float(box_regression_loss(refiner(query, window), target, 0.1).detach())
    for _ in range(50):
        loss = box_regression_loss(refiner(query, window), target, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1 * first
