#!/usr/bin/env bash
# Create .venv (if absent) and install torchntk into it, editable, with the
# test and demo extras. Quick when nothing changed since the last run.
#
# torch is installed first and pinned: pip then takes the CPU wheel from local
# disk where there is one (and the same version from PyPI elsewhere), and the
# `torch>=2.1` requirement of torchntk is already satisfied when it is installed,
# so pip never resolves an unpinned torch (which would be a multi-GB CUDA build).
# The package is built with --no-build-isolation for the same reason: an isolated
# build environment would fetch its own torch once setup.py imports it.
set -euo pipefail

TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="$venv/bin/python"

if [ ! -x "$py" ]; then
    base_python="${PYTHON:-python3.11}"
    command -v "$base_python" >/dev/null 2>&1 || base_python=python3
    echo "setup: creating $venv with $("$base_python" --version)"
    "$base_python" -m venv "$venv"
fi

# Everything that changes what `pip install -e .` builds goes into the stamp.
stamp_file="$venv/.torchntk-setup-stamp"
stamp="$(
    {
        echo "torch==$TORCH_VERSION"
        cat pyproject.toml setup.cfg
        if [ -f setup.py ]; then cat setup.py; fi
        if [ -d csrc ]; then find csrc -type f -print0 | sort -z | xargs -0 cat; fi
    } | sha256sum | cut -d' ' -f1
)"
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ]; then
    exit 0
fi

echo "setup: installing torch==$TORCH_VERSION and torchntk[test,demo] into $venv"
pip=("$py" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==$TORCH_VERSION"
"${pip[@]}" "setuptools>=64" wheel
"${pip[@]}" --no-build-isolation -e ".[test,demo]"
echo "$stamp" > "$stamp_file"
echo "setup: $venv is ready (torch $("$py" -c 'import torch; print(torch.__version__)'))"
