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
    return numerator / _window_norm(features, h, w, "valid", eps)


def _fft_size(n: int) -> int:
    """Smallest 2^a·3^b·5^c ≥ n: sizes the FFT handles fast."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _window_norm(features: torch.Tensor, h: int, w: int, padding: str, eps: float) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, 1, H', W')`` L2 norm of every h×w window (box filter over squares)."""
    energy = features.pow(2).sum(dim=1, keepdim=True)
    if padding == "same":
        energy = F.pad(energy, same_padding(h, w))
    window_energy = F.avg_pool2d(energy, (h, w), stride=1) * float(h * w)
    return window_energy.clamp_min(0.0).sqrt().clamp_min(eps)


def _integral(energy: torch.Tensor, pad: int) -> torch.Tensor:
    """Summed-area table of ``(B, H, W)`` zero-padded by ``pad`` on every side: ``(B, H+2p+1, W+2p+1)``."""
    padded = F.pad(energy, (pad, pad, pad, pad))
    table = padded.double().cumsum(1).cumsum(2)  # double: differences of large sums stay exact
    return F.pad(table, (1, 0, 1, 0))


def _window_norm_from_integral(table: torch.Tensor, pad: int, height: int, width: int, h: int, w: int,
                               padding: str, eps: float) -> torch.Tensor:
    """Window norms read off a summed-area table built with :func:`_integral`: ``(B, 1, H', W')``."""
    if padding == "same":
        top, left = pad - (h - 1) // 2, pad - (w - 1) // 2
        rows, cols = height, width
    else:
        top, left = pad, pad
        rows, cols = height - h + 1, width - w + 1
    y0, x0 = top, left
    y1, x1 = top + h, left + w
    sums = (table[:, y1:y1 + rows, x1:x1 + cols] - table[:, y0:y0 + rows, x1:x1 + cols]
            - table[:, y1:y1 + rows, x0:x0 + cols] + table[:, y0:y0 + rows, x0:x0 + cols])
    return sums.clamp_min(0.0).sqrt().float().clamp_min(eps).unsqueeze(1)


def _uses_fft(height: int, width: int, h: int, w: int) -> bool:
    """Direct correlation costs ∝ h·w per output cell, the FFT ∝ log of the map size:
    past a few cells per template the FFT wins (measured on CPU: break-even near 4×4)."""
    return h * w > 12


def cosine_cross_correlation_many(features: torch.Tensor, templates: list[torch.Tensor],
                                  padding: str = "same", eps: float = 1e-6) -> list[torch.Tensor]:
    """Eq. 3 for several templates of different sizes against the same maps.

    Small templates use the direct convolution; larger ones share one FFT of the
    gallery map, and each then costs one product summed over channels and one inverse
    transform whatever its size (the direct convolution costs ``h·w`` times more). Window
    norms come from one summed-area table. Same results as
    :func:`cosine_cross_correlation` up to float rounding (~1e-5).

    Args:
        features: ``(B, C, H, W)``.
        templates: list of ``(C, h_i, w_i)``.
        padding: ``"same"`` or ``"valid"`` (see :func:`cosine_cross_correlation`).

    Returns:
        list of ``(B, 1, H'_i, W'_i)``.
    """
    if padding not in ("same", "valid"):
        raise ValueError(f"padding must be 'same' or 'valid', not {padding!r}")
    b, c, height, width = features.shape
    pad = max(max(t.shape[-2:]) for t in templates)
    table = _integral(features.pow(2).sum(dim=1), pad)
    big = [t for t in templates if _uses_fft(height, width, *t.shape[-2:])]
    if big:
        fh = _fft_size(height + max(t.shape[-2] for t in big) - 1)
        fw = _fft_size(width + max(t.shape[-1] for t in big) - 1)
        spectrum = torch.fft.rfft2(features, s=(fh, fw))                      # (B, C, fh, fw/2+1)
    outputs = []
    for t in templates:
        h, w = t.shape[-2:]
        if padding == "valid" and (height < h or width < w):
            outputs.append(features.new_zeros(b, 1, 0, 0))
            continue
        t_unit = t / t.flatten().norm().clamp_min(eps)
        if _uses_fft(height, width, h, w):
            kernel = torch.fft.rfft2(t_unit.flip(-2, -1), s=(fh, fw))        # (C, fh, fw/2+1)
            full = torch.fft.irfft2(torch.einsum("bcij,cij->bij", spectrum, kernel), s=(fh, fw))
            # full[n] holds the window whose top-left cell is n − (h − 1)
            if padding == "same":
                numerator = full[:, h // 2: h // 2 + height, w // 2: w // 2 + width].unsqueeze(1)
            else:
                numerator = full[:, h - 1: height, w - 1: width].unsqueeze(1)
        else:
            padded = F.pad(features, same_padding(h, w)) if padding == "same" else features
            numerator = F.conv2d(padded, t_unit.unsqueeze(0))
        outputs.append(numerator / _window_norm_from_integral(table, pad, height, width, h, w, padding, eps))
    return outputs


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
