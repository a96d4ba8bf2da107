"""Layers with a finite-width `forward` and an infinite-width kernel rule."""

from .branching import FanInConcat, FanInProd, FanInSum, FanOut
from .combinators import Parallel, Serial, parallel, repeat, serial
from .conv import Conv, ConvLocal, ConvTranspose
from .dropout import Dropout
from .elementwise import (ABRelu, Abs, Cos, Elementwise, ElementwiseNumerical, Erf, Exp,
                          ExpNormalized, Gabor, Gaussian, Gelu, Hermite, LeakyRelu, Mish,
                          Monomial, Polynomial, Rbf, RectifiedMonomial, Relu, SiLU, Sigmoid,
                          Sigmoid_like, Sign, Sin, Softplus, Tanh)
from .linear import Dense, Identity
from .module import Layer
from .normalization import LayerNorm
from .pooling import AvgPool, Flatten, GlobalAvgPool, GlobalSumPool, SumPool
from .requirements import Bool, Diagonal, Requirements
from .resize import ImageResize
