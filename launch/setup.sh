#!/usr/bin/env bash
# Set up Gristmill in ./.venv (created if missing). To use an environment of your own instead,
# install torch as you like, then `pip install -e ".[dev,deploy]" -c constraints.txt`
# (constraints.txt is written by launch/freeze_constraints.py).
#
#   bash launch/setup.sh                # the package and its runtime dependencies
#   bash launch/setup.sh dev            # ... plus pytest and ruff, and the `deploy` extra the tests need
#                                       # (gguf, torchao, lm-eval: GGUF export, quantization, harness)
#   bash launch/setup.sh --cuda         # the CUDA build of torch, also where no GPU is visible
#   bash launch/setup.sh --cpu          # the CPU build of torch, also where GPUs are visible
#   bash launch/setup.sh --dry-run      # say which torch build would be installed, and why
#
# PyTorch: without --cuda/--cpu the build follows this machine: pip's default (CUDA) build where
# `nvidia-smi` lists a GPU, else the CPU build of torch 2.13.0 (the version CI tests), so nothing
# pulls a multi-GB CUDA build onto a laptop. On a cluster whose checkout (and .venv) lives on a
# filesystem the GPU nodes share, run setup on the login node with --cuda: auto-detection there
# would pick the CPU build, and the GPU nodes would train on their CPUs.
# A torch that is already installed is kept when it is the build asked for, and replaced when
# --cuda/--cpu asks for the other one. TORCH_CPU_INDEX / TORCH_CUDA_INDEX choose other indexes.
#
# Versions: the other packages are installed with constraints.txt (the versions CI tested; torch
# is not in it); --unpinned installs the newest ones pyproject.toml allows instead.
# With the CPU build and a working C++ compiler, DeepSpeed's CPU shared-memory collective op is
# built once here, so the first training run does not wait for it.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_CPU_VERSION=2.13.0
usage() { sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }

extras="" choice="" pins=1 dry=0
for arg in "$@"; do
  case $arg in
    dev) extras="[dev,deploy]" ;;
    --cuda | --cpu)
      if [ -n "$choice" ] && [ "$choice" != "${arg#--}" ]; then
        echo "setup: error: give --cuda or --cpu, not both" >&2
        exit 2
      fi
      choice=${arg#--} ;;
    --unpinned) pins=0 ;;
    --dry-run) dry=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "setup: error: unknown argument '$arg' (see bash launch/setup.sh --help)" >&2; exit 2 ;;
  esac
done

gpu_count() {
  # GPUs nvidia-smi lists on this machine (0 without the tool or a driver)
  command -v nvidia-smi >/dev/null 2>&1 || { echo 0; return; }
  nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
}

# Which build, and the reason we print with it
gpus=$(gpu_count)
if [ -n "$choice" ]; then
  build=$choice reason="--$choice was given"
elif [ "$gpus" -gt 0 ]; then
  build=cuda reason="nvidia-smi lists $gpus GPU(s) here"
else
  build=cpu reason="no NVIDIA GPU is visible here (for GPU nodes that share this checkout, use --cuda)"
fi

installed_build() {
  # "cuda", "cpu" or "" (no torch) for the venv's python
  [ -x .venv/bin/python ] || return 0
  .venv/bin/python -c "import torch; print('cuda' if torch.version.cuda else 'cpu')" 2>/dev/null || true
}
have=$(installed_build)

if [ "$dry" = 1 ]; then
  if [ -z "$have" ]; then echo "setup: would install the $build build of torch, because $reason"
  elif [ "$have" = "$build" ]; then echo "setup: would keep the installed torch ($have build); $reason"
  elif [ -z "$choice" ]; then echo "setup: would keep the installed torch ($have build), although $reason; --$build replaces it"
  else echo "setup: would replace the installed torch ($have build) with the $build build, because $reason"; fi
  exit 0
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

install_torch() {
  # install_torch BUILD [pip options]: the CPU build (pinned, from the CPU index) or pip's default CUDA build
  local which=$1
  shift
  if [ "$which" = cpu ]; then
    python -m pip install --retries 2 "$@" "torch==$TORCH_CPU_VERSION" \
      --extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
  else
    python -m pip install --retries 2 "$@" torch ${TORCH_CUDA_INDEX:+--index-url "$TORCH_CUDA_INDEX"}
  fi
}

if [ -z "$have" ]; then
  echo "setup: installing the $build build of torch, because $reason"
  install_torch "$build"
elif [ "$have" = "$build" ]; then
  echo "setup: keeping the installed torch ($have build; $reason)"
elif [ -n "$choice" ]; then
  echo "setup: replacing the installed torch ($have build) with the $build build, because $reason"
  install_torch "$build" --force-reinstall
else
  echo "setup: keeping the installed torch ($have build), although $reason; rerun with --$build to replace it" >&2
fi

constraints=()
[ "$pins" = 1 ] && constraints=(-c constraints.txt)
python -m pip install -e ".${extras}" "${constraints[@]}"

if [ "$(installed_build)" = cpu ]; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
python - <<'EOF'
import torch, deepspeed, transformers, ray, sentencepiece  # noqa: F401  (all importable)
build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
gpus = torch.cuda.device_count() if torch.version.cuda else 0
seen = f"{gpus} GPU(s) visible here" if gpus else "no GPU visible here"
print(f"setup: ok, torch {torch.__version__} ({build}; {seen}), deepspeed {deepspeed.__version__}, "
      f"transformers {transformers.__version__}")
EOF

# CPU ranks all-reduce through a DeepSpeed op compiled just in time on first use (~30 s on 2 cores):
# build it now, where a compiler works, into the cache every later run reads (TORCH_EXTENSIONS_DIR).
if [ "$(installed_build)" = cpu ]; then
  if "${CXX:-c++}" --version >/dev/null 2>&1; then
    echo "setup: building DeepSpeed's CPU shared-memory collective op once (about 30 s on 2 cores) ..."
    if python -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load(verbose=False)" >/dev/null 2>&1; then
      echo "setup: built the shared-memory collective op"
    else
      echo "setup: could not build the shared-memory collective op; CPU runs use plain gloo collectives (slower)"
    fi
  else
    echo "setup: no C++ compiler (${CXX:-c++}); CPU runs use plain gloo collectives instead of DeepSpeed's shared-memory op"
  fi
fi
