"""LowRankGradient against dense computation on random factors."""

from __future__ import annotations

import pytest
import torch

from backward_lens.lowrank import LowRankGradient


def _factors(n: int, d_in: int, d_out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_dense_is_sum_of_outer_products(layout: str) -> None:
    x, d = _factors(5, 7, 4)
    g = LowRankGradient(x, d, layout)
    by_hand = sum(torch.outer(x[i], d[i]) for i in range(5))
    expected = by_hand if layout == "in_out" else by_hand.T
    assert g.shape == tuple(expected.shape)
    torch.testing.assert_close(g.dense(), expected)


@pytest.mark.parametrize(
    ("n", "dependent"),
    [(1, 0), (4, 0), (6, 2), (6, 5), (12, 0)],
)
def test_rank_matches_matrix_rank(n: int, dependent: int) -> None:
    x, d = _factors(n, 64, 48, seed=n + dependent)
    # make the last `dependent` inputs copies of the first one: each drops the rank by one
    for i in range(n - dependent, n):
        x[i] = x[0]
    g = LowRankGradient(x, d, "in_out")
    expected = int(torch.linalg.matrix_rank(g.dense()))
    assert g.rank() == expected == n - dependent


def test_rank_of_zero_gradient_is_zero() -> None:
    g = LowRankGradient(torch.zeros(3, 8), torch.randn(3, 5))
    assert g.rank() == 0 == int(torch.linalg.matrix_rank(g.dense()))


def test_singular_values_match_dense_svd() -> None:
    x, d = _factors(6, 30, 20)
    g = LowRankGradient(x, d, "out_in")
    dense_sv = torch.linalg.svdvals(g.dense().double())[:6]
    torch.testing.assert_close(g.singular_values(), dense_sv, rtol=1e-5, atol=1e-6)


def test_norms_and_neurons_match_dense() -> None:
    x, d = _factors(5, 12, 9)
    g = LowRankGradient(x, d, "in_out")
    dense = g.dense()  # [d_in, d_out]
    assert g.norm() == pytest.approx(float(dense.norm()), rel=1e-5)
    torch.testing.assert_close(g.output_space_neurons(), dense)
    torch.testing.assert_close(g.input_space_neurons(), dense.T)
    torch.testing.assert_close(
        g.output_space_neuron_norms(), dense.norm(dim=1), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        g.input_space_neuron_norms(), dense.norm(dim=0), rtol=1e-4, atol=1e-5
    )
    idx = torch.tensor([3, 0])
    torch.testing.assert_close(g.output_space_neurons(idx), dense[idx])
    torch.testing.assert_close(
        g.position_norms(), torch.stack([torch.outer(x[i], d[i]).norm() for i in range(5)])
    )


def test_bad_factor_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="factors"):
        LowRankGradient(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="layout"):
        LowRankGradient(torch.zeros(3, 4), torch.zeros(3, 4), "rows")
