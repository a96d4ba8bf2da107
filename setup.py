"""Builds the compiled extension torchntk._C; the package metadata is in setup.cfg.

The CPU sources (csrc/*.cpp) are always built. The CUDA sources (csrc/*.cu) are
added when torch was built with CUDA and a CUDA toolkit is found, or when
TORCHNTK_BUILD_CUDA=1 forces them (TORCHNTK_BUILD_CUDA=0 leaves them out).
TORCHNTK_BUILD_EXTENSION=0 skips the extension: torchntk then runs on its pure
torch fallback.

Build with `pip install --no-build-isolation -e .` after torch is installed
(scripts/setup.sh does): this file imports torch, and an isolated build would
resolve a torch of its own.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == '':
        return None
    if value not in ('0', '1'):
        raise ValueError(f'{name} must be 0 or 1, got {value!r}')
    return value == '1'


def _extensions():
    if _flag('TORCHNTK_BUILD_EXTENSION') is False:
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join('csrc', '*.cpp')))
    cuda_sources = sorted(glob.glob(os.path.join('csrc', '*.cu')))
    build_cuda = _flag('TORCHNTK_BUILD_CUDA')
    if build_cuda is None:
        build_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None

    # -O3 and OpenMP (at::parallel_for is an inline OpenMP loop in torch's CPU
    # builds and runs serially without it); no -march: the row kernels are
    # compiled per instruction set by target_clones and picked at load time.
    # No contraction into fused multiply-adds: var1·var2 − c² must be exactly 0
    # for an example paired with itself (csrc/conv_chain.cpp). No errno from
    # math functions, which keeps sqrt from vectorizing (nothing reads errno).
    cxx = ['-O3', '-std=c++17', '-fopenmp', '-ffp-contract=off', '-fno-math-errno']
    link = ['-fopenmp'] if sys.platform.startswith('linux') else []
    if sys.platform == 'darwin':
        cxx.remove('-fopenmp')
    if build_cuda:
        extension = cpp_extension.CUDAExtension(
            'torchntk._C', sources + cuda_sources,
            define_macros=[('TORCHNTK_WITH_CUDA', None)],
            extra_compile_args={'cxx': cxx, 'nvcc': ['-O3', '-std=c++17', '--fmad=false']},
            extra_link_args=link)
    else:
        extension = cpp_extension.CppExtension(
            'torchntk._C', sources, extra_compile_args={'cxx': cxx}, extra_link_args=link)
    return [extension], {'build_ext': cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
