"""The four training losses of seed 000, section 3, and their weighted sum (eq. 6).

    L = λ1·L_NCE + λ2·L_dense + λ3·L_trip + λ4·L_scale

Every function here is pure: tensors in, tensors out, no module state. Learned
quantities (temperatures, biases) are passed in by the caller, so they can be
``nn.Parameter`` objects owned by the model and still receive gradients.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(
    query: Tensor,
    keys: Tensor,
    tau: float,
    negatives: Tensor | None = None,
    positive_mask: Tensor | None = None,
) -> Tensor:
    """InfoNCE with in-batch negatives over cosine similarities (eq. 1 and 7).

    Args:
        query: ``(B, D)`` query descriptors (any norm; L2-normalised here).
        keys: ``(B, D)`` or ``(B, N, D)``. ``keys[i]`` holds the positive(s) of
            ``query[i]``; with ``(B, N, D)`` each of the N rows is a positive
            (e.g. several frames of the same object, or the global and the box
            region descriptor of one positive image).
        tau: temperature τ > 0.
        negatives: optional ``(M, D)`` extra negatives shared by all queries
            (e.g. hard negatives mined from the index).
        positive_mask: optional ``(B, B)`` bool; ``positive_mask[i, j]`` marks
            ``keys[j]`` as also showing the object of ``query[i]`` (two pairs of
            the same sequence in one batch), so those keys are left out of the
            negatives of query i. The diagonal is ignored: ``keys[i]`` is always
            positive for query i.

    Returns:
        ``()`` scalar: the mean over the B·N (query, positive) pairs of

            -log( e^{s⁺/τ} / (e^{s⁺/τ} + Σ_negatives e^{s⁻/τ}) )

        where the negatives of query i are every key of every other row j with
        ``positive_mask[i, j]`` false, plus all rows of ``negatives``. The other
        positives of the same query are not in its denominator. A query with no
        negative at all contributes 0.
    """
    if query.dim() != 2:
        raise ValueError(f"query must be (B, D), got {tuple(query.shape)}")
    if keys.dim() == 2:
        keys = keys.unsqueeze(1)
    if keys.dim() != 3 or keys.shape[0] != query.shape[0] or keys.shape[2] != query.shape[1]:
        raise ValueError(f"keys must be (B, D) or (B, N, D) matching query {tuple(query.shape)}, got {tuple(keys.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    b, n, d = keys.shape

    q = F.normalize(query, dim=-1)
    k = F.normalize(keys, dim=-1)
    sims = torch.einsum("id,jnd->ijn", q, k) / tau                      # (B, B, N)
    pos = sims.diagonal(dim1=0, dim2=1).transpose(0, 1)                   # (B, N)

    is_positive = torch.eye(b, dtype=torch.bool, device=query.device)
    if positive_mask is not None:
        if positive_mask.shape != (b, b):
            raise ValueError(f"positive_mask must be ({b}, {b}), got {tuple(positive_mask.shape)}")
        is_positive = is_positive | positive_mask.to(device=query.device, dtype=torch.bool)
    # -inf drops a logit from the softmax exactly while keeping the shape static.
    neg = sims.masked_fill(is_positive.unsqueeze(-1), float("-inf")).reshape(b, b * n)
    if negatives is not None:
        if negatives.dim() != 2 or negatives.shape[1] != d:
            raise ValueError(f"negatives must be (M, {d}), got {tuple(negatives.shape)}")
        extra = q @ F.normalize(negatives, dim=-1).T / tau                # (B, M)
        neg = torch.cat([neg, extra], dim=1)

    logits = torch.cat([pos.unsqueeze(-1), neg.unsqueeze(1).expand(b, n, neg.shape[1])], dim=-1)
    target = torch.zeros(b * n, dtype=torch.long, device=query.device)
    return F.cross_entropy(logits.reshape(b * n, -1), target)


def box_mask(boxes: Tensor, height: int, width: int, stride: float = 1) -> Tensor:
    """Ground-truth mask of one box per image on a heatmap grid.

    Args:
        boxes: ``(B, 4)`` boxes ``(x1, y1, x2, y2)`` in image pixels.
        height, width: heatmap size ``H × W`` in cells.
        stride: pixels per heatmap cell; cell ``(i, j)`` (row, column) stands for
            the pixel point ``((j + 0.5)·stride, (i + 0.5)·stride)``.

    Returns:
        ``(B, 1, H, W)`` float mask: 1 where the cell's point lies in
        ``[x1, x2) × [y1, y2)``, else 0. A box that covers no cell point (smaller
        than a cell) gets the cell whose square contains its centre instead, so
        small objects still have a positive target rather than all background.
        A box entirely outside the map gives an all-zero mask.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (B, 4), got {tuple(boxes.shape)}")
    boxes = boxes.to(torch.float32)
    x1, y1, x2, y2 = (boxes[:, i, None] for i in range(4))                # (B, 1) each
    cx = (torch.arange(width, dtype=torch.float32, device=boxes.device) + 0.5) * stride
    cy = (torch.arange(height, dtype=torch.float32, device=boxes.device) + 0.5) * stride
    inside_x = (cx >= x1) & (cx < x2)                                     # (B, W)
    inside_y = (cy >= y1) & (cy < y2)                                     # (B, H)
    mask = inside_y[:, :, None] & inside_x[:, None, :]                    # (B, H, W)

    # Fallback for boxes below cell size, which would otherwise train as pure background.
    centre_col = torch.floor((x1 + x2)[:, 0] / 2 / stride).long()
    centre_row = torch.floor((y1 + y2)[:, 0] / 2 / stride).long()
    on_map = (centre_col >= 0) & (centre_col < width) & (centre_row >= 0) & (centre_row < height)
    on_map &= ~mask.flatten(1).any(dim=1)
    rows = torch.arange(boxes.shape[0], device=boxes.device)[on_map]
    mask[rows, centre_row[on_map], centre_col[on_map]] = True
    return mask.unsqueeze(1).to(torch.float32)


def focal_loss(
    logits_or_probs: Tensor,
    target: Tensor,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    from_logits: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Binary focal loss (Lin et al. 2017), averaged over all cells of each sample.

    Args:
        logits_or_probs: ``(B, ...)`` logits, or probabilities in [0, 1] when
            ``from_logits`` is False.
        target: ``(B, ...)`` same shape, values in [0, 1] (soft targets allowed).
        alpha: weight of the positive class (negatives get ``1 - alpha``);
            None weights both classes equally.
        gamma: focusing exponent; 0 gives plain binary cross-entropy.
        from_logits: whether the first argument is logits (numerically stabler).
        eps: probabilities are clamped to ``[eps, 1 - eps]`` before the log when
            ``from_logits`` is False.

    Returns:
        ``(B,)``: per sample, mean over cells of
        ``-α_t (1 - p_t)^γ log p_t`` with ``p_t = p·t + (1-p)(1-t)`` and
        ``α_t = α·t + (1-α)(1-t)``.
    """
    if logits_or_probs.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(logits_or_probs.shape)} vs {tuple(target.shape)}")
    target = target.to(logits_or_probs.dtype)
    if from_logits:
        p = torch.sigmoid(logits_or_probs)
        ce = F.binary_cross_entropy_with_logits(logits_or_probs, target, reduction="none")
    else:
        p = logits_or_probs.clamp(eps, 1 - eps)
        ce = F.binary_cross_entropy(p, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    return loss.flatten(1).mean(dim=1)


def dice_loss(probs: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Soft Dice loss per sample.

    Args:
        probs: ``(B, ...)`` probabilities in [0, 1].
        target: ``(B, ...)`` same shape, values in [0, 1].
        eps: smoothing added to numerator and denominator; keeps the loss defined
            for an empty target, where it becomes ``1 - eps / (Σp + eps)`` and so
            only rewards predicting background everywhere.

    Returns:
        ``(B,)``: ``1 - (2 Σ p·t + eps) / (Σ p + Σ t + eps)`` summed over all
        cells of each sample.
    """
    if probs.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(probs.shape)} vs {tuple(target.shape)}")
    p = probs.flatten(1)
    t = target.to(probs.dtype).flatten(1)
    return 1 - (2 * (p * t).sum(dim=1) + eps) / (p.sum(dim=1) + t.sum(dim=1) + eps)


def peak_loss(heatmap: Tensor, mask: Tensor, temperature: float | Tensor) -> Tensor:
    """Localisation loss: −log of the spatial-softmax mass that falls inside the mask.

    Focal + Dice judge every cell on its own; the box the search reports sits at the
    heatmap's argmax, so this term asks directly for the map's maximum to lie on the
    object: ``−log Σ_cells mask · softmax(temperature · H)``.

    Args:
        heatmap: ``(B, 1, H, W)`` fused heatmap.
        mask: ``(B, 1, H, W)`` target cells in {0, 1} (e.g. :func:`box_mask` of the box's centre part);
            an all-zero mask contributes 0.

    Returns:
        ``()`` scalar, mean over the images whose mask is not empty (0 if none).
    """
    if heatmap.dim() != 4 or heatmap.shape[1] != 1 or heatmap.shape != mask.shape:
        raise ValueError(f"heatmap and mask must both be (B, 1, H, W), got {tuple(heatmap.shape)} and {tuple(mask.shape)}")
    logits = (heatmap * temperature).flatten(1)
    log_p = torch.log_softmax(logits, dim=1)
    inside = mask.flatten(1) > 0
    has = inside.any(dim=1)
    if not bool(has.any()):
        return heatmap.sum() * 0.0
    log_mass = torch.logsumexp(log_p.masked_fill(~inside, float("-inf")), dim=1)
    return -log_mass[has].mean()


def dense_loss(
    heatmap: Tensor,
    mask: Tensor,
    temperature: float | Tensor,
    bias: float | Tensor,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    dice_eps: float = 1.0,
) -> Tensor:
    """Dense matching loss (section 3.2): focal + Dice of the fused heatmap vs a box mask.

    Args:
        heatmap: ``(B, 1, H, W)`` fused heatmap H, cosine-like values in [-1, 1].
        mask: ``(B, 1, H, W)`` ground truth in [0, 1] (see :func:`box_mask`).
        temperature, bias: H becomes the probability
            ``sigmoid((H - bias) · temperature)``; floats or scalar tensors
            (learnable parameters get gradients).
        alpha, gamma: focal loss parameters.
        dice_eps: Dice smoothing.

    Returns:
        ``()`` scalar: mean over the batch of focal + Dice.
    """
    if heatmap.dim() != 4 or heatmap.shape[1] != 1 or heatmap.shape != mask.shape:
        raise ValueError(f"heatmap and mask must both be (B, 1, H, W), got {tuple(heatmap.shape)} and {tuple(mask.shape)}")
    logits = (heatmap - bias) * temperature
    focal = focal_loss(logits, mask, alpha=alpha, gamma=gamma, from_logits=True)
    dice = dice_loss(torch.sigmoid(logits), mask, eps=dice_eps)
    return (focal + dice).mean()


def triplet_region_loss(pos_sims: Tensor, neg_sims: Tensor, margin: float) -> Tensor:
    """Triplet loss over the best-matching regions (eq. 8).

    Args:
        pos_sims: ``(B, Kpos)`` similarities s(z, r_k⁺) of the query to the
            regions of its positive image.
        neg_sims: ``(B, Kneg)`` similarities s(z, r_k⁻) to the regions of a
            negative image; Kneg may differ from Kpos. Pad missing regions with
            ``-inf`` (each row needs at least one finite value).
        margin: m.

    Returns:
        ``()`` scalar: mean over the batch of ``[m + max_k neg - max_k pos]_+``.
    """
    if pos_sims.dim() != 2 or neg_sims.dim() != 2 or pos_sims.shape[0] != neg_sims.shape[0]:
        raise ValueError(f"expected (B, Kpos) and (B, Kneg), got {tuple(pos_sims.shape)} and {tuple(neg_sims.shape)}")
    best_pos = pos_sims.max(dim=1).values
    best_neg = neg_sims.max(dim=1).values
    return F.relu(margin + best_neg - best_pos).mean()


def scale_consistency_loss(
    per_level: Tensor,
    fused: Tensor,
    temperature: float | Tensor,
    valid: Tensor | None = None,
) -> Tensor:
    """Scale consistency (section 3.4): KL(P_l ‖ P_fused) between spatial distributions.

    Each map is turned into a distribution over its H·W cells,
    ``P = softmax(temperature · map)``, and per level and sample

        KL(P_l ‖ P_fused) = Σ_cells P_l · log(P_l / P_fused),

    i.e. the expectation is under the per-level distribution: it is large where
    a level puts mass that the fused map does not. Both inputs get gradients;
    detach ``fused`` at the call site to use it as a fixed teacher.

    Args:
        per_level: ``(B, L, H, W)`` per-level heatmaps upsampled to the fused size.
        fused: ``(B, 1, H, W)`` fused heatmap.
        temperature: softmax sharpness (float or scalar tensor).
        valid: optional ``(B, L)`` bool; false marks a level that produced no map
            for that sample (e.g. template too large there), left out of the mean.

    Returns:
        ``()`` scalar: mean of the KL over levels and batch (over valid pairs only
        when ``valid`` is given; 0 if none is valid).
    """
    if per_level.dim() != 4 or fused.dim() != 4 or fused.shape[1] != 1:
        raise ValueError(f"expected (B, L, H, W) and (B, 1, H, W), got {tuple(per_level.shape)} and {tuple(fused.shape)}")
    if per_level.shape[0] != fused.shape[0] or per_level.shape[2:] != fused.shape[2:]:
        raise ValueError(f"per_level {tuple(per_level.shape)} and fused {tuple(fused.shape)} differ in batch or size")
    log_p = F.log_softmax(temperature * per_level.flatten(2), dim=-1)    # (B, L, H·W)
    log_q = F.log_softmax(temperature * fused.flatten(2), dim=-1)        # (B, 1, H·W)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)                     # (B, L)
    if valid is None:
        return kl.mean()
    if valid.shape != kl.shape:
        raise ValueError(f"valid must be {tuple(kl.shape)}, got {tuple(valid.shape)}")
    weights = valid.to(device=kl.device, dtype=kl.dtype)
    return (kl * weights).sum() / weights.sum().clamp(min=1)


def box_regression_loss(predicted: Tensor, target: Tensor, beta: float) -> Tensor:
    """Smooth-L1 between predicted and true box deltas (``box_refinement.box_deltas``).

    Args:
        predicted, target: ``(N, 4)`` deltas (dx, dy, dlog w, dlog h).
        beta: below this absolute error the loss is quadratic (``0.5·e²/β``), above linear (``|e| − β/2``).

    Returns:
        ``()`` scalar: the mean over the N boxes of the summed loss of their four deltas.
    """
    if predicted.shape != target.shape or predicted.dim() != 2 or predicted.shape[1] != 4:
        raise ValueError(f"expected two (N, 4), got {tuple(predicted.shape)} and {tuple(target.shape)}")
    return F.smooth_l1_loss(predicted, target, beta=beta, reduction="none").sum(dim=1).mean()


def total_loss(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the loss terms (eq. 6) and a log of each.

    Args:
        terms: name → ``()`` scalar tensor, e.g. ``{"nce", "dense", "trip",
            "scale"}``; a term not computed for a batch is simply left out.
        weights: name → λ. Every term needs a weight (a misspelt key fails
            loudly instead of silently dropping a term); extra weights are
            ignored. A term with weight 0 is logged but not added, so a NaN in
            a disabled term cannot poison the total.

    Returns:
        ``(total, log)``: ``total`` is the ``()`` scalar Σ λ·term; ``log`` maps
        each term name to its unweighted float value, plus ``"total"``.
    """
    if not terms:
        raise ValueError("no loss terms given")
    missing = sorted(set(terms) - set(weights))
    if missing:
        raise ValueError(f"no weight for loss term(s) {missing}; weights given for {sorted(weights)}")
    total: Tensor | None = None
    log: dict[str, float] = {}
    for name, value in terms.items():
        if value.dim() != 0:
            raise ValueError(f"loss term '{name}' must be a scalar, got shape {tuple(value.shape)}")
        log[name] = float(value.detach())
        if weights[name] == 0:
            continue
        weighted = weights[name] * value
        total = weighted if total is None else total + weighted
    if total is None:
        total = torch.zeros((), device=next(iter(terms.values())).device)
    log["total"] = float(total.detach())
    return total, log
