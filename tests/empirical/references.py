"""What the empirical kernels are checked against: the definition, computed
the slow way (one `torch.autograd.grad` call per output entry, parameters
flattened and concatenated, `Θ = J1 J2ᵀ`), and the Jacobian contraction of the
whole batch, without `vmap_axes`.
"""

import torch

import torchntk


IMPLEMENTATIONS = ('jacobian_contraction', 'ntk_vector_products', 'structured_derivatives',
                   'auto')

ATOL = 1e-12


def jacobian_by_loop(model, x):
    """`(N, O, P)`: the gradient of every output entry, parameters concatenated."""
    params = list(model.parameters())
    out = model(x)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i, o], params,
                                                                  retain_graph=True)])
            for i in range(out.shape[0]) for o in range(out.shape[1])]
    return torch.stack(rows).reshape(out.shape[0], out.shape[1], -1)


def full_ntk_by_loop(model, x1, x2):
    """`(N1, N2, O, O)`: `Θ[i, j, o, o'] = ∂f_o(x1_i)/∂θ · ∂f_o'(x2_j)/∂θ`."""
    return torch.einsum('iap,jbp->ijab', jacobian_by_loop(model, x1), jacobian_by_loop(model, x2))


def agrees_with_jacobian_contraction(model, x1, x2, trace_axes, vmap_axes=0,
                                     implementations=IMPLEMENTATIONS, **kwargs):
    expected = torchntk.empirical_ntk_fn(model, trace_axes, vmap_axes=None,
                                         implementation='jacobian_contraction')(x1, x2, **kwargs)
    for axes in (vmap_axes, None):
        for implementation in implementations:
            ntk = torchntk.empirical_ntk_fn(model, trace_axes, vmap_axes=axes,
                                            implementation=implementation)(x1, x2, **kwargs)
            torch.testing.assert_close(ntk, expected, rtol=0, atol=ATOL)
