"""`torchntk.empirical.analysis`: the forward passes run once per shapes, and
examples that interact across the batch take the whole batch, not vmap.
"""

import pytest
import torch

import torchntk
from torchntk import stax
from torchntk.empirical import analysis as empirical_analysis, model as empirical_model

from tests.empirical.references import ATOL, IMPLEMENTATIONS, full_ntk_by_loop


def test_forward_passes_and_flop_counts_run_once_per_shapes(monkeypatch):
    """The shape analysis (forward passes, FLOP count, per-example check) runs on
    the first call with given shapes and training modes, not on every call."""
    passes, counters = [], []

    class CountingFlopCounterMode(empirical_model.FlopCounterMode):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            counters.append(self)

    traced_forward = empirical_analysis.traced_forward
    monkeypatch.setattr(empirical_model, 'FlopCounterMode', CountingFlopCounterMode)
    monkeypatch.setattr(empirical_analysis, 'traced_forward',
                        lambda *args, **kwargs: passes.append(1) or traced_forward(*args, **kwargs))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3)).double()
    ntk_fn = torchntk.empirical_ntk_fn(model)
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first = ntk_fn(x)
    analysis_passes = len(passes)
    assert analysis_passes > 0 and len(counters) == 1 and counters[0].get_total_flops() > 0
    again = ntk_fn(x + 1)                    # the same shapes: nothing rerun
    assert len(passes) == analysis_passes and len(counters) == 1
    ntk_fn(x[:4])                            # new shapes
    ntk_fn(x, x[:2])                         # an x2
    model.eval()                             # other training modes
    ntk_fn(x)
    assert len(counters) == 4 and len(passes) > 3 * analysis_passes
    for value, inputs in ((first, x), (again, x + 1)):
        expected = torchntk.empirical_ntk_fn(model, implementation='jacobian_contraction')(inputs)
        torch.testing.assert_close(value, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_batchnorm_in_training_mode_falls_back_to_whole_batch(implementation):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6),
                                torch.nn.Tanh(), torch.nn.Linear(6, 2)).double().train()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.diagonal(full_ntk_by_loop(model, x, x), dim1=2, dim2=3).mean(-1)
    running_mean = model[1].running_mean.clone()
    ntk = torchntk.empirical_ntk_fn(model, vmap_axes=0, implementation=implementation)(x)
    torch.testing.assert_close(ntk, expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(model[1].running_mean, running_mean, rtol=0, atol=0)


class CentreBatch(torch.nn.Module):
    """Subtracts the batch mean: examples interact, and no known module says so."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


def test_undetected_batch_interaction_with_vmap_raises_value_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), CentreBatch(), torch.nn.Linear(6, 2))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match='vmap_axes=None'):
        torchntk.empirical_ntk_fn(model, vmap_axes=0)(x)
    assert torchntk.empirical_ntk_fn(model, vmap_axes=None)(x).shape == (5, 5)


def test_stax_layernorm_over_batch_axis_falls_back_to_whole_batch():
    model = stax.serial(stax.Dense(6), stax.LayerNorm(axis=(0, 1)), stax.Dense(2))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model.init_parameters(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.diagonal(full_ntk_by_loop(model, x, x), dim1=2, dim2=3).mean(-1)
    ntk = torchntk.empirical_ntk_fn(model, vmap_axes=0)(x)
    torch.testing.assert_close(ntk, expected, rtol=0, atol=ATOL)
