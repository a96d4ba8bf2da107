"""torchntk.outputs: neural-tangents' `get` semantics for every function with a `get`."""

import pytest
import torch

from torchntk.outputs import KERNEL_FIELDS, Outputs, namedtuple_type
from torchntk.stax import Dense

PAIR = Outputs('Pair', ('nngp', 'ntk'), 'kernel', default=('nngp', 'ntk'))
VALUES = {'nngp': 1., 'ntk': 2.}


def test_none_gives_the_default_names_as_a_named_tuple():
    out = PAIR.select(VALUES, None, 'f')
    assert type(out).__name__ == 'Pair' and out._fields == ('nngp', 'ntk') and out == (1., 2.)


def test_none_without_a_default_gives_the_whole_record():
    record = object()
    assert KERNEL_FIELDS.select(record, None, 'f') is record


def test_a_string_gives_that_one_value_case_insensitively():
    assert PAIR.select(VALUES, 'NTK', 'f') == 2.


def test_a_tuple_gives_a_named_tuple_in_its_order():
    out = PAIR.select(VALUES, ['NTK', 'nngp'], 'f')
    assert out._fields == ('ntk', 'nngp') and out == (2., 1.)


def test_fields_are_read_as_attributes_of_a_record():
    x = torch.randn(3, 2, dtype=torch.float64)
    kernel = Dense(1).kernel_fn(x)
    cov1, nngp = KERNEL_FIELDS.select(kernel, ('cov1', 'nngp'), 'f')
    assert cov1 is kernel.cov1 and nngp is kernel.nngp


def test_the_named_tuple_class_is_made_once_per_name_and_fields():
    first = PAIR.select(VALUES, ('ntk',), 'f')
    second = PAIR.select(VALUES, ('ntk',), 'f')
    assert type(first) is type(second) is namedtuple_type('Pair', ('ntk',))
    assert namedtuple_type('Other', ('ntk',)) is not type(first)


@pytest.mark.parametrize('get', ['cov1', ('nngp', 'cov1')])
def test_an_unknown_name_raises_value_error_naming_caller_and_name(get):
    with pytest.raises(ValueError, match=r"^f: get must be one of \('nngp', 'ntk'\) or a tuple "
                                         r"of them, got unknown kernel 'cov1'$"):
        PAIR.names(get, 'f')


@pytest.mark.parametrize('get', [(), []])
def test_an_empty_selection_raises_value_error(get):
    with pytest.raises(ValueError, match=r"^f: get must be a kernel name or a non-empty tuple"):
        PAIR.names(get, 'f')


def test_a_repeated_name_raises_value_error():
    with pytest.raises(ValueError, match=r"^f: get must name each kernel once, got duplicate"):
        PAIR.names(('ntk', 'NTK'), 'f')


@pytest.mark.parametrize('get', [3, {'ntk'}, b'ntk', ('ntk', 3)])
def test_a_get_of_a_wrong_type_raises_type_error(get):
    with pytest.raises(TypeError, match=r"^f: get must "):
        PAIR.names(get, 'f')
