"""Learned box refinement: from a peak box of the query's size to the object's extent.

A peak box has the query's size times the best query scale, centred on a correlation peak,
so it is off in position and in size (on held-out tracking pairs the log errors of width and
height correlate at .85, std .28). The refiner looks at how the query's parts lie inside
the box's surroundings and predicts the shift and the size change. Measured, it mostly
re-centres (held-out CorLoc@0.5 of the fine stage .52 → .63) and leaves the scale error
about where it was (``benchmarks/box_refinement.py``):

query box cells φ(P3) at the box's scale ─► (C, G, G) grid ──┐
gallery ψ(P3) around the box (×2 side) ─► (C, 2G, 2G) grid ─► local correlation (G², 2G, 2G)
  ─► two convs ─► MLP ─► deltas (dx, dy, dlog w, dlog h) ─► refined box (applied ``steps`` times)

It sees only cosine similarities between query and gallery cells, never the gallery
features themselves, so it learns geometry (where each query part matched), not what
objects look like: with a branch on the gallery features added, it overfitted the nine
training sequences within a few hundred steps. Its output layer starts at zero, so an
untrained refiner leaves every box as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

# A predicted log size change is clamped to ±this per pass (a factor of e at most).
MAX_LOG_SCALE = 1.0


def expand_boxes(boxes: torch.Tensor, factor: float) -> torch.Tensor:
    """Boxes scaled by ``factor`` about their centres: ``(..., 4)`` → ``(..., 4)``."""
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2
    half = (boxes[..., 2:] - boxes[..., :2]) / 2 * factor
    return torch.cat([centre - half, centre + half], dim=-1)


def box_deltas(boxes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What moves ``boxes`` onto ``targets``: ``(N, 4)``, ``(N, 4)`` → ``(N, 4)`` as
    (centre shift x / box width, centre shift y / box height, log width ratio, log height ratio)."""
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    tw, th = targets[:, 2] - targets[:, 0], targets[:, 3] - targets[:, 1]
    return torch.stack([((targets[:, 0] + targets[:, 2]) - (boxes[:, 0] + boxes[:, 2])) / 2 / bw,
                        ((targets[:, 1] + targets[:, 3]) - (boxes[:, 1] + boxes[:, 3])) / 2 / bh,
                        torch.log(tw / bw), torch.log(th / bh)], dim=1)


def apply_box_deltas(boxes: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`box_deltas` (log sizes clamped to ±``MAX_LOG_SCALE``): ``(N, 4)``, ``(N, 4)`` → ``(N, 4)``."""
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 + deltas[:, 0] * bw
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 + deltas[:, 1] * bh
    w = bw * deltas[:, 2].clamp(-MAX_LOG_SCALE, MAX_LOG_SCALE).exp()
    h = bh * deltas[:, 3].clamp(-MAX_LOG_SCALE, MAX_LOG_SCALE).exp()
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)


def clip_boxes(boxes: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """Boxes ``(N, 4)`` clipped to their images ``(N, 2)`` (height, width)."""
    h = image_sizes[:, 0:1].to(boxes.dtype)
    w = image_sizes[:, 1:2].to(boxes.dtype)
    x = boxes[:, 0::2].clamp(min=0)
    y = boxes[:, 1::2].clamp(min=0)
    x = torch.minimum(x, w)
    y = torch.minimum(y, h)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def box_grid(features: torch.Tensor, boxes: torch.Tensor, batch_index: torch.Tensor, stride: float,
             cells: int) -> torch.Tensor:
    """ROIAlign of each box to a ``cells × cells`` grid.

    Args:
        features: ``(B, C, H, W)`` maps, cell ``i`` centred at pixel ``stride·(i + 0.5)``.
        boxes: ``(N, 4)`` pixel boxes; batch_index: ``(N,)`` which map each box is on.

    Returns:
        ``(N, C, cells, cells)``.
    """
    rois = torch.cat([batch_index.to(features.dtype).unsqueeze(1), boxes.to(features.dtype)], dim=1)
    # one bilinear sample per output cell: the cells are about a map cell wide or finer for the
    # boxes this samples, and 2×2 samples made ROIAlign half of the refiner's time
    return roi_align(features, rois, cells, 1.0 / stride, 1, True)


def local_correlation(query: torch.Tensor, window: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Cosine of every query cell with every window cell.

    Args:
        query: ``(N, C, g, g)`` grids of the query box; window: ``(N, C, h, w)`` grids of the gallery
            surroundings of the box it is compared with.

    Returns:
        ``(N, g·g, h, w)``: channel ``i·g + j`` is query cell (i, j)'s similarity map over the window.
    """
    q = F.normalize(query.flatten(2), dim=1, eps=eps)
    x = F.normalize(window, dim=1, eps=eps)
    return torch.einsum("ncq,nchw->nqhw", q, x)


class BoxRefiner(nn.Module):
    """Deltas of :func:`box_deltas` from a query grid and a gallery window grid.

    ``forward(query (N, C, g, g), window (N, C, 2g, 2g))`` → ``(N, 4)``; zero at initialisation.
    """

    def __init__(self, grid: int = 4, hidden: int = 32, fc_hidden: int = 128) -> None:
        super().__init__()
        self.grid = grid
        self.conv1 = nn.Conv2d(grid * grid, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(hidden * grid * grid, fc_hidden)
        self.fc2 = nn.Linear(fc_hidden, 4)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, query: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        x = local_correlation(query, window)
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def refiner_deltas(refiner: BoxRefiner, query_grid: torch.Tensor, gallery: torch.Tensor, boxes: torch.Tensor,
                   batch_index: torch.Tensor, stride: float, context: float) -> torch.Tensor:
    """One pass of the refiner over boxes on gallery maps.

    Args:
        query_grid: ``(C, g, g)`` (one query) or ``(N, C, g, g)``.
        gallery: ``(B, C, H, W)`` ψ maps; boxes: ``(N, 4)`` pixels; batch_index: ``(N,)``.
        context: the window is each box scaled by this about its centre.

    Returns:
        ``(N, 4)`` deltas.
    """
    window = box_grid(gallery, expand_boxes(boxes, context), batch_index, stride, 2 * refiner.grid)
    if query_grid.dim() == 3:
        query_grid = query_grid.unsqueeze(0).expand(len(boxes), -1, -1, -1)
    return refiner(query_grid.to(window.dtype), window)


def refine_boxes(refiner: BoxRefiner, query_grid: torch.Tensor, gallery: torch.Tensor, boxes: torch.Tensor,
                 image_sizes: torch.Tensor, stride: float, context: float, steps: int) -> torch.Tensor:
    """Apply the refiner ``steps`` times to every image's boxes.

    Args:
        query_grid: ``(C, g, g)`` for every box, or ``(B, K, C, g, g)`` one per box;
        gallery: ``(B, C, H, W)`` ψ maps; boxes: ``(B, K, 4)`` pixels
            (pass ``boxes[:, :n]`` to refine only the first n of each image);
        image_sizes: ``(B, 2)`` (height, width) pixels.

    Returns:
        ``(B, K, 4)`` refined boxes, clipped to each image.
    """
    b, k, _ = boxes.shape
    if steps <= 0 or b * k == 0:
        return boxes
    flat = boxes.reshape(-1, 4)
    if query_grid.dim() == 5:
        query_grid = query_grid.flatten(0, 1)
    index = torch.arange(b, device=boxes.device).repeat_interleave(k)
    sizes = image_sizes.to(boxes.device)[index]
    for _ in range(steps):
        deltas = refiner_deltas(refiner, query_grid, gallery, flat, index, stride, context)
        flat = clip_boxes(apply_box_deltas(flat, deltas.to(flat.dtype)), sizes)
        # a box clipped to nothing (outside its image) keeps a minimal size
        flat = torch.cat([flat[:, :2], torch.maximum(flat[:, 2:], flat[:, :2] + 1.0)], dim=1)
    return flat.view(b, k, 4)


def jitter_boxes(targets: torch.Tensor, query_aspect: torch.Tensor, samples: int, scale_std: float,
                 shift_std: float, aspect_std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training boxes around ground-truth boxes, distributed like the fine stage's peak boxes.

    Half keep the query's aspect ratio (as a peak box does), half the target's with small noise;
    all are scaled by ``exp(N(0, scale_std))`` and shifted by ``N(0, shift_std)`` of their size.

    Args:
        targets: ``(N, 4)`` pixel boxes; query_aspect: ``(N,)`` width / height of each query.
        generator: the random source (None: torch's global one).

    Returns:
        ``(N, samples, 4)``.
    """
    n = len(targets)
    device, dtype = targets.device, targets.dtype
    rand = lambda *shape: torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)  # noqa: E731
    tw = (targets[:, 2] - targets[:, 0]).clamp_min(1.0).unsqueeze(1)
    th = (targets[:, 3] - targets[:, 1]).clamp_min(1.0).unsqueeze(1)
    scale = (rand(n, samples) * scale_std).exp()
    keep_query_aspect = torch.rand(n, samples, generator=generator).to(device) < 0.5
    area = tw * th * scale ** 2
    qa = query_aspect.to(dtype).unsqueeze(1)
    w = torch.where(keep_query_aspect, (area * qa).sqrt(), tw * scale * (rand(n, samples) * aspect_std).exp())
    h = torch.where(keep_query_aspect, (area / qa).sqrt(), th * scale * (rand(n, samples) * aspect_std).exp())
    cx = (targets[:, 0:1] + targets[:, 2:3]) / 2 + rand(n, samples) * shift_std * w
    cy = (targets[:, 1:2] + targets[:, 3:4]) / 2 + rand(n, samples) * shift_std * h
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)

