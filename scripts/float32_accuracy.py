"""float32-vs-float64 worst error per nonlinearity over input scales 1e-3..1e4.

For each nonlinearity φ and scale, x = scale·randn(5, 7) (float64, and the same
values in float32) goes through a shallow net Dense → φ → Dense(1) and a deep one
Dense → φ → Dense → φ → Dense → φ → Dense(1); the error is
max|K32 − K64| / max|K64| over nngp and ntk. Cases whose float64 kernel is
not finite or exceeds float32's range are exempt ('ovf'); a non-finite float32
kernel where the float64 one is finite counts as inf.

Run: .venv/bin/python scripts/float32_accuracy.py            (extension)
     TORCHNTK_BACKEND=torch .venv/bin/python scripts/float32_accuracy.py
"""
import math
import warnings

import torch

from torchntk import stax
from torchntk.ops import extension

warnings.simplefilter("ignore")
SCALES = [1e-3, 1e-2, 1e-1, 1., 1e1, 1e2, 1e3, 1e4]
F32_MAX = torch.finfo(torch.float32).max

NONLINEARITIES = {
    "relu": stax.Relu, "leaky_relu": lambda: stax.LeakyRelu(0.1), "abs": stax.Abs,
    "abrelu": lambda: stax.ABRelu(-0.3, 1.2), "sign": stax.Sign,
    **{f"rect_mono{n}": (lambda n=n: stax.RectifiedMonomial(n)) for n in range(4)},
    "erf": lambda: stax.Erf(1.3, 0.7, 0.2), "sigmoid_like": stax.Sigmoid_like, "gelu": stax.Gelu,
    "sin": lambda: stax.Sin(1.2, 0.9, 0.3), "cos": stax.Cos, "rbf": lambda: stax.Rbf(0.7),
    "gabor": stax.Gabor, "exp": lambda: stax.Exp(0.8, 0.6),
    "gaussian-": lambda: stax.Gaussian(1.5, -0.7), "gaussian+": lambda: stax.Gaussian(1., 0.1),
    "exp_normalized": stax.ExpNormalized, "polynomial": lambda: stax.Polynomial([0.1, 1., -0.5, 0.2]),
    "monomial3": lambda: stax.Monomial(3),
    "tanh": stax.Tanh, "sigmoid": stax.Sigmoid, "softplus": stax.Softplus, "silu": stax.SiLU,
    "mish": stax.Mish,
}


def networks(factory):
    dense = lambda: stax.Dense(16, W_std=1.5, b_std=0.1)
    yield "shallow", stax.serial(dense(), factory(), stax.Dense(1, W_std=1.5))
    yield "deep", stax.serial(dense(), factory(), dense(), factory(), dense(), factory(),
                              stax.Dense(1, W_std=1.5))


def error(model, x):
    k64 = model.kernel_fn(x, get=("nngp", "ntk"))
    k32 = model.kernel_fn(x.float(), get=("nngp", "ntk"))
    worst = 0.
    for a, b in zip(k64, k32):
        scale = a.abs().max().item()
        if not torch.isfinite(a).all() or scale > F32_MAX:
            return math.nan   # exempt: the float64 kernel overflows float32
        if not torch.isfinite(b).all():
            return math.inf
        if scale > 0:
            worst = max(worst, ((b.double() - a).abs().max() / scale).item())
    return worst


def main():
    x0 = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    print(f"backend={extension.backend()}; worst max|K32-K64|/max|K64| over scales "
          f"{SCALES[0]:g}..{SCALES[-1]:g}, nngp and ntk")
    print(f"{'nonlinearity':15s}{'net':8s}" + "".join(f"{s:>9g}" for s in SCALES) + f"{'worst':>10s}")
    for name, factory in NONLINEARITIES.items():
        for net, model in networks(factory):
            errors = [error(model, s * x0) for s in SCALES]
            finite = [e for e in errors if not math.isnan(e)]
            cells = "".join(f"{'ovf':>9s}" if math.isnan(e) else f"{e:9.1e}" for e in errors)
            worst = f"{max(finite):10.1e}" if finite else f"{'-':>10s}"
            print(f"{name:15s}{net:8s}{cells}{worst}", flush=True)


if __name__ == "__main__":
    main()
