"""Peak finding and box placement on the heatmap grid."""
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
