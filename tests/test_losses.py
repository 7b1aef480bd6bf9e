"""Losses vs hand-computed values and slow loop references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from retrieval.losses import (
    box_mask,
    dense_loss,
    dice_loss,
    focal_loss,
    info_nce,
    scale_consistency_loss,
    total_loss,
    triplet_region_loss,
)

torch.set_num_threads(1)


# --- InfoNCE -----------------------------------------------------------------

def info_nce_reference(query, keys, tau, negatives=None, positive_mask=None):
    """Eq. 7 written out with Python loops in float64."""
    q = np.asarray(query, dtype=np.float64)
    k = np.asarray(keys, dtype=np.float64)
    if k.ndim == 2:
        k = k[:, None, :]
    b, n, _ = k.shape
    cos = lambda a, c: float(a @ c / (np.linalg.norm(a) * np.linalg.norm(c)))
    losses = []
    for i in range(b):
        neg_terms = []
        for j in range(b):
            if j == i or (positive_mask is not None and positive_mask[i][j]):
                continue
            for m in range(n):
                neg_terms.append(math.exp(cos(q[i], k[j, m]) / tau))
        if negatives is not None:
            for row in np.asarray(negatives, dtype=np.float64):
                neg_terms.append(math.exp(cos(q[i], row) / tau))
        for m in range(n):
            pos = math.exp(cos(q[i], k[i, m]) / tau)
            losses.append(-math.log(pos / (pos + sum(neg_terms))))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("n_pos", [None, 3])
@pytest.mark.parametrize("with_negatives", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_info_nce_matches_loop(n_pos, with_negatives, with_mask):
    g = torch.Generator().manual_seed(0)
    b, d = 5, 8
    query = torch.randn(b, d, generator=g, dtype=torch.float64) * 3  # un-normalised on purpose
    keys = torch.randn(b, d, generator=g, dtype=torch.float64) if n_pos is None else torch.randn(b, n_pos, d, generator=g, dtype=torch.float64)
    negatives = torch.randn(4, d, generator=g, dtype=torch.float64) if with_negatives else None
    mask = None
    if with_mask:
        mask = torch.zeros(b, b, dtype=torch.bool)
        mask[0, 1] = mask[1, 0] = True   # pairs 0 and 1 show the same object
        mask[2, 4] = True                # asymmetric on purpose: only query 2 sees key 4 as positive
    got = info_nce(query, keys, tau=0.1, negatives=negatives, positive_mask=mask)
    want = info_nce_reference(query.numpy(), keys.numpy(), 0.1,
                              None if negatives is None else negatives.numpy(),
                              None if mask is None else mask.numpy())
    assert got.shape == ()
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_info_nce_positive_mask_changes_value():
    g = torch.Generator().manual_seed(1)
    query, keys = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 1] = True
    assert info_nce(query, keys, 0.2, positive_mask=mask).item() < info_nce(query, keys, 0.2).item()


def test_info_nce_hand_value_two_orthogonal_pairs():
    # q0 = k0 = e0, q1 = k1 = e1: s⁺ = 1, s⁻ = 0 → -log(e^{1/τ} / (e^{1/τ} + 1)).
    eye = torch.eye(2)
    tau = 0.5
    want = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert info_nce(eye, eye, tau).item() == pytest.approx(want, rel=1e-6)


def test_info_nce_no_negatives_is_zero():
    assert info_nce(torch.randn(1, 4), torch.randn(1, 4), 0.1).item() == pytest.approx(0.0, abs=1e-7)


def test_info_nce_rejects_bad_shapes():
    with pytest.raises(ValueError):
        info_nce(torch.randn(3, 4), torch.randn(2, 4), 0.1)
    with pytest.raises(ValueError):
        info_nce(torch.randn(3, 4), torch.randn(3, 4), 0.1, positive_mask=torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError):
        info_nce(torch.randn(3, 4), torch.randn(3, 4), 0.0)


# --- box mask ----------------------------------------------------------------

def box_mask_reference(boxes, height, width, stride):
    out = np.zeros((len(boxes), 1, height, width), dtype=np.float32)
    for b, (x1, y1, x2, y2) in enumerate(boxes):
        for i in range(height):
            for j in range(width):
                px, py = (j + 0.5) * stride, (i + 0.5) * stride
                if x1 <= px < x2 and y1 <= py < y2:
                    out[b, 0, i, j] = 1
        col, row = math.floor((x1 + x2) / 2 / stride), math.floor((y1 + y2) / 2 / stride)
        if out[b].sum() == 0 and 0 <= col < width and 0 <= row < height:
            out[b, 0, row, col] = 1
    return out


@pytest.mark.parametrize("stride", [1, 4, 8])
def test_box_mask_matches_loop(stride):
    rng = np.random.default_rng(stride)
    h, w = 9, 13
    boxes = []
    for _ in range(20):
        x1, y1 = rng.uniform(-20, w * stride), rng.uniform(-20, h * stride)
        boxes.append([x1, y1, x1 + rng.uniform(0.5, 6 * stride), y1 + rng.uniform(0.5, 6 * stride)])
    boxes += [
        [0, 0, w * stride, h * stride],                 # whole map
        [1.1 * stride, 2.2 * stride, 1.3 * stride, 2.4 * stride],  # smaller than a cell
        [-50, -50, -10, -10],                           # outside
        [w * stride - 1, h * stride - 1, w * stride + 40, h * stride + 40],  # hangs off the corner
    ]
    got = box_mask(torch.tensor(boxes, dtype=torch.float64), h, w, stride)
    want = box_mask_reference(boxes, h, w, stride)
    assert got.shape == (len(boxes), 1, h, w) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), want)
    assert got[-4].sum() == h * w
    assert got[-3].sum() == 1
    assert got[-2].sum() == 0


def test_box_mask_hand_example():
    # stride 4: cell centres at 2, 6, 10, 14. Box x∈[3, 11), y∈[0, 7) → columns 1, 2; rows 0, 1.
    got = box_mask(torch.tensor([[3.0, 0.0, 11.0, 7.0]]), 3, 4, stride=4)[0, 0]
    want = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(got, want)


def test_box_mask_edges_on_cell_centres_are_half_open():
    # Box [2, 10) × [2, 6): left/top edges on centres 2 are in, right/bottom edges on 10 and 6 are out.
    got = box_mask(torch.tensor([[2.0, 2.0, 10.0, 6.0]]), 3, 4, stride=4)[0, 0]
    want = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(got, want)


# --- focal, Dice, dense --------------------------------------------------------

def test_focal_hand_values():
    p = torch.tensor([[0.8, 0.8]])
    t = torch.tensor([[1.0, 0.0]])
    # t=1: 0.25 · 0.2² · -log 0.8; t=0: 0.75 · 0.8² · -log 0.2
    per_cell = [0.25 * 0.04 * -math.log(0.8), 0.75 * 0.64 * -math.log(0.2)]
    got = focal_loss(p, t, from_logits=False)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(sum(per_cell) / 2, rel=1e-5)
    logits = torch.log(p / (1 - p))
    assert focal_loss(logits, t).item() == pytest.approx(sum(per_cell) / 2, rel=1e-5)
    # γ = 0 and no α: plain BCE
    assert focal_loss(p, t, alpha=None, gamma=0.0, from_logits=False).item() == pytest.approx(
        (-math.log(0.8) - math.log(0.2)) / 2, rel=1e-5)


def test_focal_matches_torchvision():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 1, 6, 7, generator=g) * 3
    target = (torch.rand(3, 1, 6, 7, generator=g) > 0.7).float()
    want = sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="none").flatten(1).mean(1)
    torch.testing.assert_close(focal_loss(logits, target), want)


def test_dice_hand_values():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    # 1 - 2·0.5 / (1 + 1) = 0.5 without smoothing; with eps=1: 1 - 2/3
    assert dice_loss(p, t, eps=0.0).item() == pytest.approx(0.5)
    assert dice_loss(p, t, eps=1.0).item() == pytest.approx(1 / 3)
    assert dice_loss(t, t).item() == pytest.approx(0.0)


def _masks():
    boxes = torch.tensor([[4.0, 8.0, 20.0, 28.0], [30.0, 2.0, 40.0, 12.0]])
    return box_mask(boxes, 12, 12, stride=4)


def test_dense_perfect_mask_near_zero_wrong_mask_large():
    mask = _masks()
    perfect = 2 * mask - 1            # +1 on the object, -1 elsewhere
    wrong = 1 - 2 * mask
    good = dense_loss(perfect, mask, temperature=50.0, bias=0.0)
    bad = dense_loss(wrong, mask, temperature=50.0, bias=0.0)
    assert good.shape == ()
    assert good.item() < 1e-6
    assert bad.item() > 5.0
    # blurred (all zeros = p of 0.5 everywhere) sits in between
    middle = dense_loss(torch.zeros_like(mask), mask, temperature=50.0, bias=0.0)
    assert good.item() < middle.item() < bad.item()


def test_dense_equals_focal_plus_dice_mean():
    g = torch.Generator().manual_seed(3)
    heat = torch.rand(2, 1, 12, 12, generator=g) * 2 - 1
    mask = _masks()
    logits = (heat - 0.3) * 7.0
    want = (focal_loss(logits, mask) + dice_loss(torch.sigmoid(logits), mask)).mean()
    torch.testing.assert_close(dense_loss(heat, mask, temperature=7.0, bias=0.3), want)


# --- triplet -----------------------------------------------------------------

def test_triplet_zero_when_margin_holds():
    pos = torch.tensor([[0.9, 0.2]])
    neg = torch.tensor([[0.3, 0.1]])
    assert triplet_region_loss(pos, neg, margin=0.2).item() == 0.0


def test_triplet_hand_value_with_different_k():
    pos = torch.tensor([[0.9, 0.2, 0.1], [0.5, 0.1, 0.3]])     # best: 0.9, 0.5
    neg = torch.tensor([[0.3, 0.1], [0.6, 0.2]])               # best: 0.3, 0.6
    # row 0: 0.2 + 0.3 - 0.9 < 0 → 0; row 1: 0.2 + 0.6 - 0.5 = 0.3; mean 0.15
    assert triplet_region_loss(pos, neg, margin=0.2).item() == pytest.approx(0.15)


def test_triplet_ignores_minus_inf_padding():
    pos = torch.tensor([[0.5, -math.inf]])
    neg = torch.tensor([[0.6, -math.inf, -math.inf]])
    assert triplet_region_loss(pos, neg, margin=0.1).item() == pytest.approx(0.2)


# --- scale consistency -------------------------------------------------------

def kl_reference(per_level, fused, temperature):
    b, l = per_level.shape[:2]
    total = 0.0
    for i in range(b):
        q = np.exp(temperature * fused[i, 0].ravel().astype(np.float64))
        q /= q.sum()
        for j in range(l):
            p = np.exp(temperature * per_level[i, j].ravel().astype(np.float64))
            p /= p.sum()
            total += float(np.sum(p * np.log(p / q)))
    return total / (b * l)


def test_kl_zero_for_equal_maps():
    g = torch.Generator().manual_seed(4)
    fused = torch.rand(2, 1, 5, 6, generator=g)
    per_level = fused.expand(2, 3, 5, 6).clone()
    assert scale_consistency_loss(per_level, fused, temperature=10.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_matches_numpy_and_direction():
    g = torch.Generator().manual_seed(5)
    per_level = torch.rand(2, 3, 5, 6, generator=g) * 2 - 1
    fused = torch.rand(2, 1, 5, 6, generator=g) * 2 - 1
    got = scale_consistency_loss(per_level, fused, temperature=4.0).item()
    want = kl_reference(per_level.numpy(), fused.numpy(), 4.0)
    assert got > 0
    assert got == pytest.approx(want, rel=1e-5)
    # KL is asymmetric: the reverse direction gives a different number, so the test pins it.
    reverse = np.mean([kl_reference(fused[:, :1].numpy(), per_level[:, j:j + 1].numpy(), 4.0) for j in range(3)])
    assert abs(reverse - want) > 1e-3


def test_kl_valid_mask_averages_valid_levels_only():
    g = torch.Generator().manual_seed(6)
    per_level = torch.rand(2, 3, 4, 4, generator=g)
    fused = torch.rand(2, 1, 4, 4, generator=g)
    valid = torch.tensor([[True, False, True], [False, False, True]])
    got = scale_consistency_loss(per_level, fused, 3.0, valid=valid).item()
    pairs = [(0, 0), (0, 2), (1, 2)]
    want = np.mean([kl_reference(per_level[b:b + 1, l:l + 1].numpy(), fused[b:b + 1].numpy(), 3.0) for b, l in pairs])
    assert got == pytest.approx(want, rel=1e-5)


# --- total -------------------------------------------------------------------

def test_total_loss_weights_and_log():
    terms = {"nce": torch.tensor(2.0), "dense": torch.tensor(0.5), "trip": torch.tensor(0.1),
             "scale": torch.tensor(float("nan"))}
    total, log = total_loss(terms, {"nce": 1.0, "dense": 2.0, "trip": 10.0, "scale": 0.0, "unused": 3.0})
    assert total.item() == pytest.approx(2.0 + 1.0 + 1.0)
    assert log["nce"] == 2.0 and log["dense"] == 0.5 and log["trip"] == pytest.approx(0.1)
    assert math.isnan(log["scale"])
    assert log["total"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="no weight"):
        total_loss({"nce": torch.tensor(1.0), "tirp": torch.tensor(1.0)}, {"nce": 1.0, "trip": 1.0})


# --- gradients ---------------------------------------------------------------

def _assert_good_grad(t):
    assert t.grad is not None
    assert torch.isfinite(t.grad).all()
    assert t.grad.abs().sum() > 0


def test_gradients_flow_through_all_terms():
    g = torch.Generator().manual_seed(7)
    query = torch.randn(4, 8, generator=g, requires_grad=True)
    keys = torch.randn(4, 2, 8, generator=g, requires_grad=True)
    negatives = torch.randn(3, 8, generator=g, requires_grad=True)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 1] = True
    heat = (torch.rand(2, 1, 12, 12, generator=g) * 2 - 1).requires_grad_()
    temperature = torch.tensor(5.0, requires_grad=True)
    bias = torch.tensor(0.2, requires_grad=True)
    pos = torch.rand(4, 5, generator=g).requires_grad_()
    neg = (torch.rand(4, 3, generator=g) + 1).requires_grad_()   # margin violated on every row
    per_level = torch.rand(2, 3, 12, 12, generator=g, requires_grad=True)
    fused = torch.rand(2, 1, 12, 12, generator=g, requires_grad=True)
    kl_temp = torch.tensor(4.0, requires_grad=True)

    terms = {
        "nce": info_nce(query, keys, 0.1, negatives=negatives, positive_mask=mask),
        "dense": dense_loss(heat, _masks(), temperature, bias),
        "trip": triplet_region_loss(pos, neg, 0.2),
        "scale": scale_consistency_loss(per_level, fused, kl_temp),
    }
    total, _ = total_loss(terms, {"nce": 1.0, "dense": 1.0, "trip": 1.0, "scale": 1.0})
    total.backward()
    for t in (query, keys, negatives, heat, temperature, bias, pos, neg, per_level, fused, kl_temp):
        _assert_good_grad(t)
    # eq. 8 only moves the best region on each side
    assert (pos.grad != 0).sum() == 4 and (neg.grad != 0).sum() == 4


def test_peak_loss_hand_values():
    from retrieval.losses import peak_loss

    flat = torch.zeros(1, 1, 4, 5)
    mask = torch.zeros(1, 1, 4, 5)
    mask[0, 0, 1:3, 1:3] = 1                      # 4 of 20 cells
    assert abs(float(peak_loss(flat, mask, 20.0)) - math.log(5.0)) < 1e-5
    sharp = flat.clone()
    sharp[0, 0, 2, 2] = 1.0                        # the maximum on the object
    assert float(peak_loss(sharp, mask, 50.0)) < 1e-6
    wrong = flat.clone()
    wrong[0, 0, 0, 4] = 1.0                        # the maximum off the object
    assert float(peak_loss(wrong, mask, 50.0)) > 40
    assert float(peak_loss(sharp, torch.zeros_like(mask), 20.0)) == 0.0
