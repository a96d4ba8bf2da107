import collections
import json
import os
import pathlib

import numpy as np
import pytest

from torchntk.ops import conv_chain, extension

REFERENCE_DIR = pathlib.Path(__file__).parent / "reference"


# Parameter name -> case file: fully connected, convolutional and masked reference cases.
_CASE_FILES = {"fc_case": "cases.json", "conv_case": "conv_cases.json",
               "mask_case": "mask_cases.json"}


def _reference(file_name):
    with np.load(REFERENCE_DIR / file_name) as data:
        return dict(data)


def _cases(file_name):
    return json.loads((REFERENCE_DIR / file_name).read_text())


def pytest_generate_tests(metafunc):
    # Cases are parameters, not a fixture's value, so each one is its own test id.
    for parameter, file_name in _CASE_FILES.items():
        if parameter in metafunc.fixturenames:
            cases = _cases(file_name)
            metafunc.parametrize(parameter, cases, ids=[case["name"] for case in cases])


@pytest.fixture(scope="session")
def fc_reference():
    """neural-tangents' kernels for the cases in cases.json, by key ``f"{name}/{kernel}"``."""
    return _reference("fc_reference.npz")


@pytest.fixture(scope="session")
def conv_reference():
    """neural-tangents' kernels for the cases in conv_cases.json, by key ``f"{name}/{kernel}"``."""
    return _reference("conv_reference.npz")


@pytest.fixture(scope="session")
def mask_reference():
    """neural-tangents' kernels for the cases in mask_cases.json, by key ``f"{name}/{kernel}"``."""
    return _reference("mask_reference.npz")


# Hypothesis profiles: 'ci' is reproducible (derandomized) and bounded; 'dev'
# explores new random examples. Chosen by HYPOTHESIS_PROFILE, else 'ci' when CI=true.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=20,
                          print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=20, print_blob=True)
settings.load_profile(os.environ.get(
    "HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI", "").lower() == "true" else "dev"))


@pytest.fixture
def onednn_calls(monkeypatch):
    """A list that grows by one per product `torchntk.ops.products` sends to
    oneDNN, with its size threshold lowered to 4096 multiply-adds."""
    from torchntk.ops import products
    calls = []
    product = products._onednn_mm_t
    monkeypatch.setattr(products, '_onednn_mm_t', lambda a, b: calls.append(1) or product(a, b))
    monkeypatch.setattr(products, '_MIN_MULTIPLY_ADDS', 1 << 12)
    return calls


@pytest.fixture(params=['extension', 'torch'])
def backend(request, monkeypatch):
    """Runs a test with the compiled extension (the fused chain included) and
    with the torch fallback. Where the extension is not in use the first is
    skipped, except under CI (CI=true), which builds it: there it fails."""
    if request.param == 'torch':
        monkeypatch.setattr(extension, 'EXTENSION', None)
    elif extension.EXTENSION is None:
        message = 'the extension is not in use (not built, or TORCHNTK_BACKEND=torch)'
        if os.environ.get('CI', '').lower() == 'true':
            pytest.fail(f'{message}; CI builds it')
        pytest.skip(message)
    return request.param


@pytest.fixture
def chain_calls(monkeypatch):
    """Counts of the calls to the fused chain's `chain_self` and `chain_pairs`
    (by name): a test that names the fused path asserts that it ran."""
    calls = collections.Counter()
    for name in ('chain_self', 'chain_pairs'):
        function = getattr(conv_chain, name)
        monkeypatch.setattr(conv_chain, name, lambda *args, _f=function, _n=name, **kwargs:
                            calls.update([_n]) or _f(*args, **kwargs))
    return calls
