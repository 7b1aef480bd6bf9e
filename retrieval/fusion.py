"""Multi-level fusion (eq. 4) and the resampling that aligns maps of different strides.

H(u, v) = 1/γ · log Σ_l α_l · exp(γ · H↑^l(u, v))

Every heatmap here lives on a grid of cells whose centres sit at pixel
``stride · (i + 0.5 + offset)``; resampling maps one grid onto another exactly
(bilinear, edges clamped) rather than trusting ``interpolate``'s corner conventions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def resample_heatmap(heat: torch.Tensor, src_stride: float, out_size: tuple[int, int],
                     out_stride: float, src_offset: tuple[float, float] = (0.0, 0.0),
                     src_sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinearly resample a map from one cell grid to another.

    Args:
        heat: ``(B, T, h, w)`` values on cells centred at pixel ``src_stride · (i + 0.5 + offset)``.
        src_stride: pixels per source cell.
        out_size: ``(H, W)`` of the output grid.
        out_stride: pixels per output cell (1 gives a per-pixel map).
        src_offset: ``(dy, dx)`` centre offsets of the source cells, in source cells.
        src_sizes: optional ``(B, 2)`` (rows, cols) of each map's own cells when the batch is
            zero-padded to ``(h, w)``: the edge clamp then happens at each map's own border, so
            an image gets the same values in a padded batch as alone.

    Returns:
        ``(B, T, H, W)``.
    """
    b, t, h, w = heat.shape
    out_h, out_w = out_size
    if h == 0 or w == 0:
        return heat.new_zeros(b, t, out_h, out_w)
    device, dtype = heat.device, heat.dtype
    ys = (torch.arange(out_h, device=device, dtype=dtype) + 0.5) * out_stride / src_stride - 0.5 - src_offset[0]
    xs = (torch.arange(out_w, device=device, dtype=dtype) + 0.5) * out_stride / src_stride - 0.5 - src_offset[1]
    if src_sizes is None:
        ys, xs = ys.expand(b, -1), xs.expand(b, -1)
    else:
        rows = src_sizes[:, 0:1].to(device=device, dtype=dtype)
        cols = src_sizes[:, 1:2].to(device=device, dtype=dtype)
        ys = torch.minimum(ys.clamp(min=0).expand(b, -1), rows - 1)
        xs = torch.minimum(xs.clamp(min=0).expand(b, -1), cols - 1)
    # grid_sample(align_corners=False): normalised n ↔ source index (n + 1) · size / 2 − 0.5
    gy = ((2 * ys + 1) / h - 1)[:, :, None].expand(-1, -1, out_w)
    gx = ((2 * xs + 1) / w - 1)[:, None, :].expand(-1, out_h, -1)
    grid = torch.stack([gx, gy], dim=-1)                                  # (B, H, W, 2) as (x, y)
    return F.grid_sample(heat, grid, mode="bilinear", padding_mode="border", align_corners=False)


def lse_fusion(maps: torch.Tensor, alpha: torch.Tensor, gamma: torch.Tensor | float,
               level_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4: weighted log-sum-exp over levels.

    Args:
        maps: ``(B, L, H, W)`` per-level heatmaps, already on a common grid.
        alpha: ``(L,)`` positive weights summing to 1.
        gamma: temperature (scalar tensor or float); large γ → max, small γ → weighted mean.
        level_mask: optional ``(L,)`` bool; levels marked False are left out and the
            remaining weights renormalised (a template too large for a level).

    Returns:
        ``(B, 1, H, W)``; equals the maps when all levels are equal.
    """
    log_alpha = torch.log(alpha.clamp_min(1e-12))
    if level_mask is not None:
        log_alpha = log_alpha.masked_fill(~level_mask, float("-inf"))
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=0)
    gamma_t = torch.as_tensor(gamma, dtype=maps.dtype, device=maps.device)
    weighted = gamma_t * maps + log_alpha.view(1, -1, 1, 1).to(maps.dtype)
    if level_mask is not None:
        weighted = weighted[:, level_mask]
    return torch.logsumexp(weighted, dim=1, keepdim=True) / gamma_t


def lse_fusion_naive(maps: torch.Tensor, alpha: torch.Tensor, gamma: float) -> torch.Tensor:
    """Direct transcription of eq. 4 for tests: ``(B, L, H, W)`` → ``(B, 1, H, W)``."""
    total = sum(float(alpha[l]) * torch.exp(gamma * maps[:, l:l + 1]) for l in range(maps.shape[1]))
    return torch.log(total) / gamma


def fusion_max_limit(maps: torch.Tensor, alpha: torch.Tensor, gamma: float) -> torch.Tensor:
    """What eq. 4 approaches for large γ: max_l (H^l + log α_l / γ). Shapes as :func:`lse_fusion`."""
    return (maps + (torch.log(alpha) / gamma).view(1, -1, 1, 1)).amax(dim=1, keepdim=True)
