"""The cost model: FLOP estimates of the three implementations, by which
`implementation='auto'` chooses, and the search for the cheapest order of
the pairwise products of an einsum."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .structured import affine_operands

if TYPE_CHECKING:
    from .task import NtkTask


def flops(task: NtkTask, implementation: str) -> float:
    """The FLOP estimate of `implementation` (`empirical_ntk_fn`'s docstring)."""
    n_params = sum(p.numel() for p in task.params.values())
    k = _contraction_size(task)
    if implementation == 'jacobian_contraction':
        return _jacobian_pass_flops(task, 2.) + 2 * k * n_params
    if implementation == 'ntk_vector_products':
        calls2, forward2, outputs2 = _per_call(task)[1]
        return calls2 * forward2 * (1 + 2 * outputs2) + 3 * task.forward_flops * calls2 * outputs2
    rules = task.structured_layers
    structured = {n for rule in rules.values() for n in rule.param_names()}
    other = sum(p.numel() for n, p in task.params.items() if n not in structured)
    passes = _jacobian_pass_flops(task, 1 + other / n_params)
    return passes + 2 * k * other + 2 * sum(
        contraction_order(*affine_operands(task, output, rule), task.max_entries())[0]
        for output in range(len(task.contractions)) for rule in rules.values())


def _contraction_size(task: NtkTask) -> int:
    """Result entries times traced entries: the multiply-adds per parameter."""
    return sum(contraction.multiply_adds(shape1, shape2) for contraction, shape1, shape2
               in zip(task.contractions, task.batch1.out_shapes, task.batch2.out_shapes))


def _per_call(task: NtkTask) -> list[tuple[int, float, float]]:
    """`(calls, forward FLOPs per call, outputs per call)` of each input."""
    calls1, calls2 = task.batch_sizes()
    outputs1, outputs2 = task.batch1.outputs(), task.batch2.outputs()
    forward = task.forward_flops / calls1
    return [(calls1, forward, outputs1 / calls1),
            (calls2, forward * (1 if task.axes else outputs2 / outputs1), outputs2 / calls2)]


def _jacobian_pass_flops(task: NtkTask, reverse_per_forward: float) -> float:
    """FLOPs of one forward and one reverse pass per output entry, on both inputs."""
    inputs = _per_call(task)[:1 if task.same_inputs else 2]
    return sum(calls * forward * (1 + outputs * reverse_per_forward)
               for calls, forward, outputs in inputs)


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
