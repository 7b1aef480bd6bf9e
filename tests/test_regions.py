"""Peak finding and box placement on the heatmap grid."""
import pytest
import torch

from retrieval.regions import find_peaks, peak_boxes, subcell_peaks


def _bump(h: int, w: int, cy: float, cx: float) -> torch.Tensor:
    """A paraboloid culminating at the fractional cell (cy, cx): ``(1, 1, H, W)``."""
    ys = torch.arange(h, dtype=torch.float32).view(-1, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, -1)
    return (1.0 - 0.01 * ((ys - cy) ** 2 + (xs - cx) ** 2)).view(1, 1, h, w)


def test_subcell_peaks_recover_a_fractional_maximum():
    for cy, cx in [(5.3, 7.8), (4.0, 4.0), (6.49, 2.51), (3.7, 9.2)]:
        heat = _bump(12, 14, cy, cx)
        _, ys, xs = find_peaks(heat, 1)
        assert (int(ys), int(xs)) == (round(cy), round(cx))
        fy, fx = subcell_peaks(heat, ys, xs)
        assert abs(float(fy) - cy) < 1e-3 and abs(float(fx) - cx) < 1e-3


def test_subcell_peaks_leave_borders_and_invalid_neighbours_alone():
    heat = _bump(6, 6, 0.2, 5.0)                  # maximum on the top row
    fy, fx = subcell_peaks(heat, torch.tensor([[0]]), torch.tensor([[5]]))
    assert float(fy) == 0.0 and float(fx) == 5.0
    heat = _bump(6, 6, 2.3, 2.0)
    valid = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    valid[0, 0, 3, 2] = False                     # padding below the peak
    fy, _ = subcell_peaks(heat, torch.tensor([[2]]), torch.tensor([[2]]), valid)
    assert float(fy) == 2.0


def test_peak_boxes_are_centred_on_fractional_cells():
    boxes = peak_boxes(torch.tensor([[2.25]]), torch.tensor([[3.5]]), 8.0, torch.tensor([[16.0]]),
                       torch.tensor([[8.0]]), torch.tensor([[100, 100]]))
    cx, cy = (3.5 + 0.5) * 8, (2.25 + 0.5) * 8
    assert torch.allclose(boxes[0, 0], torch.tensor([cx - 8, cy - 4, cx + 8, cy + 4]))


def test_suppress_overlaps_keeps_the_best_and_says_which():
    from retrieval.regions import suppress_overlaps

    boxes = torch.tensor([[[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 1, 1]]], dtype=torch.float32)
    scores = torch.tensor([[0.5, 0.9, 0.7, float("-inf")]])
    kept, kept_scores, valid, index = suppress_overlaps(boxes, scores, iou=0.3, keep=3)
    assert index.tolist() == [[1, 2, -1]]
    assert torch.equal(kept[0, :2], boxes[0, [1, 2]]) and kept_scores[0, :2].tolist() == pytest.approx([0.9, 0.7])
    assert valid.tolist() == [[True, True, False]]


def test_rank_boxes_weighs_peak_and_region_similarity():
    from retrieval.regions import rank_boxes

    peaks = torch.tensor([[0.80, 0.78, 0.90]])
    sims = torch.tensor([[0.20, 0.90, 0.50]])
    valid = torch.tensor([[True, True, False]])
    scores, order = rank_boxes(peaks, sims, valid, weight_peak=0.8)
    assert order.tolist() == [[1, 0, 2]]                      # .804 beats .68; the invalid slot goes last
    assert scores[0, :2].tolist() == pytest.approx([0.8 * 0.78 + 0.2 * 0.9, 0.8 * 0.8 + 0.2 * 0.2])
    assert scores[0, 2] == float("-inf")
    _, by_peak = rank_boxes(peaks, sims, valid, weight_peak=1.0)
    assert by_peak.tolist() == [[0, 1, 2]]
