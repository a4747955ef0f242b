"""MiCoTA: Mid-CoT Teacher Assistant distillation (SPEC 2; arXiv 2507.01887).

A large reasoning teacher writes long chain-of-thought (CoT) that small students learn poorly from.
A teacher assistant (TA) of intermediate size is fine-tuned on the long CoT, then merged with its own
pre-fine-tune weights by DARE-TIES; the merged TA writes CoT about half as long, and the student is
distilled from that "mid" CoT instead. Steps (each runs alone; `all` chains them in SPEC order):

  synth     the offline problem set data/gsm_synth/{train,test}.jsonl (seeded word problems)
  generate  CoT per problem, SPEC 2.1 prompt, greedy, --max-new-tokens cap (SPEC 2.1 teacher, 2.4
            merged TA); a local checkpoint or an OpenAI-compatible endpoint (--url: vLLM); resumable
  filter    keep answers that match the reference and stopped within the cap (SPEC 2.1, 2.4); kept
            rows carry "messages" (user: the prompt, assistant: the CoT), which sft.py trains on
  (sft.py)  the fine-tunes (loss on the CoT): TA on long CoT (SPEC 2.2), student on mid CoT (2.5)
  merge     DARE-TIES of the TA before and after its fine-tune (SPEC 2.3), HF-format output
  eval      accuracy and mean length per benchmark file and on average (SPEC 2.6)
  nll       the student's mean per-token NLL of each CoT set's responses (SPEC 2.7)

CPU demo (2 cores, minutes): `python distill_micota.py all` runs every step (sft.py in a subprocess)
on 32 seeded word problems with the embedded SmolLM2-135M-Instruct as teacher, TA and student, into
out/micota. It shows the mechanics, not the paper's effect: a 135M model is no reasoning teacher and
almost never writes \\boxed{}, so GSM8K-style answers fall back to the last number unless --strict.

Real configuration (32B teacher served by vLLM, 14B TA, 3B student; one node with 8 GPUs):
  vllm serve deepseek-ai/DeepSeek-R1-Distill-Qwen-32B --tensor-parallel-size 8 --max-model-len 20000
  python distill_micota.py generate --url http://localhost:8000/v1 --api-model \\
      deepseek-ai/DeepSeek-R1-Distill-Qwen-32B --problems math_train.jsonl --max-new-tokens 16384 \\
      --workers 64 --output out/micota/long_raw.jsonl
  python distill_micota.py filter --strict --max-cot-tokens 16384 --data out/micota/long_raw.jsonl \\
      --output out/micota/long.jsonl
  torchrun --standalone --nproc_per_node 8 sft.py --model Qwen/Qwen2.5-14B-Instruct \\
      --data out/micota/long.jsonl --out out/micota/ta_sft --max-samples 0 --eval-frac 0 --lr 1e-5 \\
      --epochs 2 --global-batch 64 --max-len 16896 --token-budget 16896 --precision bf16-mixed --checkpointing
  python distill_micota.py merge --base Qwen/Qwen2.5-14B-Instruct --finetuned out/micota/ta_sft \\
      --density 0.5 --weight 1.0 --dtype bfloat16 --output out/micota/ta_merged
  vllm serve out/micota/ta_merged --tensor-parallel-size 8 --served-model-name ta_merged
  python distill_micota.py generate --chat on --url http://localhost:8000/v1 --api-model ta_merged \\
      --problems math_train.jsonl --max-new-tokens 16384 --workers 64 --output out/micota/mid_raw.jsonl
  python distill_micota.py filter --strict --max-cot-tokens 16384 --data out/micota/mid_raw.jsonl \\
      --output out/micota/mid.jsonl
  python distill_micota.py nll --model Qwen/Qwen2.5-3B-Instruct --token-budget 32768 \\
      --data out/micota/long.jsonl out/micota/mid.jsonl
  torchrun --standalone --nproc_per_node 8 sft.py --model Qwen/Qwen2.5-3B-Instruct \\
      --data out/micota/mid.jsonl --out out/micota/student_sft --max-samples 0 --eval-frac 0 --lr 1e-5 \\
      --epochs 2 --global-batch 64 --max-len 16896 --token-budget 16896 --precision bf16-mixed --checkpointing
  vllm serve out/micota/student_sft --tensor-parallel-size 8 --served-model-name student
  python distill_micota.py eval --strict --url http://localhost:8000/v1 --api-model student \\
      --eval-max-new-tokens 16384 --eval-files gsm8k_test.jsonl aime24.jsonl amc23.jsonl \\
      olympiadbench.jsonl math500.jsonl
A 7B student: the same with Qwen/Qwen2.5-7B-Instruct. The endpoint key is read from $OPENAI_API_KEY
(--api-key-env). Every step writes <out>/<step>_summary.json and a line of <out>/metrics.jsonl.
"""
import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import zlib
from fractions import Fraction
from pathlib import Path

import torch
from tqdm import tqdm

from common import (DEFAULT_MODEL, DataError, append_jsonl, chat_completion, chat_prompt_ids,
                    conversation_ids_and_mask, drop_torn_tail, endpoint_request, generate, json_clean,
                    load_model, main_guard, map_concurrent, micro_batches, read_jsonl, response_logprobs,
                    save_model, stop_token_ids, write_jsonl)

REPO = Path(__file__).resolve().parent
SYNTH_DIR = REPO / "data" / "gsm_synth"
STEPS = ["synth", "generate", "filter", "merge", "eval", "nll", "all"]
# sft.py flags of both fine-tunes in `all`: SPEC 2.5's recipe (lr 1e-5, cosine) at CPU-demo sizes
# (every kept sample is trained on: no held-out fraction, no sample cap)
SFT_RECIPE = ["--max-samples", "0", "--eval-frac", "0", "--lr", "1e-5", "--epochs", "1", "--global-batch", "8",
              "--max-len", "1024", "--token-budget", "1024", "--weight-decay", "0", "--save-every", "0"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("step", choices=STEPS, help="which step to run (`all` chains them)")
    p.add_argument("--out", default="out/micota", help="output folder (default paths, summaries, metrics.jsonl)")
    p.add_argument("--output", default=None, help="output file/folder of a single step (default: a name in --out)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and the DARE masks")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights dtype of local models (auto: bf16 on CUDA, fp32 on CPU)")
    # data
    p.add_argument("--problems", default=str(SYNTH_DIR / "train.jsonl"),
                   help="problem JSONL of generate/all (GSM8K, MATH, AIME, AMC, OlympiadBench layouts)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N problems per file (0 = all)")
    p.add_argument("--data", nargs="+", default=None, help="input JSONL: raw CoT (filter), kept CoT (nll)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad JSONL lines instead of stopping")
    p.add_argument("--n-train", type=int, default=32, help="synth: number of training problems")
    p.add_argument("--n-test", type=int, default=32, help="synth: number of test problems")
    # models and endpoints
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint of generate/eval/nll")
    p.add_argument("--teacher", default=DEFAULT_MODEL, help="all: teacher checkpoint (long CoT)")
    p.add_argument("--ta", default=DEFAULT_MODEL, help="all: teacher-assistant checkpoint")
    p.add_argument("--student", default=DEFAULT_MODEL, help="all: student checkpoint")
    p.add_argument("--url", default=None, help="OpenAI-compatible base URL (http://localhost:8000/v1): "
                   "generate/eval through it, not a local checkpoint (in `all`: the teacher only)")
    p.add_argument("--api-model", default=None, help="model name the endpoint serves (needed with --url)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--workers", type=int, default=16, help="concurrent endpoint requests")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per endpoint request")
    p.add_argument("--retries", type=int, default=3, help="retries of a failed request (timeouts, 429, 5xx)")
    # generation
    p.add_argument("--chat", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="generate (teacher): chat template on, or off (the raw SPEC 2.1 prompt, for reasoning "
                   "teachers); auto: on for the embedded default (it rambles on the raw prompt), else off. "
                   "The merged TA in `all` and eval always use it")
    p.add_argument("--max-new-tokens", type=int, default=256, help="new-token cap of generate (teacher)")
    p.add_argument("--mid-max-new-tokens", type=int, default=192, help="all: new-token cap of the merged TA")
    p.add_argument("--eval-max-new-tokens", type=int, default=256, help="new-token cap of eval")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (SPEC 2.1, 2.6)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per local generate call")
    # filter, fine-tunes, merge, nll, eval
    p.add_argument("--max-cot-tokens", type=int, default=0,
                   help="drop samples with more response tokens (0 = only drop those that hit the cap)")
    p.add_argument("--strict", action="store_true", help="filter/eval: only \\boxed{} (and GSM8K '#### N') "
                   "answers count (SPEC 2.6); else GSM8K-style problems fall back to the response's last number")
    p.add_argument("--sft-args", default="", help="all: sft.py flags for both fine-tunes, after "
                   f"{' '.join(SFT_RECIPE)}; e.g. --sft-args=\"--epochs 2 --overwrite\"")
    p.add_argument("--base", default=DEFAULT_MODEL, help="merge: the TA before fine-tuning")
    p.add_argument("--finetuned", nargs="+", default=None, help="merge: fine-tuned checkpoint(s)")
    p.add_argument("--density", type=float, default=0.5, help="DARE: fraction of delta entries kept, in (0, 1]")
    p.add_argument("--weight", type=float, default=1.0, help="scale of the merged task vector")
    p.add_argument("--token-budget", type=int, default=4096, help="nll: tokens per packed forward pass")
    p.add_argument("--eval-files", nargs="+", default=[str(SYNTH_DIR / "test.jsonl")],
                   help="benchmark JSONL files; the set name is the file stem")
    args = p.parse_args(argv)
    for flag, ok, rule in [  # every number is checked before any model loads
            ("limit", args.limit >= 0, ">= 0"), ("n-train", args.n_train >= 1, ">= 1"),
            ("n-test", args.n_test >= 1, ">= 1"), ("workers", args.workers >= 1, ">= 1"),
            ("timeout", args.timeout > 0, "> 0"), ("retries", args.retries >= 0, ">= 0"),
            ("max-new-tokens", args.max_new_tokens >= 1, ">= 1"),
            ("mid-max-new-tokens", args.mid_max_new_tokens >= 1, ">= 1"),
            ("eval-max-new-tokens", args.eval_max_new_tokens >= 1, ">= 1"),
            ("temperature", args.temperature >= 0, ">= 0 (0 = greedy)"), ("batch-size", args.batch_size >= 1, ">= 1"),
            ("max-cot-tokens", args.max_cot_tokens >= 0, ">= 0"), ("density", 0 < args.density <= 1, "in (0, 1]"),
            ("weight", math.isfinite(args.weight), "a finite number"),
            ("token-budget", args.token_budget >= 1, ">= 1")]:
        if not ok:
            p.error(f"--{flag} must be {rule}, got {getattr(args, flag.replace('-', '_'))}")
    if args.url and not args.api_model:
        p.error("--url needs --api-model (the model name the endpoint serves)")
    if args.step == "all" and args.output:
        p.error("--output names the output of one step; `all` writes into --out")
    if args.step == "merge" and not args.finetuned:
        p.error("merge needs --finetuned (the fine-tuned checkpoint folder)")
    if len({Path(f).stem for f in args.eval_files}) < len(args.eval_files):
        p.error("--eval-files: two files have the same stem (the set name)")
    try:
        args.sft_args = shlex.split(args.sft_args)
    except ValueError as e:
        p.error(f"--sft-args: {e}")
    return args


# ---- the offline problem set ----------------------------------------------------------------
# GSM8K-shaped records ({"id", "question", "answer": worked solution ending "#### N"}) from a
# seeded generator, small numbers so that a 135M model solves some (the filter must keep something).

NAMES = ["Ava", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jack", "Kemi", "Liam"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "cards", "stamps"]


def synth_problem(rng):
    """One word problem -> (question, worked solution, integer answer)."""
    n, it, kind = rng.choice(NAMES), rng.choice(ITEMS), rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return f"{n} has {a} {it}. {n} buys {b} more {it}. How many {it} does {n} have now?", \
            f"{a} + {b} = {a + b}", a + b
    if kind == 1:
        a = rng.randint(5, 15)
        b = rng.randint(1, a - 1)
        return f"{n} had {a} {it} and gave {b} of them to a friend. How many {it} does {n} have left?", \
            f"{a} - {b} = {a - b}", a - b
    if kind == 2:
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        return f"{n} buys {a} bags of {it}. Each bag holds {b} {it}. How many {it} does {n} buy in total?", \
            f"{a} * {b} = {a * b}", a * b
    if kind == 3:
        b, q = rng.randint(2, 4), rng.randint(2, 5)
        return f"{n} shares {b * q} {it} equally among {b} friends. How many {it} does each friend get?", \
            f"{b * q} / {b} = {q}", q
    if kind == 4:
        a, b = rng.randint(2, 9), rng.randint(1, 5)
        c = rng.randint(1, a + b - 1)
        return f"{n} has {a} {it}, buys {b} more, and then gives {c} away. How many {it} does {n} have now?", \
            f"{a} + {b} = {a + b}\n{a + b} - {c} = {a + b - c}", a + b - c
    a, b = rng.randint(1, 5), rng.randint(2, 3)
    c = 10 * ((a * b) // 10 + 1)
    return f"A notebook costs ${a}. {n} buys {b} notebooks and pays with ${c}. How much change does {n} " \
        f"get, in dollars?", f"{a} * {b} = {a * b}\n{c} - {a * b} = {c - a * b}", c - a * b


def synth_rows(n, seed, prefix):
    import random
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q, sol, ans = synth_problem(rng)
        rows.append({"id": f"{prefix}-{i}", "question": q, "answer": f"{sol}\n#### {ans}"})
    return rows


# ---- answers: extraction and MATH-style normalisation (SPEC 2.1, 2.6) -------------------------

def last_boxed_answer(text):
    r"""Content of the last \boxed{...} (or \fbox{...}) in text, braces matched; None if absent
    or unbalanced (a response cut off inside its box has no answer). Handles "\boxed 5" too."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    rest = text[i + (6 if text.startswith("\\boxed", i) else 5):]
    if rest.startswith(" "):
        m = re.match(r"\s+([^\s$]+)", rest)
        return m.group(1) if m else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for k, ch in enumerate(rest):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return rest[1:k]
    return None


def gsm8k_reference(answer):
    """The number after the last '####' of a GSM8K answer."""
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def extract_answer(response, kind, last_number=False):
    r"""The model's final answer: the last non-empty \boxed{}; for GSM8K problems also a
    '#### N' line and, with last_number, the last number in the response (lm-eval's "flexible
    extract", for small models that never box; SPEC 2.6 scoring is boxed-only: --strict)."""
    boxed = last_boxed_answer(response)
    if boxed is not None and boxed.strip():
        return boxed
    if kind != "gsm8k":
        return None
    found = re.findall(r"####\s*\$?\s*(-?[\d,]*\.?\d+)", response)
    if not found and last_number:
        found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", response)
    return found[-1].rstrip(",") if found else None


UNIT_TAIL = re.compile(r"^(-?[\d.,/]+|-?\\frac\{\d+\}\{\d+\})\s*(?:[a-zA-Z]{2,}|[a-zA-Z]{2,}/[a-zA-Z]+)"
                       r"(?:\s+[a-zA-Z]{2,})*(?:\^[23]|\^\{[23]\})?$")


def normalize_math_answer(answer):
    r"""MATH-style normal form of an answer string (SPEC 2.1). In order: drop newlines and LaTeX
    spacing; tfrac/dfrac -> frac; drop \left \right, degree signs, $ and % signs, \text{} wrappers,
    a unit word after a number ("5 cm", "18 dollars"), a trailing period, a short "x =" prefix and
    all spaces; \sqrt2 -> \sqrt{2}, \frac12 -> \frac{1}{2}; "1,000" -> "1000"; numbers lose leading
    zeros and trailing ".0" (".5" -> "0.5", "025" -> "25", "2.50" -> "2.5"); "0.5" -> \frac{1}{2};
    "a/b" -> \frac{a}{b}."""
    s = str(answer).strip().replace("\n", "").replace("\\!", "")
    s = re.sub(r"\\(?:,|;|:|quad|qquad)", "", s).replace("\\ ", " ")
    s = s.replace("\\\\", "\\").replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    s = s.replace("\\circ", "").replace("\\degree", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}", r"\1", s).strip()
    m = UNIT_TAIL.match(s)
    if m:
        s = m.group(1)
    s = s.rstrip(".").strip()
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1]
    s = s.replace(" ", "")
    s = re.sub(r"\\sqrt([^{\\])", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac([^{\\]|\{[^{}]*\})([^{\\]|\{[^{}]*\})",
               lambda m: "\\frac" + "".join(g if g.startswith("{") else "{" + g + "}" for g in m.groups()), s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", s):
        sign, s = ("-", s[1:]) if s.startswith("-") else ("", s)
        whole, _, frac = s.partition(".")
        whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
        s = sign + whole + ("." + frac if frac else "")
        s = "0" if s == "-0" else s
    if s == "0.5":
        s = "\\frac{1}{2}"
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    return s


def _as_number(s):
    """A normalised answer as an exact Fraction (integer, decimal, \\frac{a}{b}), else None."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}", s)
    if m:
        return None if int(m.group(3)) == 0 else Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1)
    if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", s):
        return Fraction(s)
    return None


SYMPY_TIMEOUT_S = 2  # per math-verify parse or comparison; signal.alarm counts whole seconds


def symbolic_match(pred, ref):
    r"""math-verify's verdict (Hugging Face's sympy-based grader, SPEC 2.6): radicals, powers, mixed
    numbers, reordered or factored expressions, sets, intervals, tuples, choice letters. Both sides
    go in as \boxed{...}, so it reads the answer we extracted (the last box) and nothing else. Its
    timeouts use signal.alarm, which works only on the main thread; off it, sympy would run
    unguarded, so there the fast path's verdict (no match) stands, with a warning."""
    if threading.current_thread() is not threading.main_thread():
        import warnings
        warnings.warn("answers_match off the main thread: no sympy timeout there, so no symbolic grading",
                      RuntimeWarning)
        return False
    from math_verify import parse, verify  # here, not at the top: only MATH-style answers need sympy
    gold = parse(f"\\boxed{{{ref}}}", parsing_timeout=SYMPY_TIMEOUT_S)
    return verify(gold, parse(f"\\boxed{{{pred}}}", parsing_timeout=SYMPY_TIMEOUT_S),
                  timeout_seconds=SYMPY_TIMEOUT_S)


def answers_match(pred, ref):
    r"""Is the extracted answer right (SPEC 2.6)? Fast path without sympy: equal after normalisation,
    or the same rational value (0.5 = \frac12 = 1/2); two different integers (GSM8K, AIME, AMC) are
    simply different. Anything else goes to math-verify (symbolic_match)."""
    if pred is None or ref is None:
        return False
    p, r = normalize_math_answer(pred), normalize_math_answer(ref)
    pv, rv = _as_number(p), _as_number(r)
    if p == r or (pv is not None and pv == rv):
        return True
    if pv is not None and rv is not None and pv.denominator == rv.denominator == 1:
        return False
    return symbolic_match(pred, ref)


# ---- problem files --------------------------------------------------------------------------

def load_problems(path, limit=0):
    """Problems of any supported layout -> [{"id", "problem", "reference", "kind"}].
    Text: 'problem' or 'question' (OlympiadBench 'context' is prepended). Reference: 'answer'
    ending '#### N' (GSM8K, kind "gsm8k"); 'answer' as a string or number (MATH-500, AIME24,
    AMC23); 'final_answer' list (OlympiadBench, joined by ','); else the last \\boxed{} of
    'solution' (MATH train). Anything else is a DataError naming file, line and fields."""
    rows, _ = read_jsonl(path)
    out, seen = [], set()
    for lineno, r in rows[:limit or None]:
        text = r.get("problem") or r.get("question")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{lineno}: field 'problem' or 'question' missing or not a non-empty "
                            f"string (fields: {sorted(r)})")
        if isinstance(r.get("context"), str) and r["context"].strip():
            text = f"{r['context'].strip()}\n\n{text}"
        ans, final = r.get("answer"), r.get("final_answer")
        kind = "math"
        if isinstance(ans, str) and "####" in ans:
            kind, ref = "gsm8k", gsm8k_reference(ans)
        elif isinstance(ans, (str, int, float)) and not isinstance(ans, bool) and str(ans).strip():
            ref = str(ans)
        elif isinstance(final, list) and final and all(isinstance(x, (str, int, float)) for x in final):
            ref = ",".join(str(x) for x in final)
        elif isinstance(final, (str, int, float)) and str(final).strip():
            ref = str(final)
        elif isinstance(r.get("solution"), str) and last_boxed_answer(r["solution"]) is not None:
            ref = last_boxed_answer(r["solution"])
        else:
            raise DataError(f"{path}:{lineno}: no reference answer: expected field 'answer' (GSM8K "
                            f"'... #### N', MATH-500, AIME, AMC), 'final_answer' (OlympiadBench) or "
                            f"'solution' with \\boxed{{}} (fields: {sorted(r)})")
        pid = str(r["id"]) if r.get("id") is not None else f"{Path(path).stem}-{lineno}"
        if pid in seen:
            raise DataError(f"{path}:{lineno}: duplicate id {pid!r} (ids key resumable outputs)")
        seen.add(pid)
        out.append({"id": pid, "problem": text.strip(), "reference": ref, "kind": kind})
    if not out:
        raise DataError(f"{path}: no problems")
    return out


INSTRUCTION = "Solve the problem step by step, then write the final answer inside \\boxed{}."


def problem_prompt(problem):
    """SPEC 2.1: the problem, then the instruction to reason step by step and box the answer."""
    return f"{problem}\n{INSTRUCTION}"


def cot_messages(row):
    """A CoT sample as a conversation (SFT and NLL use the chat template, like eval)."""
    return [{"role": "user", "content": problem_prompt(row["problem"])},
            {"role": "assistant", "content": row["response"]}]


# ---- step: generate (SPEC 2.1 teacher, 2.4 merged TA; also the engine of eval) ---------------

def ask_endpoint(args, url, prompt, chat, max_new_tokens):
    """One answer from an OpenAI-compatible server -> (text, n_tokens, stopped): /chat/completions
    with the chat template, else /completions with the raw SPEC 2.1 prompt. Sampling parameters
    are always sent (vLLM would fill them from the model's generation_config.json)."""
    if chat:
        res = chat_completion(url, args.api_model, [{"role": "user", "content": prompt}], temperature=args.temperature,
                              max_tokens=max_new_tokens, timeout=args.timeout, retries=args.retries,
                              api_key_env=args.api_key_env)
        text = res["choices"][0]["message"].get("content") or ""
    else:
        body = {"model": args.api_model, "prompt": prompt + "\n", "max_tokens": max_new_tokens,
                "temperature": args.temperature, "top_p": 1.0}
        res = endpoint_request(url, "/completions", body, args.timeout, args.retries, 1.0, args.api_key_env)
        text = res["choices"][0].get("text") or ""
    n_tokens = (res.get("usage") or {}).get("completion_tokens", len(text.split()))
    return text, n_tokens, res["choices"][0].get("finish_reason") == "stop"


def generate_cot(args, problems, out_path, model_name, chat, max_new_tokens, url=None):
    """Answer every problem that out_path holds no row for, appending one row per answer: {id,
    problem, reference, kind, response, n_tokens, stopped, model}. Returns (the rows of `problems`
    in order, summary). Resuming after a kill: a last line cut mid-write is dropped first; any other
    bad line stops the run naming file and line, or with --skip-bad is counted, and its problem is
    answered again only if no valid row has its id (so no id is ever there twice)."""
    out_path = Path(out_path)
    drop_torn_tail(out_path)
    rows, bad = read_cot([out_path], ("id", "response"), args.skip_bad) if out_path.exists() else ([], [])
    done = {r["id"]: r for r in rows}
    todo = [p for p in problems if p["id"] not in done]
    print(f"generate -> {out_path}: {len(problems) - len(todo)} done, {len(todo)} to go ({url or model_name}, "
          f"chat template {'on' if chat else 'off'})" + (f"; {len(bad)} bad lines skipped: {bad[0]}" if bad else ""))
    source, lock = (args.api_model if url else str(model_name)), threading.Lock()

    def record(p, response, n_tokens, stopped):
        with lock:
            done[p["id"]] = {**p, "response": response, "n_tokens": n_tokens, "stopped": stopped, "model": source}
            append_jsonl(out_path, done[p["id"]])

    def ask(p):
        record(p, *ask_endpoint(args, url, problem_prompt(p["problem"]), chat, max_new_tokens))

    if todo and url:
        map_concurrent(ask, todo, args.workers, "generate")
    elif todo:
        model, tok = load_model(model_name, args.device, args.torch_dtype)
        for i in tqdm(range(0, len(todo), args.batch_size), desc="generate"):
            batch = todo[i:i + args.batch_size]
            prompts = [chat_prompt_ids(tok, [{"role": "user", "content": problem_prompt(p["problem"])}])
                       if chat else tok(problem_prompt(p["problem"]) + "\n")["input_ids"] for p in batch]
            g = generate(model, prompts, max_new_tokens, temperature=args.temperature, stop_ids=stop_token_ids(tok),
                         seed=args.seed + i)
            for p, toks, stopped in zip(batch, g.tokens, g.stopped):
                record(p, tok.decode(toks[:-1] if stopped else toks, skip_special_tokens=True), len(toks), stopped)
    rows = [done[p["id"]] for p in problems]
    return rows, {"rows": len(rows), "bad_lines": len(bad), "mean_tokens": _mean(r["n_tokens"] for r in rows),
                  "stopped_frac": _mean(r["stopped"] for r in rows)}


def generate_step(args, problems, output, model, chat, max_new_tokens, url=None):
    return generate_cot(args, load_problems(problems, args.limit), output, model, chat, max_new_tokens, url)[1]


def read_cot(paths, fields, skip_bad=False):
    """(rows, skipped) of CoT files written by generate/filter; each row needs the string fields
    named. A bad line is a DataError naming file and line, or with skip_bad "path:line: why" in skipped."""
    rows, skipped = [], []
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"{path}: file not found")
        try:
            good, bad = read_jsonl(path, skip_bad)
        except DataError as e:  # a bad line
            raise DataError(f"{e} (--skip-bad skips and counts such lines)") from None
        skipped += bad
        for lineno, r in good:
            missing = [f for f in fields if not isinstance(r.get(f), str)]
            if not missing:
                rows.append(r)
            elif skip_bad:
                skipped.append(f"{path}:{lineno}: field '{missing[0]}' missing or not a string")
            else:
                raise DataError(f"{path}:{lineno}: field '{missing[0]}' missing or not a string (not a `generate` row)")
    return rows, skipped


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None  # None, not NaN: summaries stay valid JSON


# ---- step: filter (SPEC 2.1 correctness + length) ---------------------------------------------

def filter_cot(rows, max_cot_tokens=0, last_number=False):
    """Keep rows that stopped on their own within the cap and whose answer matches the reference
    (over-long samples are dropped, not truncated); kept rows gain "pred" and "messages", the
    conversation sft.py trains on. Returns (kept, counts)."""
    kept, n_wrong, n_long = [], 0, 0
    for r in rows:
        too_long = r.get("stopped") is False or bool(max_cot_tokens and r.get("n_tokens", 0) > max_cot_tokens)
        pred = extract_answer(r["response"], r.get("kind", "math"), last_number)
        correct = answers_match(pred, r["reference"])
        n_long, n_wrong = n_long + too_long, n_wrong + (not correct)
        if correct and not too_long:
            kept.append({**r, "pred": pred, "messages": cot_messages(r)})
    return kept, {"total": len(rows), "kept": len(kept), "wrong_answer": n_wrong, "too_long": n_long,
                  "mean_tokens_all": _mean(r.get("n_tokens", 0) for r in rows),
                  "mean_tokens_kept": _mean(r.get("n_tokens", 0) for r in kept)}


def filter_step(args, data, output):
    rows, bad = read_cot(data, ("problem", "response", "reference"), args.skip_bad)
    kept, counts = filter_cot(rows, args.max_cot_tokens, not args.strict)
    write_jsonl(output, kept)
    print(f"filter -> {output}: kept {counts['kept']}/{counts['total']} ({counts['wrong_answer']} wrong, "
          f"{counts['too_long']} over-long; {len(bad)} bad lines skipped)")
    return {**counts, "bad_lines": len(bad)}


# ---- the fine-tunes: sft.py (SPEC 2.2 TA on long CoT, 2.5 student on mid CoT) ------------------

def sft_step(args, model, data, output):
    """`python sft.py` on the kept rows' "messages" (loss on the assistant turn, the CoT) with
    SFT_RECIPE + --sft-args. Like generate's answers, a finished fine-tune (output/DONE) is kept
    unless --sft-args has --overwrite."""
    output = Path(output).resolve()
    if (output / "DONE").exists() and "--overwrite" not in args.sft_args:
        print(f"sft -> {output}: finished before (DONE), kept; --sft-args=--overwrite trains it again")
        return {"kept_finished_run": True}
    model = str(Path(model).resolve()) if Path(model).exists() else str(model)  # sft.py runs in REPO
    cmd = [sys.executable, str(REPO / "sft.py"), "--model", model, "--data", *[str(Path(d).resolve()) for d in data],
           "--out", str(output), *SFT_RECIPE, *args.sft_args]
    print("sft: " + shlex.join(cmd), flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise SystemExit(f"error: sft.py failed (its message is above): {shlex.join(cmd)}")
    logged = read_jsonl(output / "metrics.jsonl", skip_bad=True)[0] if (output / "metrics.jsonl").exists() else []
    return {"command": shlex.join(cmd), "last_metrics": logged[-1][1] if logged else None}


# ---- step: merge (SPEC 2.3 DARE-TIES) --------------------------------------------------------

def tensor_seed(seed, name):
    """Per-tensor seed: a tensor's DARE mask depends only on (seed, name), not on merge order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62)


def dare_ties_merge(base_sd, ft_sds, density, weight, seed):
    """DARE-TIES (SPEC 2.3), per tensor, exactly:
    1. task vectors d_i = W_ft_i - W_base (fp32), one per fine-tuned model i;
    2. DARE: keep each entry of d_i with probability `density` (mask = torch.rand(shape, generator
       seeded by tensor_seed(seed, name)) < density, drawn for i = 0, 1, ... in turn) and rescale
       the kept ones by 1 / density (nothing dropped when density == 1);
    3. TIES sign election s = sign(sum_i d_i) (DARE's drop replaces TIES' magnitude trim, as in
       mergekit's dare_ties);
    4. disjoint mean m = sum of the d_i whose sign is s (zeros excluded) / their count (0 if none);
    5. W = W_base + weight * m, in the base dtype; non-float tensors are copied from the base.
    One model at density 1 gives W_base + weight * (W_ft - W_base). (mergekit's normalize=True
    would cancel `weight` for a single model; here it always scales the merged task vector.)"""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    out = {}
    for name, base in base_sd.items():
        if not base.is_floating_point():
            out[name] = base.clone()
            continue
        g = torch.Generator().manual_seed(tensor_seed(seed, name))
        deltas = []
        for ft in ft_sds:
            d = ft[name].float() - base.float()
            if density < 1.0:
                keep = torch.rand(d.shape, generator=g) < density
                d = torch.where(keep, d / density, torch.zeros_like(d))
            deltas.append(d)
        d = torch.stack(deltas)
        elected = torch.sign(d.sum(0))
        agree = (torch.sign(d) == elected) & (d != 0)
        merged = (d * agree).sum(0) / agree.sum(0).clamp(min=1)
        out[name] = (base.float() + weight * merged).to(base.dtype)
    return out


@torch.no_grad()
def merge_checkpoints(args, base, finetuned, output):
    """DARE-TIES of whole HF checkpoints, tensor by tensor (peak memory: base + fine-tuned models)."""
    model, tok = load_model(base, "cpu", args.torch_dtype)
    fts = [dict(load_model(f, "cpu", args.torch_dtype)[0].named_parameters()) for f in finetuned]
    delta2 = merged2 = 0.0
    for name, p in tqdm(list(model.named_parameters()), desc="merge"):
        new = dare_ties_merge({name: p}, [{name: ft[name]} for ft in fts], args.density, args.weight, args.seed)[name]
        delta2 += float((fts[0][name].float() - p.float()).pow(2).sum())
        merged2 += float((new.float() - p.float()).pow(2).sum())
        p.copy_(new)
    save_model(model, tok, output)
    return {"density": args.density, "weight": args.weight, "seed": args.seed,
            "task_vector_norm": math.sqrt(delta2), "merged_delta_norm": math.sqrt(merged2)}


# ---- step: eval (SPEC 2.6) -------------------------------------------------------------------

def score_rows(rows, last_number=False):
    """Mark each generated row correct or not; returns (rows with pred/correct, accuracy, mean length)."""
    scored = [{**r, "pred": extract_answer(r["response"], r["kind"], last_number)} for r in rows]
    scored = [{**r, "correct": answers_match(r["pred"], r["reference"])} for r in scored]
    return scored, _mean(r["correct"] for r in scored), _mean(r["n_tokens"] for r in scored)


def evaluate(args, model, eval_files, output, url=None):
    """Greedy, chat-templated answers per benchmark file (output/<set>_raw.jsonl, resumable),
    scored into output/<set>.jsonl; {set: accuracy, n, mean_tokens} and the average over sets."""
    results = {}
    for path in eval_files:
        name = Path(path).stem
        rows, _ = generate_cot(args, load_problems(path, args.limit), Path(output) / f"{name}_raw.jsonl", model,
                               True, args.eval_max_new_tokens, url)
        scored, acc, mean_len = score_rows(rows, not args.strict)
        write_jsonl(Path(output) / f"{name}.jsonl", scored)
        results[name] = {"accuracy": acc, "n": len(scored), "mean_tokens": mean_len}
        print(f"eval {name}: accuracy {100 * acc:.1f}% over {len(scored)}, mean length {mean_len:.0f} tokens")
    return {**results, "average": {k: _mean(v[k] for v in results.values()) for k in ("accuracy", "mean_tokens")}}


# ---- step: nll (SPEC 2.7) --------------------------------------------------------------------

@torch.no_grad()
def response_nll(model, tokenizer, rows, token_budget=4096):
    """The model's token-mean negative log-likelihood of each row's response given its prompt: the
    assistant turn of cot_messages (the CoT and its end-of-turn token), the tokens sft.py trains on.
    Forward passes pack <= token_budget tokens, the chat template's shared system prompt once.
    Returns (mean NLL, or None without tokens; number of tokens)."""
    docs = [conversation_ids_and_mask(tokenizer, cot_messages(r)) for r in rows]
    seqs, starts = [ids for ids, _ in docs], [mask.index(1) for _, mask in docs]
    total, count = 0.0, 0
    for batch in tqdm(micro_batches(seqs, token_budget, share_prefix=True), desc="nll"):
        logps, _ = response_logprobs(model, [seqs[i] for i in batch], [starts[i] for i in batch])
        for i, lp in zip(batch, logps):
            on = torch.tensor(docs[i][1][starts[i]:], dtype=torch.bool, device=lp.device)
            total, count = total - float(lp[on].double().sum()), count + int(on.sum())
    return (total / count if count else None), count


def nll_report(args, model, data):
    model, tok = load_model(model, args.device, args.torch_dtype)
    report = {}
    for path in data:
        rows, bad = read_cot([path], ("problem", "response"), args.skip_bad)
        nll, n = response_nll(model, tok, rows, args.token_budget)
        ppl = math.exp(nll) if nll is not None and nll < 700 else None
        report[Path(path).stem] = {"nll_per_token": nll, "perplexity": ppl, "tokens": n, "bad_lines": len(bad)}
        print(f"nll {path}: {nll:.4f} per token (perplexity {ppl:.2f}) over {n} tokens" if ppl
              else f"nll {path}: {nll} per token over {n} tokens")
    return report


# ---- driver ----------------------------------------------------------------------------------

def synth_step(args, output):
    write_jsonl(Path(output) / "train.jsonl", synth_rows(args.n_train, args.seed, "train"))
    write_jsonl(Path(output) / "test.jsonl", synth_rows(args.n_test, args.seed + 1, "test"))
    return {"train": args.n_train, "test": args.n_test}


def run_step(args, tag, fn, **paths):
    """fn(args, **paths) -> summary; writes <out>/<tag>_summary.json and a line of <out>/metrics.jsonl."""
    t0 = time.time()
    summary = json_clean({"step": tag, **paths, **fn(args, **paths), "seconds": round(time.time() - t0, 1)})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{tag}_summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    append_jsonl(Path(args.out) / "metrics.jsonl", {"time": round(time.time(), 3), **summary})
    return summary


def main(argv=None):
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise DataError("distill_micota.py runs in one process; run sft.py under torchrun (see the docstring)")
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32)
    out, o = Path(args.out), args.output
    teacher = args.model if args.step == "generate" else args.teacher  # --chat auto|on|off -> bool
    args.chat = args.chat == "on" or (args.chat == "auto" and str(teacher) == DEFAULT_MODEL and not args.url)
    long_raw, long, mid_raw, mid = (out / f"{n}.jsonl" for n in ("long_raw", "long", "mid_raw", "mid"))
    steps = {  # one step alone
        "synth": [("synth", synth_step, dict(output=o or SYNTH_DIR))],
        "generate": [("generate", generate_step, dict(problems=args.problems, output=o or long_raw, model=args.model,
                                                      chat=args.chat, max_new_tokens=args.max_new_tokens,
                                                      url=args.url))],
        "filter": [("filter", filter_step, dict(data=args.data or [long_raw], output=o or long))],
        "merge": [("merge", merge_checkpoints, dict(base=args.base, finetuned=args.finetuned,
                                                    output=o or out / "merged"))],
        "eval": [("eval", evaluate, dict(model=args.model, eval_files=args.eval_files, output=o or out / "eval",
                                         url=args.url))],
        "nll": [("nll", nll_report, dict(model=args.model, data=args.data or [long, mid]))],
        "all": [  # SPEC 2 steps 1-7 in order
            ("generate_long", generate_step, dict(problems=args.problems, output=long_raw, model=args.teacher,
                                                  chat=args.chat, max_new_tokens=args.max_new_tokens, url=args.url)),
            ("filter_long", filter_step, dict(data=[long_raw], output=long)),
            ("sft_ta", sft_step, dict(model=args.ta, data=[long], output=out / "ta_sft")),
            ("merge", merge_checkpoints, dict(base=args.ta, finetuned=[out / "ta_sft"], output=out / "ta_merged")),
            ("generate_mid", generate_step, dict(problems=args.problems, output=mid_raw, model=out / "ta_merged",
                                                 chat=True, max_new_tokens=args.mid_max_new_tokens)),
            ("filter_mid", filter_step, dict(data=[mid_raw], output=mid)),
            ("nll", nll_report, dict(model=args.student, data=[long, mid])),
            ("sft_student", sft_step, dict(model=args.student, data=[mid], output=out / "student_sft")),
            ("eval_base", evaluate, dict(model=args.student, eval_files=args.eval_files, output=out / "eval_base")),
            ("eval_student", evaluate, dict(model=out / "student_sft", eval_files=args.eval_files,
                                            output=out / "eval_student"))]}
    for tag, fn, paths in steps[args.step]:
        summary = run_step(args, tag, fn, **paths)  # a refused endpoint: one line via common.main_guard
        if args.step == "all" and fn is filter_step and summary["kept"] == 0:
            raise DataError(f"the filter kept no sample of {paths['data'][0]}: nothing to fine-tune on; raise "
                            f"--max-new-tokens / --mid-max-new-tokens or use a stronger --teacher")


if __name__ == "__main__":
    main_guard(main)
