"""Compute reference NNGP/NTK values with neural-tangents for the cases in cases.json
(fully connected networks), conv_cases.json (convolutional networks) and
mask_cases.json (masked inputs).

The values in ``fc_reference.npz``, ``conv_reference.npz`` and
``mask_reference.npz`` come from an
independent implementation, neural-tangents 0.6.5 in float64, so that ``tests/stax/test_reference.py`` can
check torchntk's kernels against them. This script is a tool for maintainers:
it is never imported by torchntk or by the tests, and it needs its own
environment, because neural-tangents depends on jax and tensorflow::

    python3 -m venv /path/to/nt-venv
    /path/to/nt-venv/bin/pip install neural-tangents==0.6.5 jax==0.4.23 \\
        jaxlib==0.4.23 'numpy<2' scipy==1.11.4 tensorflow==2.15.1 tf2jax==0.3.5

Then, from the repository root::

    /path/to/nt-venv/bin/python tests/reference/make_reference.py [conv_cases.json ...]

It reads each case file (all of them, or those named) and rewrites its
reference file (``cases.json`` -> ``fc_reference.npz``, ``conv_cases.json``
-> ``conv_reference.npz``, ``mask_cases.json`` -> ``mask_reference.npz``,
about 2 minutes on 2 cores) with, for every case ``name``, the keys
``name/x1``, ``name/x2`` (only when the case gives ``x2_shape``),
``name/nngp``, ``name/ntk``, ``name/cov1`` and ``name/cov2`` (only with x2).
Inputs are stored in torchntk's (PyTorch) layout: batch axis 0, channel axis 1.

Besides the fields every case has, a case may give ``diagonal_spatial``, the
layout to force (both libraries get it), ``zero_rows``, rows of x1
set to zero, ``get``, the kernels to store and compare when
neural-tangents cannot give all of them (its RectifiedMonomial is NaN where
the two inputs coincide, so only the x1-x2 ``nngp`` and ``ntk`` are usable),
and ``mask_constant`` (a number or ``"nan"``): then entries of the inputs are
set to it with probability ``mask_p`` (default 0.3), independently except
along the PyTorch-layout axes ``mask_axes`` (e.g. ``[1]``: all channels of a
position at once), and both libraries mask them (``kernel_fn(...,
mask_constant=...)``). The stored inputs hold the constant.

Accuracy: the NTK of ReLU-like layers (and Sign's NNGP) has a square-root
singularity where the two inputs coincide, so an ulp of disagreement between
the NNGP diagonal and the variances becomes a 1e-9..1e-8 relative error on the
kernel's diagonal. neural-tangents computes the two by different paths with
``diagonal_batch=True`` and inside ``stax.repeat`` (a ``lax.scan``), and its
values there are off by that much (checked against 40-digit mpmath for
ReLU). This script therefore always asks for the full batch and takes the
diagonal of ``cov1``/``cov2`` itself, and unrolls ``repeat`` into ``serial``:
the same kernels, computed consistently, accurate to ~1e-15. (One exception
to "the same": neural-tangents' Sign sets every nonzero entry of a full cov1 to
1, so Sign cases must use ``diagonal_batch=True``.)

A case's network is written in torchntk's vocabulary (see cases.json); the
table ``LAYERS`` below translates each layer name to the neural-tangents layer
that computes the same kernel. A new layer family is added there, as one entry.
Images are channels-first in torchntk and channels-last in neural-tangents:
the inputs and ``ImageResize``'s ``shape`` move the channel axis last; filter,
window and stride sizes keep their (H, W) order, and both libraries lay the
kernels out as (N1, N2, H, H', W, W'). neural-tangents keeps the spatial axes
of a kernel reversed after an odd number of full-spatial shared convolutions
(``is_reversed``); ``unreverse`` restores the order. (Its ``ImageResize``
ignores that flag and resizes the wrong axes of a reversed kernel, so
conv_cases.json resizes only after an even number of such convolutions, or
to a square size.)
"""
import json
import logging
import os
import pathlib
import sys
import zlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import jax.scipy.special  # noqa: E402
import numpy as np  # noqa: E402
from neural_tangents import stax  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
# (case file, reference file) pairs: fully connected, convolutional, and masked networks.
CASE_FILES = [
    (HERE / "cases.json", HERE / "fc_reference.npz"),
    (HERE / "conv_cases.json", HERE / "conv_reference.npz"),
    (HERE / "mask_cases.json", HERE / "mask_reference.npz"),
]

# Activations that torchntk names and neural-tangents only has through quadrature.
NUMERICAL_FNS = {
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "silu": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "erf": jax.scipy.special.erf,
    "sin": jnp.sin,
}


def channels_last_axis(axis, ndim):
    """Map an axis of a PyTorch-layout (N, C, *spatial) array to neural-tangents' (N, *spatial, C)."""
    axis %= ndim
    if axis == 0:
        return 0
    if axis == 1:
        return ndim - 1
    return axis - 1


def to_channels_last(x):
    return np.moveaxis(x, 1, -1)


def channels_last_shape(shape):
    """An (N, C, *spatial) shape, e.g. ImageResize's, in neural-tangents' (N, *spatial, C) order."""
    return (shape[0], *shape[2:], shape[1])


def _window_args(**kw):
    """Filter, window and stride sizes as tuples; spatial axes keep their order (H, W)."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in kw.items()}


def _numerical(fn, deg):
    return stax.ElementwiseNumerical(fn=NUMERICAL_FNS[fn], deg=deg)


# Layers whose torchntk name or arguments differ from neural-tangents'. Each
# builder takes the case's keyword arguments and the input rank; every other
# layer name is looked up in neural_tangents.stax with its arguments unchanged.
LAYERS = {
    "Dense": lambda ndim, s=(1, 1), **kw: stax.Dense(s=tuple(s), **kw),
    "Dropout": lambda ndim, p: stax.Dropout(rate=1.0 - p, mode="train"),
    "LayerNorm": lambda ndim, axis: stax.LayerNorm(
        axis=[channels_last_axis(a, ndim) for a in axis] if isinstance(axis, list)
        else channels_last_axis(axis, ndim)),
    "FanInConcat": lambda ndim, axis: stax.FanInConcat(axis=channels_last_axis(axis, ndim)),
    "ElementwiseNumerical": lambda ndim, fn, deg: _numerical(fn, deg),
    "Tanh": lambda ndim, deg: _numerical("tanh", deg),
    "Sigmoid": lambda ndim, deg: _numerical("sigmoid", deg),
    "Softplus": lambda ndim, deg: _numerical("softplus", deg),
    "SiLU": lambda ndim, deg: _numerical("silu", deg),
    "Mish": lambda ndim, deg: _numerical("mish", deg),
    "Conv": lambda ndim, **kw: stax.Conv(**_window_args(**kw)),
    "ConvTranspose": lambda ndim, **kw: stax.ConvTranspose(**_window_args(**kw)),
    "ConvLocal": lambda ndim, **kw: stax.ConvLocal(**_window_args(**kw)),
    "AvgPool": lambda ndim, **kw: stax.AvgPool(**_window_args(**kw)),
    "SumPool": lambda ndim, **kw: stax.SumPool(**_window_args(**kw)),
    "ImageResize": lambda ndim, shape, **kw: stax.ImageResize(shape=channels_last_shape(shape), **kw),
}

COMBINATORS = {
    "serial": lambda layers: stax.serial(*layers),
    "parallel": lambda layers: stax.parallel(*layers),
    # Unrolled rather than stax.repeat: see "Accuracy" in the module docstring.
    "repeat": lambda layers, n: stax.serial(*layers * n),
}


def build(spec, ndim):
    """Translate a torchntk layer spec ``[name, kwargs(, children)]`` into a neural-tangents layer."""
    name, kwargs, *children = spec
    if name in COMBINATORS:
        return COMBINATORS[name]([build(child, ndim) for child in children[0]], **kwargs)
    if name in LAYERS:
        return LAYERS[name](ndim, **kwargs)
    return getattr(stax, name)(**kwargs)


def mask_constant(case):
    """The case's ``mask_constant`` as a float (JSON has no NaN), or None."""
    value = case.get("mask_constant")
    return None if value is None else float(value)


def draw_inputs(case):
    """Inputs of a case, in PyTorch layout, from a seed fixed by the case name."""
    rng = np.random.default_rng(zlib.crc32(case["name"].encode()))
    shapes = [case["x1_shape"], case["x2_shape"]]
    xs = [None if shape is None else np.cos(rng.normal(size=shape)) for shape in shapes]
    for row in case.get("zero_rows", []):
        xs[0][row] = 0.0
    if "mask_constant" in case:
        for x in xs:
            if x is not None:
                mask_shape = [1 if axis in case.get("mask_axes", []) else size
                              for axis, size in enumerate(x.shape)]
                masked = np.broadcast_to(rng.random(mask_shape) < case.get("mask_p", 0.3), x.shape)
                x[masked] = mask_constant(case)
    return xs


def unreverse(value, batch_ndim):
    """Undo neural-tangents' ``is_reversed``: its full-spatial shared convolutions
    reverse the order of the (X, X') pairs of spatial axes."""
    n_pairs = (value.ndim - batch_ndim) // 2
    order = list(range(batch_ndim))
    for pair in reversed(range(n_pairs)):
        order += [batch_ndim + 2 * pair, batch_ndim + 2 * pair + 1]
    return value.transpose(order)


def reference(case):
    x1, x2 = draw_inputs(case)
    _, _, kernel_fn = build(case["network"], x1.ndim)
    get = tuple(case.get("get", ("nngp", "ntk", "cov1", "cov2")))
    if x2 is None:
        get = tuple(key for key in get if key != "cov2")
    # Always the full batch, then the diagonal: see "Accuracy" in the module docstring.
    kernel = kernel_fn(
        to_channels_last(x1),
        None if x2 is None else to_channels_last(x2),
        get=None,
        diagonal_batch=False,
        diagonal_spatial=case.get("diagonal_spatial"),
        mask_constant=mask_constant(case),
    )
    arrays = {"x1": x1} if x2 is None else {"x1": x1, "x2": x2}
    for key in get:
        value = np.asarray(getattr(kernel, key))
        if kernel.is_reversed and not kernel.diagonal_spatial:
            value = unreverse(value, 2)
        if key in ("cov1", "cov2") and case["diagonal_batch"]:
            value = np.einsum("ii...->i...", value)
        arrays[key] = value
    return arrays


def write_references(case_file, output):
    cases = json.loads(case_file.read_text())
    names = [case["name"] for case in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"{case_file.name}: case names must be unique")
    results = {}
    for case in cases:
        arrays = reference(case)
        bad = [key for key, value in arrays.items()
               if key not in ("x1", "x2") and not np.all(np.isfinite(value))]
        if bad:
            raise ValueError(f"case {case['name']!r}: neural-tangents gave non-finite {bad}")
        results.update({f"{case['name']}/{key}": value for key, value in arrays.items()})
    np.savez_compressed(output, **results)
    logging.info("wrote %d cases to %s", len(cases), output)


def main(names):
    """Rewrite the references of the case files named in ``names`` (all when empty)."""
    for case_file, output in CASE_FILES:
        if not names or case_file.name in names:
            write_references(case_file, output)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(sys.argv[1:])
