"""Layer scores (SPEC 2.1) against an independent NumPy computation; ranking and selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeptao.core.scoring import combine_scores, layer_scores, rank_layers, select_layers


def numpy_score(hidden: np.ndarray) -> float:
    x = hidden.reshape(hidden.shape[0], -1).astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    cos = (x @ x.T) / np.outer(norms, norms)
    lam = np.clip(np.linalg.eigvalsh(cos), 0.0, None)
    return float(np.sum(np.log(lam + 1e-5) + 1.0 / (lam + 1e-5)))


@pytest.mark.parametrize(("batch", "seq", "hidden"), [(2, 3, 4), (5, 7, 6), (8, 16, 12)])
def test_layer_scores_match_numpy(batch, seq, hidden):
    g = torch.Generator().manual_seed(batch)
    outputs = [torch.randn(batch, seq, hidden, generator=g) * (layer + 1) for layer in range(4)]
    got = layer_scores(outputs)
    assert got.dtype == torch.float64 and got.shape == (4,)
    want = [numpy_score(h.numpy()) for h in outputs]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9)


def test_layer_scores_rank_near_duplicate_examples_higher():
    # Near-identical examples give a near-singular cosine matrix: eigenvalues near 0 blow up 1/(lam+eps).
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(6, 5, 8, generator=g)
    collapsed = torch.randn(1, 5, 8, generator=g).expand(6, 5, 8) + 1e-4 * torch.randn(6, 5, 8, generator=g)
    scores = layer_scores([spread, collapsed])
    assert scores[1] > scores[0]


def test_attention_mask_zeroes_padding():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 6, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    masked = hidden * mask.unsqueeze(-1)
    noisy = masked + (1 - mask.unsqueeze(-1)) * 100.0  # garbage at padded positions
    torch.testing.assert_close(layer_scores([noisy], attention_mask=mask), layer_scores([masked]))
    with pytest.raises(ValueError):
        layer_scores([hidden], attention_mask=mask[:, :5])


def test_layer_scores_rejects_small_batches_and_mismatch():
    with pytest.raises(ValueError, match="at least 2"):
        layer_scores([torch.randn(1, 4, 3)])
    with pytest.raises(ValueError):
        layer_scores([torch.randn(3, 4, 3), torch.randn(2, 4, 3)])
    with pytest.raises(ValueError):
        layer_scores([])


def test_combine_scores_weights_by_size():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([4.0, 0.0, -1.0])
    got = combine_scores([a, b], [1, 3])
    torch.testing.assert_close(got, torch.tensor([3.25, 0.5, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        combine_scores([a, b], [1])
    with pytest.raises(ValueError):
        combine_scores([a, b], [0, 0])


def test_rank_layers_descending_ties_by_lower_index():
    assert rank_layers(torch.tensor([0.5, 2.0, 0.5, 3.0, 2.0])) == [3, 1, 4, 0, 2]
    with pytest.raises(ValueError):
        rank_layers(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize(("ratio", "count"), [(0.5, 5), (0.51, 6), (0.01, 1), (0.0, 1), (1.0, 10), (0.99, 10)])
def test_select_layers_takes_ceil_and_sorts(ratio, count):
    ranking = [7, 2, 9, 0, 4, 1, 8, 3, 6, 5]
    got = select_layers(ranking, ratio)
    assert got == sorted(ranking[:count])


def test_select_layers_ignores_float_noise():
    assert 0.28 * 25 > 7  # 7.000000000000001
    assert len(select_layers(list(range(25)), 0.28)) == 7


def test_select_layers_validates():
    with pytest.raises(ValueError):
        select_layers([0, 1, 1], 0.5)
    with pytest.raises(ValueError):
        select_layers([0, 1], 1.5)
