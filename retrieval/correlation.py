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


def _direct_is_cheaper(h: int, w: int) -> bool:
    """Whether one direct convolution with every template zero-padded to ``h×w`` beats the FFT.

    The direct convolution costs ∝ h·w per output cell and hardly depends on the number
    of templates; the FFT path costs a transform of the whole map plus a product summed
    over channels per template. Measured on CPU (1 thread, 32 maps of 64 channels, five
    templates): on 60×80 maps, direct 67 ms at 2×2, 107 at 4×4, 126 at 5×5 against the
    FFT's 103–107; on 30×40 maps the crossing is also near 5×5.
    """
    return h * w <= 16


def _centred_in(templates: list[torch.Tensor], h: int, w: int) -> torch.Tensor:
    """``(T, C, h, w)``: each ``(C, h_i, w_i)`` template placed so that a ``same``-padded
    correlation with the padded kernel equals the ``same``-padded correlation with the template."""
    out = templates[0].new_zeros(len(templates), templates[0].shape[0], h, w)
    for i, t in enumerate(templates):
        th, tw = t.shape[-2:]
        oy, ox = (h - 1) // 2 - (th - 1) // 2, (w - 1) // 2 - (tw - 1) // 2
        out[i, :, oy:oy + th, ox:ox + tw] = t
    return out


def _same_numerators_direct(features: torch.Tensor, units: list[torch.Tensor], h: int, w: int) -> list[torch.Tensor]:
    """``(B, C, H, W)`` × unit templates (at most ``h×w``) → per template ``(B, 1, H, W)`` ``same``
    numerators, one conv."""
    out = F.conv2d(F.pad(features, same_padding(h, w)), _centred_in(units, h, w))   # (B, T, H, W)
    return list(out.split(1, dim=1))


def channel_products(spectra: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """``Σ_c spectra[b, c] · kernels[t, c]``: ``(B, C, *S)``, ``(T, C, *S)`` → ``(B, T, *S)``.

    The same as ``einsum("bc...,tc...->bt...")``, but a loop of in-place multiply-adds over
    the channels: on CPU, einsum runs complex inputs as a batched matmul with one tiny
    matrix per frequency, which is 2-3x slower (tested against einsum). Other devices keep
    einsum: 64 small kernel launches would cost more there than one contraction.
    """
    if spectra.device.type != "cpu":
        return torch.einsum("bc...,tc...->bt...", spectra, kernels)
    out = spectra[:, None, 0] * kernels[None, :, 0]
    for c in range(1, spectra.shape[1]):
        out.addcmul_(spectra[:, None, c], kernels[None, :, c])
    return out


def _same_numerators_fft(features: torch.Tensor, units: list[torch.Tensor], h: int, w: int) -> list[torch.Tensor]:
    """As :func:`_same_numerators_direct` through one FFT of the maps, one product for all
    templates and one batched inverse transform."""
    b, c, height, width = features.shape
    fh, fw = _fft_size(height + h - 1), _fft_size(width + w - 1)
    flipped = units[0].new_zeros(len(units), c, h, w)
    for i, t in enumerate(units):
        flipped[i, :, : t.shape[-2], : t.shape[-1]] = t.flip(-2, -1)
    spectrum = torch.fft.rfft2(features, s=(fh, fw))                              # (B, C, fh, fw/2+1)
    kernels = torch.fft.rfft2(flipped, s=(fh, fw))                                # (T, C, fh, fw/2+1)
    full = torch.fft.irfft2(channel_products(spectrum, kernels), s=(fh, fw))     # (B, T, fh, fw)
    # full[n] holds the window whose top-left cell is n − (h_i − 1); the same-padded output
    # cell i holds the one whose top-left is i − (h_i − 1) // 2
    return [full[:, n: n + 1, t.shape[-2] // 2: t.shape[-2] // 2 + height, t.shape[-1] // 2: t.shape[-1] // 2 + width]
            for n, t in enumerate(units)]


def cosine_cross_correlation_many(features: torch.Tensor, templates: list[torch.Tensor],
                                  padding: str = "same", eps: float = 1e-6) -> list[torch.Tensor]:
    """Eq. 3 for several templates of different sizes against the same maps.

    All templates go through one computation: a single direct convolution when they are
    all small, otherwise one FFT of the gallery maps shared by all of them (see
    :func:`_direct_is_cheaper`). Window norms come from one summed-area table. Same results
    as :func:`cosine_cross_correlation` up to float rounding (~1e-5).

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
    fits = [i for i, t in enumerate(templates)
            if padding == "same" or (t.shape[-2] <= height and t.shape[-1] <= width)]
    outputs = [features.new_zeros(b, 1, 0, 0) for _ in templates]
    if not fits:
        return outputs
    units = [templates[i] / templates[i].flatten().norm().clamp_min(eps) for i in fits]
    pad = max(max(t.shape[-2:]) for t in units)
    table = _integral(features.pow(2).sum(dim=1), pad)
    h_max, w_max = max(t.shape[-2] for t in units), max(t.shape[-1] for t in units)
    numerators = (_same_numerators_direct if _direct_is_cheaper(h_max, w_max) else _same_numerators_fft)(
        features, units, h_max, w_max)
    for i, t, numerator in zip(fits, units, numerators):
        h, w = t.shape[-2:]
        if padding == "valid":  # valid window j is the same-padded output cell j + (h − 1) // 2
            numerator = numerator[:, :, (h - 1) // 2: (h - 1) // 2 + height - h + 1,
                                  (w - 1) // 2: (w - 1) // 2 + width - w + 1]
        outputs[i] = numerator / _window_norm_from_integral(table, pad, height, width, h, w, padding, eps)
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
