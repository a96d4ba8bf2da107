"""Predictions of wide networks trained by gradient descent, from their kernels."""

from .mse import (Gaussian, ODEState, gp_inference, gradient_descent, gradient_descent_mse,
                  gradient_descent_mse_ensemble, gradient_descent_mse_params, max_learning_rate)

__all__ = ['Gaussian', 'ODEState', 'gp_inference', 'gradient_descent', 'gradient_descent_mse',
           'gradient_descent_mse_ensemble', 'gradient_descent_mse_params', 'max_learning_rate']
