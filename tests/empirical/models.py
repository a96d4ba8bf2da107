"""Small models shared by the tests of `torchntk.empirical`: stax networks
initialized in float64, and a `torch.nn` model with pytree inputs and outputs.
"""

import torch

from torchntk import stax


def tiny_models():
    return {
        'erf_ntk': lambda: stax.serial(stax.Dense(7, W_std=1.3, b_std=0.2), stax.Erf(),
                                       stax.Dense(3, W_std=0.9, b_std=0.1)),
        'relu_standard': lambda: stax.serial(
            stax.Dense(6, W_std=1.4, parameterization='standard'), stax.Relu(),
            stax.Dense(5, W_std=1.1, b_std=0.3, parameterization='standard', s=(2, 1)),
            stax.Tanh(), stax.Dense(2, b_std=0., parameterization='standard')),
    }


def initialized(name, seed):
    model = tiny_models()[name]()
    model.init_parameters((1, 4), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64)
    return model


class TwoInputsTwoHeads(torch.nn.Module):
    """`{'u': (N, 4), 'v': (N, 3)}` -> `((N, 2), {'z': (N, 3)})`, optionally scaled by `gate`."""

    def __init__(self):
        super().__init__()
        self.u, self.v = torch.nn.Linear(4, 5), torch.nn.Linear(3, 5)
        self.head1, self.head2 = torch.nn.Linear(5, 2), torch.nn.Linear(5, 3)

    def forward(self, x, gate=None):
        h = torch.tanh(self.u(x['u']) + self.v(x['v']))
        if gate is not None:
            h = h * gate
        return self.head1(h), {'z': self.head2(h)}


def pytree_inputs(n, seed):
    generator = torch.Generator().manual_seed(seed)
    return {'u': torch.randn(n, 4, generator=generator, dtype=torch.float64),
            'v': torch.randn(n, 3, generator=generator, dtype=torch.float64)}
