"""Evaluation: PersonaFeedback binary accuracy (SPEC 3) and length-controlled win rate (SPEC 1.4).

`accuracy`: a judge decides which of two responses (chosen, reject) fits a persona better; a case
counts 1 when it prefers chosen, 0.5 on a tie. Both orders of each pair are judged (chosen as A,
then as B), which cancels position bias exactly, or one seeded random order (`--order random`).
Reported per tier and category, with counts. The GRM's held-out pairwise accuracy is measured
here (`--judge grm` on data/persona_world/pairs.jsonl, `--split eval`). Judges (`--judge`):
  model     a local causal LM asked "A or B?"; P(A) = softmax over the two choice-token logits.
  grm       a generative reward model scoring each response alone (SPEC 1.1 weighted score).
  rm        a scalar reward model (value-head checkpoint): the value at the response's last token.
  endpoint  an OpenAI-compatible /chat/completions server: P(A) from the log-probs of the answer
            letter when the server gives them, else the parsed letter.
  rubric    the persona world's rule-based rubric (data/persona_world/rubric.py).
Data layouts (SPEC 3): the public one, the CPE release's, and the persona world's pairs.jsonl.

`winrate`: a policy answers each question of a {question, persona, response} file (`response` =
the reference answer) at temperature 0.8, top-p 0.9; a judge compares each answer with the
reference (seeded random sides); the AlpacaEval "length_controlled_minimal" model removes the
judge's length preference (SPEC 1.4):
    P(win_i) = sigmoid(theta + phi * tanh(dlen_i / std(dlen))),  dlen = len(answer) - len(reference)
    LC win rate = 100 * sigmoid(theta)
reported with the raw win rate, mean lengths (characters and tokens) and bootstrap CIs.

A judgment the judge could not give (an endpoint reply without a choice letter, a GRM reply
without a <scores> block, an endpoint call that failed after its retries) is never a tie: it is
excluded, counted and listed. When more than --max-fail-rate of the judgments failed, no metric
is reported and the exit status is 1. Bad input (flags, data) is one line "error: ..", status 2.
Outputs in --out: <cmd>_judgments.jsonl (appended as judged), <cmd>_summary.json / .md,
metrics.jsonl; winrate also writes winrate_answers.jsonl (reusable: --answers).

Commands (one process; on a GPU add `--device cuda --dtype bfloat16`; serve big judges with vLLM):
  python eval_persona.py accuracy --data ../shared/data/personafeedback --judge model --per-tier 50
  python eval_persona.py accuracy --data data/persona_world/pairs.jsonl --split eval --judge grm \
      --model out/grm --out out/eval/acc_grm
  python eval_persona.py accuracy --data data/persona_world/pairs.jsonl --judge rm --model out/bt --out out/eval/acc_bt
  OPENAI_API_KEY=... python eval_persona.py accuracy --data ../shared/data/personafeedback \
      --judge endpoint --base-url http://localhost:8000/v1 --endpoint-model Qwen2.5-7B-Instruct
  python eval_persona.py winrate --policy out/sft --eval-file data/persona_world/eval.jsonl --judge rubric
  python eval_persona.py winrate --policy out/ppo --eval-file ../shared/data/cpe_eval300/gpt-4o.jsonl \
      --judge endpoint --base-url https://api.openai.com/v1 --endpoint-model gpt-4.1
"""

import argparse
import functools
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common
from common import DataError

TIERS = {"easy": "easy", "medium": "medium", "mid": "medium", "hard": "hard"}
CATEGORIES = {"general": "general", "specific": "specific", "spedific": "specific"}

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def judge_flags(s, default_judge):
        s.add_argument("--judge", default=default_judge, choices=["model", "grm", "rm", "endpoint", "rubric"],
                       help="who decides which response is better (see the module docstring)")
        s.add_argument("--model", "--judge-model", dest="judge_model", default=common.DEFAULT_MODEL,
                       help="checkpoint of the model / grm / rm judge (path or the embedded default name)")
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for local models")
        s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of local models")
        s.add_argument("--token-budget", type=int, default=8192, help="model / rm judge: most tokens per forward")
        s.add_argument("--no-share-prefix", action="store_true", help="model judge: pack every sequence whole")
        s.add_argument("--batch-size", type=int, default=8, help="grm judge / policy: prompts generated together")
        s.add_argument("--grm-max-new-tokens", type=int, default=512, help="grm judge: most tokens of its reply")
        s.add_argument("--grm-score", choices=["expected", "parsed"], default="expected",
                       help="grm judge: probability-weighted scores at the written score tokens (breaks the "
                            "many ties of a small GRM), or the integers parsed from the text")
        s.add_argument("--base-url", default="http://localhost:8000/v1", help="endpoint judge: base URL (.../v1)")
        s.add_argument("--endpoint-model", default="default", help="endpoint judge: model name sent to the server")
        s.add_argument("--api-key-env", default="OPENAI_API_KEY", help="endpoint judge: env variable with the key")
        s.add_argument("--concurrency", type=int, default=8, help="endpoint judge: parallel requests")
        s.add_argument("--timeout", type=float, default=60.0, help="endpoint judge: seconds per request")
        s.add_argument("--retries", type=int, default=3, help="endpoint judge: retries (timeouts, 429/5xx, bad JSON)")
        s.add_argument("--backoff", type=float, default=1.0, help="endpoint judge: first retry delay (s), doubling")
        s.add_argument("--endpoint-max-tokens", type=int, default=8, help="endpoint judge: most answer tokens")
        s.add_argument("--no-logprobs", action="store_true", help="endpoint judge: for servers that reject logprobs")
        s.add_argument("--max-fail-rate", type=float, default=0.1,
                       help="fraction of judgments that may fail (unparsable reply, failed call); above it no "
                            "metric is reported and the exit status is 1")
        s.add_argument("--chunk", type=int, default=256, help="cases / questions judged and saved at a time")
        s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
        s.add_argument("--seed", type=int, default=0, help="seed for sampling cases, orders, sides")
        s.add_argument("--skip-bad", action="store_true", help="skip bad lines / rows (counted, listed), don't fail")
        s.add_argument("--out", default="out/eval", help="output folder")

    a = sub.add_parser("accuracy", help="PersonaFeedback binary accuracy of a judge (SPEC 3)")
    a.add_argument("--data", default="../shared/data/personafeedback",
                   help="benchmark folder (either published layout) or a persona-world pairs.jsonl")
    a.add_argument("--categories", default="general,specific", help="comma list of categories to use")
    a.add_argument("--tiers", default="easy,medium,hard", help="comma list of tiers to use")
    a.add_argument("--split", default="eval", help="pairs.jsonl only: split to use ('all' for every row)")
    a.add_argument("--per-tier", type=int, default=0, help="seeded sample of this many cases per tier; 0 = all")
    a.add_argument("--order", default="both", choices=["both", "random"], help="both orders, or one seeded random one")
    judge_flags(a, "model")

    w = sub.add_parser("winrate", help="length-controlled win rate against reference answers (SPEC 1.4)")
    w.add_argument("--policy", default=common.DEFAULT_MODEL, help="policy checkpoint that answers")
    w.add_argument("--eval-file", default="data/persona_world/eval.jsonl", help="{question, persona, response}")
    w.add_argument("--answers", default=None, help="reuse a winrate_answers.jsonl instead of generating")
    w.add_argument("--limit", type=int, default=0, help="seeded sample of this many questions; 0 = all")
    w.add_argument("--temperature", type=float, default=0.8, help="policy sampling temperature (SPEC 1.4)")
    w.add_argument("--top-p", type=float, default=0.9, help="policy nucleus sampling (SPEC 1.4)")
    w.add_argument("--max-new-tokens", type=int, default=512, help="policy answer length cap")
    w.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    judge_flags(w, "rubric")
    args = p.parse_args(argv)

    # every number checked before any data or model is read
    at_least = {"token_budget": 1, "batch_size": 1, "grm_max_new_tokens": 1, "concurrency": 1, "retries": 0,
                "endpoint_max_tokens": 1, "chunk": 1, "threads": 0, "per_tier": 0, "limit": 0,
                "max_new_tokens": 1, "bootstrap": 1}
    for name, low in at_least.items():
        if getattr(args, name, low) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not args.timeout > 0 or not args.backoff >= 0:
        p.error(f"--timeout must be > 0 and --backoff >= 0, got {args.timeout} and {args.backoff}")
    if not 0 <= args.max_fail_rate <= 1:
        p.error(f"--max-fail-rate must be in [0, 1], got {args.max_fail_rate}")
    if args.cmd == "winrate" and not (args.temperature >= 0 and 0 < args.top_p <= 1):
        p.error(f"need --temperature >= 0 and 0 < --top-p <= 1, got {args.temperature} and {args.top_p}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu)")
    for flag, known in (("categories", CATEGORIES), ("tiers", TIERS)) if args.cmd == "accuracy" else ():
        names = [x.strip() for x in getattr(args, flag).split(",")]
        if set(names) - set(known):
            p.error(f"--{flag}: unknown {sorted(set(names) - set(known))}; choose from {sorted(known)}")
        setattr(args, flag, sorted({known[x] for x in names}))
    return args

# ---------------------------------------------------------------------------------------------
# Data: PersonaFeedback cases (SPEC 3) and win-rate questions (SPEC 1.4)

def find_benchmark_files(root):
    """[(category, tier, path)] for whichever published layout lives under root."""
    return [(cat, tier, f) for base in [Path(root), Path(root) / "data", Path(root) / "rm_benchmark_all"]
            for cat_name, cat in CATEGORIES.items() for tier_name, tier in TIERS.items()
            for f in [base / cat_name / f"{tier_name}.jsonl", base / f"{cat_name}_{tier_name}.jsonl"] if f.is_file()]

def persona_finder(root):
    """user_id -> persona, from persona/all_personas.jsonl (lines {"user_id", "persona"}, a persona
    with a user_id, or {user_id: persona}) and <user_id>.json files in persona_all/ or personas/,
    next to root or one folder up."""
    table, dirs = {}, []
    for base in [Path(root), Path(root).parent]:
        for f in [base / "persona" / "all_personas.jsonl", base / "all_personas.jsonl"]:
            for lineno, row in common.read_jsonl(f)[0] if f.is_file() else []:
                if "user_id" in row:
                    table[str(row["user_id"])] = row.get("persona", {k: v for k, v in row.items() if k != "user_id"})
                elif len(row) == 1:
                    table.update({str(k): v for k, v in row.items()})
                else:
                    raise DataError(f"{f}:{lineno}: persona line has no user_id")
        dirs += [d for d in [base / "persona_all", base / "personas"] if d.is_dir()]

    def find(user_id):
        for f in [d / f"{user_id}.json" for d in dirs if user_id not in table]:
            if f.is_file():
                try:
                    table[user_id] = json.loads(f.read_text(encoding="utf-8"))
                except ValueError as e:
                    raise DataError(f"{f}: malformed persona JSON ({e})") from None
                break
        if user_id not in table:
            raise DataError(f"persona for user_id '{user_id}' not found next to {root}")
        return table[user_id]
    return find

def make_case(row, path, lineno, category, tier, personas):
    if category is None or tier is None:
        raise DataError(f"{path}:{lineno}: unknown category/tier {row.get('category')!r}/{row.get('tier')!r}")
    user_id = str(row.get("user_id", ""))
    if personas is None:  # pairs.jsonl: inline persona
        persona = common.require_field(row, "persona", path, lineno, (str, dict))
    elif not user_id:
        raise DataError(f"{path}:{lineno}: field 'user_id' is missing")
    else:
        try:
            persona = personas(user_id)
        except DataError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
    return {"id": f"{category}/{tier}/{Path(path).name}:{lineno}", "user_id": user_id, "persona": persona,
            **{k: common.require_field(row, k, path, lineno) for k in ("question", "chosen", "reject")},
            "category": category, "tier": tier}

def load_personafeedback(data, categories=("general", "specific"), tiers=("easy", "medium", "hard"),
                         split="eval", skip_bad=False):
    """(cases, skipped): cases are dicts {id, user_id, persona, question, chosen, reject, category,
    tier}; skipped lists "path:line: why" for each line --skip-bad left out. `data` is a benchmark
    folder (either published layout) or a pairs.jsonl. A missing persona means a broken copy of the
    benchmark: never skipped."""
    data = Path(data)
    if data.is_file() or ((data / "pairs.jsonl").is_file() and not find_benchmark_files(data)):
        files, personas = [(None, None, data if data.is_file() else data / "pairs.jsonl")], None
    else:
        files = [(c, t, f) for c, t, f in find_benchmark_files(data) if c in categories and t in tiers]
        if not files:
            raise DataError(f"{data}: no PersonaFeedback files found (expected data/general/easy.jsonl or "
                            f"general_easy.jsonl style names, or a pairs.jsonl)")
        personas = persona_finder(data)
    cases, skipped = [], []
    for cat, tier, path in files:
        rows, bad = common.read_jsonl(path, skip_bad)
        skipped += bad
        for lineno, row in rows:
            if personas is None and split != "all" and row.get("split", split) != split:
                continue
            try:  # pairs.jsonl rows carry their own category and tier
                case = make_case(row, path, lineno, cat or CATEGORIES.get(str(row.get("category", "")).lower()),
                                 tier or TIERS.get(str(row.get("tier", "")).lower()), personas)
            except DataError as e:
                if not skip_bad or "persona for user_id" in str(e):
                    raise
                skipped.append(str(e))
                continue
            if case["category"] in categories and case["tier"] in tiers:
                cases.append(case)
    return cases, skipped

def sample_per_tier(cases, n, seed):
    """A seeded sample of n cases from each (category, tier), in file order."""
    if n <= 0:
        return cases
    groups, rng, keep = {}, random.Random(seed), set()
    for i, c in enumerate(cases):
        groups.setdefault((c["category"], c["tier"]), []).append(i)
    for idx in groups.values():
        keep.update(rng.sample(idx, min(n, len(idx))))
    return [c for i, c in enumerate(cases) if i in keep]

def load_eval_rows(path, limit=0, seed=0, skip_bad=False):
    """(rows, skipped): win-rate questions [{idx, line, persona, question, reference}]."""
    rows, skipped = common.read_jsonl(path, skip_bad)
    out = []
    for lineno, row in rows:
        try:
            out.append({"idx": len(out), "line": lineno,
                        "persona": common.require_field(row, "persona", path, lineno, (str, dict)),
                        "question": common.require_field(row, "question", path, lineno),
                        "reference": common.require_field(row, "response" if "response" in row else "reference",
                                                          path, lineno)})
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
    if 0 < limit < len(out):
        out = [out[i] for i in sorted(random.Random(seed).sample(range(len(out)), limit))]
    return out, skipped

# ---------------------------------------------------------------------------------------------
# Judges. A pairwise judge maps items (persona, question, answer_a, answer_b) to dicts with
# "p_a" = P(A is better); a pointwise judge maps items (persona, question, response) to dicts
# with a "score". A judgment that could not be made has p_a / score None and an "error".

PAIRWISE_TASKS = {
    "accuracy": "Which answer fits this user better: more helpful for the question, more relevant "
                "to this user's persona, and natural?",
    # SPEC 1.4: the win-rate judge weighs the three criteria and breaks near-ties towards brevity
    "winrate": "Which answer is better for this user? Weigh helpfulness, personalization to this "
               "user's persona, and naturalness. If the two answers are similar in quality, prefer "
               "the shorter one.",
}

def pairwise_messages(persona, question, answer_a, answer_b, task="accuracy"):
    # persona and question first: both orders of a pair share this prefix
    content = (f"You are comparing two answers written for one specific user.\n\n"
               f"The user's persona:\n{common.render_persona(persona)}\n\n"
               f"The user's question:\n{question}\n\n"
               f"[Answer A]\n{answer_a}\n[End of answer A]\n\n"
               f"[Answer B]\n{answer_b}\n[End of answer B]\n\n"
               f"{PAIRWISE_TASKS[task]} Reply with a single letter: A or B.")
    return [{"role": "user", "content": content}]

@torch.no_grad()
def model_choice_probs(model, tokenizer, items, token_budget=8192, task="accuracy", share_prefix=True, desc="judge"):
    """A local causal LM asked "A or B?": P(A) = softmax over the logits of the two choice tokens
    after the prompt (SPEC 3: the choice-token log-probs, no text parsing). Prompts are packed into
    forwards of at most token_budget tokens; with share_prefix the two orders of a pair store their
    persona + question prefix once (common.pack; exact)."""
    choice_ids = [tokenizer.encode(letter, add_special_tokens=False)[0] for letter in "AB"]
    if choice_ids[0] == choice_ids[1]:
        raise ValueError("the tokenizer maps 'A' and 'B' to the same first token")
    seqs = [common.chat_prompt_ids(tokenizer, pairwise_messages(*it, task=task)) for it in items]
    device, out = next(model.parameters()).device, []
    for batch in tqdm(common.micro_batches(seqs, token_budget, share_prefix), desc=desc, unit="batch"):
        packed = common.pack([seqs[i] for i in batch], device, share_prefix)
        last = torch.stack([w[-1] for w in packed.where])  # the logits there predict the answer
        logp = torch.log_softmax(model(packed.input_ids, packed.cu_seqlens, packed.parents, select=last), -1)
        logp = logp[:, choice_ids]
        p_a, mass = torch.softmax(logp, -1)[:, 0].tolist(), logp.exp().sum(-1).tolist()
        out += [{"p_a": p_a[j], "choice_mass": mass[j], "prompt_tokens": len(seqs[i])}  # mass: P(A) + P(B)
                for j, i in enumerate(batch)]
    return out

def endpoint_choice(response):
    """(P(A), how) from a chat-completions reply: the top log-probs at the first generated token
    that is the letter A or B ("logprobs"); else the letter parsed from the text ("text"): a
    leading letter, then 'answer: X', then any standalone letter; else (None, "unparsed")."""
    choice = response["choices"][0]
    for pos in ((choice.get("logprobs") or {}).get("content")) or []:
        tok = str(pos.get("token", "")).strip().upper()
        if tok not in ("A", "B"):
            continue
        cands, listed = {}, []  # letter -> log-prob, log-sum-exp over spellings like "A" and " A"
        for c in pos.get("top_logprobs") or []:
            if c.get("logprob") is not None:
                letter, lp = str(c.get("token", "")).strip().upper(), float(c["logprob"])
                listed.append(lp)
                if letter in ("A", "B"):
                    cands[letter] = float(np.logaddexp(cands[letter], lp)) if letter in cands else lp
        if tok not in cands and pos.get("logprob") is not None:
            cands[tok] = float(pos["logprob"])  # the sampled letter itself, when not listed
        floor = min(listed) if listed else -math.inf  # an unlisted letter is below every listed one
        la, lb = cands.get("A", floor), cands.get("B", floor)
        if la == lb == -math.inf:
            break
        return 1.0 / (1.0 + math.exp(max(min(lb - la, 700.0), -700.0))), "logprobs"
    text = ((choice.get("message") or {}).get("content") or choice.get("text") or "").strip()
    for pattern in [r"^\W*([AB])\b", r"(?i:answer|choice|better|prefer)\w*\W{0,5}(?:is\W{0,5})?([AB])\b",
                    r"\b([AB])\b"]:
        m = re.search(pattern, text)
        if m:
            return (1.0 if m.group(1) == "A" else 0.0), "text"
    return None, "unparsed"

def endpoint_choice_probs(args, items, task="accuracy", desc="judge"):
    """An OpenAI-compatible chat-completions server as the pairwise judge (args.concurrency parallel
    requests; retries with backoff live in common.chat_completion). A call that still fails is one
    failed judgment, not a crash that loses the others."""
    def one(item):
        try:  # greedy judging, sent explicitly (a server may otherwise apply its own defaults)
            resp = common.chat_completion(
                args.base_url, args.endpoint_model, pairwise_messages(*item, task=task), temperature=0.0, top_p=1.0,
                max_tokens=args.endpoint_max_tokens, timeout=args.timeout, retries=args.retries,
                backoff=args.backoff, api_key_env=args.api_key_env,
                **({} if args.no_logprobs else {"logprobs": True, "top_logprobs": 5}))
            text = ((resp["choices"][0].get("message") or {}).get("content") or "")[:300]
            p_a, how = endpoint_choice(resp)
        except common.EndpointError as e:
            return {"p_a": None, "error": f"endpoint call failed: {str(e)[:500]}"}
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:  # a reply of another shape
            return {"p_a": None, "error": f"endpoint reply malformed ({e!r}): {str(resp)[:200]}"}
        if p_a is None:
            return {"p_a": None, "text": text, "error": f"endpoint reply has no A/B choice: {text[:80]!r}"}
        return {"p_a": p_a, "how": how, "text": text}
    return common.map_concurrent(one, items, max_workers=args.concurrency, desc=desc)

def grm_scores(model, tokenizer, items, batch_size=8, max_new_tokens=512, score="expected", desc="grm"):
    """A generative reward model (SPEC 1.1): greedy critique + scores, weighted into one reward.
    The engine records the probabilities of the score tokens while the reply is written
    (watch_ids), so the expected scores need no second forward pass."""
    prompts = [common.chat_prompt_ids(tokenizer, common.grm_messages(*it)) for it in items]
    stop, watch, out = common.stop_token_ids(tokenizer), common.grm_watch_ids(tokenizer), [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: prompts[i])  # shared prefixes side by side
    for k in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        batch = order[k:k + batch_size]
        gen = common.generate(model, [prompts[i] for i in batch], max_new_tokens, temperature=0.0, stop_ids=stop,
                              watch_ids=watch)
        for j, i in enumerate(batch):
            text = tokenizer.decode(gen.tokens[j], skip_special_tokens=True)
            scores = (common.grm_expected_scores(tokenizer, gen.tokens[j], gen.watched[j])
                      if score == "expected" else common.parse_grm_scores(text))
            if scores is None:  # a parse failure is never a score (issue 25)
                out[i] = {"score": None, "grm_output": text,
                          "error": f"GRM reply has no <scores> block: ...{text[-60:]!r}"}
            else:
                out[i] = {"score": common.grm_reward(scores), "scores": scores, "grm_output": text}
    return out

@torch.no_grad()
def rm_scores(model, tokenizer, items, token_budget=8192, desc="rm"):
    """A scalar (Bradley-Terry) reward model: the value at the response's end-of-turn token."""
    seqs = [common.response_ids(tokenizer, *it) for it in items]
    out = []
    for batch in tqdm(common.micro_batches(seqs, token_budget, share_prefix=True), desc=desc, unit="batch"):
        out += [{"score": v} for v in common.last_token_values(model, [seqs[i] for i in batch]).tolist()]
    return out

def rubric_scores(items, desc="rubric"):
    """The persona world's rule-based rubric (SPEC 1.1 dimensions and weights)."""
    from data.persona_world.rubric import rubric_judge
    scores = [rubric_judge(*it)[1] for it in tqdm(items, desc=desc, unit="resp")]
    return [{"score": common.grm_reward(s), "scores": s} for s in scores]

def build_judge(args, task):
    """(kind, judge, tokenizer or None): kind "pair" (judge(items, desc) -> [{"p_a", ...}]) or
    "point" (judge(items, desc) -> [{"score", ...}])."""
    if args.judge == "endpoint":
        return "pair", functools.partial(endpoint_choice_probs, args, task=task), None
    if args.judge == "rubric":
        return "point", rubric_scores, None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model, tok = common.load_model(args.judge_model, device=args.device, dtype=dtype, value_head=args.judge == "rm")
    if args.judge == "model":
        return "pair", functools.partial(model_choice_probs, model, tok, token_budget=args.token_budget, task=task,
                                         share_prefix=not args.no_share_prefix), tok
    if args.judge == "grm":
        return "point", functools.partial(grm_scores, model, tok, batch_size=args.batch_size,
                                          max_new_tokens=args.grm_max_new_tokens, score=args.grm_score), tok
    return "point", functools.partial(rm_scores, model, tok, token_budget=args.token_budget), tok

def judge_pairs(items, kind, judge, desc="judge"):
    """One dict per item (persona, question, answer_a, answer_b) with "p_a" = P(answer A is better),
    None (and an "error") when the judgment failed. A pointwise judge scores each distinct answer
    once, on its own; the higher score wins, a tie counts half (SPEC 1.1 weighted scores tie
    often); both sides' results are kept under "a" and "b"."""
    if kind == "pair":
        return judge(items, desc=desc)
    triples, index = {}, []
    for persona, question, *answers in items:
        for x in answers:
            index.append(triples.setdefault((common.render_persona(persona), question, x),
                                            (len(triples), (persona, question, x)))[0])
    scored = judge([t for _, t in triples.values()], desc=desc)
    out = []
    for k in range(len(items)):
        a, b = scored[index[2 * k]], scored[index[2 * k + 1]]
        errors = [f"{side}: {r['error']}" for side, r in (("A", a), ("B", b)) if r["score"] is None]
        p_a = None if errors else 1.0 if a["score"] > b["score"] else 0.0 if a["score"] < b["score"] else 0.5
        out.append({"p_a": p_a, "a": a, "b": b, **({"error": "; ".join(errors)} if errors else {})})
    return out

# ---------------------------------------------------------------------------------------------
# Judging in chunks, each appended to the judgments file when done; failures counted (issue 25)

def fresh_out(out_dir, cmd, fresh_files):
    """Check that --out is writable before any model loads: create it, start the given files
    empty and remove an old summary (a failed run must not leave a previous metric behind)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in fresh_files:
            common.write_jsonl(out / name, [])
        for name in (f"{cmd}_summary.json", f"{cmd}_summary.md"):
            (out / name).unlink(missing_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: not writable ({e})") from None
    return out

def judge_in_chunks(jobs, judge_chunk, n_planned, path, args):
    """judge_chunk(jobs[i:i + chunk]) -> records, appended to `path` chunk by chunk (a crash keeps
    them). Stops once more than --max-fail-rate of the n_planned judgments failed: the run can no
    longer pass."""
    records = []
    for start in range(0, len(jobs), args.chunk):
        for r in judge_chunk(jobs[start:start + args.chunk]):
            common.append_jsonl(path, r)
            records.append(r)
        if sum("error" in r for r in records) > args.max_fail_rate * n_planned:
            break
    return records

def print_list(title, lines, limit=10):
    if lines:
        print(title + "".join(f"\n  {x[:200]}" for x in lines[:limit]) + ("\n  ..." if len(lines) > limit else ""))

def check_failures(records, n_planned, args, metric):
    """The failed judgments, printed. Above --max-fail-rate (or with no valid judgment left) the
    command reports no metric and exits with status 1."""
    failed = [r for r in records if "error" in r]
    print_list(f"{len(failed)} of {n_planned} judgments failed and are excluded from the {metric}:",
               [f"{r.get('id', r.get('idx'))}: {r['error']}" for r in failed])
    if len(failed) > args.max_fail_rate * n_planned or len(failed) == len(records):
        print(f"error: {len(failed)} of {n_planned} judgments failed ({len(records)} judged, --max-fail-rate "
              f"{args.max_fail_rate}): no {metric} reported; the judgments and their errors are in "
              f"{Path(args.out) / (args.cmd + '_judgments.jsonl')}", file=sys.stderr)
        sys.exit(1)
    return failed

# ---------------------------------------------------------------------------------------------
# Accuracy (SPEC 3)

def judge_cases(cases, kind, judge, order="both", seed=0):
    """One record per (case, order) judged: {id, category, tier, chosen_first, p_chosen, correct,
    ...}; correct is 1 if the judge prefers chosen, 0.5 on an exact tie, 0 otherwise, None on a
    failed judgment. order "both": chosen shown as A, then as B; "random": one coin flip per case,
    seeded by seed and case id (the same whatever the chunking)."""
    views = [(c, first) for c in cases for first in ((True, False) if order == "both" else
                                                     (random.Random(f"{seed}:{c['id']}").random() < 0.5,))]
    items = [(c["persona"], c["question"], *((c["chosen"], c["reject"]) if first else (c["reject"], c["chosen"])))
             for c, first in views]
    records = []
    for (c, first), r in zip(views, judge_pairs(items, kind, judge, desc="judge pairs")):
        p = None if r["p_a"] is None else r["p_a"] if first else 1.0 - r["p_a"]
        records.append({"id": c["id"], "user_id": c["user_id"], "category": c["category"], "tier": c["tier"],
                        "chosen_first": first, "p_chosen": p,
                        "correct": None if p is None else 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5, **r})
    return records

def accuracy_table(records):
    """{"rows", "total", "by_order"}: accuracy (%) over the valid judgments, with their count n and
    the count of failed ones, per (category, tier), per category (pooled, and the mean over its
    tiers as the papers average), per order and in total."""
    def acc(rs):
        ok = [r for r in rs if r["correct"] is not None]
        return {"n": len(ok), "n_failed": len(rs) - len(ok),
                "accuracy": 100.0 * sum(r["correct"] for r in ok) / len(ok) if ok else math.nan,
                "mean_p_chosen": float(np.mean([r["p_chosen"] for r in ok])) if ok else math.nan}
    rows = []
    for cat in ["specific", "general"]:
        cat_rs = [r for r in records if r["category"] == cat]
        tier_rows = [{"category": cat, "tier": t, **acc([r for r in cat_rs if r["tier"] == t])}
                     for t in ["easy", "medium", "hard"] if any(r["tier"] == t for r in cat_rs)]
        if tier_rows:
            rows += tier_rows + [{"category": cat, "tier": "all", **acc(cat_rs),
                                  "tier_mean": float(np.mean([r["accuracy"] for r in tier_rows]))}]
    total = {"category": "total", "tier": "all", **acc(records),
             "tier_mean": float(np.mean([r["accuracy"] for r in rows if r["tier"] != "all"]))}
    by_order = {name: acc([r for r in records if r["chosen_first"] == first])
                for name, first in (("chosen_first", True), ("chosen_second", False))}
    return {"rows": rows, "total": total, "by_order": by_order}

def accuracy_markdown(table, title):
    lines = [f"### {title}", "", "| category | tier | judgments | failed | accuracy % | mean P(chosen) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in [*table["rows"], table["total"]]:
        extra = f" (tier mean {r['tier_mean']:.1f})" if "tier_mean" in r else ""
        lines.append(f"| {r['category']} | {r['tier']} | {r['n']} | {r['n_failed']} | {r['accuracy']:.1f}{extra} "
                     f"| {r['mean_p_chosen']:.3f} |")
    first, second = table["by_order"]["chosen_first"], table["by_order"]["chosen_second"]
    return "\n".join(lines) + (f"\n\nChosen shown first: {first['accuracy']:.1f}% (n={first['n']}); "
                               f"shown second: {second['accuracy']:.1f}% (n={second['n']}).\n")

# ---------------------------------------------------------------------------------------------
# Length-controlled win rate (SPEC 1.4, AlpacaEval length_controlled_minimal)

def _logistic_loss(w, X, y, l2):
    z = X @ w
    return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * (w @ w))

def fit_length_logistic(p_win, len_model, len_ref, l2=1e-4, iters=100):
    """(theta, phi) maximising sum_i y_i log s_i + (1-y_i) log(1-s_i), s_i = sigmoid(theta + phi x_i),
    x_i = tanh(dlen_i / std(dlen)), by Newton's method (IRLS) with a backtracking line search.
    y may be soft (judge probabilities) or hard (0, 0.5, 1). The tiny ridge l2 keeps the fit
    finite when every judgment goes one way. AlpacaEval 0.6.6 fits an L1-penalised, cross-validated
    regression instead, whose CV can shrink theta to 0 (LC 50.0) at small n such as 48 prompts."""
    y = np.asarray(p_win, dtype=np.float64)
    dlen = np.asarray(len_model, dtype=np.float64) - np.asarray(len_ref, dtype=np.float64)
    std = dlen.std(ddof=1) if len(dlen) > 1 else 0.0
    x = np.tanh(dlen / std) if std > 0 else np.zeros_like(dlen)
    X = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    loss = _logistic_loss(w, X, y, l2)
    for _ in range(iters):
        s = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (s - y) + l2 * w
        hess = (X * (s * (1 - s))[:, None]).T @ X + l2 * np.eye(2)
        step = np.linalg.solve(hess + 1e-12 * np.eye(2), grad)
        t = 1.0
        while t > 1e-10:
            new_loss = _logistic_loss(w - t * step, X, y, l2)
            if new_loss <= loss + 1e-12:
                break
            t *= 0.5
        w = w - t * step
        converged = abs(loss - new_loss) < 1e-12 * max(1.0, abs(loss)) or np.max(np.abs(t * step)) < 1e-10
        loss = new_loss
        if converged:
            break
    return float(w[0]), float(w[1])

def length_controlled_winrate(p_win, len_model, len_ref, l2=1e-4):
    """{"lc_winrate", "winrate", "theta", "phi"} in percent: LC = 100 * sigmoid(theta), the win
    probability the fit predicts at equal length; raw = 100 * mean(p_win)."""
    theta, phi = fit_length_logistic(p_win, len_model, len_ref, l2=l2)
    return {"lc_winrate": 100.0 / (1.0 + math.exp(-theta)), "winrate": 100.0 * float(np.mean(p_win)),
            "theta": theta, "phi": phi}

def bootstrap_ci(p_win, len_model, len_ref, n_boot=1000, seed=0, level=0.95):
    """Percentile bootstrap CIs {"lc_winrate": (lo, hi), "winrate": (lo, hi)} over resampled questions."""
    p, lm, lr = (np.asarray(v, dtype=np.float64) for v in (p_win, len_model, len_ref))
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(p), len(p)) for _ in range(n_boot)]
    fits = [length_controlled_winrate(p[i], lm[i], lr[i]) for i in draws]
    q = [50 * (1 - level), 100 - 50 * (1 - level)]
    return {k: tuple(float(v) for v in np.percentile([f[k] for f in fits], q)) for k in ("lc_winrate", "winrate")}

# ---------------------------------------------------------------------------------------------
# Policy answers (SPEC 1.4 sampling: temperature 0.8, top-p 0.9)

def generate_answers(model, tokenizer, rows, args, path):
    """The policy's answer to every row, appended to `path` batch by batch."""
    prompts = [common.chat_prompt_ids(tokenizer, common.persona_messages(r["persona"], r["question"])) for r in rows]
    stop, answers = common.stop_token_ids(tokenizer), [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    for b, k in enumerate(tqdm(range(0, len(order), args.batch_size), desc="policy answers", unit="batch")):
        batch = order[k:k + args.batch_size]
        gen = common.generate(model, [prompts[i] for i in batch], args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, stop_ids=stop, seed=args.seed * 100003 + b)
        for j, i in enumerate(batch):
            toks = gen.tokens[j][:-1] if gen.stopped[j] else gen.tokens[j]  # without the end-of-turn token
            answers[i] = {"idx": rows[i]["idx"], "question": rows[i]["question"],
                          "answer": tokenizer.decode(toks, skip_special_tokens=True).strip(),
                          "answer_tokens": len(toks), "stopped": bool(gen.stopped[j])}
            common.append_jsonl(path, answers[i])
    return answers

def read_answers(path, rows, skip_bad):
    lines, skipped = common.read_jsonl(path, skip_bad)
    by_idx = {a.get("idx"): a for _, a in lines}
    for r in rows:
        a = by_idx.get(r["idx"])
        if a is None or a.get("question") != r["question"] or not isinstance(a.get("answer"), str):
            raise DataError(f"{path}: no answer for question {r['idx']} (line {r['line']} of the eval file)")
    return [by_idx[r["idx"]] for r in rows], skipped

# ---------------------------------------------------------------------------------------------
# Main

def judge_description(args):
    return (f"endpoint {args.endpoint_model} @ {args.base_url}" if args.judge == "endpoint" else
            "rubric" if args.judge == "rubric" else f"{args.judge} {args.judge_model}")

def write_summary(out, cmd, summary, markdown):
    summary = common.json_clean(summary)  # NaN -> null: valid JSON
    (out / f"{cmd}_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    (out / f"{cmd}_summary.md").write_text(markdown)
    common.MetricsLogger(out / "metrics.jsonl").log(
        {"stage": f"eval_{cmd}", **{k: v for k, v in summary.items() if isinstance(v, (int, float, str))}})
    print(markdown + f"\nwrote {out}/{cmd}_judgments.jsonl, {cmd}_summary.json, {cmd}_summary.md")

def run_accuracy(args):
    t0 = time.time()
    cases, skipped = load_personafeedback(args.data, args.categories, args.tiers, args.split, args.skip_bad)
    cases = sample_per_tier(cases, args.per_tier, args.seed)
    if not cases:
        raise DataError(f"{args.data}: no cases for categories {args.categories}, tiers {args.tiers}, "
                        f"split {args.split}")
    print(f"{len(cases)} cases from {args.data}; judge: {judge_description(args)}")
    print_list(f"{len(skipped)} bad lines skipped (--skip-bad):", skipped)
    out = fresh_out(args.out, "accuracy", ["accuracy_judgments.jsonl"])
    kind, judge, _ = build_judge(args, "accuracy")

    t1, n_planned = time.time(), len(cases) * (2 if args.order == "both" else 1)
    records = judge_in_chunks(cases, lambda chunk: judge_cases(chunk, kind, judge, args.order, args.seed),
                              n_planned, out / "accuracy_judgments.jsonl", args)
    t_judge = time.time() - t1
    failed = check_failures(records, n_planned, args, "accuracy")
    table = accuracy_table(records)
    summary = {"judge": judge_description(args), "data": str(args.data), "split": args.split, "order": args.order,
               "seed": args.seed, "per_tier": args.per_tier, "n_cases": len(cases), "n_judgments": len(records),
               "n_valid": table["total"]["n"], "n_failed": len(failed), "fail_rate": len(failed) / n_planned,
               "failures": [{"id": r["id"], "error": r["error"]} for r in failed],
               "n_skipped_lines": len(skipped), "skipped_lines": skipped,
               "accuracy": table["total"]["accuracy"], "tier_mean_accuracy": table["total"]["tier_mean"],
               "table": table, "judge_seconds": t_judge, "total_seconds": time.time() - t0,
               "device": args.device, "dtype": args.dtype}
    md = accuracy_markdown(table, f"PersonaFeedback accuracy: {summary['judge']} ({args.order} orders, "
                                  f"{len(cases)} cases)")
    md += (f"\n{len(records)} judgments ({len(failed)} failed, excluded) in {t_judge:.0f} s "
           f"({args.device}, {args.dtype}); {len(skipped)} bad lines skipped.\n")
    write_summary(out, "accuracy", summary, md)
    return summary

def run_winrate(args):
    t0 = time.time()
    rows, skipped = load_eval_rows(args.eval_file, args.limit, args.seed, args.skip_bad)
    if not rows:
        raise DataError(f"{args.eval_file}: no questions")
    print(f"{len(rows)} questions from {args.eval_file}; judge: {judge_description(args)}")
    answers, bad = read_answers(args.answers, rows, args.skip_bad) if args.answers else (None, [])
    skipped += bad
    print_list(f"{len(skipped)} bad lines skipped (--skip-bad):", skipped)
    out = fresh_out(args.out, "winrate", ["winrate_judgments.jsonl"] + ["winrate_answers.jsonl"] * (not args.answers))
    tokenizer = None
    if answers is None:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        policy, tokenizer = common.load_model(args.policy, device=args.device, dtype=dtype)
        answers = generate_answers(policy, tokenizer, rows, args, out / "winrate_answers.jsonl")
        del policy
    t_gen, t1 = time.time() - t0, time.time()

    # each answer against the reference; the model's side (A or B) is a seeded coin flip
    kind, judge, judge_tok = build_judge(args, "winrate")
    tokenizer = tokenizer or judge_tok
    rng = random.Random(args.seed)
    model_is_a = [rng.random() < 0.5 for _ in rows]

    def judge_chunk(idx):
        sides = [(answers[i]["answer"], rows[i]["reference"])[::1 if model_is_a[i] else -1] for i in idx]
        items = [(rows[i]["persona"], rows[i]["question"], *ab) for i, ab in zip(idx, sides)]
        return [{"idx": rows[i]["idx"], "question": rows[i]["question"], "answer": answers[i]["answer"],
                 "reference": rows[i]["reference"], "model_is_a": model_is_a[i],
                 "p_model_wins": None if r["p_a"] is None else r["p_a"] if model_is_a[i] else 1.0 - r["p_a"],
                 "len_answer": len(answers[i]["answer"]), "len_reference": len(rows[i]["reference"]), **r}
                for i, r in zip(idx, judge_pairs(items, kind, judge, desc="judge answers"))]

    records = judge_in_chunks(list(range(len(rows))), judge_chunk, len(rows), out / "winrate_judgments.jsonl", args)
    t_judge = time.time() - t1
    failed = check_failures(records, len(rows), args, "win rate")
    ok = [r for r in records if "error" not in r]
    p_win, len_model, len_ref = ([r[k] for r in ok] for k in ("p_model_wins", "len_answer", "len_reference"))
    lc = length_controlled_winrate(p_win, len_model, len_ref)
    ci = bootstrap_ci(p_win, len_model, len_ref, args.bootstrap, args.seed)
    tok_model = tok_ref = None
    if tokenizer is not None:
        tok_model, tok_ref = (float(np.mean([len(tokenizer.encode(r[k], add_special_tokens=False)) for r in ok]))
                              for k in ("answer", "reference"))
    summary = {"policy": args.answers or args.policy, "eval_file": str(args.eval_file),
               "judge": judge_description(args), "n": len(ok), "n_questions": len(rows), "n_failed": len(failed),
               "fail_rate": len(failed) / len(rows), "failures": [{k: r[k] for k in ("idx", "error")} for r in failed],
               "n_skipped_lines": len(skipped), "skipped_lines": skipped, **lc,
               "lc_ci95": list(ci["lc_winrate"]), "winrate_ci95": list(ci["winrate"]),
               "mean_len_chars_model": float(np.mean(len_model)), "mean_len_chars_reference": float(np.mean(len_ref)),
               "mean_len_tokens_model": tok_model, "mean_len_tokens_reference": tok_ref,
               "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
               "seed": args.seed, "generate_seconds": t_gen, "judge_seconds": t_judge,
               "device": args.device, "dtype": args.dtype}
    tokens = lambda v: "-" if v is None else f"{v:.0f}"
    md = (f"### Length-controlled win rate vs reference ({Path(args.eval_file).name})\n\n"
          "| policy | judge | n | failed | LC win rate % (95% CI) | raw win rate % (95% CI) "
          "| mean length chars / tokens: policy | reference |\n|---|---|---:|---:|---:|---:|---:|---:|\n"
          f"| {summary['policy']} | {summary['judge']} | {len(ok)} | {len(failed)} | {lc['lc_winrate']:.1f} "
          f"({ci['lc_winrate'][0]:.1f}-{ci['lc_winrate'][1]:.1f}) | {lc['winrate']:.1f} "
          f"({ci['winrate'][0]:.1f}-{ci['winrate'][1]:.1f}) | {np.mean(len_model):.0f} / {tokens(tok_model)} | "
          f"{np.mean(len_ref):.0f} / {tokens(tok_ref)} |\n\n"
          f"Fit: theta {lc['theta']:.3f}, phi {lc['phi']:.3f}. Generation {t_gen:.0f} s, judging {t_judge:.0f} s "
          f"({args.device}, {args.dtype}); {len(skipped)} bad lines skipped.\n")
    write_summary(out, "winrate", summary, md)
    return summary

def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_accuracy(args) if args.cmd == "accuracy" else run_winrate(args)


if __name__ == "__main__":
    common.main_guard(main)
