"""torchntk.checks: a wrong type is a TypeError, a wrong value a ValueError, and
every message names the caller and the argument."""

import math

import pytest
import torch

from torchntk import checks


@pytest.mark.parametrize('value', ['3', 2.0, True, None, [1]])
def test_check_positive_int_of_a_wrong_type_raises_type_error(value):
    with pytest.raises(TypeError, match=r"^Layer: n must be a positive integer, got "):
        checks.check_positive_int(value, 'n', 'Layer')


@pytest.mark.parametrize('value', [0, -1])
def test_check_positive_int_below_one_raises_value_error(value):
    with pytest.raises(ValueError, match=rf"^Layer: n must be a positive integer, got {value}$"):
        checks.check_positive_int(value, 'n', 'Layer')


def test_check_int_names_its_range():
    assert checks.check_int(5, 'degree', 'Monomial', 0, 5) == 5
    with pytest.raises(ValueError, match=r"^Monomial: degree must be an integer in 0\.\.5, got 6$"):
        checks.check_int(6, 'degree', 'Monomial', 0, 5)
    with pytest.raises(ValueError, match=r"^f: k must be an integer >= 0, got -1$"):
        checks.check_int(-1, 'k', 'f', minimum=0)


@pytest.mark.parametrize('value', ['1', True, None, 1j, torch.tensor(True)])
def test_check_nonnegative_of_a_wrong_type_raises_type_error(value):
    with pytest.raises(TypeError, match=r"^f: x must be "):
        checks.check_nonnegative(value, 'x', 'f')


@pytest.mark.parametrize('value', [-1., math.inf, math.nan, torch.tensor(-2.)])
def test_check_nonnegative_of_a_wrong_value_raises_value_error(value):
    with pytest.raises(ValueError, match=r"^f: x must be finite and >= 0, got "):
        checks.check_nonnegative(value, 'x', 'f')


def test_check_nonnegative_returns_the_number_of_a_scalar_tensor():
    assert checks.check_nonnegative(torch.tensor([2.5], dtype=torch.float64), 'x', 'f') == 2.5
    assert checks.check_nonnegative(None, 'x', 'f', allow_none=True) is None


def test_a_tensor_of_several_entries_is_not_a_scalar():
    with pytest.raises(ValueError, match=r"^f: x must be a scalar, got shape \(2,\)$"):
        checks.check_real(torch.ones(2), 'x', 'f')


def test_check_positive_refuses_zero():
    with pytest.raises(ValueError, match=r"^f: rate must be > 0, got 0.0$"):
        checks.check_positive(0, 'rate', 'f')


def test_check_real_refuses_non_finite_values_and_accepts_negative_ones():
    assert checks.check_real(-3, 'a', 'Sin') == -3.
    with pytest.raises(ValueError, match=r"^Sin: a must be finite, got inf$"):
        checks.check_real(math.inf, 'a', 'Sin')


@pytest.mark.parametrize('allow_none, expected', [(False, 'True or False'),
                                                  (True, 'True, False or None')])
def test_check_flag_refuses_truthy_stand_ins(allow_none, expected):
    with pytest.raises(TypeError, match=rf"^f: flag must be {expected}, got 1$"):
        checks.check_flag(1, 'flag', 'f', allow_none)
    assert checks.check_flag(None, 'flag', 'f', allow_none=True) is None


def test_check_choice_is_case_insensitive_and_types_its_argument():
    assert checks.check_choice('same', 'padding', 'Conv', ('SAME', 'VALID')) == 'SAME'
    with pytest.raises(ValueError, match=r"^Conv: padding must be one of \('SAME', 'VALID'\), "
                                         r"got 'full'$"):
        checks.check_choice('full', 'padding', 'Conv', ('SAME', 'VALID'))
    with pytest.raises(TypeError, match=r"^Conv: padding must be one of"):
        checks.check_choice(1, 'padding', 'Conv', ('SAME', 'VALID'))


def test_check_axes_takes_one_int_or_a_sequence_of_ints():
    assert checks.check_axes(-1, 'axis', 'f') == (-1,)
    assert checks.check_axes([0, 2], 'axis', 'f') == (0, 2)
    for axes in ('ab', (1, True), 1.0, (1, 2.0)):
        with pytest.raises(TypeError, match=r"^f: axis must be a sequence of ints or one int"):
            checks.check_axes(axes, 'axis', 'f')


def test_check_callable_names_the_type_it_got():
    with pytest.raises(TypeError, match=r"^Elementwise: fn must be a function or None, got str$"):
        checks.check_callable('tanh', 'fn', 'Elementwise', allow_none=True)


def test_type_name_qualifies_types_outside_builtins():
    assert checks.type_name([1]) == 'list'
    assert checks.type_name(torch.ones(1)) == 'torch.Tensor'


def test_check_input_values_refuses_complex_nan_and_meta_inputs():
    with pytest.raises(TypeError, match=r"^f: x1 must be real"):
        checks.check_input_values(torch.ones(2, 2, dtype=torch.complex64), 'x1', 'f')
    with pytest.raises(ValueError, match=r"^f: x1 contains non-finite values"):
        checks.check_input_values(torch.tensor([[1., math.nan]]), 'x1', 'f')
    with pytest.raises(ValueError, match=r"^f: x1 is on the meta device"):
        checks.check_input_values(torch.ones(2, 2, device='meta'), 'x1', 'f')


def test_check_input_values_lets_masked_entries_be_non_finite():
    checks.check_input_values(torch.tensor([[1., math.nan]]), 'x1', 'f', mask_constant=math.nan)
    with pytest.raises(ValueError, match="that are not the mask_constant"):
        checks.check_input_values(torch.tensor([[math.inf, math.nan]]), 'x1', 'f',
                                  mask_constant=math.nan)
