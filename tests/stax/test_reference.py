"""torchntk's kernels against neural-tangents 0.6.5.

The cases are in tests/reference/cases.json (fully connected),
tests/reference/conv_cases.json (convolutional) and mask_cases.json (masked
inputs), the reference values in fc_reference.npz, conv_reference.npz and
mask_reference.npz beside them, made by tests/reference/make_reference.py. A
case may fix ``diagonal_spatial`` and give a ``mask_constant``.
"""
import pytest
import torch
import torch.nn.functional as F

from torchntk import stax

TOLERANCE = {"closed_form": 1e-10, "quadrature": 1e-6}
# Every case also runs on the GPU where there is one (kernels follow the inputs' device).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

NUMERICAL_FNS = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "silu": F.silu,
    "mish": F.mish,
    "erf": torch.special.erf,
    "sin": torch.sin,
}

COMBINATORS = {
    "serial": lambda layers: stax.serial(*layers),
    "parallel": lambda layers: stax.parallel(*layers),
    "repeat": lambda layers, n: stax.repeat(layers[0], n),
}


def build_model(spec):
    """Build a torchntk model from a cases.json layer spec ``[name, kwargs(, children)]``."""
    name, kwargs, *children = spec
    if name in COMBINATORS:
        return COMBINATORS[name]([build_model(child) for child in children[0]], **kwargs)
    if name == "ElementwiseNumerical":
        kwargs = {**kwargs, "fn": NUMERICAL_FNS[kwargs["fn"]]}
    if "s" in kwargs:
        kwargs = {**kwargs, "s": tuple(kwargs["s"])}
    return getattr(stax, name)(**kwargs)


def relative_error(actual, expected):
    return (torch.linalg.norm(actual - expected) / torch.linalg.norm(expected)).item()


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_match_neural_tangents(fc_case, fc_reference, device):
    check_case(fc_case, fc_reference, device)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_kernels_match_neural_tangents(conv_case, conv_reference, device):
    check_case(conv_case, conv_reference, device)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_kernels_match_neural_tangents(mask_case, mask_reference, device):
    check_case(mask_case, mask_reference, device)


def check_case(case, reference, device):
    name = case["name"]
    x1 = torch.from_numpy(reference[f"{name}/x1"]).to(device)
    x2 = None if case["x2_shape"] is None else torch.from_numpy(reference[f"{name}/x2"]).to(device)
    get = tuple(case.get("get", ("nngp", "ntk", "cov1", "cov2")))
    if x2 is None:
        get = tuple(key for key in get if key != "cov2")

    model = build_model(case["network"])
    mask_constant = case.get("mask_constant")
    kernels = model.kernel_fn(x1, x2, get=get, diagonal_batch=case["diagonal_batch"],
                              diagonal_spatial=case.get("diagonal_spatial"),
                              mask_constant=None if mask_constant is None else float(mask_constant))

    tolerance = TOLERANCE[case["tolerance"]]
    errors = {}
    for key in get:
        expected = torch.from_numpy(reference[f"{name}/{key}"])
        actual = getattr(kernels, key)
        assert actual.device.type == device, f"{key} is on {actual.device}, not {device}"
        actual = actual.cpu()
        assert actual.shape == expected.shape, f"{key}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
        errors[key] = relative_error(actual, expected)
    assert all(error <= tolerance for error in errors.values()), f"relative errors {errors} > {tolerance}"
