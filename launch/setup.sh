#!/usr/bin/env bash
# Set up Gristmill in ./.venv (created if missing). To use an environment of your own instead,
# install torch as you like, then `pip install -e ".[dev,deploy]"`.
#
#   bash launch/setup.sh          # the package and its runtime dependencies
#   bash launch/setup.sh dev      # ... plus pytest and ruff, and the `deploy` extra the tests need
#                                 # (gguf, torchao, lm-eval: GGUF export, quantization, harness)
#
# PyTorch: on a machine with an NVIDIA GPU, pip's default (CUDA) build is installed; without one,
# the CPU build of torch 2.13.0 is installed first, so nothing pulls a multi-GB CUDA build.
# Set TORCH_CPU_INDEX to use another index for the CPU build. A torch that is already
# installed is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found; installing pip's default (CUDA) torch"
    python -m pip install torch
  else
    echo "setup: no GPU found; installing the CPU build of torch"
    python -m pip install --retries 2 "torch==2.13.0" \
      --extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
  fi
fi

extras=""
[ "${1:-}" = "dev" ] && extras="[dev,deploy]"
python -m pip install -e ".${extras}"
python -c "import torch, deepspeed, transformers, ray, sentencepiece; print('setup: ok, torch', torch.__version__)"
