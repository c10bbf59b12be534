#!/usr/bin/env bash
# Fetches mamba-ssm's source distribution from PyPI (pip download, hash-checked) and keeps what the kernels
# suite compiles: csrc/selective_scan and PKG-INFO, in .mamba_ssm_src/mamba_ssm-VERSION/ (ignored by git; a GPU
# session carries it). Then: export MAMBA_SSM_CSRC=<the printed path>.
#
# pip prepares the sdist's metadata by running its setup.py, which imports torch: run it with the project's
# environment (PYTHON, default .venv/bin/python). MAMBA_SKIP_CUDA_BUILD keeps setup.py from compiling anything.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=2.3.2.post1
SHA256=104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028
PYTHON=${PYTHON:-.venv/bin/python}
target=.mamba_ssm_src/mamba_ssm-$VERSION
if [ -d "$target/csrc/selective_scan" ]; then
    echo "already fetched; remove $target to fetch again"
    echo "export MAMBA_SSM_CSRC=$PWD/$target/csrc/selective_scan"
    exit 0
fi
download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT
MAMBA_SKIP_CUDA_BUILD=TRUE "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
    -d "$download" "mamba-ssm==$VERSION"
archive=$download/mamba_ssm-$VERSION.tar.gz
echo "$SHA256  $archive" | sha256sum --check --quiet
tar -xzf "$archive" -C "$download" "mamba_ssm-$VERSION/PKG-INFO" "mamba_ssm-$VERSION/LICENSE" \
    "mamba_ssm-$VERSION/csrc/selective_scan"
mkdir -p .mamba_ssm_src
mv "$download/mamba_ssm-$VERSION" "$target"
echo "export MAMBA_SSM_CSRC=$PWD/$target/csrc/selective_scan"
