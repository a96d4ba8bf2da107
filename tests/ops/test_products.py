"""torchntk.ops.products: two-operand einsums, float32 CPU products through oneDNN."""

import pytest
import torch

from torchntk.ops import products

needs_onednn = pytest.mark.skipif(not products._onednn_available(),
                                  reason="oneDNN's float32 product is not in this PyTorch")

# (spec, shape of a, shape of b): batched, several letters per group, the
# result in another order than torch.einsum's, summed letters in any order.
SPECS = [
    ('ik,jk->ij', (300, 200), (250, 200)),
    ('bik,bkj->bij', (3, 160, 200), (3, 200, 180)),
    ('ACywz,Azyx->AyCwx', (4, 10, 1, 64, 100), (4, 100, 1, 77)),
    ('AyCwx,ByDwx->ACBD', (6, 1, 10, 64, 77), (5, 1, 10, 64, 77)),
    ('nkac,mck->amn', (40, 30, 7, 20), (50, 20, 30)),
]


def operands(shape_a, shape_b, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(shape_a, generator=generator, dtype=dtype),
            torch.randn(shape_b, generator=generator, dtype=dtype))


@needs_onednn
@pytest.mark.parametrize('spec, shape_a, shape_b', SPECS)
def test_onednn_product_equals_torch_einsum(onednn_calls, spec, shape_a, shape_b):
    a, b = operands(shape_a, shape_b)
    expected = torch.einsum(spec, a.double(), b.double())
    result = products.einsum_pair(spec, a, b)
    assert onednn_calls, 'oneDNN was not used'
    assert result.shape == expected.shape
    scale = torch.einsum(spec, a.double().abs(), b.double().abs())
    assert ((result.double() - expected).abs() <= 1e-5 * scale).all()


@needs_onednn
def test_non_contiguous_operands_give_the_same_product(onednn_calls):
    a, b = operands((200, 300), (250, 200))
    expected = products.einsum_pair('ik,jk->ij', a.t().contiguous(), b)
    assert torch.equal(products.einsum_pair('ik,jk->ij', a.t(), b), expected)


def test_products_needing_gradients_keep_them(onednn_calls):
    a, b = operands((300, 200), (250, 200))
    a.requires_grad_(True)
    result = products.einsum_pair('ik,jk->ij', a, b)
    (gradient,) = torch.autograd.grad(result.sum(), a)
    assert not onednn_calls
    assert torch.allclose(gradient, b.sum(0).expand(300, -1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('spec, shape_a, shape_b, dtype', [
    ('ik,jk->ij', (300, 200), (250, 200), torch.float64),   # float64: MKL
    ('ik,jk->ij', (30, 20), (25, 20), torch.float32),       # too small to pay
    ('iik,jk->ij', (30, 30, 200), (25, 200), torch.float32),  # a diagonal
    ('ikl,jk->ij', (30, 200, 4), (25, 200), torch.float32),   # a sum over one operand
])
def test_other_einsums_are_torch_einsum(monkeypatch, spec, shape_a, shape_b, dtype):
    calls = []
    monkeypatch.setattr(products, '_onednn_mm_t', lambda a, b: calls.append(1))
    a, b = operands(shape_a, shape_b, dtype)
    assert torch.equal(products.einsum_pair(spec, a, b), torch.einsum(spec, a, b))
    assert not calls
