"""Dense cosine cross-correlation (eq. 3 of the method).

H(u, v) = <t, X[:, u:u+h, v:v+w]> / (||t|| · ||X[:, u:u+h, v:v+w]||)

The template ``t`` is normalised once; the window norms of the gallery map come from a
box filter over the channel-summed squares, so the whole map costs two convolutions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def same_padding(h: int, w: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding that keeps the output at the input size.

    Output cell ``i`` then holds the window whose top-left cell is ``i - (h - 1) // 2``,
    i.e. whose centre lies at cell ``i + window_offset(h)``.
    """
    return (w - 1) // 2, w // 2, (h - 1) // 2, h // 2


def window_offset(size: int) -> float:
    """Centre of a ``same``-padded window relative to its output cell: 0 (odd) or 0.5 (even)."""
    return 0.0 if size % 2 else 0.5


def cosine_cross_correlation(features: torch.Tensor, template: torch.Tensor,
                             padding: str = "same", eps: float = 1e-6) -> torch.Tensor:
    """Eq. 3 for a batch of gallery maps and one or more templates of the same size.

    Args:
        features: ``(B, C, H, W)`` gallery feature maps ψ(X).
        template: ``(C, h, w)`` or ``(T, C, h, w)`` query templates φ(Z) (any h, w ≥ 1).
        padding: ``"valid"`` — only windows fully inside the map, output
            ``(B, T, H - h + 1, W - w + 1)`` (a template larger than the map gives an
            empty map); ``"same"`` — the map is zero-padded so that the output is
            ``(B, T, H, W)``; windows reaching over the border count the missing cells
            as zero features, which lowers their score instead of inventing a match.
        eps: floor of the norms, so that all-zero windows give 0 and not NaN.

    Returns:
        ``(B, T, H', W')`` cosine similarities in [-1, 1].
    """
    if template.dim() == 3:
        template = template.unsqueeze(0)
    if features.dim() != 4 or template.dim() != 4 or features.shape[1] != template.shape[1]:
        raise ValueError(f"features {tuple(features.shape)} and template {tuple(template.shape)} "
                         "must be (B, C, H, W) and (T, C, h, w) with the same C")
    h, w = template.shape[-2:]
    if padding == "same":
        features = F.pad(features, same_padding(h, w))
    elif padding != "valid":
        raise ValueError(f"padding must be 'same' or 'valid', not {padding!r}")
    if features.shape[-2] < h or features.shape[-1] < w:
        return features.new_zeros(features.shape[0], template.shape[0], 0, 0)
    t_norm = template.flatten(1).norm(dim=1).clamp_min(eps).view(-1, 1, 1, 1)
    numerator = F.conv2d(features, template / t_norm)
    energy = features.pow(2).sum(dim=1, keepdim=True)
    window_energy = F.avg_pool2d(energy, (h, w), stride=1) * float(h * w)
    window_norm = window_energy.clamp_min(0.0).sqrt().clamp_min(eps)
    return numerator / window_norm


def cosine_cross_correlation_naive(features: torch.Tensor, template: torch.Tensor,
                                   eps: float = 1e-6) -> torch.Tensor:
    """Slow reference of eq. 3 (valid windows only): ``(B, C, H, W)``, ``(C, h, w)`` → ``(B, 1, H-h+1, W-w+1)``."""
    b, _, height, width = features.shape
    h, w = template.shape[-2:]
    t = template.flatten()
    out = features.new_zeros(b, 1, max(height - h + 1, 0), max(width - w + 1, 0))
    for n in range(b):
        for u in range(height - h + 1):
            for v in range(width - w + 1):
                window = features[n, :, u:u + h, v:v + w].flatten()
                denom = t.norm().clamp_min(eps) * window.norm().clamp_min(eps)
                out[n, 0, u, v] = (t * window).sum() / denom
    return out
