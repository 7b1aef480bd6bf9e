"""Eq. 4 and the gradients of the whole fine stage."""
import math

import pytest
import torch
from PIL import Image

from retrieval.fusion import fusion_max_limit, lse_fusion, lse_fusion_naive, resample_heatmap
from retrieval.images import to_tensor
from retrieval.matching import encode_query, match_query


def test_equal_levels_fuse_to_themselves():
    level = torch.rand(2, 1, 6, 7) * 2 - 1
    maps = level.repeat(1, 3, 1, 1)
    alpha = torch.softmax(torch.randn(3), 0)
    for gamma in (0.5, 5.0, 50.0):
        assert torch.allclose(lse_fusion(maps, alpha, gamma), level, atol=1e-5)


def test_matches_naive_formula_and_large_gamma_limit():
    torch.manual_seed(0)
    maps = torch.rand(2, 3, 5, 4) * 2 - 1
    alpha = torch.tensor([0.2, 0.5, 0.3])
    assert torch.allclose(lse_fusion(maps, alpha, 3.0), lse_fusion_naive(maps, alpha, 3.0), atol=1e-5)
    gamma = 2000.0
    fused = lse_fusion(maps, alpha, gamma)
    assert torch.allclose(fused, fusion_max_limit(maps, alpha, gamma), atol=2e-3)
    assert torch.allclose(fused, maps.amax(1, keepdim=True), atol=math.log(5) / gamma + 1e-4)


def test_masked_level_is_ignored():
    maps = torch.rand(1, 3, 4, 4)
    alpha = torch.tensor([0.25, 0.25, 0.5])
    mask = torch.tensor([True, False, True])
    expected = lse_fusion(maps[:, [0, 2]], torch.tensor([1 / 3, 2 / 3]), 4.0)
    assert torch.allclose(lse_fusion(maps, alpha, 4.0, mask), expected, atol=1e-6)


def test_resample_identity_and_alignment():
    heat = torch.rand(1, 2, 5, 6)
    assert torch.allclose(resample_heatmap(heat, 8, (5, 6), 8), heat, atol=1e-6)
    # a coarse cell i (stride 16) is centred at pixel 16(i + .5): fine cells 2i and 2i+1 straddle it
    coarse = torch.zeros(1, 1, 3, 3)
    coarse[0, 0, 1, 1] = 1.0
    fine = resample_heatmap(coarse, 16, (6, 6), 8)
    assert fine[0, 0, 2, 2] == pytest.approx(fine[0, 0, 3, 3]) and fine[0, 0, 2, 2] > 0.5


def test_gradients_reach_every_learned_part(model):
    model.zero_grad()
    rng = torch.Generator().manual_seed(0)
    gallery = torch.rand(2, 3, 96, 128, generator=rng)
    patch = Image.fromarray((gallery[0, :, 20:60, 30:70].permute(1, 2, 0).numpy() * 255).astype("uint8"))
    with torch.enable_grad():
        query = encode_query(model, patch)
        templates = [{l: model.encode_query(to_tensor(patch.resize(sz)).unsqueeze(0))[l][0]
                      for l in model.levels} for sz in query.sizes]
        query.templates = templates
        query.descriptor = model.describe(templates[0]["p3"].unsqueeze(0))[0]
        maps = model.encode_gallery(gallery)
        out = match_query(model, query, maps, torch.tensor([[96, 128], [96, 128]]))
        (out.score.sum() + out.fused.mean() + out.per_level.mean()).backward()
    named = {"alpha": model.alpha_logits, "gamma": model.log_gamma, "phi": model.phi.weight,
             "psi": model.psi.weight, "mlp": model.head.fc2.weight, "gem_p": model.head.p,
             "fpn": model.fpn.inner_blocks[0][0].weight}
    for name, param in named.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    model.zero_grad()


def test_resample_of_a_zero_padded_batch_matches_each_map_alone():
    torch.manual_seed(5)
    small, big = torch.rand(1, 2, 5, 7), torch.rand(1, 2, 6, 9)
    batch = torch.zeros(2, 2, 6, 9)
    batch[0, :, :5, :7] = small[0]
    batch[1] = big[0]
    out = resample_heatmap(batch, 16, (12, 18), 8, (0.5, 0.0), src_sizes=torch.tensor([[5, 7], [6, 9]]))
    alone = resample_heatmap(small, 16, (10, 14), 8, (0.5, 0.0))
    assert torch.allclose(out[0, :, :10, :14], alone, atol=1e-6)
    assert torch.allclose(out[1:], resample_heatmap(big, 16, (12, 18), 8, (0.5, 0.0)), atol=1e-6)
    unaware = resample_heatmap(batch, 16, (12, 18), 8, (0.5, 0.0))
    assert not torch.allclose(unaware[0, :, :10, :14], alone, atol=1e-3)   # why src_sizes exists


def test_levels_a_large_query_skips_are_reported_and_left_out(model):
    """A 200-px query is 25 P3 cells wide at scale 1: too large for P3 (max_template_cells 24),
    so P3 must be reported unused there and its map must not count."""
    rng = torch.Generator().manual_seed(1)
    gallery = torch.rand(1, 3, 320, 320, generator=rng)
    patch = Image.fromarray((gallery[0, :, 50:250, 60:260].permute(1, 2, 0).numpy() * 255).astype("uint8"))
    query = encode_query(model, patch)
    out = match_query(model, query, model.encode_gallery(gallery), torch.tensor([[320, 320]]))
    best = min(range(len(query.scales)), key=lambda s: abs(query.scales[s] - float(out.best_scale[0])))
    limit = model.config.max_template_cells
    expected = [max(query.templates[best][l].shape[-2:]) <= limit for l in model.levels]
    assert out.level_used[0].tolist() == expected
    for s, tpl in enumerate(query.templates):           # at scale ≥ 1 this query is too wide for P3
        if query.scales[s] >= 1.0:
            assert max(tpl["p3"].shape[-2:]) > limit
