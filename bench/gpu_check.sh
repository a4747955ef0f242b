#!/usr/bin/env bash
# One call on a CUDA machine: the CUDA-marked tests, then the generation, SFT and PPO benchmarks,
# then one summary. Meant for the device tool's 10-minute command limit:
#   bash bench/gpu_check.sh            # writes $OUT/gpu_check.log when $OUT is set
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
log=${OUT:-/tmp}/gpu_check.log
: > "$log"
run() { echo "=== $*" | tee -a "$log"; timeout 240 "$@" 2>&1 | grep -v "Loading weights" | tee -a "$log" | tail -25; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$log"
python3 -c "import torch, flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null | tee -a "$log" \
  || echo "flash-attn not installed: attention runs on PyTorch SDPA" | tee -a "$log"
run python3 -m pytest -q -m cuda tests
run python3 -m pytest -q tests/test_model.py -k "logits_match or packed"
run python3 bench/bench_generate.py --device cuda
run python3 bench/bench_sft.py --device cuda
run python3 bench/bench_ppo.py --skip-trl
echo "=== summary" | tee -a "$log"
grep -E "passed|failed|speed-up|x$|MFU|tok/s" "$log" | tail -30
