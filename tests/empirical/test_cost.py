"""`torchntk.empirical.cost`: the cheapest order of an einsum's pairwise
products, and `contraction.cheapest_einsum`, which runs it.
"""

import torch

from torchntk.empirical import contraction as empirical_contraction, cost as empirical_cost

from tests.empirical.references import ATOL


def test_contraction_order_is_cheapest_and_exact():
    # (1000 x 2) (2 x 1000) (1000 x 3): multiplying the last two first costs
    # 2·1000·3 + 1000·2·3 multiply-adds, the first two first 1000·1000·2 + 1000·1000·3.
    sizes = {'i': 1000, 'j': 2, 'k': 1000, 'l': 3}
    cost, plan = empirical_cost.contraction_order(['ij', 'jk', 'kl'], 'il', sizes)
    assert cost == 2 * 1000 * 3 + 1000 * 2 * 3
    assert plan[0] == 0 and plan[1][:2] == (1, 2)
    a, b, c = (torch.randn(m, n, dtype=torch.float64) for m, n in ((7, 2), (2, 9), (9, 3)))
    einsum = empirical_contraction.cheapest_einsum
    torch.testing.assert_close(einsum(['ij', 'jk', 'kl'], 'il', (a, b, c)), a @ b @ c, rtol=0,
                               atol=ATOL)


def test_contraction_order_keeps_intermediates_within_max_size():
    # Cheapest: (ij)(jk) first, 2·10·100 + 2·100·10 multiply-adds through a 2 x 100
    # intermediate; within 100 entries: (jk)(kl) first, 10·100·10 + 2·10·10 through 10 x 10.
    sizes = {'i': 2, 'j': 10, 'k': 100, 'l': 10}
    order = empirical_cost.contraction_order
    assert order(['ij', 'jk', 'kl'], 'il', sizes) == (4000, ((0, 1, 'ik'), 2, 'il'))
    assert order(['ij', 'jk', 'kl'], 'il', sizes, max_size=100) == (10200, (0, (1, 2, 'jl'), 'il'))
    a, b, c = (torch.randn(m, n, dtype=torch.float64) for m, n in ((2, 10), (10, 100), (100, 10)))
    einsum = empirical_contraction.cheapest_einsum
    torch.testing.assert_close(einsum(['ij', 'jk', 'kl'], 'il', (a, b, c), max_size=100),
                               a @ b @ c, rtol=0, atol=ATOL)
