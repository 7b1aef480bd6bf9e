"""Eq. 3: the fast correlation against a naive loop."""
import pytest
import torch

from retrieval.correlation import (_direct_is_cheaper, channel_products, cosine_cross_correlation,
                                   cosine_cross_correlation_many,
                                   cosine_cross_correlation_naive,
                                   same_padding)


@pytest.mark.parametrize("map_size,tpl_size", [((9, 13), (1, 1)), ((7, 5), (3, 2)), ((6, 11), (4, 4)),
                                               ((5, 5), (5, 5)), ((12, 4), (2, 3))])
def test_valid_matches_naive_loop(map_size, tpl_size):
    torch.manual_seed(0)
    feats = torch.randn(2, 6, *map_size)
    tpl = torch.randn(6, *tpl_size)
    fast = cosine_cross_correlation(feats, tpl, padding="valid")
    slow = cosine_cross_correlation_naive(feats, tpl)
    assert fast.shape == slow.shape
    assert (fast - slow).abs().max() <= 1e-4


def test_same_padding_is_valid_on_zero_padded_map():
    torch.manual_seed(1)
    feats = torch.randn(3, 4, 8, 10)
    tpl = torch.randn(4, 2, 3)
    same = cosine_cross_correlation(feats, tpl, padding="same")
    assert same.shape == (3, 1, 8, 10)
    padded = torch.nn.functional.pad(feats, same_padding(2, 3))
    assert torch.allclose(same, cosine_cross_correlation_naive(padded, tpl), atol=1e-4)


def test_batched_templates_equal_one_by_one():
    torch.manual_seed(2)
    feats = torch.randn(2, 5, 6, 7)
    tpls = torch.randn(3, 5, 2, 2)
    both = cosine_cross_correlation(feats, tpls)
    for t in range(3):
        assert torch.allclose(both[:, t:t + 1], cosine_cross_correlation(feats, tpls[t]), atol=1e-6)


def test_exact_copy_scores_one_and_template_larger_than_map():
    feats = torch.rand(1, 8, 10, 10)
    tpl = feats[0, :, 3:6, 4:8].clone()
    heat = cosine_cross_correlation(feats, tpl, padding="valid")
    assert heat[0, 0, 3, 4] == pytest.approx(1.0, abs=1e-5)
    assert heat.max() <= 1.0 + 1e-5
    big = torch.rand(8, 14, 3)
    assert cosine_cross_correlation(feats, big, padding="valid").numel() == 0
    same = cosine_cross_correlation(feats, big, padding="same")
    assert same.shape == (1, 1, 10, 10) and torch.isfinite(same).all()


def test_zero_map_gives_zero_not_nan():
    out = cosine_cross_correlation(torch.zeros(1, 3, 5, 5), torch.rand(3, 2, 2))
    assert torch.isfinite(out).all() and out.abs().max() == 0


# one set small enough for the single padded direct convolution, one that takes the FFT path
TEMPLATE_SETS = {"direct": [(1, 1), (3, 2), (2, 3), (3, 3), (2, 2)],
                 "fft": [(1, 1), (3, 2), (6, 7), (4, 4), (10, 5)]}


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("path", sorted(TEMPLATE_SETS))
def test_batched_paths_match_direct_and_naive(padding, path):
    sizes = TEMPLATE_SETS[path]
    hm, wm = max(h for h, _ in sizes), max(w for _, w in sizes)
    assert _direct_is_cheaper(hm, wm) == (path == "direct")
    torch.manual_seed(3)
    feats = torch.randn(2, 16, 11, 17)
    templates = [torch.randn(16, h, w) for h, w in sizes]
    fast = cosine_cross_correlation_many(feats, templates, padding=padding)
    for t, out in zip(templates, fast):
        direct = cosine_cross_correlation(feats, t, padding=padding)
        assert out.shape == direct.shape
        assert (out - direct).abs().max() <= 1e-4
        if padding == "valid":
            assert (out - cosine_cross_correlation_naive(feats, t)).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_channel_products_match_einsum_and_backpropagate(dtype):
    torch.manual_seed(4)
    spectra = torch.randn(3, 7, 5, 4, dtype=dtype, requires_grad=True)
    kernels = torch.randn(2, 7, 5, 4, dtype=dtype, requires_grad=True)
    out = channel_products(spectra, kernels)
    expected = torch.einsum("bcij,tcij->btij", spectra, kernels)
    assert out.shape == (3, 2, 5, 4)
    assert (out - expected).abs().max() <= 1e-5
    weights = torch.randn(3, 2, 5, 4, dtype=dtype)
    grads = torch.autograd.grad((out * weights).real.sum(), (spectra, kernels))
    grads_ref = torch.autograd.grad((expected * weights).real.sum(), (spectra, kernels))
    for g, r in zip(grads, grads_ref):
        assert (g - r).abs().max() <= 1e-4
