"""The contraction-order search: the cheapest order of pairwise products of an einsum."""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence


def contraction_order(terms: Sequence[str], result: str, sizes: Mapping[str, int],
                       max_size: float = math.inf) -> tuple[int, Any]:
    """The cheapest order of pairwise contractions for `einsum(terms -> result)`
    (`_search_contraction_order`), remembered across calls: the search costs
    milliseconds, as much as a small model's whole kernel."""
    return _search_contraction_order(tuple(terms), result, tuple(sizes.items()), max_size)


@functools.lru_cache(maxsize=4096)
def _search_contraction_order(terms: tuple[str, ...], result: str,
                              size_items: tuple[tuple[str, int], ...],
                              max_size: float) -> tuple[int, Any]:
    """The cheapest order of pairwise contractions for `einsum(terms -> result)`.

    Exhaustive over binary trees (a handful of operands); orders whose
    intermediate results stay within `max_size` entries come first, as
    opt_einsum's `memory_limit`. Returns the multiply-adds and the plan: an
    operand index, or `(plan, plan, letters)` for the contraction of two
    intermediate results into `letters` (the letters of `result` in another
    order at the root).
    """
    sizes = dict(size_items)
    everything = frozenset(range(len(terms)))

    @functools.cache
    def best(subset: frozenset) -> tuple[tuple[bool, int], Any, str]:
        """`((too large, multiply-adds), plan, letters)` of the best order for `subset`."""
        if len(subset) == 1:
            i = next(iter(subset))
            return (False, 0), i, terms[i]
        needed = set(result).union(*(terms[i] for i in everything - subset))
        first, rest = min(subset), sorted(subset - {min(subset)})
        options = []
        for mask in range(2**len(rest) - 1):   # the part holding `first` misses some of `rest`
            left = frozenset([first, *(i for b, i in enumerate(rest) if mask >> b & 1)])
            ((large1, cost1), plan1, letters1), ((large2, cost2), plan2, letters2) = \
                best(left), best(subset - left)
            # torch.einsum's own layout of a product (shared, left-only, right-only
            # kept axes): a result in it is not copied, and symmetric pairs agree.
            # A broadcast product (nothing summed) keeps the larger factor's layout.
            if all(sizes[c] == 1 for c in set(letters1) | set(letters2) if c not in needed):
                big, small = sorted((letters1, letters2),
                                    key=lambda term: -math.prod(sizes[c] for c in term))
                letters = ''.join(c for c in dict.fromkeys(big + small) if c in needed)
            else:
                letters = ''.join(
                    [c for c in letters1 if c in letters2 and c in needed]
                    + [c for c in letters1 if c not in letters2 and c in needed]
                    + [c for c in letters2 if c not in letters1 and c in needed])
            cost = cost1 + cost2 + math.prod(sizes[c] for c in set(letters1) | set(letters2))
            large = large1 or large2 or (subset != everything
                                         and math.prod(sizes[c] for c in letters) > max_size)
            options.append(((large, cost), (plan1, plan2, letters), letters))
        return min(options, key=lambda option: option[0])

    (_, cost), plan, _ = best(everything)
    return cost, plan
