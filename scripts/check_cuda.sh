#!/usr/bin/env bash
# Compile the CUDA sources of the extension (csrc/*.cu) with nvcc, to check
# that they build on a machine without a GPU or a CUDA torch (CI runs this).
# Nothing is linked or run; the objects go to a temporary directory.
# Skips, saying so, where nvcc is absent. NVCC and TORCHNTK_CUDA_ARCH
# (default sm_80) override the compiler and the target architecture.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
nvcc="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ]; then nvcc=/usr/local/cuda/bin/nvcc; fi
if [ -z "$nvcc" ]; then
    echo "check_cuda: SKIPPED, nvcc not found (set NVCC or put it on PATH)"
    exit 0
fi
bash scripts/setup.sh
py="$root/.venv/bin/python"
mapfile -t includes < <("$py" -c 'from torch.utils.cpp_extension import include_paths
for p in include_paths(): print(p)')
include_flags=()
for dir in "${includes[@]}"; do include_flags+=(-isystem "$dir"); done
python_include="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# A CPU torch ships c10/cuda's headers but not the one its CMake generates for
# CUDA builds; a stand-in with that file's content lets them compile.
if [ ! -f "${includes[0]}/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    mkdir -p "$out/include/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' \
        > "$out/include/c10/cuda/impl/cuda_cmake_macros.h"
    include_flags+=(-isystem "$out/include")
fi
arch="${TORCHNTK_CUDA_ARCH:-sm_80}"
for source in csrc/*.cu; do
    echo "check_cuda: $("$nvcc" --version | tail -1 | sed 's/^Build //'): compiling $source for $arch"
    "$nvcc" -c "$source" -o "$out/$(basename "$source").o" -std=c++17 -O3 --fmad=false -arch="$arch" \
        -DTORCHNTK_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1 \
        --expt-relaxed-constexpr -Xcompiler -fPIC \
        "${include_flags[@]}" -isystem "$python_include" -Icsrc
done
echo "check_cuda: csrc/*.cu compiled"
