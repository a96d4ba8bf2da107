"""Two-operand einsums as one (batched) matrix product, float32 ones on the CPU through oneDNN.

PyTorch sends float32 matrix products on the CPU to MKL. On the CPUs we
benchmark on, oneDNN's product, which PyTorch also ships (the private operator
`torch.ops.mkldnn._linear_pointwise` reaches it), is faster than MKL's
`sgemm`, and the empirical kernels spend most of their time in such products
(the measurements: `benchmarks/README.md`, `bench_empirical.py`).
`einsum_pair` runs the product there when

- both operands are float32 on the CPU and oneDNN's product exists and agrees
  with `torch.mm` on a small check (it is private to PyTorch);
- no gradient has to flow through the result (that product has no derivative);
- each of the products holds at least `_MIN_MULTIPLY_ADDS` multiply-adds
  (below that, the call costs more than it saves);
- torch.compile is not tracing, nor torch.func transforming them;

and `torch.einsum` otherwise.
"""

from __future__ import annotations

import functools
import math

import torch

#: Multiply-adds below which one product is left to torch.einsum.
_MIN_MULTIPLY_ADDS = 1 << 22


@functools.cache
def _onednn_available() -> bool:
    """Whether oneDNN's float32 product exists here and agrees with torch.mm."""
    if not torch.backends.mkldnn.is_available() or \
            not hasattr(torch.ops.mkldnn, '_linear_pointwise'):
        return False
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(24, 40, generator=generator) for _ in range(2))
    try:
        product = _onednn_mm_t(a, b)
    except RuntimeError:
        return False
    return bool(torch.allclose(product, a @ b.t(), rtol=1e-5, atol=1e-5))


def _onednn_mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b.T` for `a` `(M, K)` and `b` `(N, K)`, by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, 'none', [], '')


def einsum_pair(spec: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`torch.einsum(spec, a, b)`; see the module's docstring for where oneDNN computes it.

    The result is laid out as torch.einsum lays it out: batch letters (in
    both operands and the result), then `a`'s, then `b`'s, permuted (a view)
    into the order `spec` asks for.
    """
    if not _takes(a, b):
        return torch.einsum(spec, a, b)
    operands, result = spec.replace(' ', '').split('->')
    letters_a, letters_b = operands.split(',')
    batch = [c for c in letters_a if c in letters_b and c in result]
    only_a = [c for c in letters_a if c not in letters_b]
    only_b = [c for c in letters_b if c not in letters_a]
    summed = [c for c in letters_a if c in letters_b and c not in result]
    if (len(set(letters_a)) < len(letters_a) or len(set(letters_b)) < len(letters_b)
            or any(c not in result for c in only_a + only_b)):
        return torch.einsum(spec, a, b)        # repeated letters, or sums over one operand
    size = dict(zip(letters_a, a.shape)) | dict(zip(letters_b, b.shape))
    n_batch, rows, columns, depth = (math.prod(size[c] for c in part)
                                     for part in (batch, only_a, only_b, summed))
    if rows * columns * depth < _MIN_MULTIPLY_ADDS:
        return torch.einsum(spec, a, b)
    a = a.permute([letters_a.index(c) for c in batch + only_a + summed])
    b = b.permute([letters_b.index(c) for c in batch + only_b + summed])
    a, b = a.reshape(n_batch, rows, depth), b.reshape(n_batch, columns, depth)
    if n_batch == 1:
        product = _onednn_mm_t(a[0], b[0])
    else:
        product = a.new_empty(n_batch, rows, columns)
        for i in range(n_batch):
            product[i] = _onednn_mm_t(a[i], b[i])
    layout = batch + only_a + only_b
    product = product.view([size[c] for c in layout])
    return product.permute([layout.index(c) for c in result])


def _takes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype == torch.float32 and a.device.type == b.device.type == 'cpu'
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
            and not torch.compiler.is_compiling()
            and not any(map(torch._C._functorch.is_functorch_wrapped_tensor, (a, b)))
            and _onednn_available())
