"""report.py: the results table of the quickstart (run.sh calls it last) and of the reward ablation
(experiments/ablation.sh); SPEC 1.4 metrics.

    python report.py --out out            # reads out/eval/*, out/ppo_*/metrics.jsonl -> out/report.md
    python report.py --out out/abl --title "Ablation" --policies sft,ppo_bt --ppo-runs ppo_bt   # any subset

For each policy evaluated by `eval_persona.py winrate` into out/eval/<policy>/: LC and raw win
rate against the persona world's reference answers, mean answer length, and the ground-truth
rubric scores per dimension (the rubric re-judges the saved answers); for the reward models: every
`eval_persona.py accuracy` run in out/eval/acc_<name>/ (held-out pairs); for each
PPO run: reward and length over steps, as a table and (when matplotlib is installed) a PNG.
"""
import argparse
import json
from pathlib import Path

from data.persona_world.rubric import rubric_judge

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", default="out", help="the pipeline's output root")
parser.add_argument("--policies", default="base,sft,ppo_cpe,ppo_grm,ppo_bt",
                    help="comma list of out/eval/<name> folders, in table order")
parser.add_argument("--title", default="Quickstart report", help="the report's heading")
parser.add_argument("--ppo-runs", default="ppo_cpe,ppo_grm,ppo_bt", help="comma list of out/<name> PPO runs")
args = parser.parse_args()
root = Path(args.out)
DIMS = ("Helpfulness", "Personalization", "Natural")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


lines = [f"# {args.title}", "",
         "Policies answer the persona world's held-out prompts (temperature 0.8, top-p 0.9); the rubric "
         "judges each answer against the reference answer (SPEC 1.4 LC win rate) and scores it per dimension.", "",
         "| policy | n | LC win rate % (95% CI) | raw win rate % | mean length (tokens) | "
         "Helpfulness | Personalization | Natural | weighted |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
for name in args.policies.split(","):
    folder = root / "eval" / name
    if not (folder / "winrate_summary.json").exists():
        lines.append(f"| {name} | (not run) | | | | | | | |")
        continue
    s = json.loads((folder / "winrate_summary.json").read_text())
    judged = read_jsonl(folder / "winrate_judgments.jsonl")
    eval_rows = read_jsonl(s["eval_file"])  # by row index: personas share general questions
    if any(eval_rows[j["idx"]]["question"] != j["question"] for j in judged):
        raise SystemExit(f"{folder}: its judgments do not match the rows of {s['eval_file']}")
    scores = [rubric_judge(eval_rows[j["idx"]]["persona"], j["question"], j["answer"])[1] for j in judged]
    mean = {d: sum(x[d] for x in scores) / len(scores) for d in DIMS}
    weighted = 0.35 * mean["Helpfulness"] + 0.40 * mean["Personalization"] + 0.25 * mean["Natural"]
    tokens = s.get("mean_len_tokens_model")
    lines.append(f"| {name} | {s['n']} | {s['lc_winrate']:.1f} ({s['lc_ci95'][0]:.1f}-{s['lc_ci95'][1]:.1f}) "
                 f"| {s['winrate']:.1f} | {tokens:.0f} | " + " | ".join(f"{mean[d]:+.2f}" for d in DIMS)
                 + f" | {weighted:+.2f} |")

lines += ["", "| reward model (eval_persona.py accuracy, held-out pairs) | pairs | accuracy % | failed judgments |",
          "|---|---:|---:|---:|"]
for folder in sorted((root / "eval").glob("acc_*")):
    summary = folder / "accuracy_summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        lines.append(f"| {folder.name[4:]} | {s['n_cases']} | {s['accuracy']:.1f} | {s.get('n_failed', 0)} |")
    else:
        lines.append(f"| {folder.name[4:]} | (no summary: judging failed, see its log) | | |")

curves = {}
lines += ["", "| PPO run | steps | reward first -> last | length first -> last (tokens) | EOS rate last |",
          "|---|---:|---:|---:|---:|"]
for name in args.ppo_runs.split(","):
    metrics = root / name / "metrics.jsonl"
    rows = [r for r in read_jsonl(metrics) if r.get("orig_reward") is not None] if metrics.exists() else []
    if not rows:
        lines.append(f"| {name} | (not run) | | | |")
        continue
    curves[name] = rows
    lines.append(f"| {name} | {len(rows)} | {rows[0]['orig_reward']:+.2f} -> {rows[-1]['orig_reward']:+.2f} "
                 f"| {rows[0]['orig_len_mean']:.0f} -> {rows[-1]['orig_len_mean']:.0f} "
                 f"| {rows[-1]['orig_eos_rate']:.2f} |")

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_r, ax_l) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in curves.items():
        ax_r.plot([r["step"] for r in rows], [r["orig_reward"] for r in rows], label=name)
        ax_l.plot([r["step"] for r in rows], [r["orig_len_mean"] for r in rows], label=name)
    ax_r.set(xlabel="PPO step", ylabel="reward of rollouts (own reward model)")
    ax_l.set(xlabel="PPO step", ylabel="mean response length (tokens)")
    ax_r.legend()
    fig.tight_layout()
    fig.savefig(root / "ppo_curves.png", dpi=100)
    lines += ["", "![reward and length over PPO steps](ppo_curves.png)"]
except ImportError:
    lines += ["", "(matplotlib is not installed: no plot)"]

(root / "report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"wrote {root / 'report.md'}")
