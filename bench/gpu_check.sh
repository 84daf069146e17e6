#!/usr/bin/env bash
# GPU check of diffq's fast path: see bench/gpu_check.py's docstring for what it measures.
#
#   bash bench/gpu_check.sh              # on a GPU machine, no network: one table, under 10 minutes
#   bash bench/gpu_check.sh --compile --compile-mode default   # adds a torch.compile row
#   GPU_CHECK_TIMEOUT=1800 bash bench/gpu_check.sh --compile    # max-autotune compiles for long
#   bash bench/gpu_check.sh --tiny       # a tiny model on the CPU, to check the script (about a minute)
#
# Uses the repository's .venv if there is one, else python3; extra arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
"$PYTHON" - <<'PY'
import torch
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {'available: ' + torch.cuda.get_device_name(0) if cuda else 'not available'}")
PY
exec timeout "${GPU_CHECK_TIMEOUT:-590}" "$PYTHON" bench/gpu_check.py "$@"
