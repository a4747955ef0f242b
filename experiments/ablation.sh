#!/usr/bin/env bash
# The paper's reward ablation (SPEC 1.4: BT 51.8 LC at 995 tokens, GRM 59.5 at 409, GRM + CPE 64.1
# at 447) in miniature, on the persona world, with the embedded SmolLM2-135M-Instruct:
#
#   arm          policy                                   reward
#   sft          the SFT warm start                       -
#   ppo_bt       plain PPO                                Bradley-Terry RM
#   ppo_grm      plain PPO                                the GRM
#   ppo_cpe      PPO + Critique-Post-Edit (default edits) the GRM
#   ppo_rubric   plain PPO                                the rubric itself (an oracle ceiling)
#
# Every policy answers the held-out personas' prompts; the rubric judges each answer against the
# reference (LC win rate with a 95% bootstrap interval, raw win rate, length, the three scores).
# Ends in $OUT/report.md and $OUT/ppo_curves.png. Resumable: run it again after a kill and the
# finished stages are skipped (a killed training stage continues from its checkpoint).
#
#   nohup bash experiments/ablation.sh > ablation.log 2>&1 &     # 2 CPU cores (sizes below)
#   SEEDS="0 1" bash experiments/ablation.sh                    # two PPO seeds per arm
#   PROFILE=gpu bash experiments/ablation.sh                    # one GPU: bigger batches, more steps
#   STEPS=4 PPO="--prompts-per-step 2" OUT=out/abl_smoke bash experiments/ablation.sh   # a smoke run
#
# Its own persona world ($OUT/world, data/persona_world/prepare.py): the same personas and RL
# prompts as the committed world, 8 reference-answered questions per held-out persona (96 prompts
# instead of 24) and preference pairs whose chosen answer is the longer one where a tier allows it
# (as in human preference data: the length shortcut the paper's BT reward learned).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/ablation}
W=$OUT/world
SEEDS=${SEEDS:-0}
if [ "${PROFILE:-cpu}" = gpu ]; then
  STEPS=${STEPS:-16}; PPO=${PPO:---prompts-per-step 8 --samples 4 --minibatch-size 8 --max-new-tokens 192}
  CAP=${CAP:-192}; SFT_EPOCHS=${SFT_EPOCHS:-3}
else
  STEPS=${STEPS:-8}; PPO=${PPO:---prompts-per-step 4 --samples 2 --max-new-tokens 128}
  CAP=${CAP:-128}; SFT_EPOCHS=${SFT_EPOCHS:-2}
fi
FREEZE=${FREEZE:-0}
PPO="$PPO --actor-lr ${ACTOR_LR:-3e-5} --critic-lr 5e-5"
mkdir -p "$OUT"
TIMES=$OUT/wall_times.tsv

stage() {  # stage NAME DONE_FILE command...: skipped when DONE_FILE exists; wall time recorded
  local name=$1 done_file=$2; shift 2
  if [ -e "$done_file" ]; then echo "=== $name: done before, skipped"; return; fi
  echo; echo "=== $name ($(date -u +%H:%M:%S) UTC)"
  local t0=$SECONDS
  "$@"
  printf '%s\t%d\n' "$name" $((SECONDS - t0)) >> "$TIMES"
}
resume_flag() { [ -d "$1" ] && echo --resume || true; }  # a killed run continues

stage world "$W/manifest.json" python3 data/persona_world/prepare.py --out_dir "$W" \
  --eval_questions 8 --pairs_prefer_longer --resume_cache "$OUT/world_generations.jsonl"
stage sft "$OUT/sft/DONE" python3 sft.py --data "$W/sft.jsonl" --out "$OUT/sft" --max-samples 0 \
  --epochs "$SFT_EPOCHS" $(resume_flag "$OUT/sft")
stage grm "$OUT/grm/DONE" python3 sft.py --data "$W/grm.jsonl" --out "$OUT/grm" --share-prefix --lr 2e-4 \
  --epochs 1 --weight-decay 0 --max-len 1536 --token-budget 4096 --max-samples 0 --precision bf16-mixed \
  --freeze-layers "$FREEZE" $(resume_flag "$OUT/grm")
stage bt "$OUT/bt/DONE" python3 train_grm.py --mode bt --pairs "$W/pairs.jsonl" --out "$OUT/bt" --max-train 0 \
  $(resume_flag "$OUT/bt")

evaluate() {  # evaluate NAME POLICY: rubric-judged win rate against the references
  rm -rf "$OUT/eval/$1"  # an unfinished evaluation starts over
  python3 eval_persona.py winrate --policy "$2" --eval-file "$W/eval.jsonl" --judge rubric \
    --max-new-tokens "$CAP" --batch-size 16 --out "$OUT/eval/$1"
}
stage eval_sft "$OUT/eval/sft/winrate_summary.json" evaluate sft "$OUT/sft"

runs=""  # every PPO run, in table order
for seed in $SEEDS; do
  sfx=$([ "$seed" = 0 ] && echo "" || echo "_s$seed")
  for arm in bt grm cpe rubric; do
    case $arm in
      bt) reward="--reward bt --bt $OUT/bt --no-edit" ;;
      grm) reward="--reward grm --grm $OUT/grm --no-edit" ;;
      cpe) reward="--reward grm --grm $OUT/grm" ;;
      rubric) reward="--reward rubric --no-edit" ;;
    esac
    run=ppo_$arm$sfx
    runs="$runs,$run"
    stage "$run" "$OUT/$run/DONE" python3 ppo_cpe.py --sft "$OUT/sft" --prompts "$W/prompts.jsonl" $reward \
      --max-steps "$STEPS" --seed "$seed" $PPO --out "$OUT/$run" $(resume_flag "$OUT/$run")
    stage "eval_$run" "$OUT/eval/$run/winrate_summary.json" evaluate "$run" "$OUT/$run/actor"
  done
done
rm -rf "$OUT"/*/ckpt_*  # resume states of finished runs

# The reward models on the world's held-out pairs (how good a signal each arm got)
stage acc_bt "$OUT/eval/acc_bt/accuracy_summary.json" python3 eval_persona.py accuracy --data "$W/pairs.jsonl" \
  --split eval --judge rm --model "$OUT/bt" --out "$OUT/eval/acc_bt"
stage acc_grm "$OUT/eval/acc_grm/accuracy_summary.json" python3 eval_persona.py accuracy --data "$W/pairs.jsonl" \
  --split eval --judge grm --model "$OUT/grm" --grm-max-new-tokens 224 --per-tier 8 --out "$OUT/eval/acc_grm"

python3 report.py --out "$OUT" --title "Reward ablation in miniature" --policies "sft$runs" --ppo-runs "${runs#,}"
{ echo; echo "| stage | wall (s) |"; echo "|---|---:|"; awk -F'\t' '{print "| " $1 " | " $2 " |"}' "$TIMES"; } >> "$OUT/report.md"
echo "wrote $OUT/report.md"
