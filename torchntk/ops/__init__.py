"""Hot loops of kernel propagation, with a compiled extension and a torch fallback.

`diagonal_conv` is the full-spatial covariance of a shared-weight convolution
along one spatial dimension (Novak et al. 2019, arXiv:1810.05148, eq. 7):

    out[b, p, q] = (1/k) Σ_{i<k} cov_pad[b, s·p + i, s·q + i]

— a sum along the diagonals of each `(X, X')` pair, O(k) work per output entry
(neural-tangents spends O(k²) on a dense k×k depthwise convolution). A
D-dimensional convolution applies it once per spatial dimension; a trailing
axis `(B, X, X, R)` carries the other dimensions' pairs, so no permuted copies
are needed. `diagonal_conv_transpose` is its adjoint, which gives its gradient;
the rule of a transposed convolution is not that adjoint but `diagonal_conv`
on the stride-dilated covariance (`torchntk.functional.conv.conv_transpose`).

The backend is the C++/CUDA extension `torchntk._C` (csrc/) when it was built,
else pure torch; `TORCHNTK_BACKEND=torch|extension` forces one, and `backend()`
says which is in use. Tensors the extension does not take (CUDA tensors when it
was built without CUDA, dtypes other than float32/float64) go to torch.
"""

from __future__ import annotations

from .diagonal_conv import diagonal_conv, diagonal_conv_output_size, diagonal_conv_transpose
from .extension import backend

__all__ = ['backend', 'diagonal_conv', 'diagonal_conv_output_size', 'diagonal_conv_transpose']
