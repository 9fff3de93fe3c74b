#!/usr/bin/env bash
# The Python package's tests (python/tests, pytest): makes a virtual environment in
# target/python-venv (numpy, pytest, safetensors and maturin from PyPI; kept between runs),
# builds and installs the package into it as `pip install .` does (maturin, here with cargo's
# test profile so that it reuses what `cargo test` built), and runs pytest. Extra arguments go
# to pytest. MCDM_BIN: the CLI to compare against (default target/release/mcdm, built when
# missing). Needs python3 with venv and pip; exit status 77 when python3 cannot make a venv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/python-venv
if [[ ! -x $venv/bin/python ]]; then
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        rm -rf "$venv"
        echo "python-test: python3 cannot make a virtual environment (python3-venv)" >&2
        exit 77
    fi
fi
export PATH="$PWD/$venv/bin:$PATH"
pip install --quiet --disable-pip-version-check "numpy>=1.21" pytest safetensors "maturin>=1.7,<2"
# The same NVRTC set-up as scripts/test.sh, so that cargo reuses its build (same fingerprints).
if [[ -f .nvrtc/nvidia/cu13/lib/libnvrtc.so.13 ]]; then
    export MCDM_NVRTC_LIB="${MCDM_NVRTC_LIB:-$PWD/.nvrtc/nvidia/cu13/lib/libnvrtc.so.13}"
    export MCDM_CUDA_INCLUDE="${MCDM_CUDA_INCLUDE:-$PWD/.nvrtc/nvidia/cu13/include}"
fi
MATURIN_PEP517_ARGS="--profile dev" \
    pip install --quiet --disable-pip-version-check --no-build-isolation --force-reinstall --no-deps .
if [[ -z ${MCDM_BIN:-} ]]; then
    cargo build --release --locked --bin mcdm --quiet
    export MCDM_BIN="$PWD/target/release/mcdm"
fi
# From another folder, so that `import mcdm` is the installed package, not python/mcdm.
cd python/tests
exec python -m pytest -q "$@"
