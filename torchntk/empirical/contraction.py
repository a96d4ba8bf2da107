"""Contractions: the einsum that turns two output-shaped tensors into a
kernel (`OutputContraction`), and einsums of several operands run pairwise in
the cheapest order."""

from __future__ import annotations

import math
import string
from typing import Sequence

import torch

from ..ops.products import einsum_pair
from .cost import contraction_order


def output_contractions(shapes1: Sequence[Sequence[int]], shapes2: Sequence[Sequence[int]],
                         trace_axes: Sequence[int], diagonal_axes: Sequence[int], caller: str
                         ) -> list[OutputContraction]:
    """The contraction of each pair of output tensors of shapes `shapes1[i]`
    and `shapes2[i]`, which must agree on the traced and diagonal axes."""
    contractions = []
    for shape1, shape2 in zip(shapes1, shapes2):
        contraction = OutputContraction(len(shape1), trace_axes, diagonal_axes, caller)
        for axis in contraction.paired_axes():
            if len(shape1) != len(shape2) or shape1[axis] != shape2[axis]:
                raise ValueError(f"{caller}: outputs of shapes {tuple(shape1)} and {tuple(shape2)} "
                                 f"differ on axis {axis}, which is in trace_axes "
                                 f"{tuple(trace_axes)} or diagonal_axes {tuple(diagonal_axes)}")
        contractions.append(contraction)
    return contractions


def cheapest_einsum(terms: Sequence[str], result: str, tensors: Sequence[torch.Tensor],
            max_size: float = math.inf, into: torch.Tensor | None = None) -> torch.Tensor:
    """`torch.einsum` of several operands, pairwise in the cheapest order
    (intermediate results of at most `max_size` entries where possible); with
    `into` (a result of ours), added to it in place, the last product fused
    with the addition where it sums nothing (`addcmul_`).

    A pair met twice (the same tensors, the same contraction up to the names
    of the letters, as both sides of a kernel with `x2=None`) is computed once.
    """
    sizes = {c: n for term, t in zip(terms, tensors) for c, n in zip(term, t.shape)}
    plan, done = contraction_order(terms, result, sizes, max_size)[1], {}
    if isinstance(plan, int):
        out = tensors[plan].permute([terms[plan].index(c) for c in result])
        return out.clone() if into is None else into.add_(out)
    (left, left_letters), (right, right_letters) = (_run_plan(part, terms, tensors, done)
                                                    for part in plan[:2])
    if any(sizes[c] != 1 for c in left_letters + right_letters if c not in result):
        out = einsum_pair(f"{left_letters},{right_letters}->{result}", left, right)
        return out if into is None else into.add_(out)
    # The last product sums nothing: a broadcast multiplication, fused with the
    # addition, or done in place in a product of ours holding the whole result.
    left, right = _aligned(left, left_letters, result), _aligned(right, right_letters, result)
    if into is not None:
        return into.addcmul_(left, right)
    if not (torch.is_grad_enabled() and (left.requires_grad or right.requires_grad)):
        for own, other, part in ((left, right, plan[0]), (right, left, plan[1])):
            if (not isinstance(part, int) and own.shape == torch.Size(sizes[c] for c in result)
                    and own.untyped_storage().data_ptr() != other.untyped_storage().data_ptr()):
                return own.mul_(other)
    return left * right


def _run_plan(plan, terms: Sequence[str], tensors: Sequence[torch.Tensor],
              done: dict) -> tuple[torch.Tensor, str]:
    """The result of `plan` (`_search_contraction_order`) and its letters; the
    products made are kept in `done` by operands and contraction."""
    if isinstance(plan, int):
        return tensors[plan], terms[plan]
    (left, left_letters), (right, right_letters) = (_run_plan(part, terms, tensors, done)
                                                    for part in plan[:2])
    spec = f"{left_letters},{right_letters}->{plan[2]}"
    names = {c: string.ascii_letters[i]
             for i, c in enumerate(c for c in dict.fromkeys(spec) if c.isalpha())}
    key = (id(left), id(right), ''.join(names.get(c, c) for c in spec))
    if key not in done:
        done[key] = einsum_pair(spec, left, right)
    return done[key], plan[2]


def _aligned(t: torch.Tensor, letters: str, result: str) -> torch.Tensor:
    """`t` (axes named by `letters`; those not in `result` of size 1) as a view
    broadcasting to `result`'s axes."""
    t = t[tuple(slice(None) if c in result else 0 for c in letters)]
    kept = [c for c in letters if c in result]
    t = t.permute([kept.index(c) for c in result if c in kept])
    return t[tuple(slice(None) if c in kept else None for c in result)]


class OutputContraction:
    """The einsum that turns two output-shaped tensors into a kernel.

    Output axis `i` gets letter `a_i` on side 1 and `b_i` on side 2; a traced
    or diagonal axis uses one letter on both sides (summed, or kept once).
    Output axes take upper-case letters, and lower-case ones from the end of
    the alphabet name the other axes (parameters, rows, groups, columns):
    `torch.einsum` orders summed axes by letter, so summed output axes come
    before the parameter axes that follow them in memory, and a Jacobian
    `(*out, *θ)` is contracted without being copied.
    """

    def __init__(self, out_ndim: int, trace_axes: Sequence[int], diagonal_axes: Sequence[int],
                 caller: str):
        for name, axes in (('trace_axes', trace_axes), ('diagonal_axes', diagonal_axes)):
            if any(not -out_ndim <= a < out_ndim for a in axes):
                raise ValueError(f"{caller}: {name} {tuple(axes)} are out of range for outputs "
                                 f"with {out_ndim} axes")
        trace = {a % out_ndim for a in trace_axes}
        diagonal = {a % out_ndim for a in diagonal_axes}
        if trace & diagonal:
            raise ValueError(f"{caller}: trace_axes {tuple(trace_axes)} and diagonal_axes "
                             f"{tuple(diagonal_axes)} must not overlap")
        alphabet = iter(string.ascii_uppercase + string.ascii_lowercase[:10])
        letters1, letters2, result = '', '', ''
        for axis in range(out_ndim):
            a = next(alphabet)
            b = a if axis in trace | diagonal else next(alphabet)
            letters1 += a
            letters2 += b
            if axis in diagonal:
                result += a
            elif axis not in trace:
                result += a + b
        #: The letters of the output axes on each side, and of the kernel's axes.
        self.letters1, self.letters2, self.result = letters1, letters2, result
        self.ndim = out_ndim
        self.trace = sorted(trace)

    def paired_axes(self) -> list[int]:
        """Traced and diagonal axes: the two outputs must agree in size on them."""
        return [i for i, (a, b) in enumerate(zip(self.letters1, self.letters2)) if a == b]

    def normalized(self, kernel: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor:
        """`kernel` divided by the size of the traced axes of `out_shape`."""
        divisor = math.prod(out_shape[a] for a in self.trace)
        return kernel if divisor == 1 else kernel / divisor

    def contract(self, t1: torch.Tensor, t2: torch.Tensor, n_param_dims: int) -> torch.Tensor:
        """Contract `(*out1, *P)` with `(*out2, *P)` over `P` and the traced axes
        (summed, not yet `normalized`)."""
        params = string.ascii_lowercase[26 - n_param_dims:]
        spec = f"{self.letters1}{params},{self.letters2}{params}->{self.result}"
        return einsum_pair(spec, t1, t2)

    def multiply_adds(self, shape1: Sequence[int], shape2: Sequence[int]) -> int:
        """Entries of the result times entries of the traced axes."""
        paired = self.paired_axes()
        return math.prod(shape1[i] if i in paired else shape1[i] * shape2[i]
                         for i in range(self.ndim))

    def affine_terms(self, shapes: Sequence[tuple[Sequence[int], int]], groups: int,
                     columns: int, outputs: int, cotangent_layout: str, batch_axis: int | None
                     ) -> tuple[list[str], str, dict[str, int]]:
        r"""Einsum terms, result and letter sizes of a structured layer's contribution

        .. math:: \sum_{r, s, g} (a_1[r, g]·a_2[s, g])\,(g_1[…, r, g]·g_2[…, s, g])

        from `g1 (*out1, R, G, J)`, `a1 ([N1], R, G, I)`, `g2 (*out2, S, G, J)`,
        `a2 ([N2], S, G, I)` (the cotangents' last three axes in the order of
        `cotangent_layout`, e.g. `'RGJ'`); `shapes` holds `(output shape,
        rows R)` of each side. With a `batch_axis`, `a` holds the rows of one
        example's call per example of that output axis.
        """
        (out1, rows1), (out2, rows2) = shapes
        batch1, batch2 = ('', '') if batch_axis is None else \
            (self.letters1[batch_axis], self.letters2[batch_axis])
        g1, g2 = (cotangent_layout.replace('R', rows).replace('G', 'y').replace('J', 'w')
                  for rows in ('z', 'v'))
        terms = [self.letters1 + g1, f"{batch1}zyx", self.letters2 + g2, f"{batch2}vyx"]
        sizes = {**dict(zip(self.letters1, out1)), **dict(zip(self.letters2, out2)),
                 'z': rows1, 'v': rows2, 'y': groups, 'x': columns, 'w': outputs}
        return terms, self.result, sizes

    def contract_full(self, full: torch.Tensor) -> torch.Tensor:
        """Apply the traces and diagonals to a full `(*out1, *out2)` kernel."""
        return self.normalized(torch.einsum(f"{self.letters1}{self.letters2}->{self.result}", full),
                               full.shape)
