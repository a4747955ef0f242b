"""Benchmark of one PPO iteration (ppo_cpe.py, SPEC 1.2/1.3), and the same iteration in TRL.

Part 1, our Critique-Post-Edit iteration on the default setting: time split between generation,
scoring, editing (critique + edit + edit scoring) and training, for one step of the default run
(out/sft and out/grm when they exist, else the embedded SmolLM2-135M-Instruct stands in for both).

Part 2, the peer: one plain PPO iteration of identical size through ppo_cpe's functions and
through TRL's PPOTrainer (trl==1.12.0, trl.experimental.ppo), in this one run: the same model
(policy, critic, reference and scalar reward model all SmolLM2-135M, fp32), the same prompts
(persona-world prompts, chat template), samples per prompt, response cap, temperature 0.9 with
top-p 1.0 (TRL samples without nucleus truncation), KL coefficient 0.05 in the reward (TRL always
runs its reference model), 1 PPO epoch, 1 minibatch holding the whole batch. Both stop at EOS.
Our side scores every response with the scalar reward model, as TRL does. Each side runs --iters
iterations, the first --warmup untimed (loading, compilation, allocator); our side runs again after
TRL's and the two blocks are averaged (--bracket), so a drifting machine favours neither side; the
ratio is printed last.

TRL lives in its own environment so it cannot change this one's torch / transformers:
    python -m venv --system-site-packages /tmp/trlenv
    /tmp/trlenv/bin/pip install trl==1.12.0      # adds datasets, pandas, pyarrow; no torch change
Run (CPU, ~5-10 minutes on 2 cores; also runs on one CUDA GPU, where both sides use it):
    python bench/bench_ppo.py                                   # both parts
    python bench/bench_ppo.py --skip-cpe                        # only ours-vs-TRL
    python bench/bench_ppo.py --trl-python /path/to/python      # where trl==1.12.0 is importable
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FALLBACK_PROMPTS = [  # used only when data/persona_world/prompts.jsonl is missing
    ({"Name": "Ana", "Demographics": {"Age": 34, "Career_Information": "nurse on night shifts"},
      "Preference": {"Local_Life": {"Food_Drinks": "vegetarian"}}}, "What can I cook for a quick dinner?"),
    ({"Name": "Bo", "Personality": {"Values_and_Interests": ["chess", "running"]}}, "How do I get better at chess?"),
    ({"Name": "Cai", "Demographics": {"Age": 61, "Career_Information": "retired teacher"}},
     "Which houseplants are easy to keep alive?"),
    ({"Name": "Dee", "Preference": {"Travel": {"Leisure_Travel": "trains, not planes"}}},
     "Plan me a weekend trip from Paris."),
]


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=2, help="prompts per iteration")
    p.add_argument("--samples", type=int, default=2, help="rollouts per prompt, as ppo_cpe's default (TRL: prompts "
                   "repeated; at 4 prompts x 2 samples TRL outgrew 24 GiB of RAM on the 2-core machine and was "
                   "OOM-killed)")
    p.add_argument("--response-length", type=int, default=64, help="response cap (tokens)")
    p.add_argument("--micro-token-budget", type=int, default=2048, help="our tokens per forward/backward "
                   "(memory; the optimizer step still covers the whole batch, like TRL's single minibatch)")
    p.add_argument("--bracket", action=argparse.BooleanOptionalAction, default=True,
                   help="run our side again after TRL and average both blocks, so that a machine that "
                   "speeds up or slows down during the run favours neither side")
    p.add_argument("--iters", type=int, default=4, help="iterations per side; all but the --warmup first are timed")
    p.add_argument("--warmup", type=int, default=2, help="untimed first iterations per side (loading, the "
                   "allocator's first use of fresh memory)")
    p.add_argument("--prompt-file", default=str(ROOT / "data/persona_world/prompts.jsonl"))
    p.add_argument("--trl-python", default=None, help="interpreter with trl==1.12.0 (default: this one "
                   "if trl imports, else /tmp/trlenv/bin/python)")
    p.add_argument("--skip-cpe", action="store_true", help="skip part 1")
    p.add_argument("--skip-trl", action="store_true", help="skip TRL (part 2 prints only our side)")
    p.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)  # internal: JSON job file
    return p.parse_args()


def load_prompt_rows(path, n):
    if Path(path).exists():
        rows = [json.loads(line) for line in open(path) if line.strip()]
        return [(r["persona"], r["question"]) for r in rows[:n]]
    return (FALLBACK_PROMPTS * n)[:n]


# ---------------------------------------------------------------------------------------------
# part 1: our CPE iteration, default setting
# ---------------------------------------------------------------------------------------------

def bench_cpe(a):
    import torch
    import common
    import ppo_cpe
    sft = "out/sft" if (ROOT / "out/sft").exists() else common.DEFAULT_MODEL
    grm = "out/grm" if (ROOT / "out/grm").exists() else common.DEFAULT_MODEL
    args = ppo_cpe.get_args(["--sft", sft, "--grm", grm, "--precision", "fp32"])
    env = common.dist_init()
    actor, tok = common.load_trainable(args.sft, env)
    critic, _ = common.load_trainable(args.sft, env, value_head=True)
    rm = common.load_model(grm, device=env.device)
    opt_a = common.adamw(actor, args.actor_lr, args.weight_decay)
    opt_c = common.adamw(critic, args.critic_lr, args.weight_decay)
    path = args.prompts if Path(args.prompts).exists() else None
    items = ppo_cpe.load_prompts(path, tok, args.max_prompt_tokens) if path else \
        [{"persona": p, "question": q, "prompt_ids": common.chat_prompt_ids(tok, common.persona_messages(p, q))}
         for p, q in FALLBACK_PROMPTS * 2]
    print(f"part 1: one Critique-Post-Edit PPO iteration, default flags (sft={sft}, grm={grm}, "
          f"{args.prompts_per_step} prompts x {args.samples} samples, cap {args.max_new_tokens}, device {env.device})")
    timer = dict.fromkeys(["gen", "score", "edit", "train"], 0.0)
    counts = dict.fromkeys(["reward_calls", "reward_fail", "groups_dropped", "critique_fail"], 0)
    t0 = time.time()
    samples, _ = ppo_cpe.collect_batch(args, 0, env, actor, tok, rm, items, counts, timer)
    t = time.time()
    b = ppo_cpe.prepare_advantages(args, env, actor, critic, None, samples)
    ppo_cpe.ppo_update(args, 0, env, actor, critic, opt_a, opt_c, b)
    timer["train"] = time.time() - t
    total = time.time() - t0
    n_tok = sum(len(s["response"]) for s in samples)
    for k, v in timer.items():
        print(f"  {k:<6} {v:7.1f} s  {100 * v / total:5.1f}%")
    print(f"  total  {total:7.1f} s  ({len(samples)} sequences, {n_tok} response tokens, "
          f"{counts['reward_fail']} failed reward calls)")
    return {"cpe_iteration_s": total, **{f"cpe_{k}_s": v for k, v in timer.items()}}


# ---------------------------------------------------------------------------------------------
# part 2: ours vs TRL on one plain PPO iteration of identical size
# ---------------------------------------------------------------------------------------------

def bench_ours(a, rows):
    import torch
    import common
    import ppo_cpe
    env = common.dist_init()
    args = ppo_cpe.get_args(["--sft", common.DEFAULT_MODEL, "--reward", "bt", "--no-edit", "--precision", "fp32",
                             "--samples", str(a.samples), "--max-new-tokens", str(a.response_length),
                             "--top-p", "1.0", "--kl-coef", "0.05", "--kl-in", "reward",
                             "--minibatch-size", str(a.prompts), "--micro-token-budget", str(a.micro_token_budget)])
    actor, tok = common.load_trainable(args.sft, env)
    critic, _ = common.load_trainable(args.sft, env, value_head=True)
    ref, _ = common.load_model(args.sft, device=env.device)
    rm = common.load_model(args.sft, device=env.device, value_head=True)
    opt_a = common.adamw(actor, 1e-6, args.weight_decay)
    opt_c = common.adamw(critic, 1e-5, args.weight_decay)
    prompts = [(p, q, common.chat_prompt_ids(tok, common.persona_messages(p, q))) for p, q in rows]
    stops = common.stop_token_ids(tok)
    times, lengths, cpu = [], [], []
    for it in range(a.iters):
        split = {}
        t0, c0 = time.time(), time.process_time()
        rollouts = [x for x in prompts for _ in range(a.samples)]
        gen = common.generate(actor, [x[2] for x in rollouts], a.response_length, temperature=0.9, top_p=1.0,
                              stop_ids=stops, seed=it)
        split["gen"] = time.time() - t0
        t = time.time()
        texts = [tok.decode(x, skip_special_tokens=True) for x in gen.tokens]
        judged = ppo_cpe.judge(args, rm, [(p, q, y) for (p, q, _), y in zip(rollouts, texts)], False, 0)
        scores = ppo_cpe.apply_eos_penalty(torch.tensor([r for r, _, _ in judged]),
                                           torch.tensor(gen.stopped), args.eos_penalty)
        samples = [dict(prompt_ids=x[2], response=y, reward=float(r), is_edit=False, edit_logp=None)
                   for x, y, r in zip(rollouts, gen.tokens, scores)]
        b = ppo_cpe.prepare_advantages(args, env, actor, critic, ref, samples)  # old log-probs, values, ref
        split["score"] = time.time() - t
        t = time.time()
        ppo_cpe.ppo_update(args, it, env, actor, critic, opt_a, opt_c, b)
        split["update"] = time.time() - t
        times.append((time.time() - t0, split))
        cpu.append(time.process_time() - c0)
        lengths.append(sum(len(x) for x in gen.tokens) / len(gen.tokens))
    return times, lengths, cpu


TRL_WORKER = r'''
import json, os, sys, time, warnings
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
warnings.filterwarnings("ignore")
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
import trl
from trl.experimental.ppo import PPOConfig, PPOTrainer
import trl.experimental.ppo.ppo_trainer as ppo_mod

job = json.load(open(sys.argv[1]))
path, n = job["model"], job["prompts"] * job["samples"]
tok = AutoTokenizer.from_pretrained(path, padding_side="left")
tok.add_special_tokens({"pad_token": "[PAD]"})  # pad distinct from EOS
def load(cls, **kw):
    m = cls.from_pretrained(path, dtype=torch.float32, **kw)
    m.resize_token_embeddings(len(tok))
    m.config.pad_token_id = tok.pad_token_id
    return m
policy, ref = load(AutoModelForCausalLM), load(AutoModelForCausalLM)
value, reward = load(AutoModelForSequenceClassification, num_labels=1), \
    load(AutoModelForSequenceClassification, num_labels=1)
ids = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False) for m in job["messages"]]
ids = [x["input_ids"] if isinstance(x, dict) else list(x) for x in ids]
ids = [x for x in ids for _ in range(job["samples"])]
data = Dataset.from_dict({"input_ids": ids})
cfg = PPOConfig(output_dir=job["out"], per_device_train_batch_size=n, gradient_accumulation_steps=1,
                num_mini_batches=1, num_ppo_epochs=1, total_episodes=n * job["iters"],
                response_length=job["response_length"], temperature=0.9, stop_token="eos",
                local_rollout_forward_batch_size=n, kl_coef=0.05, learning_rate=1e-6, bf16=False,
                gradient_checkpointing=False, report_to=[], num_sample_generations=0, save_strategy="no",
                logging_steps=1, seed=0, dataloader_num_workers=0, disable_tqdm=True)
gen_time = []
orig = ppo_mod.batch_generation
def timed(*args, **kw):
    t = time.time(); out = orig(*args, **kw); gen_time.append(time.time() - t)
    gen_time_lengths.append(float((out[0][:, args[1].shape[1]:] != tok.pad_token_id).sum(1).float().mean()))
    return out
gen_time_lengths = []
ppo_mod.batch_generation = timed
stamps, cpu_stamps = [], []
class Stamp(TrainerCallback):
    def on_step_end(self, *a, **k):
        stamps.append(time.time())
        cpu_stamps.append(time.process_time())
trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                     value_model=value, train_dataset=data, eval_dataset=data, callbacks=[Stamp()])
t0, c0 = time.time(), time.process_time()
trainer.train()
starts, cpu_starts = [t0] + stamps[:-1], [c0] + cpu_stamps[:-1]
json.dump({"iter_s": [e - s for s, e in zip(starts, stamps)], "gen_s": gen_time, "trl": trl.__version__,
           "cpu_s": [e - s for s, e in zip(cpu_starts, cpu_stamps)],
           "mean_response_tokens": gen_time_lengths}, open(job["result"], "w"))
'''


def find_trl_python(a):
    if a.trl_python:
        return a.trl_python
    try:
        import trl  # noqa: F401
        return sys.executable
    except ImportError:
        return "/tmp/trlenv/bin/python" if Path("/tmp/trlenv/bin/python").exists() else None


def bench_trl(a, rows, python):
    import common
    model_dir = str(common.resolve_checkpoint(common.DEFAULT_MODEL))
    with tempfile.TemporaryDirectory() as tmp:
        job = {"model": model_dir, "prompts": a.prompts, "samples": a.samples, "iters": a.iters,
               "response_length": a.response_length, "out": f"{tmp}/out", "result": f"{tmp}/result.json",
               "messages": [common.persona_messages(p, q) for p, q in rows]}
        Path(f"{tmp}/job.json").write_text(json.dumps(job))
        Path(f"{tmp}/worker.py").write_text(TRL_WORKER)
        proc = subprocess.run([python, f"{tmp}/worker.py", f"{tmp}/job.json"], capture_output=True, text=True)
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB (Linux)
        if proc.returncode != 0:  # e.g. -9: killed by the kernel's OOM killer
            print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
            print(f"  TRL run failed (exit {proc.returncode}; peak RSS {peak_gb:.1f} GiB)")
            return None
        return {**json.loads(Path(job["result"]).read_text()), "peak_rss_gb": peak_gb}


def mean_after_warmup(xs, warmup):
    """Mean of the timed iterations: all but the first `warmup` ones (or the last, if none is left)."""
    timed = xs[warmup:] or xs[-1:]
    return sum(timed) / len(timed)


def ours_block(a, rows, label):
    """Our iterations, printed; returns the mean wall and CPU seconds of the timed ones."""
    times, lengths, cpu = bench_ours(a, rows)
    for i, (t, split) in enumerate(times):
        print(f"  {label} iteration {i + 1}: {t:6.1f} s  (" + ", ".join(f"{k} {v:.1f} s" for k, v in split.items())
              + f"; mean response {lengths[i]:.0f} tokens; CPU time {cpu[i]:.1f} s)"
              + ("  [warm-up]" if i < min(a.warmup, len(times) - 1) else ""))
    return mean_after_warmup([t for t, _ in times], a.warmup), mean_after_warmup(cpu, a.warmup)


def main():
    a = get_args()
    results = {}
    if not a.skip_cpe:
        results.update(bench_cpe(a))
    rows = load_prompt_rows(a.prompt_file, a.prompts)
    print(f"\npart 2: one plain PPO iteration, {a.prompts} prompts x {a.samples} samples, response cap "
          f"{a.response_length}, SmolLM2-135M fp32 for policy / critic / reference / reward")
    ours, ours_cpu = ours_block(a, rows, "ours")
    results["ours_iteration_s"], results["ours_iteration_cpu_s"] = ours, ours_cpu
    results["ours_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  ours  peak RSS {results['ours_peak_rss_gb']:.1f} GiB (this process, part 1 included)")
    python = None if a.skip_trl else find_trl_python(a)
    import gc
    gc.collect()  # our models are gone before TRL starts (24 GiB hold both barely)
    trl = None if python is None else bench_trl(a, rows, python)
    if python is None:
        print("  TRL: skipped (no interpreter with trl==1.12.0: see the install lines in this file's docstring)")
    elif trl is not None:
        print(f"  TRL peak RSS {trl['peak_rss_gb']:.1f} GiB")
        results["trl_peak_rss_gb"] = trl["peak_rss_gb"]
        for i, t in enumerate(trl["iter_s"]):
            g = trl["gen_s"][i] if i < len(trl["gen_s"]) else float("nan")
            ln = trl["mean_response_tokens"][i] if i < len(trl["mean_response_tokens"]) else float("nan")
            print(f"  TRL {trl['trl']} iteration {i + 1}: {t:6.1f} s  (generation {g:.1f} s; mean response "
                  f"{ln:.0f} tokens; CPU time {trl['cpu_s'][i]:.1f} s)"
                  + ("  [warm-up]" if i < min(a.warmup, len(trl["iter_s"]) - 1) else ""))
        results["trl_iteration_s"] = mean_after_warmup(trl["iter_s"], a.warmup)
        results["trl_iteration_cpu_s"] = mean_after_warmup(trl["cpu_s"], a.warmup)
        if a.bracket:  # ours again after TRL: a machine drifting steadily over the run cancels out
            after, after_cpu = ours_block(a, rows, "ours (after TRL)")
            ours, ours_cpu = (ours + after) / 2, (ours_cpu + after_cpu) / 2
            results["ours_after_trl_iteration_s"] = after
            results["ours_iteration_s"], results["ours_iteration_cpu_s"] = ours, ours_cpu
        results["speedup_vs_trl"] = results["trl_iteration_s"] / ours
        results["speedup_vs_trl_cpu_time"] = results["trl_iteration_cpu_s"] / ours_cpu
    print("\n" + json.dumps({k: round(v, 3) for k, v in results.items()}))
    if "speedup_vs_trl" in results:
        # CPU time is the steadier figure on a shared machine; wall time is what a user waits
        print(f"ppo iteration, ours vs TRL PPOTrainer, CPU time per iteration (TRL / ours): "
              f"{results['speedup_vs_trl_cpu_time']:.2f}x")
        print(f"ppo iteration, ours vs TRL PPOTrainer, wall time per iteration (TRL / ours): "
              f"{results['speedup_vs_trl']:.2f}x")


if __name__ == "__main__":
    main()
