"""Critique-Post-Edit PPO (SPEC 1.2, 1.3): PPO with a generative reward model and policy edits.

Personalizes a chat model to explicit user personas with PPO, a generative reward model (GRM)
and policy-written edits of its own rollouts (arXiv 2510.18849).

One iteration, in the order this file runs it:
  1. rollouts: n samples per prompt from the actor (temperature 0.9, top-p 0.9), common.generate;
  2. scoring: the GRM judges each rollout greedily -> R_o (responses that never stop get the
     fixed EOS penalty instead, SPEC 1.3);
  3. critique: a separate sampled GRM call (temperature 0.9) per rollout, critique text kept;
  4. edit: the actor answers an edit prompt (original prompt + its response + the critique);
     log pi_e(y_e | edit prompt) is stored per token;
  5. the edit is scored by the GRM as an answer to the ORIGINAL prompt -> R_e;
  6. floor(edit_ratio x originals) edits are selected (random | reward_rank | conditional) and
     ADDED to the batch as (original prompt, y_e) samples;
  7. PPO update: clipped surrogate for originals, the off-policy term
     -A * pi_theta(y_e | x) / pi_e(y_e | x_edit) for edits, clipped value loss, GAE on the
     critic's values, whitened advantages, token-mean over each minibatch.
--no-edit gives plain PPO (steps 3-6 skipped). When a step makes one optimizer step (--ppo-epochs 1,
the batch in one minibatch), the update's own forwards also give pi_old and V_old (--fused-update).

Commands:
  python sft.py && python train_grm.py       # once: out/sft (policy) and out/grm (reward)
  python ppo_cpe.py                          # default: embedded SmolLM2-135M, persona world, CPU
  python ppo_cpe.py --no-edit                # plain PPO with the GRM
  python ppo_cpe.py --reward bt --bt out/bt --no-edit   # the reward-hacking baseline (SPEC 1.4)
  python ppo_cpe.py --reward rubric          # offline sanity check: the persona-world rubric
  python ppo_cpe.py --resume                 # continue from the latest out/ppo/ckpt_*
  # the paper's 7B run (SPEC 1.3): 8 GPUs for actor + critic (FSDP2), the 14B GRM served by vLLM
  #   vllm serve /ckpt/grm-14b --served-model-name grm --port 8000 --tensor-parallel-size 2
  torchrun --nproc_per_node 8 ppo_cpe.py --sft /ckpt/qwen2.5-7b-sft --prompts prompts.jsonl \\
      --grm-url http://grm-host:8000/v1 --grm-model grm --grm-max-new-tokens 1024 \\
      --prompts-per-step 128 --samples 4 --minibatch-size 64 --ppo-epochs 1 --epochs 2 \\
      --max-steps 0 --max-new-tokens 2048 --max-prompt-tokens 2048 --actor-lr 1e-6 \\
      --critic-lr 1e-5 --eos-penalty -5 --micro-batch-size 2 --dtype bfloat16 --save-every 20
"""
import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common
from common import (
    is_distributed,
    DEFAULT_MODEL, MetricsLogger, all_reduce_sum, chat_prompt_ids, conversation_ids_and_mask,
    dist_cleanup, dist_init, full_state_dict, generate, grm_messages, grm_reward, is_rank0,
    latest_checkpoint, load_model, load_training_state, pack_shared_prompts, parse_grm_critique,
    parse_grm_scores, persona_messages, print0, read_jsonl_checked, require_field, save_model,
    save_training_state, stop_token_ids, unsharded, unwrap, wrap_model,
)

GRM_DIMS = list(common.GRM_WEIGHTS)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data and models
    p.add_argument("--sft", default="out/sft", help="SFT checkpoint: initialises the actor, the critic "
                   "(plus a new zero-init value head) and the optional reference model")
    p.add_argument("--prompts", default="data/persona_world/prompts.jsonl",
                   help="RL prompts, JSONL with persona (dict or JSON string) and question")
    p.add_argument("--out", default="out/ppo", help="output folder: metrics.jsonl, samples.jsonl, ckpt_*/, "
                   "actor/ (the latest actor, HF format)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights of actor, critic, reference and local reward model")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the training forwards and "
                   "backwards (weights stay --dtype; the paper trains in bf16)")
    p.add_argument("--parallel", default="fsdp", choices=["none", "fsdp"],
                   help="under torchrun: FSDP2 for actor and critic (plain python: ignored)")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling, edit selection and minibatch order")
    # reward
    p.add_argument("--reward", default="grm", choices=["grm", "bt", "rubric"],
                   help="grm: generative reward model (local --grm or remote --grm-url); bt: Bradley-Terry "
                   "scalar RM (--bt, needs --no-edit: it writes no critique); rubric: the persona-world rubric")
    p.add_argument("--grm", default="out/grm", help="local GRM checkpoint (run in-process with common.generate)")
    p.add_argument("--grm-url", default=None, help="OpenAI-compatible endpoint serving the GRM (e.g. vLLM "
                   "at http://host:8000/v1); overrides --grm")
    p.add_argument("--grm-model", default="grm", help="model name to request from --grm-url")
    p.add_argument("--grm-max-new-tokens", type=int, default=192, help="token budget of one GRM reply")
    p.add_argument("--grm-score", default="expected", choices=["expected", "parsed"],
                   help="local GRM: reward from the probability-weighted scores at the score tokens the "
                        "GRM wrote (dense: a small GRM writes the same integers for most answers), or "
                        "from the integers parsed from its text (the paper's reward; always so for --grm-url)")
    p.add_argument("--grm-batch-size", type=int, default=16, help="local GRM: replies generated together")
    p.add_argument("--grm-workers", type=int, default=16, help="remote GRM: concurrent requests")
    p.add_argument("--critique-temperature", type=float, default=0.9, help="sampled critique call (SPEC 1.2)")
    p.add_argument("--bt", default="out/bt", help="Bradley-Terry reward model (train_grm.py --mode bt)")
    # rollouts
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompts per PPO step, all ranks (paper 128)")
    p.add_argument("--samples", type=int, default=2, help="rollouts per prompt (paper 4)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="response cap (paper 2048)")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts are dropped (paper 2048)")
    p.add_argument("--temperature", type=float, default=0.9, help="rollout and edit sampling temperature")
    p.add_argument("--top-p", type=float, default=0.9, help="rollout and edit nucleus sampling")
    p.add_argument("--eos-penalty", type=float, default=-5.0,
                   help="EOS trick: reward of a response that hits the cap without stopping")
    # Critique-Post-Edit
    p.add_argument("--no-edit", action="store_true", help="plain PPO: no critiques, no edits")
    p.add_argument("--edit-strategy", default="random", choices=["random", "reward_rank", "conditional"],
                   help="which edits join the batch (SPEC 1.2 step 6; random was best in the paper)")
    p.add_argument("--edit-ratio", type=float, default=0.5, help="edits added = floor(ratio x originals)")
    p.add_argument("--edit-clip", action="store_true", help="clip the edit ratio to [1-clip, 1+clip_high] "
                   "(the paper's text; the release and default run unclipped)")
    # PPO (SPEC 1.3 values of the 7B release in brackets where they differ)
    p.add_argument("--epochs", type=float, default=2, help="passes over the prompts (paper 2)")
    p.add_argument("--max-steps", type=int, default=4, help="stop after this many PPO steps (0: --epochs "
                   "decides); 4 keep the default run under 15 minutes on 2 CPU cores")
    p.add_argument("--minibatch-size", type=int, default=6,
                   help="sequences (originals + edits, all ranks) per optimizer step (paper 64)")
    p.add_argument("--micro-batch-size", type=int, default=2, help="sequences per forward/backward (memory: ~1 GB "
                   "of activations per 600-token sequence for the 135M default in fp32)")
    p.add_argument("--ppo-epochs", type=int, default=1, help="passes over each step's batch (paper 1)")
    p.add_argument("--fused-update", action=argparse.BooleanOptionalAction, default=True,
                   help="when a PPO step makes a single optimizer step (--ppo-epochs 1 and the whole batch in "
                   "one minibatch), the update's own forward passes give the old log-probs and values (the "
                   "weights have not moved since the rollouts): one actor and one critic forward fewer per "
                   "step, at the cost of holding the whole batch's activations until the backward")
    p.add_argument("--actor-lr", type=float, default=5e-5,
                   help="constant actor lr (paper 1e-6 for 7B; 5e-5 lets the 4-step CPU default learn, README)")
    p.add_argument("--critic-lr", type=float, default=5e-5, help="constant critic lr (paper 1e-5)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (paper 0.01)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm, actor and critic (paper 1.0)")
    p.add_argument("--clip", type=float, default=0.2, help="policy ratio clip eps (lower side; paper 0.2)")
    p.add_argument("--clip-higher", type=float, default=None, help="upper clip eps for originals and the "
                   "clipped edit term (\"clip-higher\"; default = --clip)")
    p.add_argument("--value-clip", type=float, default=0.5, help="value clip around the old values (paper 0.5)")
    p.add_argument("--entropy-coef", type=float, default=0.0, help="entropy bonus (paper 0)")
    p.add_argument("--kl-coef", type=float, default=0.0, help="reference-model KL (paper 0: no KL, no reference)")
    p.add_argument("--kl-in", default="reward", choices=["reward", "loss"],
                   help="KL as per-token reward penalty (k1) or as a loss term (k3)")
    p.add_argument("--gamma", type=float, default=1.0, help="GAE discount (paper 1.0)")
    p.add_argument("--lam", type=float, default=1.0, help="GAE lambda (paper 1.0)")
    # bookkeeping
    p.add_argument("--save-every", type=int, default=5, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest ckpt_* in --out")
    p.add_argument("--log-samples", type=int, default=2, help="rollouts per step written to samples.jsonl")
    args = p.parse_args(argv)
    if args.clip_higher is None:
        args.clip_higher = args.clip
    if args.reward == "bt" and not args.no_edit:
        p.error("--reward bt writes no critique: add --no-edit (the BT-RM baseline is plain PPO)")
    return args


# =============================================================================================
# PPO math (pure: tensors in, tensors out). Per-sequence tensors are right-padded to [N, L] for
# the math only; masks always come from lengths, never from "token == pad" (SmolLM2's pad is
# its EOS, which also appears inside prompts).
# =============================================================================================

def pad_right(rows, value=0.0):
    """Ragged 1-D tensors -> ([N, L] right-padded, [N, L] float mask from their lengths)."""
    padded = torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True, padding_value=value)
    lengths = torch.tensor([len(r) for r in rows], device=padded.device)
    mask = (torch.arange(padded.shape[1], device=padded.device)[None] < lengths[:, None]).float()
    return padded, mask


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask, shift_mean=True, reduce=None):
    """(x - mean) / std over the masked entries (unbiased variance); 0 outside the mask.
    `reduce` sums a tensor over ranks (common.all_reduce_sum) so statistics are global."""
    reduce = reduce or (lambda t: t)
    sums = reduce(torch.stack([(x * mask).sum(), mask.sum()]).double())
    mean = sums[0] / sums[1]
    sq = reduce(((x.double() - mean) ** 2 * mask).sum())
    var = sq / (sums[1] - 1).clamp(min=1)
    out = (x.double() - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return (out * mask).to(x.dtype)


def apply_eos_penalty(scores, stopped, penalty):
    """EOS trick (SPEC 1.3): a response that never emitted a stop token gets a fixed reward."""
    return torch.where(stopped, scores, torch.full_like(scores, penalty))


def token_rewards(scores, mask):
    """Sequence scores [N] -> per-token rewards [N, L], the score on the last real token only."""
    rewards = torch.zeros_like(mask)
    last = mask.sum(1).long() - 1
    rewards[torch.arange(len(scores)), last] = scores.to(rewards.dtype)
    return rewards


def gae_advantages(values, rewards, mask, gamma=1.0, lam=1.0):
    """Generalized advantage estimation over response tokens; values[:, t] is V(state before token t).
    Returns (advantages, returns = advantages + values), both 0 outside the mask."""
    N, L = values.shape
    values, rewards = values * mask, rewards * mask
    adv = torch.zeros_like(values)
    last = torch.zeros(N, dtype=values.dtype, device=values.device)
    for t in reversed(range(L)):
        next_v = values[:, t + 1] if t + 1 < L else torch.zeros_like(last)  # 0 past each end (masked)
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
    `logp` must be computed under the ORIGINAL prompt x, `edit_logp` is stored from the edit prompt.
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
    """Per-token clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2).
    Returns (loss [N, L], clipped)."""
    clipped_v = old_values + torch.clamp(values - old_values, -clip, clip)
    l1, l2 = (values - returns) ** 2, (clipped_v - returns) ** 2
    return 0.5 * torch.maximum(l1, l2), (l2 > l1)


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over the masked tokens: how much of the returns the critic explains."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1 - var_d / var_r) if var_r > 0 else None  # None: constant returns, nothing to explain


def select_edits(strategy, ratio, groups, rewards_orig=None, rewards_edit=None, generator=None):
    """Indices (into the originals) of the edits that join the batch (SPEC 1.2 step 6).
    Their number is floor(ratio x originals). random: uniform without replacement; reward_rank:
    per question (group) the edits with the highest R_e; conditional: per question the highest
    R_e - R_o. The per-question picks are balanced: every question's best edit comes before any
    question's second best; within one rank level the larger key wins."""
    n = len(groups)
    k = min(n, int(math.floor(ratio * n + 1e-9)))
    if k == 0:
        return []
    if strategy == "random":
        return sorted(torch.randperm(n, generator=generator)[:k].tolist())
    if strategy == "reward_rank":
        key = [float(r) for r in rewards_edit]
    elif strategy == "conditional":
        key = [float(e) - float(o) for e, o in zip(rewards_edit, rewards_orig)]
    else:
        raise ValueError(f"unknown edit strategy {strategy!r}")
    rank_in_group = {}
    for g in set(groups):
        members = sorted((i for i in range(n) if groups[i] == g), key=lambda i: (-key[i], i))
        rank_in_group.update({i: r for r, i in enumerate(members)})
    order = sorted(range(n), key=lambda i: (rank_in_group[i], -key[i], i))
    return sorted(order[:k])


# =============================================================================================
# Data, prompts and rewards
# =============================================================================================

def load_prompts(path, tokenizer, max_prompt_tokens):
    rows, _ = read_jsonl_checked(path)
    items = []
    for lineno, row in rows:
        persona = row.get("persona")
        if not isinstance(persona, (dict, str)) or not persona:
            raise common.DataError(f"{path}:{lineno}: field 'persona' must be a JSON object or string")
        question = require_field(row, "question", path, lineno)
        ids = chat_prompt_ids(tokenizer, persona_messages(persona, question))
        if len(ids) <= max_prompt_tokens:
            items.append({"persona": persona, "question": question, "prompt_ids": ids})
    if not items:
        raise common.DataError(f"{path}: no prompt fits --max-prompt-tokens")
    return items


def prompts_for_step(items, step, per_step, seed, env):
    """This rank's prompts for a (0-based) step: a fresh seeded shuffle per pass over the data, so
    a resumed run sees exactly what an uninterrupted run would."""
    per_epoch = max(1, len(items) // per_step)
    epoch, offset = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(items), generator=g).tolist()
    chosen = [items[i] for i in order[offset * per_step:(offset + 1) * per_step]]
    return chosen[env.rank::env.world_size]


EDIT_INSTRUCTION = """A user sent the request below. A first answer was drafted, and a reviewer wrote a critique of it.

=== Request ===
{request}

=== First answer ===
{response}

=== Critique ===
{critique}

Write one improved final answer to the request that applies the critique's suggestions. Give only the \
answer itself, addressed to the user: no preamble, no remarks about the draft or the critique, and do \
not repeat the first answer."""


def edit_prompt_ids(tokenizer, persona, question, response, critique):
    """The edit prompt x_edit of SPEC 1.2 step 4: one user turn with the original prompt, the
    original response and the critique."""
    request = persona_messages(persona, question)[0]["content"]
    text = EDIT_INSTRUCTION.format(request=request, response=response.strip(), critique=critique.strip())
    return chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])


def bt_ids(tokenizer, persona, question, response):
    """(persona prompt, response) up to the response's end-of-turn token, as train_grm.py --mode bt."""
    ids, mask = conversation_ids_and_mask(
        tokenizer, persona_messages(persona, question) + [{"role": "assistant", "content": response}])
    return ids[:max(i for i, m in enumerate(mask) if m) + 1]


def judge(args, rm, cases, sampled, seed, counts):
    """Reward-model calls for cases [(persona, question, response)]. sampled=False: the greedy
    scoring call; sampled=True: the critique call (temperature --critique-temperature).
    Returns a list of (reward, scores dict | None, critique text). Failures give reward 0 and are
    counted in counts["parse_fail"] / counts["endpoint_fail"] (SPEC 1.1)."""
    if not cases:
        return []
    if args.reward == "rubric":
        from data.persona_world.rubric import rubric_judge
        out = []
        for persona, question, response in cases:
            critique, scores = rubric_judge(persona, question, response)
            out.append((grm_reward(scores), scores, critique))
        return out
    if args.reward == "bt":
        model, tok = rm
        seqs = [bt_ids(tok, *c) for c in cases]
        rewards = []
        with torch.no_grad():
            for i in range(0, len(seqs), args.grm_batch_size):  # a prompt's samples share it (exact)
                ids, cu, parents, _, last = common.pack_shared_prefixes(seqs[i:i + args.grm_batch_size])
                dev = model.output_weight().device
                rewards += model.values(torch.tensor([ids], device=dev), torch.tensor(cu, device=dev,
                                        dtype=torch.int32), parents=parents)[0, last].tolist()
        return [(r, None, "") for r in rewards]
    temperature = args.critique_temperature if sampled else 0.0
    if args.grm_url:  # remote GRM (vLLM or any OpenAI-compatible server)
        def call(case):
            try:
                reply = common.chat_completion(args.grm_url, args.grm_model, grm_messages(*case),
                                               temperature=temperature, max_tokens=args.grm_max_new_tokens)
                return reply["choices"][0]["message"]["content"] or ""
            except common.EndpointError as e:
                print0(f"GRM endpoint failure: {e}")
                return None
        texts = common.map_concurrent(call, cases, max_workers=args.grm_workers)
    else:  # local GRM checkpoint through our engine
        model, tok = rm
        texts, replies = [], []
        # the scoring call records the score digits' probabilities as it writes them (expected scores)
        watch = common.grm_watch_ids(tok) if not sampled and args.grm_score == "expected" else None
        for i in range(0, len(cases), args.grm_batch_size):
            prompts = [chat_prompt_ids(tok, grm_messages(*c)) for c in cases[i:i + args.grm_batch_size]]
            gen = generate(model, prompts, args.grm_max_new_tokens, temperature=temperature,
                           stop_ids=stop_token_ids(tok), seed=seed + i, watch_ids=watch)
            texts += [tok.decode(t, skip_special_tokens=True) for t in gen.tokens]
            replies += list(zip(prompts, gen.tokens, gen.watched or [None] * len(prompts)))
    out = []
    for k, text in enumerate(texts):
        if text is None:
            counts["endpoint_fail"] += 1
            out.append((0.0, None, ""))
            continue
        scores = parse_grm_scores(text) if not sampled else None
        if not sampled and scores is None:
            counts["parse_fail"] += 1
        elif not sampled and args.grm_score == "expected" and not args.grm_url:
            # probability-weighted scores at the written score tokens (common.grm_expected_scores)
            prompt, reply, watched = replies[k]
            scores = common.grm_expected_scores(model, tok, prompt, reply, watched=watched)
        out.append((grm_reward(scores), scores, parse_grm_critique(text)))
    return out


def score_responses(args, rm, cases, stopped, seed, counts):
    """Scoring call for the responses that stopped; the EOS trick for the rest (not sent to the GRM)."""
    idx = [i for i, s in enumerate(stopped) if s]
    judged = judge(args, rm, [cases[i] for i in idx], False, seed, counts)
    rewards = torch.full((len(cases),), float(args.eos_penalty))
    scores = [None] * len(cases)
    for i, (r, s, _) in zip(idx, judged):
        rewards[i], scores[i] = r, s
    return apply_eos_penalty(rewards, torch.tensor(stopped, dtype=torch.bool), args.eos_penalty), scores


# =============================================================================================
# Log-probs and values of packed sequences
# =============================================================================================

def response_logprobs(model, seqs, starts, temperature, with_entropy=False, entropy_grad=False):
    """Per-sequence log-probs of seqs[i][starts[i]:] (logits / sampling temperature, SPEC 1.3) and,
    optionally, the entropy of each of those next-token distributions. One packed forward; only the
    positions that predict response tokens go through the output layer (prompts are most of the
    tokens, and the output layer is the widest matrix of a small model), always in fp32.
    Equal to common.sequence_logprobs (tested)."""
    device = unwrap(model).output_weight().device
    # samples of the same prompt share one copy of it (common.pack_shared_prompts, exact)
    ids, cu, parents, pos, targets, sizes = pack_shared_prompts(seqs, starts, device)
    h = model.hidden_states(ids, cu, parents=parents)[0, pos]  # FSDP2: a registered forward method (main)
    with torch.autocast(device.type, enabled=False):
        logits = unwrap(model).lm_head_logits(h.to(unwrap(model).output_weight().dtype)).float()
    logp_all = torch.log_softmax(logits / temperature, -1)
    logp = logp_all.gather(-1, targets[:, None])[:, 0]
    if not with_entropy:
        return list(logp.split(sizes)), None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return list(logp.split(sizes)), list(entropy.split(sizes))


def autocast(args, device):
    """--bf16: bfloat16 autocast for the training-side forwards (old log-probs, pi_e, values and the
    update all use it, so ratios compare like with like); the output layer stays fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)


def response_values(critic, seqs, starts):
    """Critic value V(s_t) at each position that predicts a response token (the state before it)."""
    device = unwrap(critic).output_weight().device
    ids, cu, parents, pos, _, sizes = pack_shared_prompts(seqs, starts, device)
    return list(critic.values(ids, cu, parents=parents)[0, pos].split(sizes))


def sample_sequences(samples):
    """(prompt + response token lists, prompt lengths) of the batch's samples."""
    return [s["prompt_ids"] + s["response"] for s in samples], [len(s["prompt_ids"]) for s in samples]


def by_prompt(indices, seqs, starts):
    """The indices ordered so that a prompt's samples (and its edits) sit together: micro-batches
    cut from this order store each prompt once (common.pack_shared_prompts; the same math)."""
    return sorted(indices, key=lambda i: seqs[i][:starts[i]])


def chunked(seq, size):
    return [seq[i:i + size] for i in range(0, len(seq), size)]


# =============================================================================================
# One PPO iteration: rollouts, Critique-Post-Edit, update
# =============================================================================================

def collect_batch(args, step, env, actor, tok, rm, items, counts, timer):
    """Steps 1-6 of SPEC 1.2 for this rank's prompts. Returns the training samples and logs."""
    seed = args.seed * 1_000_003 + step * 1009 + env.rank * 17
    stops = stop_token_ids(tok)
    prompts = prompts_for_step(items, step, args.prompts_per_step, args.seed, env)
    rollouts = [(p, g) for g, p in enumerate(prompts) for _ in range(args.samples)]
    groups = [g for _, g in rollouts]

    # 1. rollouts (temperature 0.9, top-p 0.9); FSDP2 parameters are gathered once for the whole call
    t = time.time()
    with unsharded(actor), torch.no_grad():
        gen = generate(unwrap(actor), [p["prompt_ids"] for p, _ in rollouts], args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, stop_ids=stops, seed=seed)
    texts = [tok.decode(t_, skip_special_tokens=True) for t_ in gen.tokens]
    cases = [(p["persona"], p["question"], y) for (p, _), y in zip(rollouts, texts)]
    timer["gen"] += time.time() - t

    # 2. score the originals greedily -> R_o (EOS trick for those that never stopped)
    t = time.time()
    r_orig, s_orig = score_responses(args, rm, cases, gen.stopped, seed + 1, counts)
    timer["score"] += time.time() - t

    samples = [dict(prompt_ids=p["prompt_ids"], response=gen.tokens[i], stopped=gen.stopped[i],
                    reward=float(r_orig[i]), scores=s_orig[i], is_edit=False, edit_logp=None, text=texts[i])
               for i, (p, _) in enumerate(rollouts)]
    edit_log = {"edit_candidates": 0}
    if args.no_edit:
        return samples, edit_log

    t = time.time()
    g = torch.Generator().manual_seed(seed + 2)
    # With random selection the choice does not depend on the edits, so only the chosen rollouts
    # are critiqued, edited and scored: the same training batch for a fraction of the GRM calls.
    if args.edit_strategy == "random":
        candidates = select_edits("random", args.edit_ratio, groups, generator=g)
    else:
        candidates = list(range(len(rollouts)))
    # 3. a separate, sampled critique call per candidate rollout
    crit = judge(args, rm, [cases[i] for i in candidates], True, seed + 3, counts)
    # 4. the policy edits its own response given the critique; store log pi_e(y_e | x_edit)
    edit_prompts = [edit_prompt_ids(tok, *cases[i], c[2]) for i, c in zip(candidates, crit)]
    with unsharded(actor), torch.no_grad():
        egen = generate(unwrap(actor), edit_prompts, args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, stop_ids=stops, seed=seed + 4)
        # The engine's log-probs belong to the top-p-truncated distribution; the loss needs the full
        # temperature-scaled one, so pi_e is recomputed with a packed forward under the edit prompt.
        edit_logp = []
        for chunk in chunked(list(range(len(candidates))), args.micro_batch_size * 2):
            with autocast(args, env.device):
                edit_logp += response_logprobs(unwrap(actor), [edit_prompts[j] + egen.tokens[j] for j in chunk],
                                               [len(edit_prompts[j]) for j in chunk], args.temperature)[0]
    etexts = [tok.decode(t_, skip_special_tokens=True) for t_ in egen.tokens]
    # 5. score each edit as an answer to the ORIGINAL prompt -> R_e
    ecases = [(cases[i][0], cases[i][1], y) for i, y in zip(candidates, etexts)]
    r_edit, s_edit = score_responses(args, rm, ecases, egen.stopped, seed + 5, counts)
    # 6. select which edits join the batch
    if args.edit_strategy == "random":
        chosen = list(range(len(candidates)))
    else:
        chosen = select_edits(args.edit_strategy, args.edit_ratio, groups, r_orig.tolist(), r_edit.tolist())
    for j in chosen:
        i = candidates[j]
        samples.append(dict(prompt_ids=rollouts[i][0]["prompt_ids"], response=egen.tokens[j],
                            stopped=egen.stopped[j], reward=float(r_edit[j]), scores=s_edit[j], is_edit=True,
                            edit_logp=edit_logp[j].float().cpu(), text=etexts[j], original=i,
                            critique=crit[j][2]))
    timer["edit"] += time.time() - t
    improved = [float(r_edit[j] > r_orig[candidates[j]]) for j in range(len(candidates))]
    edit_log = {"edit_candidates": len(candidates), "edit_improved_sum": sum(improved)}
    return samples, edit_log


def prepare_advantages(args, env, actor, critic, ref, samples, fused=None):
    """Old log-probs, values, rewards, GAE and whitened advantages for the whole batch (padded).
    fused: fused_forwards' outputs, which hold the old log-probs and values already."""
    seqs, starts = sample_sequences(samples)
    old, vals, refs = [None] * len(seqs), [None] * len(seqs), [None] * len(seqs)
    for micro, lps, _, vs in fused or []:
        for i, lp, v in zip(micro, lps, vs):
            old[i], vals[i] = lp.detach(), v.detach()
    with torch.no_grad(), autocast(args, env.device):
        for chunk in chunked(by_prompt(range(len(seqs)), seqs, starts), args.micro_batch_size * 2):
            cs, cst = [seqs[i] for i in chunk], [starts[i] for i in chunk]
            if fused is None:
                # log pi_old under the ORIGINAL prompt for every sample (edits included: KL, diagnostics)
                for i, lp in zip(chunk, response_logprobs(actor, cs, cst, args.temperature)[0]):
                    old[i] = lp
                for i, v in zip(chunk, response_values(critic, cs, cst)):
                    vals[i] = v
            if ref is not None:
                for i, lp in zip(chunk, response_logprobs(ref, cs, cst, args.temperature)[0]):
                    refs[i] = lp
    old_logp, mask = pad_right([x.float().cpu() for x in old])
    values, _ = pad_right([x.float().cpu() for x in vals])
    ref_logp = pad_right([x.float().cpu() for x in refs])[0] if ref is not None else None
    # edits carry log pi_e(y_e | x_edit); originals never use this slot
    edit_logp, _ = pad_right([s["edit_logp"] if s["is_edit"] else o for s, o in zip(samples, old_logp)])
    scores = torch.tensor([s["reward"] for s in samples])
    rewards = token_rewards(scores, mask)  # reward only on the last real token (SPEC 1.3)
    if ref is not None and args.kl_in == "reward":
        rewards = rewards - args.kl_coef * (old_logp - ref_logp) * mask
    advantages, returns = gae_advantages(values, rewards, mask, args.gamma, args.lam)
    advantages = masked_whiten(advantages, mask, reduce=all_reduce_sum if env.world_size > 1 else None)
    batch = dict(mask=mask, old_logp=old_logp, values=values, returns=returns, advantages=advantages,
                 edit_logp=edit_logp, ref_logp=ref_logp, is_edit=torch.tensor([s["is_edit"] for s in samples]))
    device = unwrap(actor).output_weight().device  # the losses are computed there
    batch = {k: (v.to(device) if v is not None else None) for k, v in batch.items()}
    return dict(batch, seqs=seqs, starts=starts)


def micro_forward(args, actor, critic, seqs, starts):
    """The update's forward passes of one micro-batch: actor log-probs and entropies, critic values."""
    lp, ent = response_logprobs(actor, seqs, starts, args.temperature, with_entropy=True,
                                entropy_grad=args.entropy_coef > 0)
    return lp, ent, (response_values(critic, seqs, starts) if critic is not None else None)


def fused_forwards(args, env, actor, critic, samples):
    """--fused-update: when this PPO step makes exactly one optimizer step, run the update's forward
    passes (with gradients) of every micro-batch now, before the advantages. Actor and critic have
    not moved since the rollouts, so the detached outputs are pi_old and V_old (the ratio is exactly
    1 at the step, as PPO's first minibatch has it up to rounding): prepare_advantages and
    ppo_update take them instead of a second forward (GRPO implementations do the same with one
    iteration per batch). Returns [(micro, log-probs, entropies, values)], or None where the step
    makes several optimizer steps."""
    if not args.fused_update or args.ppo_epochs != 1:
        return None
    mb = max(1, args.minibatch_size // env.world_size)
    # FSDP2 frees the gathered weights after each forward and cannot run the backward of an
    # earlier forward after a later one: there, only a batch that fits one micro-batch per rank
    limit = min(mb, args.micro_batch_size) if common.is_fsdp(actor) else mb
    if float(all_reduce_sum(torch.tensor([float(len(samples) > limit)]))) > 0:  # too big on any rank
        return None
    seqs, starts = sample_sequences(samples)
    out = []
    with autocast(args, env.device):
        for micro in chunked(by_prompt(range(len(seqs)), seqs, starts), args.micro_batch_size):
            out.append((micro, *micro_forward(args, actor, critic, [seqs[i] for i in micro],
                                              [starts[i] for i in micro])))
    return out


def microbatch_losses(args, actor, critic, b, micro, forward=None):
    """Per-token losses of one micro-batch (rows `micro` of the padded batch b), SPEC 1.2 step 7.
    Every row is scored under its ORIGINAL prompt: originals get the PPO clipped surrogate against
    pi_old, edits the off-policy term against the stored pi_e(y_e | x_edit). `forward`: this
    micro-batch's micro_forward outputs when fused_forwards already ran them."""
    seqs, starts = [b["seqs"][i] for i in micro], [b["starts"][i] for i in micro]
    lp, ent, vals = forward if forward is not None else micro_forward(args, actor, critic, seqs, starts)
    logp, _ = pad_right(lp)
    L = logp.shape[1]
    m, adv = b["mask"][micro, :L], b["advantages"][micro, :L]
    is_edit = b["is_edit"][micro][:, None]
    pg_o, ratio, clipped = ppo_clip_loss(logp, b["old_logp"][micro, :L], adv, args.clip, args.clip_higher)
    clip_range = (args.clip, args.clip_higher) if args.edit_clip else None
    pg_e, eratio, ebound = edit_offpolicy_loss(logp, b["edit_logp"][micro, :L], adv, clip_range)
    out = dict(mask=m, is_edit=is_edit, logp=logp, pg=torch.where(is_edit, pg_e, pg_o),
               ratio=ratio, clipped=clipped, edit_ratio=eratio, edit_bound=ebound, entropy=pad_right(ent)[0],
               kl=torch.zeros_like(logp))
    if b["ref_logp"] is not None and args.kl_in == "loss":
        d = b["ref_logp"][micro, :L] - logp
        out["kl"] = torch.exp(d) - d - 1  # k3 estimator of KL(pi_theta || pi_ref), >= 0
    if critic is not None:
        v, _ = pad_right(vals)
        out["vf"], out["vf_clipped"] = value_clip_loss(v, b["values"][micro, :L], b["returns"][micro, :L],
                                                       args.value_clip)
    return out


def ppo_update(args, step, env, actor, critic, opt_a, opt_c, b, fused=None):
    """Step 7 of SPEC 1.2: PPO epochs over shuffled minibatches, one optimizer step each for actor
    and critic; losses are token-means over the whole minibatch (all micro-batches, all ranks).
    fused: fused_forwards' outputs (one minibatch), used instead of running the forwards again."""
    N = len(b["seqs"])
    mb = max(1, args.minibatch_size // env.world_size)
    g = torch.Generator().manual_seed(args.seed * 7919 + step)
    keys = ["pg_loss", "vf_loss", "kl", "approx_kl", "clipfrac", "ratio", "edit_ratio", "edit_clip_bound",
            "vf_clipfrac", "entropy", "tokens", "orig_tokens", "edit_tokens"]
    acc = dict.fromkeys(keys, 0.0)
    grad_norms = []
    for _ in range(args.ppo_epochs):
        order = torch.randperm(N, generator=g).tolist()
        for mstart in range(0, N, mb):
            idx = order[mstart:mstart + mb]
            n_tok = float(all_reduce_sum(b["mask"][idx].sum().clone()))
            scale = env.world_size / n_tok  # FSDP averages gradients over ranks: this makes a global token-mean
            opt_a.zero_grad(set_to_none=True)
            opt_c.zero_grad(set_to_none=True)
            micros = (chunked(by_prompt(idx, b["seqs"], b["starts"]), args.micro_batch_size) if fused is None
                      else [f[0] for f in fused])
            for j, micro in enumerate(micros):
                with autocast(args, env.device):
                    o = microbatch_losses(args, actor, critic, b, micro, None if fused is None else fused[j][1:])
                m = o["mask"]
                actor_loss = (o["pg"] * m).sum() * scale
                if args.entropy_coef:
                    actor_loss = actor_loss - args.entropy_coef * (o["entropy"] * m).sum() * scale
                if args.kl_coef and args.kl_in == "loss":
                    actor_loss = actor_loss + args.kl_coef * (o["kl"] * m).sum() * scale
                actor_loss.backward()
                ((o["vf"] * m).sum() * scale).backward()
                with torch.no_grad():
                    mo, me = m * (~o["is_edit"]), m * o["is_edit"]
                    d = o["logp"] - b["old_logp"][micro, :m.shape[1]]
                    for k, x, w in (("pg_loss", o["pg"], m), ("vf_loss", o["vf"], m), ("kl", o["kl"], m),
                                    ("approx_kl", 0.5 * d ** 2, mo), ("clipfrac", o["clipped"].float(), mo),
                                    ("ratio", o["ratio"], mo), ("edit_ratio", o["edit_ratio"], me),
                                    ("edit_clip_bound", o["edit_bound"].float(), me),
                                    ("vf_clipfrac", o["vf_clipped"].float(), m), ("entropy", o["entropy"], m),
                                    ("tokens", 1.0, m), ("orig_tokens", 1.0, mo), ("edit_tokens", 1.0, me)):
                        acc[k] += float((x * w).sum())
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(actor.parameters(), args.grad_clip)))
            torch.nn.utils.clip_grad_norm_(critic.parameters(), args.grad_clip)
            opt_a.step()
            opt_c.step()
    acc = dict(zip(keys, all_reduce_sum(torch.tensor([acc[k] for k in keys], dtype=torch.float64)).tolist()))
    per = lambda k, n: acc[k] / acc[n] if acc[n] else None  # noqa: E731
    return {"pg_loss": per("pg_loss", "tokens"), "vf_loss": per("vf_loss", "tokens"), "kl": per("kl", "tokens"),
            "approx_kl": per("approx_kl", "orig_tokens"), "clipfrac": per("clipfrac", "orig_tokens"),
            "ratio_mean": per("ratio", "orig_tokens"), "edit_ratio_mean": per("edit_ratio", "edit_tokens"),
            "edit_clip_bound_frac": per("edit_clip_bound", "edit_tokens"),
            "vf_clipfrac": per("vf_clipfrac", "tokens"), "entropy": per("entropy", "tokens"),
            "grad_norm": sum(grad_norms) / max(len(grad_norms), 1)}


def step_metrics(samples, b, edit_log, counts, env):
    """Per-step logs (SPEC 1.3 diagnostics), summed over ranks."""
    def group_sums(rows):
        dims = [[s["scores"][d] for s in rows if s["scores"] is not None] for d in GRM_DIMS]
        lens = [len(s["response"]) for s in rows]
        return [len(rows), sum(s["reward"] for s in rows), sum(lens), sum(s["stopped"] for s in rows),
                len(dims[0])] + [sum(x) for x in dims]
    orig = [s for s in samples if not s["is_edit"]]
    edit = [s for s in samples if s["is_edit"]]
    vec = group_sums(orig) + group_sums(edit) + [edit_log.get("edit_candidates", 0),
                                                 edit_log.get("edit_improved_sum", 0.0),
                                                 counts["parse_fail"], counts["endpoint_fail"]]
    vec = all_reduce_sum(torch.tensor(vec, dtype=torch.float64)).tolist()
    max_len = torch.tensor([max(len(s["response"]) for s in orig)], dtype=torch.float64)
    if env.world_size > 1:
        torch.distributed.all_reduce(max_len, op=torch.distributed.ReduceOp.MAX)
    out = {}
    for name, v in (("orig", vec[:8]), ("edit", vec[8:16])):
        n, nd = max(v[0], 1), max(v[4], 1)
        out[f"{name}_count"] = int(v[0])
        out[f"{name}_reward"] = v[1] / n if v[0] else None
        out[f"{name}_len_mean"] = v[2] / n if v[0] else None
        out[f"{name}_eos_rate"] = v[3] / n if v[0] else None
        for d, x in zip(GRM_DIMS, v[5:8]):
            out[f"{name}_{d}"] = x / nd if v[4] else None
    out["orig_len_max"] = int(max_len.item())
    out["edit_improved_frac"] = vec[17] / vec[16] if vec[16] else None
    out["parse_fail"], out["endpoint_fail"] = int(vec[18]), int(vec[19])
    out["explained_var"] = explained_variance(b["values"], b["returns"], b["mask"])
    return out


# =============================================================================================
# Checkpoints
# =============================================================================================

def save_checkpoint(args, step, actor, critic, opt_a, opt_c, tok):
    """out/ckpt_<step>/ (actor and critic training states, atomic as a whole) and out/actor/ (HF)."""
    out = Path(args.out)
    tmp = out / f".ckpt_tmp_{step:06d}"
    save_training_state(str(tmp / "actor"), actor, opt_a, step, {"args": vars(args)})
    save_training_state(str(tmp / "critic"), critic, opt_c, step, {})
    save_model(actor, tok, out / "actor", state_dict=full_state_dict(actor))
    if is_rank0():
        final = out / f"ckpt_{step:06d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in out.glob("ckpt_*"):  # keep only the newest training state (they are large)
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    if is_distributed():
        torch.distributed.barrier()



def missing_input(path, command):
    return f"{path} not found: make it first with `{command}` (or point the flag elsewhere)"


# =============================================================================================
# Main: data, models, loop, save
# =============================================================================================

def main(argv=None):
    args = get_args(argv)
    env = dist_init()
    torch.manual_seed(args.seed + env.rank)
    random.seed(args.seed + env.rank)
    dtype = getattr(torch, args.dtype)

    if not Path(args.sft).exists() and args.sft != DEFAULT_MODEL:
        raise SystemExit(missing_input(args.sft, "python sft.py"))
    if args.reward == "grm" and not args.grm_url and not Path(args.grm).exists():
        raise SystemExit(missing_input(args.grm, "python train_grm.py"))
    if args.reward == "bt" and not Path(args.bt).exists():
        raise SystemExit(missing_input(args.bt, "python train_grm.py --mode bt"))

    # models: actor and critic from the SFT checkpoint (critic: new zero-init value head)
    actor, tok = load_model(args.sft, device=env.device, dtype=dtype)
    critic, _ = load_model(args.sft, device=env.device, dtype=dtype, value_head=True)
    ref = None
    if args.kl_coef > 0:
        ref, _ = load_model(args.sft, device=env.device, dtype=dtype)
        ref.requires_grad_(False)
    rm = None
    if args.reward == "grm" and not args.grm_url:
        rm = load_model(args.grm, device=env.device, dtype=dtype)
    elif args.reward == "bt":
        rm = load_model(args.bt, device=env.device, dtype=dtype, value_head=True)
    for m in [x for x in (ref, rm[0] if rm else None) if x is not None]:
        m.requires_grad_(False)
    actor.train(), critic.train()
    mode = args.parallel if env.world_size > 1 else "none"
    actor, critic = wrap_model(actor, mode, env), wrap_model(critic, mode, env)
    if mode == "fsdp":
        # FSDP2 gathers parameters around forward() only: register the other entry points we call
        import warnings
        from torch.distributed.fsdp import register_fsdp_forward_method
        warnings.filterwarnings("ignore", message=".*returned a view tensor")  # values(): we never write into it
        register_fsdp_forward_method(actor, "hidden_states")
        register_fsdp_forward_method(critic, "values")
    opt_a = common.adamw(actor.parameters(), lr=args.actor_lr, weight_decay=args.weight_decay)
    opt_c = common.adamw(critic.parameters(), lr=args.critic_lr, weight_decay=args.weight_decay)

    items = load_prompts(args.prompts, tok, args.max_prompt_tokens)
    if args.prompts_per_step % env.world_size:
        raise SystemExit("--prompts-per-step must be a multiple of the number of ranks")
    total = math.ceil(args.epochs * len(items) / args.prompts_per_step)
    if args.max_steps:
        total = min(total, args.max_steps)

    start = 0
    if args.resume and latest_checkpoint(args.out) is not None:
        ckpt = latest_checkpoint(args.out)
        start, _ = load_training_state(str(Path(ckpt) / "actor"), actor, opt_a)
        load_training_state(str(Path(ckpt) / "critic"), critic, opt_c)
        print0(f"resumed from {ckpt} (step {start})")
    elif is_rank0() and (Path(args.out) / "metrics.jsonl").exists():
        (Path(args.out) / "metrics.jsonl").unlink()  # a fresh run starts a fresh log
    logger = MetricsLogger(Path(args.out) / "metrics.jsonl")
    print0(f"PPO{'' if args.no_edit else ' + Critique-Post-Edit'}: {len(items)} prompts, {total} steps of "
           f"{args.prompts_per_step} prompts x {args.samples} samples, reward {args.reward}, world {env.world_size}")

    bar = tqdm(range(start, total), initial=start, total=total, desc="ppo", disable=not is_rank0())
    for step in bar:
        t0 = time.time()
        timer = dict.fromkeys(["gen", "score", "edit", "train"], 0.0)
        counts = {"parse_fail": 0, "endpoint_fail": 0}
        samples, edit_log = collect_batch(args, step, env, actor, tok, rm, items, counts, timer)
        t = time.time()
        fused = fused_forwards(args, env, actor, critic, samples)
        b = prepare_advantages(args, env, actor, critic, ref, samples, fused)
        upd = ppo_update(args, step, env, actor, critic, opt_a, opt_c, b, fused)
        del fused
        timer["train"] = time.time() - t
        row = {"step": step + 1, **step_metrics(samples, b, edit_log, counts, env), **upd,
               **{f"time_{k}": round(v, 2) for k, v in timer.items()}, "time_step": round(time.time() - t0, 2)}
        logger.log(row)
        if is_rank0() and args.log_samples:
            with open(Path(args.out) / "samples.jsonl", "a", encoding="utf-8") as f:
                for s in [s for s in samples if not s["is_edit"]][:args.log_samples] + \
                         [s for s in samples if s["is_edit"]][:1]:
                    f.write(json.dumps({"step": step + 1, "edit": s["is_edit"], "reward": s["reward"],
                                        "text": s["text"]}, ensure_ascii=False) + "\n")
        bar.set_postfix(R=f"{row['orig_reward']:.2f}", Re=f"{row['edit_reward'] or 0:.2f}",
                        len=f"{row['orig_len_mean']:.0f}", kl=f"{row['approx_kl']:.3f}")
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == total:
            save_checkpoint(args, step + 1, actor, critic, opt_a, opt_c, tok)
    logger.close()
    print0(f"done: actor in {Path(args.out) / 'actor'}, metrics in {Path(args.out) / 'metrics.jsonl'}")
    dist_cleanup()


if __name__ == "__main__":
    main()
