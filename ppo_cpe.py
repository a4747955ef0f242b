"""Critique-Post-Edit PPO (SPEC 1.2, 1.3; arXiv 2510.18849): PPO whose reward is a personalized
generative reward model (GRM), and whose policy also rewrites its own answers from the GRM's
critiques, the edits joining the PPO batch with an off-policy ratio.

One iteration, in the order this file runs it (collect_batch, prepare_advantages, ppo_update):
  1. rollouts: n samples per prompt from the actor (temperature 0.9, top-p 0.9);
  2. scoring: the GRM judges each rollout greedily -> R_o (a response that never stops gets the
     fixed EOS penalty instead, SPEC 1.3). A call that fails or a reply without a <scores> block
     is no reward: its prompt's whole group leaves the batch, counted; past --max-reward-fail the
     run stops with an error;
  3. critique: a separate sampled GRM call per rollout (temperature 0.9); a failed one makes no edit;
  4. edit: the actor answers an edit prompt (original prompt + response + critique); log pi_e(y_e |
     edit prompt) is stored per token;
  5. the edit is scored by the GRM as an answer to the ORIGINAL prompt -> R_e;
  6. floor(edit_ratio x originals) edits are selected (random | reward_rank | conditional) and
     ADDED to the batch as (original prompt, y_e) samples;
  7. PPO update: clipped surrogate for originals, the off-policy term
     -A * pi_theta(y_e | x) / pi_e(y_e | x_edit) for edits, clipped value loss, GAE on the
     critic's values, whitened advantages, token-mean over each minibatch.
--no-edit gives plain PPO (steps 3-6 skipped).

Commands:
  python sft.py && python sft.py --data data/persona_world/grm.jsonl --out out/grm ...   # policy, GRM (README)
  python ppo_cpe.py                               # embedded SmolLM2-135M, persona world, 2 CPU cores
  python ppo_cpe.py --no-edit                     # plain PPO with the GRM
  python ppo_cpe.py --reward bt --bt out/bt --no-edit   # the reward-hacking baseline (SPEC 1.4)
  python ppo_cpe.py --reward rubric               # the persona-world rubric as reward (oracle)
  python ppo_cpe.py --resume                      # continue from the latest ckpt_* in --out
The paper's 7B run (SPEC 1.3), 8 GPUs for actor + critic (FSDP2), the GRM served by vLLM:
  vllm serve /ckpt/grm-7b --served-model-name grm --port 8000
  torchrun --standalone --nproc_per_node 8 ppo_cpe.py --sft /ckpt/qwen2.5-7b-sft --prompts prompts.jsonl \\
      --grm-url http://grm-host:8000/v1 --grm-model grm --grm-max-new-tokens 1024 \\
      --prompts-per-step 128 --samples 4 --minibatch-size 64 --ppo-epochs 1 --epochs 2 --max-steps 0 \\
      --max-new-tokens 2048 --max-prompt-tokens 2048 --actor-lr 1e-6 --critic-lr 1e-5 \\
      --micro-token-budget 8192 --checkpointing --save-every 20
(`python memory_plan.py --stage ppo` shows the per-GPU memory of this command.)
"""
import argparse
import math
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common
from common import (DEFAULT_MODEL, PRECISIONS, DataError, MetricsLogger, all_reduce_sum, autocast, chat_prompt_ids,
                    check_resume, dist_cleanup, dist_init, generate, grm_messages, grm_reward, is_rank0,
                    latest_checkpoint, load_model, load_trainable, load_training_state, main_guard, micro_batches,
                    pack, persona_messages, predictions, prepare_out, print0, read_jsonl, require_field,
                    resolve_precision, response_logprobs, save_model, save_training_state, stop_token_ids, unsharded)

GRM_DIMS = list(common.GRM_WEIGHTS)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data and models
    p.add_argument("--sft", default="out/sft", help="SFT checkpoint: initialises the actor, the critic (a value "
                   "model with a new zero head) and the optional reference model")
    p.add_argument("--prompts", default="data/persona_world/prompts.jsonl",
                   help="RL prompts, JSONL with persona (dict or JSON string) and question")
    p.add_argument("--out", default="out/ppo", help="output folder: metrics.jsonl, samples.jsonl, ckpt_*/, actor/")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16-mixed on CUDA (bf16 compute, "
                   "fp32 master weights and AdamW state), fp32 on CPU; bf16 keeps bf16 weights (small updates lost)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block (actor, critic)")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling, edit selection and minibatch order")
    # reward
    p.add_argument("--reward", default="grm", choices=["grm", "bt", "rubric"],
                   help="grm: generative RM (local --grm or served --grm-url); bt: Bradley-Terry scalar RM (--bt, "
                   "needs --no-edit: it writes no critique); rubric: the persona-world rubric (an oracle)")
    p.add_argument("--grm", default="out/grm", help="local GRM checkpoint (run in-process with common.generate)")
    p.add_argument("--grm-url", default=None, help="OpenAI-compatible endpoint serving the GRM (vLLM: "
                   "http://host:8000/v1); overrides --grm")
    p.add_argument("--grm-model", default="grm", help="model name to request from --grm-url")
    p.add_argument("--grm-single-turn", action="store_true", help="send the GRM its rubric and the case as one user "
                   "turn (the release's judge template layout, for a GRM trained that way)")
    p.add_argument("--grm-timeout", type=float, default=120.0, help="seconds per GRM request (--grm-url)")
    p.add_argument("--grm-retries", type=int, default=3, help="retries of a failed GRM request, with backoff")
    p.add_argument("--grm-workers", type=int, default=16, help="concurrent GRM requests (--grm-url)")
    p.add_argument("--grm-max-new-tokens", type=int, default=192, help="token budget of one GRM reply")
    p.add_argument("--grm-score", default="expected", choices=["expected", "parsed"],
                   help="local GRM: reward from the probability-weighted scores at the score tokens it wrote (dense: "
                        "a small GRM writes the same integers for most answers), or the parsed integers (the "
                        "paper's reward; always so for --grm-url)")
    p.add_argument("--grm-batch-size", type=int, default=16, help="local GRM: replies generated together")
    p.add_argument("--critique-temperature", type=float, default=0.9, help="sampled critique call (SPEC 1.2)")
    p.add_argument("--max-reward-fail", type=float, default=0.25, help="stop with an error when more than this "
                   "fraction of a step's scoring calls fail or cannot be parsed")
    p.add_argument("--bt", default="out/bt", help="Bradley-Terry reward model (train_grm.py --mode bt)")
    # rollouts
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompts per PPO step, all ranks (paper 128)")
    p.add_argument("--samples", type=int, default=2, help="rollouts per prompt (paper 4)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="response cap (paper 2048)")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts are left out, counted (paper 2048)")
    p.add_argument("--temperature", type=float, default=0.9, help="rollout and edit sampling temperature")
    p.add_argument("--top-p", type=float, default=0.9, help="rollout and edit nucleus sampling")
    p.add_argument("--eos-penalty", type=float, default=-5.0,
                   help="EOS trick: the reward of a response that hits the cap without stopping")
    # Critique-Post-Edit
    p.add_argument("--no-edit", action="store_true", help="plain PPO: no critiques, no edits")
    p.add_argument("--edit-strategy", default="random", choices=["random", "reward_rank", "conditional"],
                   help="which edits join the batch (SPEC 1.2 step 6; random was best in the paper)")
    p.add_argument("--edit-ratio", type=float, default=0.5, help="edits added = floor(ratio x originals)")
    p.add_argument("--edit-clip", action="store_true", help="clip the edit ratio to [1-clip, 1+clip_high] "
                   "(the paper's text; the release and the default run unclipped)")
    # PPO (SPEC 1.3 values of the 7B release in brackets)
    p.add_argument("--epochs", type=float, default=2, help="passes over the prompts (paper 2)")
    p.add_argument("--max-steps", type=int, default=4, help="stop after this many PPO steps (0: --epochs decides)")
    p.add_argument("--minibatch-size", type=int, default=4, help="prompts per PPO minibatch, as the release counts: "
                   "one optimizer step per minibatch_size x samples sequences, edits included (paper 64)")
    p.add_argument("--micro-token-budget", type=int, default=2048,
                   help="tokens per forward/backward pass (memory; a longer sequence goes alone)")
    p.add_argument("--ppo-epochs", type=int, default=1, help="passes over each step's batch (paper 1)")
    p.add_argument("--actor-lr", type=float, default=5e-5, help="constant actor lr (paper 1e-6 for 7B; the 4-step "
                   "CPU default needs more to move)")
    p.add_argument("--critic-lr", type=float, default=5e-5, help="constant critic lr (paper 1e-5)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (paper 0.01)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm, actor and critic (paper 1.0)")
    p.add_argument("--clip", type=float, default=0.2, help="policy ratio clip eps, lower side (paper 0.2)")
    p.add_argument("--clip-higher", type=float, default=None, help="upper clip eps for originals and the clipped "
                   "edit term (\"clip-higher\"; default = --clip)")
    p.add_argument("--value-clip", type=float, default=0.5, help="value clip around the old values (paper 0.5)")
    p.add_argument("--entropy-coef", type=float, default=0.0, help="entropy bonus (paper 0)")
    p.add_argument("--kl-coef", type=float, default=0.0, help="reference-model KL (paper 0: no KL, no reference)")
    p.add_argument("--kl-in", default="reward", choices=["reward", "loss"],
                   help="KL as a per-token reward penalty (k1) or as a loss term (k3)")
    p.add_argument("--gamma", type=float, default=1.0, help="GAE discount (paper 1.0)")
    p.add_argument("--lam", type=float, default=1.0, help="GAE lambda (paper 1.0)")
    # bookkeeping
    p.add_argument("--save-every", type=int, default=5, help="resume checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest ckpt_* in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--log-samples", type=int, default=2, help="rollouts per step written to samples.jsonl")
    p.add_argument("--skip-bad", action="store_true", help="skip bad prompt lines (counted) instead of stopping")
    p.add_argument("--stop-at-step", type=int, default=0, help="testing: stop after this step as if killed")
    args = p.parse_args(argv)
    args.clip_higher = args.clip if args.clip_higher is None else args.clip_higher
    for name in ("prompts_per_step", "samples", "max_new_tokens", "max_prompt_tokens", "minibatch_size",
                 "micro_token_budget", "ppo_epochs", "grm_max_new_tokens", "grm_batch_size", "grm_workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("max_steps", "save_every", "log_samples", "grm_retries", "stop_at_step", "temperature", "critique_temperature",
                 "entropy_coef", "kl_coef", "weight_decay"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("edit_ratio", "max_reward_fail", "gamma", "lam"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if not (0 < args.top_p <= 1 and args.epochs > 0 and args.actor_lr > 0 and args.critic_lr > 0
            and args.grad_clip > 0 and args.clip > 0 and args.clip_higher > 0 and args.value_clip > 0
            and args.grm_timeout > 0):
        p.error("--top-p must be in (0, 1]; --epochs, the learning rates, --grad-clip, the clips and "
                "--grm-timeout must be > 0")
    if args.reward == "bt" and not args.no_edit:
        p.error("--reward bt writes no critique: add --no-edit (the BT-RM baseline is plain PPO)")
    return args


# =============================================================================================
# PPO math (pure: tensors in, tensors out). Per-sequence tensors are right-padded to [N, L] for
# the math only; masks come from lengths, never from "token == pad" (SmolLM2's pad is its EOS).
# =============================================================================================

def pad_right(rows, value=0.0):
    """Ragged 1-D tensors -> ([N, L] right-padded, [N, L] float mask from their lengths)."""
    padded = torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True, padding_value=value)
    lengths = torch.tensor([len(r) for r in rows], device=padded.device)
    return padded, (torch.arange(padded.shape[1], device=padded.device)[None] < lengths[:, None]).float()


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask, shift_mean=True, reduce=None):
    """(x - mean) / std over the masked entries (unbiased variance); 0 outside the mask.
    `reduce` sums a tensor over ranks (common.all_reduce_sum) so the statistics are global."""
    reduce = reduce or (lambda t: t)
    sums = reduce(torch.stack([(x * mask).sum(), mask.sum()]).double())
    mean = sums[0] / sums[1]
    var = reduce(((x.double() - mean) ** 2 * mask).sum()) / (sums[1] - 1).clamp(min=1)
    out = (x.double() - mean) * torch.rsqrt(var + 1e-8)
    return ((out if shift_mean else out + mean) * mask).to(x.dtype)


def apply_eos_penalty(scores, stopped, penalty):
    """EOS trick (SPEC 1.3): a response that never emitted a stop token gets a fixed reward."""
    return torch.where(stopped, scores, torch.full_like(scores, penalty))


def token_rewards(scores, mask):
    """Sequence scores [N] -> per-token rewards [N, L], the score on the last real token only."""
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(len(scores)), mask.sum(1).long() - 1] = scores.to(rewards.dtype)
    return rewards


def gae_advantages(values, rewards, mask, gamma=1.0, lam=1.0):
    """Generalized advantage estimation over response tokens; values[:, t] is V(state before token t).
    Returns (advantages, returns = advantages + values), both 0 outside the mask."""
    values, rewards = values * mask, rewards * mask
    adv, last = torch.zeros_like(values), torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_v = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)  # 0 past each end
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def ppo_clip_loss(logp, old_logp, advantages, clip_low=0.2, clip_high=0.2):
    """Per-token PPO clipped surrogate (SPEC 1.2 step 7, originals):
    max(-A r, -A clip(r, 1-clip_low, 1+clip_high)), r = pi_theta / pi_old.
    Returns (loss [N, L], ratio, clipped) where clipped marks tokens whose clipped branch won."""
    ratio = torch.exp(logp - old_logp)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(loss1, loss2), ratio, (loss2 > loss1)


def edit_offpolicy_loss(logp, edit_logp, advantages, clip=None):
    """Per-token off-policy loss of edits (SPEC 1.2 step 7): -A * pi_theta(y_e | x) / pi_e(y_e | x_edit),
    the ratio in probability space, exp(logp) / (exp(logp_e) + 1e-6), as in the public release.
    `logp` is computed under the ORIGINAL prompt x, `edit_logp` was stored under the edit prompt.
    clip=(low, high) clamps the ratio to [1-low, 1+high] (the paper's form; zero gradient outside).
    Returns (loss [N, L], ratio, bound) where bound marks tokens where the clamp binds."""
    ratio = torch.exp(logp) / (torch.exp(edit_logp) + 1e-6)
    bound = torch.zeros_like(ratio, dtype=torch.bool)
    if clip is not None:
        low, high = 1.0 - clip[0], 1.0 + clip[1]
        bound = (ratio < low) | (ratio > high)
        ratio = torch.clamp(ratio, low, high)
    return -advantages * ratio, ratio, bound


def value_clip_loss(values, old_values, returns, clip=0.5):
    """Per-token clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2) -> (loss, clipped)."""
    clipped_v = old_values + torch.clamp(values - old_values, -clip, clip)
    l1, l2 = (values - returns) ** 2, (clipped_v - returns) ** 2
    return 0.5 * torch.maximum(l1, l2), (l2 > l1)


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over the masked tokens (None when the returns are constant)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1 - var_d / var_r) if var_r > 0 else None


def select_edits(strategy, ratio, groups, rewards_orig=None, rewards_edit=None, generator=None):
    """Indices (into the originals) of the edits that join the batch (SPEC 1.2 step 6): floor(ratio x
    originals) of them. random: uniform without replacement; reward_rank: per question (group) the
    highest R_e; conditional: per question the highest R_e - R_o. Balanced over questions: every
    question's best edit comes before any question's second best; then the larger key wins."""
    n = len(groups)
    k = min(n, int(math.floor(ratio * n + 1e-9)))
    if k == 0:
        return []
    if strategy == "random":
        return sorted(torch.randperm(n, generator=generator)[:k].tolist())
    key = [float(e) - (float(o) if strategy == "conditional" else 0.0)
           for e, o in zip(rewards_edit, rewards_orig or [0.0] * n)]
    rank_in_group = {}
    for g in set(groups):
        members = sorted((i for i in range(n) if groups[i] == g), key=lambda i: (-key[i], i))
        rank_in_group.update({i: r for r, i in enumerate(members)})
    return sorted(sorted(range(n), key=lambda i: (rank_in_group[i], -key[i], i))[:k])


# =============================================================================================
# Prompts and rewards
# =============================================================================================

def load_prompts(path, tokenizer, max_prompt_tokens, skip_bad=False):
    rows, skipped = read_jsonl(path, skip_bad)
    items, too_long = [], 0
    for lineno, row in rows:
        persona = row.get("persona")
        if not isinstance(persona, (dict, str)) or not persona:
            raise DataError(f"{path}:{lineno}: field 'persona' must be a JSON object or string")
        question = require_field(row, "question", path, lineno)
        ids = chat_prompt_ids(tokenizer, persona_messages(persona, question))
        if len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        items.append({"persona": persona, "question": question, "prompt_ids": ids})
    if not items:
        raise DataError(f"{path}: no prompt fits --max-prompt-tokens")
    print0(f"{path}: {len(items)} prompts ({too_long} over --max-prompt-tokens, {len(skipped)} bad lines skipped)")
    return items


def prompts_for_step(items, step, per_step, seed, env):
    """This rank's prompts for a (0-based) step: a fresh seeded shuffle per pass over the data, so a
    resumed run sees exactly what an uninterrupted run would."""
    epoch, offset = divmod(step, max(1, len(items) // per_step))
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [items[i] for i in order[offset * per_step:(offset + 1) * per_step]][env.rank::env.world_size]


EDIT_INSTRUCTION = """A user sent the request below. A first answer was drafted, and a reviewer wrote a critique of it.

=== Request ===
{request}

=== First answer ===
{response}

=== Critique ===
{critique}

Write the improved final answer to the request: apply the critique's suggestions and keep everything \
the critique does not ask to change. Answer in the language of the request. Give one final answer \
only, addressed to the user: no preamble, no remarks about the draft or the critique, no repetition."""


def edit_prompt_ids(tokenizer, persona, question, response, critique):
    """The edit prompt x_edit of SPEC 1.2 step 4: one user turn with the original prompt, the
    original response and the critique."""
    text = EDIT_INSTRUCTION.format(request=persona_messages(persona, question)[0]["content"],
                                   response=response.strip(), critique=critique.strip())
    return chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])


def judge(args, rm, cases, sampled, seed):
    """Reward-model calls for cases [(persona, question, response)]: sampled=False is the greedy scoring
    call, sampled=True the critique call. Returns [(reward, scores, critique)] with reward None for a
    call that failed or a reply without scores (SPEC 1.1 says "reward 0": here it is no reward at all,
    and the caller drops the sample), critique "" when there is none."""
    if not cases:
        return []
    if args.reward == "rubric":
        from data.persona_world.rubric import rubric_judge
        return [(grm_reward(s), s, c) for c, s in (rubric_judge(*case) for case in cases)]
    if args.reward == "bt":  # the value head at the last token of (persona prompt, response)
        model, tok = rm
        seqs, rewards = [common.response_ids(tok, *c) for c in cases], []
        with torch.no_grad():
            for mb in micro_batches(seqs, args.micro_token_budget, share_prefix=True):
                rewards += common.last_token_values(model, [seqs[i] for i in mb]).tolist()
        return [(r, None, "") for r in rewards]
    temperature = args.critique_temperature if sampled else 0.0
    if args.grm_url:  # a served GRM (vLLM or any OpenAI-compatible server)
        def call(case):
            try:
                # every sampling parameter explicit: vLLM fills the ones a request leaves out from the
                # GRM's generation_config.json, which would silently change the greedy scoring
                reply = common.chat_completion(args.grm_url, args.grm_model, grm_messages(*case, args.grm_single_turn),
                                               temperature=temperature, top_p=1.0, top_k=-1, repetition_penalty=1.0,
                                               max_tokens=args.grm_max_new_tokens, timeout=args.grm_timeout,
                                               retries=args.grm_retries, seed=seed)
                return reply["choices"][0]["message"]["content"] or ""
            except (common.EndpointError, KeyError, IndexError, TypeError) as e:
                print0(f"GRM call failed: {str(e)[:300]}")
                return None
        texts, replies = common.map_concurrent(call, cases, max_workers=args.grm_workers), None
    else:  # a local GRM checkpoint through our engine; the scoring call records its score digits
        model, tok = rm
        watch = common.grm_watch_ids(tok) if not sampled and args.grm_score == "expected" else None
        texts, replies = [], []
        for i in range(0, len(cases), args.grm_batch_size):
            prompts = [chat_prompt_ids(tok, grm_messages(*c, args.grm_single_turn))
                       for c in cases[i:i + args.grm_batch_size]]
            gen = generate(model, prompts, args.grm_max_new_tokens, temperature=temperature,
                           stop_ids=stop_token_ids(tok), seed=seed + i, watch_ids=watch)
            texts += [tok.decode(t, skip_special_tokens=True) for t in gen.tokens]
            replies += list(zip(gen.tokens, gen.watched or [None] * len(prompts)))
    out = []
    for k, text in enumerate(texts):
        critique = common.parse_grm_critique(text) if text is not None else ""
        scores = common.parse_grm_scores(text) if text is not None and not sampled else None
        if scores is not None and replies is not None and args.grm_score == "expected":
            scores = common.grm_expected_scores(rm[1], *replies[k])  # probability-weighted (G-Eval)
        out.append((grm_reward(scores) if scores is not None else None, scores, critique))
    return out


def score_responses(args, rm, cases, stopped, seed):
    """The scoring call for responses that stopped; the EOS penalty for the rest (no GRM call).
    Returns (rewards [N] with NaN where the call failed, scores)."""
    idx = [i for i, s in enumerate(stopped) if s]
    rewards, scores = torch.full((len(cases),), float(args.eos_penalty)), [None] * len(cases)
    for i, (r, s, _) in zip(idx, judge(args, rm, [cases[i] for i in idx], False, seed)):
        rewards[i], scores[i] = (float("nan") if r is None else r), s
    return apply_eos_penalty(rewards, torch.tensor(stopped, dtype=torch.bool), args.eos_penalty), scores


def response_values(critic, seqs, starts):
    """Critic value V(s_t) at each position that predicts a response token (the state before it)."""
    packed = pack(seqs, next(critic.parameters()).device, share_prefix=True)
    pos, _ = predictions(packed, seqs, [range(s, len(q)) for q, s in zip(seqs, starts)])
    return list(critic.values(packed.input_ids, packed.cu_seqlens, packed.parents, select=pos)
                .split([len(q) - s for q, s in zip(seqs, starts)]))


# =============================================================================================
# One PPO iteration: rollouts, Critique-Post-Edit, update
# =============================================================================================

def collect_batch(args, step, env, actor, tok, rm, items, counts, timer):
    """Steps 1-6 of SPEC 1.2 for this rank's prompts -> (training samples, edit log)."""
    seed = args.seed * 1_000_003 + step * 1009 + env.rank * 17
    stops = stop_token_ids(tok)
    prompts = prompts_for_step(items, step, args.prompts_per_step, args.seed, env)
    rollouts = [(p, g) for g, p in enumerate(prompts) for _ in range(args.samples)]

    # 1. rollouts; FSDP2 gathers the (bf16 under bf16-mixed) parameters once for the whole call
    t = time.time()
    with unsharded(actor):
        gen = generate(actor, [p["prompt_ids"] for p, _ in rollouts], args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, stop_ids=stops, seed=seed)
    texts = [tok.decode(t_, skip_special_tokens=True) for t_ in gen.tokens]
    cases = [(p["persona"], p["question"], y) for (p, _), y in zip(rollouts, texts)]
    timer["gen"] += time.time() - t

    # 2. score the originals greedily -> R_o; a failed call takes its prompt's whole group out
    t = time.time()
    r_orig, s_orig = score_responses(args, rm, cases, gen.stopped, seed + 1)
    failed_groups = {g for (_, g), r in zip(rollouts, r_orig.tolist()) if math.isnan(r)}
    counts["reward_calls"] += sum(gen.stopped)
    counts["reward_fail"] += int(torch.isnan(r_orig).sum())
    counts["groups_dropped"] += len(failed_groups)
    keep = [i for i, (_, g) in enumerate(rollouts) if g not in failed_groups]
    timer["score"] += time.time() - t
    samples = [dict(prompt_ids=rollouts[i][0]["prompt_ids"], response=gen.tokens[i], stopped=gen.stopped[i],
                    reward=float(r_orig[i]), scores=s_orig[i], is_edit=False, edit_logp=None, text=texts[i])
               for i in keep]
    if args.no_edit or not keep:
        return samples, {"edit_candidates": 0}

    t = time.time()
    groups = [rollouts[i][1] for i in keep]
    # with random selection the choice does not depend on the edits: only the chosen ones are made
    picked = select_edits("random", args.edit_ratio, groups, generator=torch.Generator().manual_seed(seed + 2)) \
        if args.edit_strategy == "random" else list(range(len(keep)))
    # 3. a separate, sampled critique call per candidate; a failed or empty critique makes no edit
    crit = judge(args, rm, [cases[keep[j]] for j in picked], True, seed + 3)
    counts["critique_fail"] += sum(not c[2] for c in crit)
    cand = [keep[j] for j, c in zip(picked, crit) if c[2]]
    critiques = [c[2] for c in crit if c[2]]
    # 4. the policy edits its own response given the critique; store log pi_e(y_e | x_edit)
    edit_prompts = [edit_prompt_ids(tok, *cases[i], c) for i, c in zip(cand, critiques)]
    with unsharded(actor):
        egen = generate(actor, edit_prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        stop_ids=stops, seed=seed + 4)
    # the engine's log-probs are of the top-p-truncated distribution; the loss needs the full
    # temperature-scaled one, so pi_e is recomputed by a forward under the edit prompt
    seqs = [e + y for e, y in zip(edit_prompts, egen.tokens)]
    edit_logp = [None] * len(seqs)
    with torch.no_grad(), autocast(env.device, args.precision):
        for mb in micro_batches(seqs, args.micro_token_budget, share_prefix=True):
            lps, _ = response_logprobs(actor, [seqs[j] for j in mb], [len(edit_prompts[j]) for j in mb], args.temperature)
            for j, lp in zip(mb, lps):
                edit_logp[j] = lp.float().cpu()
    etexts = [tok.decode(t_, skip_special_tokens=True) for t_ in egen.tokens]
    # 5. score each edit as an answer to the ORIGINAL prompt -> R_e; an edit whose call failed is dropped
    r_edit, s_edit = score_responses(args, rm, [(*cases[i][:2], y) for i, y in zip(cand, etexts)], egen.stopped,
                                     seed + 5)
    counts["reward_calls"] += sum(egen.stopped)
    counts["reward_fail"] += int(torch.isnan(r_edit).sum())
    ok = [j for j in range(len(cand)) if not math.isnan(float(r_edit[j]))]
    # 6. select which edits join the batch: floor(edit_ratio x originals) among the scored edits
    chosen = ok
    if args.edit_strategy != "random" and ok:
        ratio = min(1.0, args.edit_ratio * len(keep) / len(ok))
        chosen = [ok[j] for j in select_edits(args.edit_strategy, ratio, [rollouts[cand[j]][1] for j in ok],
                                              [float(r_orig[cand[j]]) for j in ok], [float(r_edit[j]) for j in ok])]
    for j in chosen:
        samples.append(dict(prompt_ids=rollouts[cand[j]][0]["prompt_ids"], response=egen.tokens[j],
                            stopped=egen.stopped[j], reward=float(r_edit[j]), scores=s_edit[j], is_edit=True,
                            edit_logp=edit_logp[j], text=etexts[j], critique=critiques[j]))
    timer["edit"] += time.time() - t
    improved = [float(r_edit[j] > r_orig[cand[j]]) for j in ok]
    return samples, {"edit_candidates": len(cand), "edit_improved_sum": sum(improved), "edit_scored": len(ok)}


def sample_sequences(samples):
    """(prompt + response token lists, prompt lengths) of the batch's samples."""
    return [s["prompt_ids"] + s["response"] for s in samples], [len(s["prompt_ids"]) for s in samples]


def by_prompt(indices, seqs, starts):
    """Indices ordered so that a prompt's samples and edits sit together: a micro-batch stores the prompt once."""
    return sorted(indices, key=lambda i: seqs[i][:starts[i]])


def prepare_advantages(args, env, actor, critic, ref, samples):
    """Old log-probs (under the ORIGINAL prompt for every sample, edits included), values, rewards,
    GAE and whitened advantages for the whole batch (padded)."""
    seqs, starts = sample_sequences(samples)
    old, vals, refs = [None] * len(seqs), [None] * len(seqs), [None] * len(seqs)
    order = by_prompt(range(len(seqs)), seqs, starts)
    with torch.no_grad(), autocast(env.device, args.precision):
        for mb in micro_batches([seqs[i] for i in order], args.micro_token_budget, share_prefix=True):
            idx = [order[j] for j in mb]
            cs, cst = [seqs[i] for i in idx], [starts[i] for i in idx]
            for i, lp, v in zip(idx, response_logprobs(actor, cs, cst, args.temperature)[0],
                                response_values(critic, cs, cst)):
                old[i], vals[i] = lp, v
            if ref is not None:
                for i, lp in zip(idx, response_logprobs(ref, cs, cst, args.temperature)[0]):
                    refs[i] = lp
    old_logp, mask = pad_right([x.float().cpu() for x in old])
    values, _ = pad_right([x.float().cpu() for x in vals])
    ref_logp = pad_right([x.float().cpu() for x in refs])[0] if ref is not None else None
    # edits carry log pi_e(y_e | x_edit); originals never use this slot
    edit_logp, _ = pad_right([s["edit_logp"] if s["is_edit"] else o for s, o in zip(samples, old_logp)])
    rewards = token_rewards(torch.tensor([s["reward"] for s in samples]), mask)  # last real token (SPEC 1.3)
    if ref is not None and args.kl_in == "reward":
        rewards = rewards - args.kl_coef * (old_logp - ref_logp) * mask
    advantages, returns = gae_advantages(values, rewards, mask, args.gamma, args.lam)
    advantages = masked_whiten(advantages, mask, reduce=all_reduce_sum if env.world_size > 1 else None)
    batch = dict(mask=mask, old_logp=old_logp, values=values, returns=returns, advantages=advantages,
                 edit_logp=edit_logp, ref_logp=ref_logp, is_edit=torch.tensor([s["is_edit"] for s in samples]))
    return {**{k: (v.to(env.device) if v is not None else None) for k, v in batch.items()}, "seqs": seqs,
            "starts": starts}


def microbatch_losses(args, actor, critic, b, micro):
    """Per-token losses of one micro-batch (rows `micro` of the padded batch b), SPEC 1.2 step 7.
    Every row is scored under its ORIGINAL prompt: originals get the PPO clipped surrogate against
    pi_old, edits the off-policy term against the stored pi_e(y_e | x_edit)."""
    seqs, starts = [b["seqs"][i] for i in micro], [b["starts"][i] for i in micro]
    lp, ent = response_logprobs(actor, seqs, starts, args.temperature, with_entropy=True,
                                entropy_grad=args.entropy_coef > 0)
    logp, _ = pad_right(lp)
    L = logp.shape[1]
    m, adv, is_edit = b["mask"][micro, :L], b["advantages"][micro, :L], b["is_edit"][micro][:, None]
    pg_o, ratio, clipped = ppo_clip_loss(logp, b["old_logp"][micro, :L], adv, args.clip, args.clip_higher)
    pg_e, eratio, ebound = edit_offpolicy_loss(logp, b["edit_logp"][micro, :L], adv,
                                               (args.clip, args.clip_higher) if args.edit_clip else None)
    out = dict(mask=m, is_edit=is_edit, logp=logp, pg=torch.where(is_edit, pg_e, pg_o), ratio=ratio,
               clipped=clipped, edit_ratio=eratio, edit_bound=ebound, entropy=pad_right(ent)[0],
               kl=torch.zeros_like(logp))
    if b["ref_logp"] is not None and args.kl_in == "loss":
        d = b["ref_logp"][micro, :L] - logp
        out["kl"] = torch.exp(d) - d - 1  # k3 estimator of KL(pi_theta || pi_ref), >= 0
    v, _ = pad_right(response_values(critic, seqs, starts))
    out["vf"], out["vf_clipped"] = value_clip_loss(v, b["values"][micro, :L], b["returns"][micro, :L], args.value_clip)
    return out


def ppo_update(args, step, env, actor, critic, opt_a, opt_c, b):
    """Step 7 of SPEC 1.2: PPO epochs over shuffled minibatches, one optimizer step each for actor and
    critic; losses are token-means over the whole minibatch (all micro-batches, all ranks). A minibatch
    is minibatch_size x samples sequences over all ranks (edits included), as the release counts."""
    N, W = len(b["seqs"]), env.world_size
    # ranks may hold different numbers of samples (failed groups, edits): they agree on the number of
    # minibatches and of micro passes, and a rank without a real one runs a pass at weight zero
    n_mb = all_max(math.ceil(N / max(1, args.minibatch_size * args.samples // W)))
    g = torch.Generator().manual_seed(args.seed * 7919 + step)
    keys = ["pg_loss", "vf_loss", "kl", "approx_kl", "clipfrac", "ratio", "edit_ratio", "edit_clip_bound",
            "vf_clipfrac", "entropy", "tokens", "orig_tokens", "edit_tokens"]
    acc, grad_norms = dict.fromkeys(keys, 0.0), []
    for _ in range(args.ppo_epochs):
        order = torch.randperm(N, generator=g).tolist()
        for k in range(n_mb):
            idx = by_prompt(order[k * N // n_mb:(k + 1) * N // n_mb], b["seqs"], b["starts"])
            micros = [[idx[j] for j in mb] for mb in
                      micro_batches([b["seqs"][i] for i in idx], args.micro_token_budget, share_prefix=True)]
            n_passes = all_max(len(micros))
            scale = W / max(float(all_reduce_sum(b["mask"][idx].sum().clone())), 1.0)  # a global token mean
            for j in range(n_passes):
                real = j < len(micros)
                micro = micros[j] if real else [0]
                with autocast(env.device, args.precision):
                    o = microbatch_losses(args, actor, critic, b, micro)
                m = o["mask"] * (1.0 if real else 0.0)
                actor_loss = (o["pg"] * m).sum() * scale
                if args.entropy_coef:
                    actor_loss = actor_loss - args.entropy_coef * (o["entropy"] * m).sum() * scale
                if args.kl_coef and args.kl_in == "loss":
                    actor_loss = actor_loss + args.kl_coef * (o["kl"] * m).sum() * scale
                (actor_loss + (o["vf"] * m).sum() * scale).backward()
                with torch.no_grad():
                    mo, me = m * (~o["is_edit"]), m * o["is_edit"]
                    d = o["logp"] - b["old_logp"][micro, :m.shape[1]]
                    for key, x, w in (("pg_loss", o["pg"], m), ("vf_loss", o["vf"], m), ("kl", o["kl"], m),
                                      ("approx_kl", 0.5 * d ** 2, mo), ("clipfrac", o["clipped"].float(), mo),
                                      ("ratio", o["ratio"], mo), ("edit_ratio", o["edit_ratio"], me),
                                      ("edit_clip_bound", o["edit_bound"].float(), me),
                                      ("vf_clipfrac", o["vf_clipped"].float(), m), ("entropy", o["entropy"], m),
                                      ("tokens", 1.0, m), ("orig_tokens", 1.0, mo), ("edit_tokens", 1.0, me)):
                        acc[key] += float((x * w).sum())
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(actor.parameters(), args.grad_clip)))
            torch.nn.utils.clip_grad_norm_(critic.parameters(), args.grad_clip)
            opt_a.step(), opt_c.step()
            opt_a.zero_grad(set_to_none=True), opt_c.zero_grad(set_to_none=True)
    acc = dict(zip(keys, all_reduce_sum(torch.tensor([acc[k] for k in keys], dtype=torch.float64)).tolist()))
    per = lambda k, n: acc[k] / acc[n] if acc[n] else None  # noqa: E731
    return {"pg_loss": per("pg_loss", "tokens"), "vf_loss": per("vf_loss", "tokens"), "kl": per("kl", "tokens"),
            "approx_kl": per("approx_kl", "orig_tokens"), "clipfrac": per("clipfrac", "orig_tokens"),
            "ratio_mean": per("ratio", "orig_tokens"), "edit_ratio_mean": per("edit_ratio", "edit_tokens"),
            "edit_clip_bound_frac": per("edit_clip_bound", "edit_tokens"),
            "vf_clipfrac": per("vf_clipfrac", "tokens"), "entropy": per("entropy", "tokens"),
            "grad_norm": sum(grad_norms) / max(len(grad_norms), 1), "minibatches": n_mb * args.ppo_epochs}


def all_max(n):
    """The largest of an integer over ranks."""
    t = torch.tensor([float(n)])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def step_metrics(samples, b, edit_log, counts, env):
    """Per-step logs (SPEC 1.3 diagnostics), summed over ranks."""
    def group_sums(rows):
        dims = [[s["scores"][d] for s in rows if s["scores"] is not None] for d in GRM_DIMS]
        return [len(rows), sum(s["reward"] for s in rows), sum(len(s["response"]) for s in rows),
                sum(s["stopped"] for s in rows), len(dims[0])] + [sum(x) for x in dims]
    orig, edit = [s for s in samples if not s["is_edit"]], [s for s in samples if s["is_edit"]]
    count_keys = ["reward_calls", "reward_fail", "groups_dropped", "critique_fail"]
    vec = group_sums(orig) + group_sums(edit) + [edit_log.get("edit_candidates", 0),
                                                 edit_log.get("edit_improved_sum", 0.0),
                                                 edit_log.get("edit_scored", 0)] + [counts[k] for k in count_keys]
    vec = all_reduce_sum(torch.tensor(vec, dtype=torch.float64)).tolist()
    out = {}
    for name, v in (("orig", vec[:8]), ("edit", vec[8:16])):
        n, nd = max(v[0], 1), max(v[4], 1)
        out[f"{name}_count"] = int(v[0])
        out[f"{name}_reward"] = v[1] / n if v[0] else None
        out[f"{name}_len_mean"] = v[2] / n if v[0] else None
        out[f"{name}_eos_rate"] = v[3] / n if v[0] else None
        for d, x in zip(GRM_DIMS, v[5:8]):
            out[f"{name}_{d}"] = x / nd if v[4] else None
    out["edit_candidates"] = int(vec[16])
    out["edit_improved_frac"] = vec[17] / vec[18] if vec[18] else None
    out.update({k: int(x) for k, x in zip(count_keys, vec[19:])})
    out["explained_var"] = explained_variance(b["values"], b["returns"], b["mask"]) if b else None
    return out


# =============================================================================================
# Main: data, models, loop, save
# =============================================================================================

def save_checkpoint(args, step, plan, actor, critic, opt_a, opt_c, tok):
    """out/ckpt_<step>/{actor,critic} (sharded resume states) and out/actor/ (the policy, HF format)."""
    out = Path(args.out)
    save_training_state(out / f".ckpt_{step:06d}.tmp-parts" / "actor", actor, opt_a, step, {"plan": plan})
    save_training_state(out / f".ckpt_{step:06d}.tmp-parts" / "critic", critic, opt_c, step, {})
    save_model(actor, tok, out / "actor")
    if is_rank0():  # the pair becomes visible at once; only the newest is kept (each is large)
        shutil.rmtree(out / f"ckpt_{step:06d}", ignore_errors=True)
        (out / f".ckpt_{step:06d}.tmp-parts").rename(out / f"ckpt_{step:06d}")
        common.prune_checkpoints(out, 1)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def main(argv=None):
    args = get_args(argv)
    env = dist_init()
    args.precision = resolve_precision(args.precision, env.device)
    torch.manual_seed(args.seed + env.rank)
    random.seed(args.seed + env.rank)
    for flag, path, cmd in (("--sft", args.sft, "python sft.py"),
                            ("--grm", args.grm if args.reward == "grm" and not args.grm_url else None, "sft.py (README)"),
                            ("--bt", args.bt if args.reward == "bt" else None, "python train_grm.py --mode bt")):
        if path is not None and path != DEFAULT_MODEL and not Path(path).exists():
            raise DataError(f"{flag} {path} not found: make it first with `{cmd}` (or point {flag} elsewhere)")
    if args.prompts_per_step % env.world_size:
        raise DataError("--prompts-per-step must be a multiple of the number of ranks")
    prepare_out(args.out, args.resume, args.overwrite)

    # models: actor and critic from the SFT checkpoint (the critic is a value model: new zero head,
    # no output layer); the reward model and the optional reference are frozen, in the compute dtype
    actor, tok = load_trainable(args.sft, env, args.precision, checkpointing=args.checkpointing)
    critic, _ = load_trainable(args.sft, env, args.precision, value_head=True, checkpointing=args.checkpointing)
    items = load_prompts(args.prompts, tok, args.max_prompt_tokens, args.skip_bad)
    frozen_dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    ref = load_model(args.sft, env.device, frozen_dtype)[0].requires_grad_(False) if args.kl_coef > 0 else None
    rm = None
    if args.reward == "grm" and not args.grm_url:
        rm = load_model(args.grm, env.device, frozen_dtype)
    elif args.reward == "bt":
        rm = load_model(args.bt, env.device, frozen_dtype, value_head=True)
    opt_a = common.adamw(actor, args.actor_lr, args.weight_decay)
    opt_c = common.adamw(critic, args.critic_lr, args.weight_decay)
    total = math.ceil(args.epochs * len(items) / args.prompts_per_step)
    total = min(total, args.max_steps) if args.max_steps else total
    plan = {k: getattr(args, k) for k in ("sft", "prompts", "reward", "grm", "grm_url", "bt", "seed", "prompts_per_step",
                                          "samples", "max_new_tokens", "temperature", "top_p", "no_edit",
                                          "edit_strategy", "edit_ratio", "edit_clip", "minibatch_size", "ppo_epochs",
                                          "actor_lr", "critic_lr", "clip", "clip_higher", "value_clip", "kl_coef",
                                          "gamma", "lam", "precision")}
    plan.update(world_size=env.world_size, total_steps=total)

    start, ckpt = 0, latest_checkpoint(args.out) if args.resume else None
    if ckpt is not None:
        start, extra = load_training_state(ckpt / "actor", actor, opt_a)
        load_training_state(ckpt / "critic", critic, opt_c)
        check_resume(ckpt, extra.get("plan", {}), plan)
        print0(f"resumed from {ckpt} (step {start})")
    logger = MetricsLogger(Path(args.out) / "metrics.jsonl", keep_until_step=start if ckpt else None)
    samples_log = MetricsLogger(Path(args.out) / "samples.jsonl", keep_until_step=start if ckpt else None)
    print0(f"PPO{'' if args.no_edit else ' + Critique-Post-Edit'}: {len(items)} prompts, {total} steps of "
           f"{args.prompts_per_step} prompts x {args.samples} samples, reward {args.reward}, world {env.world_size}, "
           f"precision {args.precision}")

    bar = tqdm(range(start, total), initial=start, total=total, desc="ppo", disable=not is_rank0())
    for step in bar:
        t0, timer = time.time(), dict.fromkeys(["gen", "score", "edit", "train"], 0.0)
        counts = dict.fromkeys(["reward_calls", "reward_fail", "groups_dropped", "critique_fail"], 0)
        samples, edit_log = collect_batch(args, step, env, actor, tok, rm, items, counts, timer)
        calls, fails = all_reduce_sum(torch.tensor([counts["reward_calls"], counts["reward_fail"]],
                                                   dtype=torch.float64)).tolist()
        if fails > args.max_reward_fail * max(calls, 1):
            raise SystemExit(f"step {step + 1}: {int(fails)} of {int(calls)} reward calls failed or could not be "
                             f"parsed (more than --max-reward-fail {args.max_reward_fail}); see the messages above")
        t = time.time()
        has_samples = float(all_reduce_sum(torch.tensor([float(len(samples) == 0)]))) == 0  # every rank has some
        b = prepare_advantages(args, env, actor, critic, ref, samples) if has_samples else None
        upd = ppo_update(args, step, env, actor, critic, opt_a, opt_c, b) if has_samples else {"skipped_update": 1}
        timer["train"] = time.time() - t
        row = {"step": step + 1, **step_metrics(samples, b, edit_log, counts, env), **upd,
               **{f"time_{k}": round(v, 2) for k, v in timer.items()}, "time_step": round(time.time() - t0, 2)}
        logger.log(row)
        for s in [s for s in samples if not s["is_edit"]][:args.log_samples] + [s for s in samples if s["is_edit"]][:1]:
            samples_log.log({"step": step + 1, "edit": s["is_edit"], "reward": s["reward"], "text": s["text"]})
        bar.set_postfix(R=f"{row['orig_reward'] or 0:.2f}", Re=f"{row['edit_reward'] or 0:.2f}",
                        len=f"{row['orig_len_mean'] or 0:.0f}", kl=f"{row.get('approx_kl') or 0:.3f}")
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == total:
            save_checkpoint(args, step + 1, plan, actor, critic, opt_a, opt_c, tok)
        if step + 1 == args.stop_at_step < total:
            print0(f"stopped after step {step + 1} (--stop-at-step); continue with --resume")
            dist_cleanup()
            return
    if is_rank0():
        (Path(args.out) / "DONE").write_text("finished\n")
    print0(f"done: actor in {Path(args.out) / 'actor'}, metrics in {Path(args.out) / 'metrics.jsonl'}")
    dist_cleanup()


if __name__ == "__main__":
    main_guard(main)
