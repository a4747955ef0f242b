"""Evaluation: PersonaFeedback binary accuracy (SPEC 3) and length-controlled win rate (SPEC 1.4).

Two sub-commands.

`accuracy`: every PersonaFeedback case is (persona, question, chosen, reject). A judge decides which
response fits the persona better; the case counts 1 when it prefers `chosen`, 0.5 on a tie, 0
otherwise. Both orders of each pair are judged (chosen shown as A, then as B), which cancels a
judge's position bias exactly (a judge that always says "A" scores 50%), or one seeded random
order per case (`--order random`). Reported per tier and category, with counts, as a table and
as JSON. Judges (`--judge`):
  model     a local causal LM (any checkpoint `load_model` accepts) asked "A or B?"; P(A) is the
            softmax over the log-probs of the two choice tokens (no text parsing). The two
            orders of a pair share the persona + question prefix through the KV cache.
  grm       a generative reward model scoring each response separately (SPEC 1.1 weighted score).
  rm        a scalar reward model (value-head checkpoint): the value at the last token.
  endpoint  an OpenAI-compatible /chat/completions server (vLLM, a hosted judge): P(A) from the
            top log-probs of the first answer token when the server gives them, else the parsed
            letter. Key read from the environment variable named by --api-key-env.
  rubric    the persona world's rule-based rubric (data/persona_world/rubric.py).
Three data layouts are read (SPEC 3): the public dataset (data/{general,spedific}/{easy,medium,
hard}.jsonl + persona/all_personas.jsonl), the CPE release (rm_benchmark_all/{general,specific}_
{easy,mid,hard}.jsonl + persona_all/<user_id>.json, or personas/<user_id>.json), and the persona
world's pairs.jsonl (inline persona, tier, category, split).

`winrate`: a policy answers each question of an evaluation file ({question, persona, response},
`response` being the reference answer, e.g. ../shared/data/cpe_eval300/gpt-4o.jsonl or
data/persona_world/eval.jsonl), sampling at temperature 0.8, top-p 0.9. A judge compares each answer
with the reference (sides randomised for pairwise judges), and the AlpacaEval
"length_controlled_minimal" logistic model removes the judge's length preference (SPEC 1.4):
    P(win_i) = sigmoid(theta + phi * tanh(dlen_i / std(dlen))),  dlen = len(answer) - len(reference)
    LC win rate = 100 * sigmoid(theta)
reported with the raw win rate, mean lengths (characters and tokens) and seeded bootstrap CIs.

Outputs (in --out, default out/eval): <cmd>_judgments.jsonl (every judgment), <cmd>_summary.json,
<cmd>_summary.md, metrics.jsonl; winrate also writes winrate_answers.jsonl (reusable: --answers).

Commands:
  python eval_persona.py accuracy --data ../shared/data/personafeedback --judge model \
      --model smollm2-135m-instruct --per-tier 50 --seed 0
  python eval_persona.py accuracy --data ../shared/data/personafeedback --judge grm --model out/grm
  python eval_persona.py accuracy --data ../shared/data/personafeedback --judge rm --model out/bt
  python eval_persona.py accuracy --data data/persona_world/pairs.jsonl --judge rubric
  OPENAI_API_KEY=... python eval_persona.py accuracy --data ../shared/data/personafeedback \
      --judge endpoint --base-url http://localhost:8000/v1 --endpoint-model Qwen2.5-7B-Instruct
  python eval_persona.py winrate --policy out/sft --eval-file data/persona_world/eval.jsonl --judge rubric
  python eval_persona.py winrate --policy out/ppo --eval-file ../shared/data/cpe_eval300/gpt-4o.jsonl \
      --judge endpoint --base-url https://api.openai.com/v1 --endpoint-model gpt-4.1
Evaluation runs in one process (no torchrun): on a GPU add `--device cuda --dtype bfloat16`;
for big judges serve them with vLLM and use `--judge endpoint`.
"""

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import DataError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def judge_flags(s, default_judge):
        s.add_argument("--judge", default=default_judge,
                       choices=["model", "grm", "rm", "endpoint", "rubric"],
                       help="who decides which response is better (see the module docstring)")
        s.add_argument("--model", "--judge-model", dest="judge_model", default=common.DEFAULT_MODEL,
                       help="checkpoint of the model / grm / rm judge (path or the embedded default name)")
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="device for local models")
        s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                       help="dtype of local models (bfloat16 is ~2x faster on CPUs with AVX512-BF16)")
        s.add_argument("--token-budget", type=int, default=8192,
                       help="model judge / rm: max tokens packed into one forward pass")
        s.add_argument("--no-share-prefix", action="store_true",
                       help="model judge: do not share the persona + question KV between the two orders")
        s.add_argument("--batch-size", type=int, default=8,
                       help="grm judge / policy generation: prompts generated together")
        s.add_argument("--grm-max-new-tokens", type=int, default=512,
                       help="grm judge: max tokens of critique + scores (greedy)")
        s.add_argument("--grm-score", choices=["expected", "parsed"], default="expected",
                       help="grm judge: probability-weighted scores at the written score tokens "
                            "(breaks the many ties of a small GRM), or the integers parsed from the text")
        s.add_argument("--base-url", default="http://localhost:8000/v1",
                       help="endpoint judge: OpenAI-compatible base URL (…/v1)")
        s.add_argument("--endpoint-model", default="default",
                       help="endpoint judge: model name sent to the server")
        s.add_argument("--api-key-env", default="OPENAI_API_KEY",
                       help="endpoint judge: environment variable holding the API key (may be unset)")
        s.add_argument("--concurrency", type=int, default=8, help="endpoint judge: parallel requests")
        s.add_argument("--timeout", type=float, default=60.0, help="endpoint judge: seconds per request")
        s.add_argument("--retries", type=int, default=3,
                       help="endpoint judge: retries after a failed request (timeouts, 5xx, bad JSON)")
        s.add_argument("--backoff", type=float, default=1.0,
                       help="endpoint judge: first retry delay in seconds (doubles each retry)")
        s.add_argument("--endpoint-max-tokens", type=int, default=8,
                       help="endpoint judge: max answer tokens (the letter comes first)")
        s.add_argument("--no-logprobs", action="store_true",
                       help="endpoint judge: do not request log-probs (for servers that reject them)")
        s.add_argument("--threads", type=int, default=0,
                       help="torch CPU threads (0 = torch's default; 1 is fastest on a crowded CPU)")
        s.add_argument("--seed", type=int, default=0, help="seed for sampling cases, orders, sides")
        s.add_argument("--skip-bad", action="store_true",
                       help="skip malformed lines / empty responses (counted) instead of failing")
        s.add_argument("--out", default="out/eval", help="output folder")

    a = sub.add_parser("accuracy", help="PersonaFeedback binary accuracy of a judge (SPEC 3)")
    a.add_argument("--data", default="../shared/data/personafeedback",
                   help="benchmark folder (either published layout) or a persona-world pairs.jsonl")
    a.add_argument("--categories", default="general,specific", help="comma list of categories to use")
    a.add_argument("--tiers", default="easy,medium,hard", help="comma list of tiers to use")
    a.add_argument("--split", default="eval", help="pairs.jsonl only: split to use ('all' for every row)")
    a.add_argument("--per-tier", type=int, default=0,
                   help="seeded sample of this many cases per (category, tier); 0 = all")
    a.add_argument("--order", default="both", choices=["both", "random"],
                   help="judge both orders of each pair, or one seeded random order")
    judge_flags(a, "model")

    w = sub.add_parser("winrate", help="length-controlled win rate against reference answers (SPEC 1.4)")
    w.add_argument("--policy", default=common.DEFAULT_MODEL, help="policy checkpoint that answers")
    w.add_argument("--eval-file", default="data/persona_world/eval.jsonl",
                   help="JSONL of {question, persona, response}; response = the reference answer")
    w.add_argument("--answers", default=None,
                   help="reuse answers from a winrate_answers.jsonl instead of generating")
    w.add_argument("--limit", type=int, default=0, help="seeded sample of this many questions; 0 = all")
    w.add_argument("--temperature", type=float, default=0.8, help="policy sampling temperature (SPEC 1.4)")
    w.add_argument("--top-p", type=float, default=0.9, help="policy nucleus sampling (SPEC 1.4)")
    w.add_argument("--max-new-tokens", type=int, default=512, help="policy answer length cap")
    w.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    judge_flags(w, "rubric")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Data: PersonaFeedback cases (SPEC 3)

TIERS = {"easy": "easy", "medium": "medium", "mid": "medium", "hard": "hard"}
CATEGORIES = {"general": "general", "specific": "specific", "spedific": "specific"}


class PersonaStore:
    """user_id -> persona dict, from persona/all_personas.jsonl and/or a folder of <user_id>.json."""

    def __init__(self, jsonl_files=(), dirs=()):
        self.table, self.dirs, self.sources = {}, list(dirs), [str(p) for p in [*jsonl_files, *dirs]]
        for path in jsonl_files:
            for lineno, row in common.read_jsonl(path):
                uid, persona = _persona_record(row)
                if uid is None:
                    raise DataError(f"{path}:{lineno}: persona line has no user_id")
                self.table[str(uid)] = persona

    def __getitem__(self, user_id):
        if user_id in self.table:
            return self.table[user_id]
        for d in self.dirs:
            f = Path(d) / f"{user_id}.json"
            if f.is_file():
                try:
                    persona = json.loads(f.read_text(encoding="utf-8"))
                except json.JSONDecodeError as e:
                    raise DataError(f"{f}: malformed persona JSON ({e})") from None
                self.table[user_id] = persona
                return persona
        raise DataError(f"persona for user_id '{user_id}' not found in {', '.join(self.sources) or 'nowhere'}")


def _persona_record(row):
    """all_personas.jsonl lines come as {"user_id", "persona": {...}}, as a persona with a user_id
    field, or as {user_id: persona}; accept all three."""
    if "user_id" in row:
        persona = row.get("persona", {k: v for k, v in row.items() if k != "user_id"})
        if isinstance(persona, str):
            persona = json.loads(persona)
        return row["user_id"], persona
    if len(row) == 1:
        (uid, persona), = row.items()
        return uid, persona
    return None, None


def find_benchmark_files(root):
    """[(category, tier, path)] for whichever published layout lives under root."""
    root = Path(root)
    found = []
    for base in [root, root / "data", root / "rm_benchmark_all"]:
        for cat_name, cat in CATEGORIES.items():
            for tier_name, tier in TIERS.items():
                for f in [base / cat_name / f"{tier_name}.jsonl", base / f"{cat_name}_{tier_name}.jsonl"]:
                    if f.is_file():
                        found.append((cat, tier, f))
    return found


def find_persona_store(root):
    root = Path(root)
    jsonls, dirs = [], []
    for base in [root, root.parent]:
        for f in [base / "persona" / "all_personas.jsonl", base / "all_personas.jsonl"]:
            if f.is_file():
                jsonls.append(f)
        for d in [base / "persona_all", base / "personas"]:
            if d.is_dir():
                dirs.append(d)
    return PersonaStore(jsonls, dirs)


def load_personafeedback(data, categories=("general", "specific"), tiers=("easy", "medium", "hard"),
                         split="eval", skip_bad=False):
    """Cases as dicts {id, user_id, persona, question, chosen, reject, category, tier}, and the number
    of lines skipped. `data` is a benchmark folder (either published layout) or a pairs.jsonl."""
    data = Path(data)
    cases, n_skipped = [], 0
    if data.is_file() or ((data / "pairs.jsonl").is_file() and not find_benchmark_files(data)):
        # persona world pairs.jsonl: inline persona, tier and category on every row
        path = data if data.is_file() else data / "pairs.jsonl"
        rows, n_skipped = common.read_jsonl_checked(path, skip_bad)
        for lineno, row in rows:
            if split != "all" and row.get("split", split) != split:
                continue
            try:
                case = _make_case(row, path, lineno,
                                  CATEGORIES.get(str(row.get("category", "")).lower()),
                                  TIERS.get(str(row.get("tier", "")).lower()), None)
            except DataError:
                if not skip_bad:
                    raise
                n_skipped += 1
                continue
            if case["category"] in categories and case["tier"] in tiers:
                cases.append(case)
        return cases, n_skipped

    files = [(c, t, f) for c, t, f in find_benchmark_files(data) if c in categories and t in tiers]
    if not files:
        raise DataError(f"{data}: no PersonaFeedback files found (expected data/general/easy.jsonl or "
                        f"general_easy.jsonl style names, or a pairs.jsonl)")
    personas = find_persona_store(data)
    for cat, tier, path in files:
        rows, skipped = common.read_jsonl_checked(path, skip_bad)
        n_skipped += skipped
        for lineno, row in rows:
            try:
                cases.append(_make_case(row, path, lineno, cat, tier, personas))
            except DataError as e:
                if not skip_bad or "persona for user_id" in str(e):
                    raise  # a missing persona is a broken benchmark copy, never skipped
                n_skipped += 1
    return cases, n_skipped


def _make_case(row, path, lineno, category, tier, personas):
    if category is None or tier is None:
        raise DataError(f"{path}:{lineno}: unknown category/tier {row.get('category')!r}/{row.get('tier')!r}")
    user_id = str(row.get("user_id", ""))
    if personas is None:
        if "persona" not in row:
            raise DataError(f"{path}:{lineno}: field 'persona' is missing")
        persona = row["persona"]
    else:
        if not user_id:
            raise DataError(f"{path}:{lineno}: field 'user_id' is missing")
        try:
            persona = personas[user_id]
        except DataError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
    return {"id": f"{category}/{tier}/{Path(path).name}:{lineno}", "user_id": user_id, "persona": persona,
            "question": common.require_field(row, "question", path, lineno),
            "chosen": common.require_field(row, "chosen", path, lineno),
            "reject": common.require_field(row, "reject", path, lineno),
            "category": category, "tier": tier}


def sample_per_tier(cases, n, seed):
    """A seeded sample of n cases from each (category, tier), in file order."""
    if n <= 0:
        return cases
    groups = {}
    for i, c in enumerate(cases):
        groups.setdefault((c["category"], c["tier"]), []).append(i)
    rng = random.Random(seed)
    keep = set()
    for idx in groups.values():
        keep.update(rng.sample(idx, min(n, len(idx))))
    return [c for i, c in enumerate(cases) if i in keep]


def load_eval_rows(path, limit=0, seed=0, skip_bad=False):
    """Win-rate questions: [{idx, persona, question, reference, ...}] (persona dict or JSON string)."""
    rows, n_skipped = common.read_jsonl_checked(path, skip_bad)
    out = []
    for lineno, row in rows:
        try:
            if "persona" not in row:
                raise DataError(f"{path}:{lineno}: field 'persona' is missing")
            ref_field = "response" if "response" in row else "reference"
            out.append({"idx": len(out), "line": lineno, "persona": row["persona"],
                        "question": common.require_field(row, "question", path, lineno),
                        "reference": common.require_field(row, ref_field, path, lineno),
                        "category": row.get("category"), "user_id": row.get("user_id")})
        except DataError:
            if not skip_bad:
                raise
            n_skipped += 1
    if 0 < limit < len(out):
        keep = sorted(random.Random(seed).sample(range(len(out)), limit))
        out = [out[i] for i in keep]
    return out, n_skipped


# ---------------------------------------------------------------------------------------------
# Judges. A pairwise judge maps items (persona, question, a, b) to P(A is better); a pointwise
# judge maps items (persona, question, response) to a score, compared afterwards.

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


def choice_token_ids(tokenizer):
    ids = []
    for letter in "AB":
        toks = tokenizer.encode(letter, add_special_tokens=False)
        if len(toks) != 1:
            print(f"warning: '{letter}' is {len(toks)} tokens for this tokenizer; using the first", file=sys.stderr)
        ids.append(toks[0])
    if ids[0] == ids[1]:
        raise ValueError("the tokenizer maps 'A' and 'B' to the same first token")
    return ids


def length_batches(lengths, token_budget):
    """Groups of indices, sorted by length, each summing to <= token_budget tokens (a longer
    sequence goes alone): packing similar lengths together keeps forwards even."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur, cur_tokens = [], [], 0
    for i in order:
        if cur and cur_tokens + lengths[i] > token_budget:
            batches.append(cur)
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += lengths[i]
    if cur:
        batches.append(cur)
    return batches


@torch.no_grad()
def last_token_logits(model, seqs):
    """Next-token logits after each sequence, [n, vocab], from one packed forward. Only the last
    position of each document goes through the output layer (the full [T, vocab] would not fit)."""
    device = next(model.parameters()).device
    input_ids, cu_seqlens = common.pack_sequences(seqs, device)
    h = model.hidden_states(input_ids, cu_seqlens)
    last = cu_seqlens[1:].long() - 1
    return model.lm_head_logits(h[0, last]).float()


@torch.no_grad()
def shared_prefix_logits(model, prefixes, suffix_groups):
    """Next-token logits after prefixes[i] + s for every suffix s in suffix_groups[i] (flattened in
    order), [n_suffixes, vocab]. Each prefix is run once: its keys/values go to the engine's KV
    cache (common.KVCache, filled by a packed prefill) and every suffix attends to them, so the two
    orders of a pair pay for the persona + question (~55% of a PersonaFeedback case) once.
    Exactly equal to running each prefix + suffix on its own (tested)."""
    cfg = model.config
    weight = model.output_weight()
    device, dtype = weight.device, weight.dtype
    plens = [len(p) for p in prefixes]
    cache = common.KVCache(cfg, len(prefixes), max(plens), device, dtype)
    cache.start_prefill(plens)
    ids, cu = common.pack_sequences(prefixes, device)
    model.hidden_states(ids, cu, cache=cache)  # fills cache.k / cache.v for every layer

    suffixes = [s for g in suffix_groups for s in g]
    owner = [i for i, g in enumerate(suffix_groups) for _ in g]
    ids, cu = common.pack_sequences(suffixes, device)
    offsets = torch.tensor([plens[i] for i in owner], device=device)
    positions = common.packed_positions(ids, cu) + torch.repeat_interleave(offsets, (cu[1:] - cu[:-1]).long())
    x = model.model.embed_tokens(ids)
    cos, sin = model.rope(positions, x.dtype)
    bounds = cu.tolist()
    # the blocks of common.Transformer, with attention over [cached prefix ; own suffix tokens]
    for layer, block in enumerate(model.model.layers):
        attn = block.self_attn
        h = block.input_layernorm(x)
        T = h.shape[1]
        q = attn.q_proj(h).view(1, T, attn.n_heads, attn.head_dim)
        k = attn.k_proj(h).view(1, T, attn.n_kv, attn.head_dim)
        v = attn.v_proj(h).view(1, T, attn.n_kv, attn.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = common.apply_rope(q, cos, sin), common.apply_rope(k, cos, sin)
        outs = []
        for j, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            p = plens[owner[j]]
            keys = torch.cat([cache.k[layer][owner[j], :p], k[0, s:e]])  # [p + L, KV, D]
            vals = torch.cat([cache.v[layer][owner[j], :p], v[0, s:e]])
            # suffix token t sees the whole prefix and suffix tokens 0..t
            mask = torch.ones(e - s, p + e - s, dtype=torch.bool, device=device).tril(diagonal=p)
            o = F.scaled_dot_product_attention(q[0, s:e].transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                               vals.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
            outs.append(o[0].transpose(0, 1))
        x = x + attn.o_proj(torch.cat(outs)[None].reshape(1, T, -1))
        x = x + block.mlp(block.post_attention_layernorm(x))
    h = model.model.norm(x)
    return model.lm_head_logits(h[0, cu[1:].long() - 1]).float()


def split_shared_prefix(seqs):
    """(prefix, suffixes): the longest common token prefix of seqs, leaving every suffix >= 1 token."""
    n = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        m = 0
        while m < n and s[m] == seqs[0][m]:
            m += 1
        n = m
    return seqs[0][:n], [s[n:] for s in seqs]


class ModelPairJudge:
    """A local causal LM asked "A or B?"; P(A) = softmax over the two choice-token log-probs.
    Items with the same persona and question (the two orders of a pair) share their prefix's KV."""

    def __init__(self, model, tokenizer, token_budget=8192, task="accuracy", share_prefix=True):
        self.model, self.tokenizer, self.token_budget, self.task = model, tokenizer, token_budget, task
        self.share_prefix = share_prefix
        self.choice_ids = choice_token_ids(tokenizer)
        self.n_tokens = 0  # tokens actually run through the model

    def __call__(self, items, desc="judge"):
        seqs = [common.chat_prompt_ids(self.tokenizer, pairwise_messages(*it, task=self.task)) for it in items]
        groups = {}  # items with the same persona + question, in order
        for i, it in enumerate(items):
            key = (common.render_persona(it[0]), it[1]) if self.share_prefix else i
            groups.setdefault(key, []).append(i)
        groups = list(groups.values())
        split = [split_shared_prefix([seqs[i] for i in g]) for g in groups]
        cost = [len(p) + sum(map(len, s)) for p, s in split]
        self.n_tokens += sum(cost)
        out = [None] * len(items)
        bar = tqdm(total=len(items), desc=desc, unit="pair", dynamic_ncols=True)
        for batch in length_batches(cost, self.token_budget):
            logits = shared_prefix_logits(self.model, [split[b][0] for b in batch], [split[b][1] for b in batch])
            logp_all = torch.log_softmax(logits, dim=-1)
            p_a = torch.softmax(logits[:, self.choice_ids], dim=-1)[:, 0]
            mass = logp_all[:, self.choice_ids].exp().sum(-1)  # how much the model wants to answer A/B at all
            for j, i in enumerate(i for b in batch for i in groups[b]):
                out[i] = {"p_a": p_a[j].item(), "choice_mass": mass[j].item(), "prompt_tokens": len(seqs[i])}
            bar.update(sum(len(groups[b]) for b in batch))
        bar.close()
        return out


def parse_choice_text(text):
    """'A' / 'B' from a judge's free text, or None. Looks for a leading letter, then 'answer: X',
    then any standalone letter."""
    text = (text or "").strip()
    for pattern in [r"^\W*([AB])\b", r"(?i:answer|choice|better|prefer)\w*\W{0,5}(?:is\W{0,5})?([AB])\b",
                    r"\b([AB])\b"]:
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return None


def endpoint_choice(response):
    """(P(A), how) from a chat-completions response: the top log-probs at the first generated token
    that is the letter A or B; else the parsed text; else (0.5, "unparsed")."""
    try:
        choice = response["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise common.EndpointError(f"response has no choices: {str(response)[:200]}") from None
    content = ((choice.get("logprobs") or {}).get("content")) or []
    for pos in content:
        tok = str(pos.get("token", "")).strip().upper()
        if tok not in ("A", "B"):
            continue
        cands = {}  # letter -> log-prob, log-sum-exp over spellings like "A" and " A"
        for c in pos.get("top_logprobs") or []:
            letter = str(c.get("token", "")).strip().upper()
            if letter in ("A", "B") and c.get("logprob") is not None:
                lp = float(c["logprob"])
                cands[letter] = lp if letter not in cands else float(np.logaddexp(cands[letter], lp))
        if tok not in cands and pos.get("logprob") is not None:
            cands[tok] = float(pos["logprob"])  # the sampled letter itself, when not listed
        listed = [float(c["logprob"]) for c in (pos.get("top_logprobs") or []) if c.get("logprob") is not None]
        floor = min(listed) if listed else -float("inf")  # an unlisted letter is below every listed one
        la, lb = cands.get("A", floor), cands.get("B", floor)
        if la == lb == -float("inf"):
            break
        return float(1.0 / (1.0 + math.exp(max(min(lb - la, 700.0), -700.0)))), "logprobs"
    letter = parse_choice_text((choice.get("message") or {}).get("content") or choice.get("text"))
    if letter is None:
        return 0.5, "unparsed"
    return (1.0 if letter == "A" else 0.0), "text"


class EndpointPairJudge:
    """An OpenAI-compatible chat-completions server as the pairwise judge (bounded concurrency;
    retries with backoff live in common.chat_completion)."""

    def __init__(self, args, task="accuracy"):
        self.args, self.task = args, task
        self.n_unparsed = 0

    def _one(self, item):
        a = self.args
        resp = common.chat_completion(a.base_url, a.endpoint_model, pairwise_messages(*item, task=self.task),
                                      temperature=0.0, max_tokens=a.endpoint_max_tokens,
                                      logprobs=not a.no_logprobs, top_logprobs=0 if a.no_logprobs else 5,
                                      timeout=a.timeout, retries=a.retries, backoff=a.backoff,
                                      api_key_env=a.api_key_env)
        p_a, how = endpoint_choice(resp)
        text = ((resp["choices"][0].get("message") or {}).get("content") or "")[:200]
        return {"p_a": p_a, "how": how, "text": text}

    def __call__(self, items, desc="judge"):
        out = common.map_concurrent(self._one, items, max_workers=self.args.concurrency, desc=desc)
        self.n_unparsed += sum(o["how"] == "unparsed" for o in out)
        return out


class GRMScorer:
    """A generative reward model (SPEC 1.1): greedy critique + scores, weighted into one reward."""

    def __init__(self, model, tokenizer, batch_size=8, max_new_tokens=512, score="expected"):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.score = score  # "expected": probability-weighted scores (common.grm_expected_scores); "parsed"
        self.n_failed = 0

    def __call__(self, items, desc="grm"):
        prompts = [common.chat_prompt_ids(self.tokenizer, common.grm_messages(*it)) for it in items]
        stop = common.stop_token_ids(self.tokenizer)
        out = [None] * len(items)
        order = sorted(range(len(items)), key=lambda i: len(prompts[i]))
        watch = common.grm_watch_ids(self.tokenizer) if self.score == "expected" else None
        for k in tqdm(range(0, len(order), self.batch_size), desc=desc, unit="batch", dynamic_ncols=True):
            batch = order[k:k + self.batch_size]
            gen = common.generate(self.model, [prompts[i] for i in batch], self.max_new_tokens,
                                  temperature=0.0, stop_ids=stop, watch_ids=watch)
            for j, i in enumerate(batch):
                text = self.tokenizer.decode(gen.tokens[j], skip_special_tokens=True)
                scores = common.parse_grm_scores(text)
                self.n_failed += scores is None
                if self.score == "expected" and scores is not None:  # from the recorded digit probabilities
                    scores = common.grm_expected_scores(self.model, self.tokenizer, prompts[i], gen.tokens[j],
                                                        watched=gen.watched[j])
                out[i] = {"score": common.grm_reward(scores), "scores": scores, "grm_output": text}
        return out


def rm_sequence_ids(tokenizer, persona, question, response):
    """The sequence a scalar RM scores, as train_grm.py --mode bt trains it (bt_ids): the persona
    prompt and the response as an assistant turn, cut after the response's end-of-turn token
    (templates may add a newline after it); the value is read at the last of these tokens."""
    messages = common.persona_messages(persona, question) + [{"role": "assistant", "content": response}]
    ids, mask = common.conversation_ids_and_mask(tokenizer, messages)
    last = max(i for i, m in enumerate(mask) if m)
    return ids[:last + 1]


class RMScorer:
    """A scalar (Bradley-Terry) reward model: value head at the last token."""

    def __init__(self, model, tokenizer, token_budget=8192):
        self.model, self.tokenizer, self.token_budget = model, tokenizer, token_budget

    @torch.no_grad()
    def __call__(self, items, desc="rm"):
        seqs = [rm_sequence_ids(self.tokenizer, *it) for it in items]
        device = next(self.model.parameters()).device
        out = [None] * len(items)
        for batch in tqdm(length_batches([len(s) for s in seqs], self.token_budget), desc=desc,
                          unit="batch", dynamic_ncols=True):
            input_ids, cu = common.pack_sequences([seqs[i] for i in batch], device)
            values = self.model.values(input_ids, cu)[0, cu[1:].long() - 1].float()
            for j, i in enumerate(batch):
                out[i] = {"score": values[j].item()}
        return out


class RubricScorer:
    """The persona world's rule-based rubric (SPEC 1.1 dimensions and weights)."""

    def __init__(self):
        from data.persona_world.rubric import rubric_judge
        self.rubric_judge = rubric_judge

    def __call__(self, items, desc="rubric"):
        out = []
        for it in tqdm(items, desc=desc, unit="resp", dynamic_ncols=True):
            critique, scores = self.rubric_judge(*it)
            out.append({"score": common.grm_reward(scores), "scores": scores})
        return out


def build_judge(args, task):
    """(kind, judge, tokenizer-or-None): kind is "pair" or "point"."""
    if args.judge == "endpoint":
        return "pair", EndpointPairJudge(args, task), None
    if args.judge == "rubric":
        return "point", RubricScorer(), None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model, tokenizer = common.load_model(args.judge_model, device=args.device, dtype=dtype,
                                         value_head=args.judge == "rm")
    model.eval()
    if args.judge == "model":
        judge = ModelPairJudge(model, tokenizer, args.token_budget, task, share_prefix=not args.no_share_prefix)
        return "pair", judge, tokenizer
    if args.judge == "grm":
        scorer = GRMScorer(model, tokenizer, args.batch_size, args.grm_max_new_tokens, args.grm_score)
        return "point", scorer, tokenizer
    return "point", RMScorer(model, tokenizer, args.token_budget), tokenizer


def score_unique(scorer, triples, desc):
    """Scores for (persona, question, response) triples, each distinct triple scored once."""
    keys, uniq = [], {}
    for t in triples:
        k = (json.dumps(t[0], ensure_ascii=False, sort_keys=True) if not isinstance(t[0], str) else t[0], t[1], t[2])
        if k not in uniq:
            uniq[k] = (len(uniq), t)
        keys.append(uniq[k][0])
    results = scorer([t for _, t in sorted(uniq.values(), key=lambda x: x[0])], desc=desc)
    return [results[i] for i in keys]


def compare_scores(s_first, s_second):
    """P(first is better) from two scores: ties count as half (SPEC 1.1 weighted scores tie often)."""
    return 1.0 if s_first > s_second else 0.0 if s_first < s_second else 0.5


# ---------------------------------------------------------------------------------------------
# Accuracy (SPEC 3)

def judge_cases(cases, kind, judge, order="both", seed=0):
    """One record per (case, order): {id, category, tier, chosen_first, p_chosen, correct, ...}.
    correct is 1 if the judge prefers chosen, 0.5 on an exact tie, else 0."""
    rng = random.Random(seed)
    views = []  # (case, chosen_first)
    for c in cases:
        if order == "both":
            views += [(c, True), (c, False)]
        else:
            views.append((c, rng.random() < 0.5))
    if kind == "pair":
        items = [(c["persona"], c["question"], *((c["chosen"], c["reject"]) if first else (c["reject"], c["chosen"])))
                 for c, first in views]
        results = judge(items, desc="judge pairs")
        p_chosen = [r["p_a"] if first else 1.0 - r["p_a"] for r, (c, first) in zip(results, views)]
    else:
        # pointwise: each response scored on its own, so the order changes nothing but the record
        triples = [(c["persona"], c["question"], c[f]) for c, _ in views for f in ("chosen", "reject")]
        scores = score_unique(judge, triples, desc="score responses")
        results = [{"score_chosen": scores[2 * k]["score"], "score_reject": scores[2 * k + 1]["score"],
                    **({"scores_chosen": scores[2 * k]["scores"], "scores_reject": scores[2 * k + 1]["scores"]}
                       if "scores" in scores[2 * k] else {})} for k in range(len(views))]
        p_chosen = [compare_scores(r["score_chosen"], r["score_reject"]) for r in results]
    records = []
    for (c, first), p, r in zip(views, p_chosen, results):
        correct = 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5
        records.append({"id": c["id"], "user_id": c["user_id"], "category": c["category"], "tier": c["tier"],
                        "chosen_first": first, "p_chosen": p, "correct": correct, **r})
    return records


def accuracy_table(records):
    """{"rows": [...], "total": ...}: accuracy (%) with counts per (category, tier), per category
    (pooled over its cases, and the mean over its tiers as the papers average), per order and total."""
    def acc(rs):
        return {"n": len(rs), "accuracy": 100.0 * sum(r["correct"] for r in rs) / len(rs) if rs else float("nan"),
                "mean_p_chosen": float(np.mean([r["p_chosen"] for r in rs])) if rs else float("nan")}
    rows = []
    for cat in ["specific", "general"]:
        cat_rs = [r for r in records if r["category"] == cat]
        if not cat_rs:
            continue
        tier_accs = []
        for tier in ["easy", "medium", "hard"]:
            rs = [r for r in cat_rs if r["tier"] == tier]
            if rs:
                rows.append({"category": cat, "tier": tier, **acc(rs)})
                tier_accs.append(rows[-1]["accuracy"])
        rows.append({"category": cat, "tier": "all", **acc(cat_rs), "tier_mean": float(np.mean(tier_accs))})
    total = {"category": "total", "tier": "all", **acc(records),
             "tier_mean": float(np.mean([r["accuracy"] for r in rows if r["tier"] != "all"]))}
    by_order = {"chosen_first": acc([r for r in records if r["chosen_first"]]),
                "chosen_second": acc([r for r in records if not r["chosen_first"]])}
    return {"rows": rows, "total": total, "by_order": by_order}


def accuracy_markdown(table, title):
    lines = [f"### {title}", "", "| category | tier | judgments | accuracy % | mean P(chosen) |",
             "|---|---|---:|---:|---:|"]
    for r in [*table["rows"], table["total"]]:
        extra = f" (tier mean {r['tier_mean']:.1f})" if "tier_mean" in r else ""
        lines.append(f"| {r['category']} | {r['tier']} | {r['n']} | {r['accuracy']:.1f}{extra} | {r['mean_p_chosen']:.3f} |")
    bo = table["by_order"]
    lines += ["", f"Chosen shown first: {bo['chosen_first']['accuracy']:.1f}% (n={bo['chosen_first']['n']}); "
                  f"shown second: {bo['chosen_second']['accuracy']:.1f}% (n={bo['chosen_second']['n']})."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Length-controlled win rate (SPEC 1.4, AlpacaEval length_controlled_minimal)

def _logistic_loss(w, X, y, l2):
    z = X @ w
    return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * (w @ w))


def fit_length_logistic(p_win, len_model, len_ref, l2=1e-4, iters=100):
    """(theta, phi) maximising sum_i y_i log s_i + (1-y_i) log(1-s_i), s_i = sigmoid(theta + phi x_i),
    x_i = tanh(dlen_i / std(dlen)), by Newton's method (IRLS) with a backtracking line search.
    y may be soft (judge probabilities) or hard (0, 0.5, 1). The tiny ridge l2 keeps the fit
    finite when every judgment goes one way."""
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
    lcs, raws = [], []
    for _ in range(n_boot):
        i = rng.integers(0, len(p), len(p))
        r = length_controlled_winrate(p[i], lm[i], lr[i])
        lcs.append(r["lc_winrate"])
        raws.append(r["winrate"])
    q = [50 * (1 - level), 100 - 50 * (1 - level)]
    return {"lc_winrate": tuple(float(v) for v in np.percentile(lcs, q)),
            "winrate": tuple(float(v) for v in np.percentile(raws, q))}


# ---------------------------------------------------------------------------------------------
# Policy answers (SPEC 1.4 sampling: temperature 0.8, top-p 0.9)

def generate_answers(model, tokenizer, rows, args):
    prompts = [common.chat_prompt_ids(tokenizer, common.persona_messages(r["persona"], r["question"])) for r in rows]
    stop = set(common.stop_token_ids(tokenizer))
    answers = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    for b, k in enumerate(tqdm(range(0, len(order), args.batch_size), desc="policy answers", unit="batch",
                               dynamic_ncols=True)):
        batch = order[k:k + args.batch_size]
        gen = common.generate(model, [prompts[i] for i in batch], args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, stop_ids=sorted(stop),
                              seed=args.seed * 100003 + b)
        for j, i in enumerate(batch):
            toks = gen.tokens[j]
            if toks and toks[-1] in stop:
                toks = toks[:-1]
            answers[i] = {"idx": rows[i]["idx"], "question": rows[i]["question"],
                          "answer": tokenizer.decode(toks, skip_special_tokens=True).strip(),
                          "answer_tokens": len(toks), "stopped": bool(gen.stopped[j])}
    return answers


# ---------------------------------------------------------------------------------------------
# Main

def write_outputs(out_dir, name, judgments, summary, markdown):
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_jsonl(out_dir / f"{name}_judgments.jsonl", judgments)
    (out_dir / f"{name}_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (out_dir / f"{name}_summary.md").write_text(markdown)
    metrics = common.MetricsLogger(out_dir / "metrics.jsonl")
    metrics.log({"stage": f"eval_{name}", **{k: v for k, v in summary.items() if isinstance(v, (int, float, str))}})
    metrics.close()


def judge_description(args):
    if args.judge == "endpoint":
        return f"endpoint {args.endpoint_model} @ {args.base_url}"
    if args.judge == "rubric":
        return "rubric"
    return f"{args.judge} {args.judge_model}"


def run_accuracy(args):
    t0 = time.time()
    cats, tiers = [c.strip() for c in args.categories.split(",")], [t.strip() for t in args.tiers.split(",")]
    cases, n_skipped = load_personafeedback(args.data, cats, tiers, args.split, args.skip_bad)
    cases = sample_per_tier(cases, args.per_tier, args.seed)
    if not cases:
        raise DataError(f"{args.data}: no cases for categories {cats} and tiers {tiers}")
    print(f"{len(cases)} cases ({n_skipped} lines skipped) from {args.data}; judge: {judge_description(args)}")
    kind, judge, _ = build_judge(args, "accuracy")
    t1 = time.time()
    records = judge_cases(cases, kind, judge, args.order, args.seed)
    t_judge = time.time() - t1
    table = accuracy_table(records)
    summary = {"judge": judge_description(args), "data": str(args.data), "order": args.order, "seed": args.seed,
               "per_tier": args.per_tier, "n_cases": len(cases), "n_judgments": len(records),
               "n_skipped_lines": n_skipped, "accuracy": table["total"]["accuracy"],
               "tier_mean_accuracy": table["total"]["tier_mean"], "table": table,
               "judge_seconds": t_judge, "total_seconds": time.time() - t0,
               "cases_per_second": len(cases) / max(t_judge, 1e-9), "device": args.device, "dtype": args.dtype}
    if isinstance(judge, ModelPairJudge):
        summary["prompt_tokens"] = judge.n_tokens
    if isinstance(judge, GRMScorer):
        summary["grm_parse_failures"] = judge.n_failed
    if isinstance(judge, EndpointPairJudge):
        summary["endpoint_unparsed"] = judge.n_unparsed
    md = accuracy_markdown(table, f"PersonaFeedback accuracy: {summary['judge']} ({args.order} orders, "
                                  f"{len(cases)} cases)")
    md += (f"\n{len(cases)} cases judged in {t_judge:.0f} s ({summary['cases_per_second']:.3g} cases/s, "
           f"{t_judge / len(cases):.1f} s/case, {args.device}, {args.dtype}).\n")
    write_outputs(Path(args.out), "accuracy", records, summary, md)
    print(md)
    print(f"wrote {args.out}/accuracy_judgments.jsonl, accuracy_summary.json, accuracy_summary.md")
    return summary


def run_winrate(args):
    t0 = time.time()
    rows, n_skipped = load_eval_rows(args.eval_file, args.limit, args.seed, args.skip_bad)
    if not rows:
        raise DataError(f"{args.eval_file}: no questions")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{len(rows)} questions ({n_skipped} lines skipped) from {args.eval_file}")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    policy, tokenizer = None, None
    if args.answers:
        by_idx = {r["idx"]: r for _, r in common.read_jsonl(args.answers)}
        answers = []
        for r in rows:
            a = by_idx.get(r["idx"])
            if a is None or a["question"] != r["question"]:
                raise DataError(f"{args.answers}: no answer for question {r['idx']} of {args.eval_file}")
            answers.append(a)
    else:
        policy, tokenizer = common.load_model(args.policy, device=args.device, dtype=dtype)
        policy.eval()
        answers = generate_answers(policy, tokenizer, rows, args)
        common.write_jsonl(out_dir / "winrate_answers.jsonl", answers)
        del policy
    t_gen = time.time() - t0

    # Judge: each answer against the reference; pairwise judges see a seeded random side.
    t1 = time.time()
    kind, judge, judge_tok = build_judge(args, "winrate")
    tokenizer = tokenizer or judge_tok
    rng = random.Random(args.seed)
    model_is_a = [rng.random() < 0.5 for _ in rows]
    if kind == "pair":
        items = [(r["persona"], r["question"], *((a["answer"], r["reference"]) if ma else (r["reference"], a["answer"])))
                 for r, a, ma in zip(rows, answers, model_is_a)]
        results = judge(items, desc="judge answers")
        p_win = [res["p_a"] if ma else 1.0 - res["p_a"] for res, ma in zip(results, model_is_a)]
    else:
        triples = [(r["persona"], r["question"], x) for r, a in zip(rows, answers) for x in (a["answer"], r["reference"])]
        scores = score_unique(judge, triples, desc="score answers")
        results = [{"score_model": scores[2 * k]["score"], "score_reference": scores[2 * k + 1]["score"]}
                   for k in range(len(rows))]
        p_win = [compare_scores(res["score_model"], res["score_reference"]) for res in results]
        model_is_a = [None] * len(rows)
    t_judge = time.time() - t1

    len_model = [len(a["answer"]) for a in answers]
    len_ref = [len(r["reference"]) for r in rows]
    lc = length_controlled_winrate(p_win, len_model, len_ref)
    ci = bootstrap_ci(p_win, len_model, len_ref, args.bootstrap, args.seed)
    tok_model = tok_ref = None
    if tokenizer is not None:
        tok_model = float(np.mean([len(tokenizer.encode(a["answer"], add_special_tokens=False)) for a in answers]))
        tok_ref = float(np.mean([len(tokenizer.encode(r["reference"], add_special_tokens=False)) for r in rows]))
    judgments = [{"idx": r["idx"], "question": r["question"], "answer": a["answer"], "reference": r["reference"],
                  "model_is_a": ma, "p_model_wins": p, "len_answer": lm, "len_reference": lr, **res}
                 for r, a, ma, p, lm, lr, res in zip(rows, answers, model_is_a, p_win, len_model, len_ref, results)]
    summary = {"policy": args.answers or args.policy, "eval_file": str(args.eval_file), "judge": judge_description(args),
               "n": len(rows), "n_skipped_lines": n_skipped, **lc,
               "lc_ci95": list(ci["lc_winrate"]), "winrate_ci95": list(ci["winrate"]),
               "mean_len_chars_model": float(np.mean(len_model)), "mean_len_chars_reference": float(np.mean(len_ref)),
               "mean_len_tokens_model": tok_model, "mean_len_tokens_reference": tok_ref,
               "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
               "seed": args.seed, "generate_seconds": t_gen, "judge_seconds": t_judge,
               "cases_per_second": len(rows) / max(time.time() - t0, 1e-9), "device": args.device, "dtype": args.dtype}
    if isinstance(judge, GRMScorer):
        summary["grm_parse_failures"] = judge.n_failed
    if isinstance(judge, EndpointPairJudge):
        summary["endpoint_unparsed"] = judge.n_unparsed
    fmt_tok = lambda v: "-" if v is None else f"{v:.0f}"
    md = (f"### Length-controlled win rate vs reference ({Path(args.eval_file).name})\n\n"
          "| policy | judge | n | LC win rate % (95% CI) | raw win rate % (95% CI) "
          "| mean length chars / tokens: policy | reference |\n"
          "|---|---|---:|---:|---:|---:|---:|\n"
          f"| {summary['policy']} | {summary['judge']} | {len(rows)} | {lc['lc_winrate']:.1f} "
          f"({ci['lc_winrate'][0]:.1f}-{ci['lc_winrate'][1]:.1f}) | {lc['winrate']:.1f} "
          f"({ci['winrate'][0]:.1f}-{ci['winrate'][1]:.1f}) | {np.mean(len_model):.0f} / {fmt_tok(tok_model)} | "
          f"{np.mean(len_ref):.0f} / {fmt_tok(tok_ref)} |\n\n"
          f"Fit: theta {lc['theta']:.3f}, phi {lc['phi']:.3f}. Generation {t_gen:.0f} s, judging {t_judge:.0f} s "
          f"({summary['cases_per_second']:.3g} questions/s overall, {args.device}, {args.dtype}).\n")
    write_outputs(out_dir, "winrate", judgments, summary, md)
    print(md)
    print(f"wrote {args.out}/winrate_judgments.jsonl, winrate_summary.json, winrate_summary.md")
    return summary


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cmd == "accuracy":
        return run_accuracy(args)
    return run_winrate(args)


if __name__ == "__main__":
    main()
