#!/usr/bin/env bash
# The GPU sweep as one device command. Here, first (a few minutes, once):
#   echo /.sweep-cache/ >> .git/info/exclude
#   .venv/bin/python experiments/gpu_sweep.py --prepare .sweep-cache
# then with the device tool:
#   run(command="bash experiments/gpu_sweep_device.sh", carry=[".sweep-cache"], timeout_s=540)
# It runs under the machine's own python3 (torch, transformers, accelerate, tokenizers are there) with
# clex from src/, and puts results.md, results.json and the log in $OUT.
set -euo pipefail
export PYTHONPATH="$PWD/src" CLEX_CACHE="$PWD/.sweep-cache" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
status=0
python3 experiments/gpu_sweep.py --out /tmp/gpu-sweep --tokenizer .sweep-cache/tokenizer --budget-s "${BUDGET_S:-420}" \
  > "$OUT/log.txt" 2>&1 || status=$?
tail -40 "$OUT/log.txt"
cp /tmp/gpu-sweep/results.json /tmp/gpu-sweep/results.md "$OUT/" 2>/dev/null || true
exit $status
