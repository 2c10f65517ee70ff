#!/usr/bin/env bash
# Wheels that `python -m benchmarks.gpu_check` needs on an offline GPU machine whose image already has
# torch, triton, transformers, accelerate, pytest, hypothesis, pytest-benchmark, numpy, pyarrow, pandas,
# pillow, pyyaml, matplotlib, huggingface-hub, xxhash and fsspec (e.g. torch 2.11+cu130, Triton 3.6,
# transformers 5.17, Python 3.12): vold's rewards (math-verify), the kernel benchmark's baselines
# (liger-kernel; trl's chunked kernels) and their pure-Python dependencies, pinned to the versions vold is
# tested with. Run it where pip reaches PyPI; it writes the wheels to .whl/ (git-ignored, about 3 MB).
#
#   scripts/gpu_wheels.sh [PYTHON_VERSION, default 3.12]
#   # on the GPU machine, from the checkout, with .whl/ copied along:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   python3 -m benchmarks.gpu_check --output results/
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-3.12}"
PACKAGES=(
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2  # vold.rewards
  liger-kernel==0.8.5                                                              # kernel benchmark baseline
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19                     # trl.kernels baseline
)
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl "${PACKAGES[@]}"
ls -la .whl
