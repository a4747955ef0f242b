"""MiCoTA: Mid-CoT Teacher Assistant distillation (SPEC 2; arXiv 2507.01887), every step in one file.

A large reasoning teacher writes long chain-of-thought (CoT) that small students learn poorly from.
A teacher assistant (TA) of intermediate size is fine-tuned on the long CoT, then merged with its
own pre-fine-tune weights by DARE-TIES; the merged TA writes CoT about half as long, and the
student is distilled from that "mid" CoT instead. Steps (each runnable alone, `all` chains them):

  synth     write the offline problem set data/gsm_synth/{train,test}.jsonl (seeded word problems)
  generate  CoT for a problem file from a teacher: a local checkpoint through common.generate, or
            an OpenAI-compatible endpoint (--url, e.g. vLLM serving a 32B reasoning model).
            SPEC 2.1 prompt (problem + "step by step, answer in \\boxed{}"), chat template per
            --chat (auto: on for the embedded default, off for other teachers), greedy,
            --max-new-tokens cap. Resumable (appends, skips done ids).
  filter    keep samples whose last \\boxed{} (or GSM8K "#### N") answer equals the reference after
            MATH-style normalisation and that finished within the length cap (SPEC 2.1 / 2.4)
  sft       fine-tune on CoT with loss on the response only (SPEC 2.2 TA, SPEC 2.5 student)
  merge     DARE-TIES between the TA before and after its fine-tune (SPEC 2.3), HF-format output
  eval      accuracy on GSM8K / AIME24 / AMC23 / OlympiadBench / MATH-500-style files (SPEC 2.6):
            chat template, greedy, per-set and average accuracy, mean length, per-example JSONL
  nll       the student's mean per-token NLL and perplexity of a CoT set's responses (SPEC 2.7)

The default (`python distill_micota.py all`) runs the whole chain on 2 CPU cores: 32 seeded
one- and two-step word problems (data/gsm_synth), the embedded SmolLM2-135M-Instruct as teacher, TA
and student, short token caps, one epoch. It shows the mechanics (files, filters, merge, metrics),
not the paper's effect: a 135M model is no reasoning teacher, its "long" CoT is a few sentences,
and it almost never writes \\boxed{}, so GSM8K-style answers fall back to the response's last
number unless --strict (use --strict for SPEC 2.6 scoring with real models).

Run (CPU demo, output in out/micota):
  python distill_micota.py all
  python distill_micota.py generate --model MODEL --problems FILE --output out/micota/long_raw.jsonl
  python distill_micota.py filter --data out/micota/long_raw.jsonl --output out/micota/long.jsonl
  python distill_micota.py sft --model TA --data out/micota/long.jsonl --output out/micota/ta_sft
  python distill_micota.py merge --base TA --finetuned out/micota/ta_sft --density 0.5 --weight 1.0
  python distill_micota.py eval --model out/micota/student_sft --eval-files ../shared/data/math/*.jsonl
  python distill_micota.py nll --model STUDENT --data out/micota/long.jsonl out/micota/mid.jsonl
Real configuration (32B teacher served by vLLM, 14B TA, 3B student; one node with 8 GPUs):
  vllm serve deepseek-ai/DeepSeek-R1-Distill-Qwen-32B --tensor-parallel-size 8 --max-model-len 20000
  python distill_micota.py generate --url http://localhost:8000/v1 --api-model \\
      deepseek-ai/DeepSeek-R1-Distill-Qwen-32B --problems math_train.jsonl --max-new-tokens 16384 \\
      --output out/micota/long_raw.jsonl
  python distill_micota.py filter --strict --data out/micota/long_raw.jsonl --output out/micota/long.jsonl \\
      --max-cot-tokens 16384
  torchrun --standalone --nproc_per_node 8 distill_micota.py sft --fsdp --model Qwen2.5-14B-Instruct \\
      --data out/micota/long.jsonl --output out/micota/ta_sft --lr 1e-5 --epochs 2 \\
      --global-batch 64 --token-budget 16896
  python distill_micota.py merge --base Qwen2.5-14B-Instruct --finetuned out/micota/ta_sft \\
      --density 0.5 --weight 1.0 --dtype bfloat16 --output out/micota/ta_merged
  (serve out/micota/ta_merged with vLLM, then generate with --chat --url ... --output mid_raw.jsonl,
   filter into mid.jsonl, and torchrun ... sft --model Qwen2.5-3B-Instruct --data mid.jsonl)
  python distill_micota.py eval --strict --url ... --api-model student --eval-max-new-tokens 16384 \\
      --eval-files gsm8k_test.jsonl aime24.jsonl amc23.jsonl olympiadbench.jsonl math500.jsonl
  (the README's MiCoTA section lists every command of the real configuration)
Outputs: JSONL rows per problem, a *_summary.json per step and metrics.jsonl in --out.
"""
import argparse
import json
import math
import re
import threading
import time
import urllib.request
import zlib
from fractions import Fraction
from pathlib import Path

import torch
from tqdm import tqdm

from common import (DEFAULT_MODEL, DataError, EndpointError, MetricsLogger, append_jsonl, chat_completion,
                    chat_prompt_ids, conversation_ids_and_mask, dist_cleanup, dist_init, generate,
                    is_rank0, load_model, map_concurrent, print0, read_jsonl_checked, return_freed_cpu_memory,
                    save_model, sequence_logprobs, sft_train, stop_token_ids, write_jsonl)

REPO = Path(__file__).resolve().parent
SYNTH_DIR = REPO / "data" / "gsm_synth"
STEPS = ["synth", "generate", "filter", "sft", "merge", "eval", "nll", "all"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("step", choices=STEPS, help="which step to run (`all` chains them)")
    p.add_argument("--out", default="out/micota", help="output folder (default paths, metrics.jsonl)")
    p.add_argument("--output", default=None, help="output file/folder of a single step "
                   "(default: a name in --out, printed when the step starts)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling, shuffling and DARE masks")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights dtype for loading (auto: bf16 on CUDA, fp32 on CPU)")
    # data
    p.add_argument("--problems", default=str(SYNTH_DIR / "train.jsonl"),
                   help="problem JSONL for generate/all (GSM8K, MATH, AIME, AMC, OlympiadBench layouts)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N problems per file (0 = all)")
    p.add_argument("--data", nargs="+", default=None,
                   help="input JSONL of a step: raw CoT (filter), kept CoT (sft, nll)")
    p.add_argument("--n-train", type=int, default=32, help="synth: number of training problems")
    p.add_argument("--n-test", type=int, default=32, help="synth: number of test problems")
    # models
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint of generate/sft/eval/nll")
    p.add_argument("--teacher", default=DEFAULT_MODEL, help="all: teacher checkpoint (long CoT)")
    p.add_argument("--ta", default=DEFAULT_MODEL, help="all: teacher-assistant checkpoint")
    p.add_argument("--student", default=DEFAULT_MODEL, help="all: student checkpoint")
    p.add_argument("--url", default=None, help="OpenAI-compatible base URL (e.g. http://localhost:8000/v1): "
                   "generate/eval through it instead of a local checkpoint (in `all`: the teacher only)")
    p.add_argument("--api-model", default=None, help="model name the endpoint serves")
    p.add_argument("--workers", type=int, default=16, help="concurrent endpoint requests")
    # generation
    p.add_argument("--chat", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="generate (teacher): chat template on or off (off: the raw SPEC 2.1 prompt, for "
                   "reasoning teachers); auto = on for the embedded default (an instruct model that "
                   "rambles on the raw prompt), off otherwise. The TA in `all` and eval always use it")
    p.add_argument("--max-new-tokens", type=int, default=256, help="new-token cap of generate (teacher)")
    p.add_argument("--mid-max-new-tokens", type=int, default=192, help="all: new-token cap of the merged TA")
    p.add_argument("--eval-max-new-tokens", type=int, default=256, help="new-token cap of eval")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (SPEC 2.1, 2.6)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per local generate call")
    # filter
    p.add_argument("--max-cot-tokens", type=int, default=0,
                   help="drop samples with more response tokens (0 = only drop those that hit the cap)")
    p.add_argument("--strict", action="store_true", help="filter/eval: only \\boxed{} (and GSM8K '#### N') "
                   "answers count (SPEC 2.6); default: GSM8K-style problems fall back to the response's last "
                   "number, because the 135M default model almost never boxes its answer")
    # sft (names match common.sft_train's args)
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (SPEC 2.5: 1e-5)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the CoT data (SPEC 2.5: 2)")
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps (0 = from epochs)")
    p.add_argument("--global-batch", type=int, default=8, help="documents per optimizer step")
    p.add_argument("--token-budget", type=int, default=1024, help="tokens per packed micro-batch; "
                   "also the longest prompt+response allowed")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup fraction, then cosine")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--bf16", default="auto", choices=["auto", "on", "off"], help="bf16 autocast")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 under torchrun (else DDP)")
    p.add_argument("--save-every", type=int, default=0, help="training-state checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="sft: continue from the latest checkpoint")
    # merge
    p.add_argument("--base", default=DEFAULT_MODEL, help="merge: the TA before fine-tuning")
    p.add_argument("--finetuned", nargs="+", default=None, help="merge: fine-tuned checkpoint(s)")
    p.add_argument("--density", type=float, default=0.5, help="DARE: fraction of delta entries kept")
    p.add_argument("--weight", type=float, default=1.0, help="scale of the merged task vector")
    # eval
    p.add_argument("--eval-files", nargs="+", default=[str(SYNTH_DIR / "test.jsonl")],
                   help="benchmark JSONL files; the set name is the file stem")
    return p.parse_args(argv)


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


def answers_match(pred, ref):
    """Exact match after normalisation, or the same rational value (0.5 = \\frac12 = 1/2)."""
    if pred is None or ref is None:
        return False
    p, r = normalize_math_answer(pred), normalize_math_answer(ref)
    if p == r:
        return True
    pv, rv = _as_number(p), _as_number(r)
    return pv is not None and pv == rv


# ---- problem files --------------------------------------------------------------------------

def load_problems(path, limit=0):
    """Problems of any supported layout -> [{"id", "problem", "reference", "kind"}].
    Text: 'problem' or 'question' (OlympiadBench 'context' is prepended). Reference: 'answer'
    ending '#### N' (GSM8K, kind "gsm8k"); 'answer' as a string or number (MATH-500, AIME24,
    AMC23); 'final_answer' list (OlympiadBench, joined by ','); else the last \\boxed{} of
    'solution' (MATH train). Anything else is a DataError naming file, line and fields."""
    rows, _ = read_jsonl_checked(path)
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

def completion_request(base_url, model, prompt, max_tokens, temperature, timeout=600.0, retries=3):
    """POST {base_url}/completions (raw prompt, no chat template) with exponential backoff."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": temperature}).encode()
    url = base_url.rstrip("/") + "/completions"
    for attempt in range(retries + 1):
        try:
            req = urllib.request.Request(url, body, {"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(req, timeout=timeout) as r:
                out = json.loads(r.read())
            if out.get("choices"):
                return out
            err = f"no choices in {str(out)[:200]}"
        except (OSError, ValueError) as e:  # URLError, timeouts, HTTP errors, bad JSON
            err = f"{type(e).__name__}: {e}"
        if attempt < retries:
            time.sleep(2 ** attempt)
    raise EndpointError(f"POST {url} failed after {retries + 1} attempts: {err}")


def generate_cot(problems, out_path, args, model_name, chat, max_new_tokens, url=None):
    """Answer every problem not yet in out_path, appending one row per problem:
    {id, problem, reference, kind, response, n_tokens, stopped, model}. Returns all rows of
    out_path for these problems, in problem order."""
    out_path = Path(out_path)
    done = {}
    if out_path.exists():
        done = {r["id"]: r for _, r in read_jsonl_checked(out_path, skip_bad=True)[0] if "id" in r}
    todo = [p for p in problems if p["id"] not in done]
    print0(f"generate -> {out_path}: {len(problems) - len(todo)} done, {len(todo)} to go "
           f"({'endpoint ' + url if url else model_name}, chat template {'on' if chat else 'off'})")
    source = args.api_model if url else str(model_name)

    def record(p, response, n_tokens, stopped):
        row = {**p, "response": response, "n_tokens": n_tokens, "stopped": stopped, "model": source}
        append_jsonl(out_path, row)
        done[p["id"]] = row

    if todo and url:
        lock = threading.Lock()

        def one(p):
            if chat:
                res = chat_completion(url, args.api_model, [{"role": "user", "content": problem_prompt(p["problem"])}],
                                      temperature=args.temperature, max_tokens=max_new_tokens, timeout=600.0)
                text = res["choices"][0]["message"]["content"] or ""
            else:
                res = completion_request(url, args.api_model, problem_prompt(p["problem"]) + "\n",
                                         max_new_tokens, args.temperature)
                text = res["choices"][0]["text"]
            n = (res.get("usage") or {}).get("completion_tokens", len(text.split()))
            with lock:
                record(p, text, n, res["choices"][0].get("finish_reason") == "stop")
        map_concurrent(one, todo, max_workers=args.workers, desc="generate")
    elif todo:
        model, tok = load_model(model_name, args.device, args.torch_dtype)
        stops = stop_token_ids(tok)
        for i in tqdm(range(0, len(todo), args.batch_size), desc="generate", disable=not is_rank0()):
            batch = todo[i:i + args.batch_size]
            prompts = [chat_prompt_ids(tok, [{"role": "user", "content": problem_prompt(p["problem"])}])
                       if chat else tok(problem_prompt(p["problem"]) + "\n")["input_ids"] for p in batch]
            g = generate(model, prompts, max_new_tokens, temperature=args.temperature, stop_ids=stops,
                         seed=args.seed + i, progress=is_rank0())
            for p, toks, stopped in zip(batch, g.tokens, g.stopped):
                record(p, tok.decode(toks[:-1] if stopped else toks, skip_special_tokens=True), len(toks), stopped)
        del model
    rows = [done[p["id"]] for p in problems]
    summary = {"rows": len(rows), "mean_tokens": _mean(r["n_tokens"] for r in rows),
               "stopped_frac": _mean(r["stopped"] for r in rows)}
    return rows, summary


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None  # None, not NaN: summaries stay valid JSON


def _fmt(x):
    return "-" if x is None else f"{x:.1f}"


# ---- step: filter (SPEC 2.1 correctness + length) ---------------------------------------------

def filter_cot(rows, max_cot_tokens=0, last_number=False):
    """Keep rows that stopped on their own within the cap and whose answer matches the reference.
    Over-long samples are dropped, not truncated (rows without 'stopped'/'n_tokens', e.g. from
    another tool, are length-checked only where those fields exist). Returns (kept, counts)."""
    kept, n_wrong, n_long = [], 0, 0
    for r in rows:
        too_long = r.get("stopped") is False or (max_cot_tokens and r.get("n_tokens", 0) > max_cot_tokens)
        pred = extract_answer(r["response"], r.get("kind", "math"), last_number)
        correct = answers_match(pred, r["reference"])
        n_long += bool(too_long)
        n_wrong += not correct
        if correct and not too_long:
            kept.append({**r, "pred": pred})
    counts = {"total": len(rows), "kept": len(kept), "wrong_answer": n_wrong, "too_long": n_long,
              "mean_tokens_all": _mean(r.get("n_tokens", 0) for r in rows),
              "mean_tokens_kept": _mean(r.get("n_tokens", 0) for r in kept)}
    return kept, counts


def read_cot(paths, fields=("problem", "response")):
    """CoT rows (as written by generate/filter); each must have the string fields named."""
    rows = []
    for path in paths:
        for lineno, r in read_jsonl_checked(path)[0]:
            for field in fields:
                if not isinstance(r.get(field), str):
                    raise DataError(f"{path}:{lineno}: field '{field}' missing or not a string "
                                    f"(expected a row written by `generate`/`filter`)")
            rows.append(r)
    return rows


# ---- step: sft (SPEC 2.2 TA on long CoT, 2.5 student on mid CoT) -------------------------------

def sft_cot(model_name, data_paths, out_dir, args, env):
    """Response-only SFT: loss on the assistant turn (the CoT) of cot_messages, via common.sft_train."""
    rows = read_cot(data_paths)
    model, tok = load_model(model_name, env.device, args.torch_dtype)
    docs = [conversation_ids_and_mask(tok, cot_messages(r)) for r in rows]
    print0(f"sft {model_name} on {len(docs)} CoT samples ({sum(len(d[0]) for d in docs)} tokens) -> {out_dir}")
    return sft_train(model, tok, docs, [], args, out_dir, env)


# ---- step: merge (SPEC 2.3 DARE-TIES) --------------------------------------------------------

def tensor_seed(seed, name):
    """Per-tensor seed: a tensor's DARE mask depends only on (seed, name), not on merge order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62)


def dare_ties_merge(base_sd, ft_sds, density, weight, seed):
    """DARE-TIES (SPEC 2.3), exactly:
    1. task vectors  d_i = W_ft_i - W_base (fp32), per tensor and fine-tuned model i;
    2. DARE: keep each entry of d_i with probability `density` (mask = torch.rand(shape,
       generator seeded by tensor_seed(seed, name)) < density, drawn for i = 0, 1, ... in turn),
       rescale kept entries by 1 / density (skipped entirely when density == 1);
    3. TIES sign election: s = sign(sum_i d_i) per entry (DARE's random drop replaces TIES'
       magnitude trim, as in mergekit's dare_ties);
    4. disjoint mean: m = sum of the d_i whose sign equals s (zeros excluded) / their count
       (0 where none agree);
    5. W = W_base + weight * m, cast back to the base dtype.
    With one model and density 1 this is W_base + weight * (W_ft - W_base). Non-float tensors are
    copied from the base. (mergekit with normalize=True divides by the summed weights instead, which
    for a single model cancels `weight`; here weight always scales the merged task vector.)"""
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


def merge_checkpoints(base_name, ft_names, out_dir, args):
    """DARE-TIES of whole HF checkpoints, tensor by tensor (peak memory: base + fine-tuned models)."""
    base, tok = load_model(base_name, "cpu", args.torch_dtype)
    fts = [load_model(n, "cpu", args.torch_dtype)[0] for n in ft_names]
    ft_params = [dict(m.named_parameters()) for m in fts]
    stats = {"changed_frac": [], "delta_norm": 0.0, "merged_norm": 0.0}
    with torch.no_grad():
        for name, p in tqdm(list(base.named_parameters()), desc="merge", disable=not is_rank0()):
            new = dare_ties_merge({name: p}, [{name: fp[name]} for fp in ft_params],
                                  args.density, args.weight, args.seed)[name]
            stats["delta_norm"] += float((ft_params[0][name].float() - p.float()).pow(2).sum())
            stats["merged_norm"] += float((new.float() - p.float()).pow(2).sum())
            stats["changed_frac"].append(float((new != p).float().mean()))
            p.copy_(new)
    save_model(base, tok, out_dir)
    return {"density": args.density, "weight": args.weight, "seed": args.seed,
            "task_vector_norm": math.sqrt(stats["delta_norm"]), "merged_delta_norm": math.sqrt(stats["merged_norm"]),
            "mean_changed_frac": _mean(stats["changed_frac"])}


# ---- step: eval (SPEC 2.6) -------------------------------------------------------------------

def score_rows(rows, last_number=False):
    """Mark each generated row correct or not; returns (rows with pred/correct, accuracy, mean length)."""
    scored = []
    for r in rows:
        pred = extract_answer(r["response"], r["kind"], last_number)
        scored.append({**r, "pred": pred, "correct": answers_match(pred, r["reference"])})
    return scored, _mean(r["correct"] for r in scored), _mean(r["n_tokens"] for r in scored)


def evaluate(model_name, eval_files, out_dir, args, url=None):
    """Greedy, chat-templated answers for each benchmark file; per-example JSONL
    (out_dir/<set>.jsonl, resumable) and {set: accuracy, n, mean_tokens} plus the average."""
    out_dir = Path(out_dir)
    results = {}
    for path in eval_files:
        name = Path(path).stem
        problems = load_problems(path, args.limit)
        rows, _ = generate_cot(problems, out_dir / f"{name}_raw.jsonl", args, model_name, chat=True,
                               max_new_tokens=args.eval_max_new_tokens, url=url)
        scored, acc, mean_len = score_rows(rows, not args.strict)
        write_jsonl(out_dir / f"{name}.jsonl", scored)
        results[name] = {"accuracy": acc, "n": len(scored), "mean_tokens": mean_len}
        print0(f"eval {name}: accuracy {100 * acc:.1f}% over {len(scored)}, mean length {mean_len:.0f} tokens")
    results["average"] = {"accuracy": _mean(v["accuracy"] for v in results.values()),
                          "mean_tokens": _mean(v["mean_tokens"] for v in results.values())}
    return results


# ---- step: nll (SPEC 2.7) --------------------------------------------------------------------

@torch.no_grad()
def response_nll(model, tokenizer, rows, token_budget=4096):
    """The model's token-mean negative log-likelihood of the response tokens (mask of
    conversation_ids_and_mask: the CoT and its end-of-turn token) of each row, given the prompt.
    Returns (mean NLL over all response tokens, number of tokens)."""
    docs = [conversation_ids_and_mask(tokenizer, cot_messages(r)) for r in rows]
    total, count, batch, batch_len = 0.0, 0, [], 0
    for i, (ids, mask) in enumerate(tqdm(docs, desc="nll", disable=not is_rank0())):
        batch.append((ids, mask))
        batch_len += len(ids)
        if batch_len >= token_budget or i == len(docs) - 1:
            lps = sequence_logprobs(model, [d[0] for d in batch], [1] * len(batch))
            for lp, (_, m) in zip(lps, batch):
                sel = torch.tensor(m[1:], dtype=torch.bool, device=lp.device)
                total -= float(lp[sel].double().sum())
                count += int(sel.sum())
            batch, batch_len = [], 0
    return total / max(count, 1), count


def nll_report(model_name, data_paths, args):
    model, tok = load_model(model_name, args.device, args.torch_dtype)
    report = {}
    for path in data_paths:
        nll, n = response_nll(model, tok, read_cot([path]), args.token_budget)
        report[Path(path).stem] = {"nll_per_token": nll, "perplexity": math.exp(nll), "tokens": n}
        print0(f"nll {Path(path).stem}: {nll:.4f} per token (perplexity {math.exp(nll):.2f}, {n} tokens)")
    return report


# ---- driver ----------------------------------------------------------------------------------

def run_step(step, args, env, log, **paths):
    """Run one step with explicit paths; writes <out>/<tag>_summary.json and a metrics line."""
    t0 = time.time()
    out = Path(args.out)
    tag = paths.pop("tag", step)
    if step == "synth":
        d = Path(paths["output"])
        write_jsonl(d / "train.jsonl", synth_rows(args.n_train, args.seed, "train"))
        write_jsonl(d / "test.jsonl", synth_rows(args.n_test, args.seed + 1, "test"))
        summary = {"dir": str(d), "train": args.n_train, "test": args.n_test}
    elif step == "generate":
        problems = load_problems(paths["problems"], args.limit)
        _, summary = generate_cot(problems, paths["output"], args, paths["model"], paths["chat"],
                                  paths["max_new_tokens"], paths.get("url"))
    elif step == "filter":
        rows = read_cot(paths["data"], ("problem", "response", "reference"))
        kept, summary = filter_cot(rows, args.max_cot_tokens, not args.strict)
        write_jsonl(paths["output"], kept)
        print0(f"filter -> {paths['output']}: kept {summary['kept']}/{summary['total']} "
               f"({summary['wrong_answer']} wrong, {summary['too_long']} over-long); mean length "
               f"{_fmt(summary['mean_tokens_all'])} -> {_fmt(summary['mean_tokens_kept'])} tokens")
    elif step == "sft":
        summary = sft_cot(paths["model"], paths["data"], paths["output"], args, env) or {}
    elif step == "merge":
        summary = merge_checkpoints(paths["base"], paths["finetuned"], paths["output"], args)
    elif step == "eval":
        summary = evaluate(paths["model"], paths["eval_files"], paths["output"], args, paths.get("url"))
    elif step == "nll":
        summary = nll_report(paths["model"], paths["data"], args)
    as_json = lambda v: [str(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v  # noqa
    summary = {"step": step, **{k: as_json(v) for k, v in paths.items()}, **summary,
               "seconds": round(time.time() - t0, 1)}
    summary = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}
    if is_rank0():
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{tag}_summary.json").write_text(json.dumps(summary, indent=2))
    log.log(summary)
    # the step's models are gone: give their kept CPU memory back (common.keep_freed_cpu_memory),
    # so that the next step's allocations do not stack on it
    return_freed_cpu_memory()
    return summary


def main(argv=None):
    args = parse_args(argv)
    env = dist_init(None if args.device == "auto" else args.device)
    if env.world_size > 1 and args.step != "sft":  # the other steps would run once per rank
        raise SystemExit(f"under torchrun only the sft step runs (got {args.step}); run the others with "
                         f"python (generation at scale: --url with a vLLM server)")
    args.device = env.device
    args.torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if torch.device(env.device).type == "cuda" else torch.float32)
    out = Path(args.out)
    log = MetricsLogger(out / "metrics.jsonl")
    o = args.output
    s = args.step
    teacher = args.model if s == "generate" else args.teacher  # --chat auto|on|off -> bool
    args.chat = args.chat == "on" or (args.chat == "auto" and str(teacher) == DEFAULT_MODEL and not args.url)
    if s == "synth":
        run_step(s, args, env, log, output=o or SYNTH_DIR)
    elif s == "generate":
        run_step(s, args, env, log, problems=args.problems, output=o or out / "long_raw.jsonl",
                 model=args.model, chat=args.chat, max_new_tokens=args.max_new_tokens, url=args.url)
    elif s == "filter":
        run_step(s, args, env, log, data=args.data or [out / "long_raw.jsonl"], output=o or out / "long.jsonl")
    elif s == "sft":
        run_step(s, args, env, log, model=args.model, data=args.data or [out / "long.jsonl"],
                 output=o or out / "sft")
    elif s == "merge":
        if not args.finetuned:
            raise SystemExit("merge needs --finetuned (the fine-tuned checkpoint folder)")
        run_step(s, args, env, log, base=args.base, finetuned=args.finetuned, output=o or out / "merged")
    elif s == "eval":
        run_step(s, args, env, log, model=args.model, eval_files=args.eval_files,
                 output=o or out / "eval", url=args.url)
    elif s == "nll":
        run_step(s, args, env, log, model=args.model, data=args.data or [out / "long.jsonl", out / "mid.jsonl"])
    else:  # all: SPEC 2 steps 1-7 in order
        run_step("generate", args, env, log, tag="generate_long", problems=args.problems,
                 output=out / "long_raw.jsonl", model=args.teacher, chat=args.chat,
                 max_new_tokens=args.max_new_tokens, url=args.url)
        kept = run_step("filter", args, env, log, tag="filter_long", data=[out / "long_raw.jsonl"],
                        output=out / "long.jsonl")["kept"]
        if kept == 0:
            raise SystemExit(f"the filter kept no long-CoT sample (see {out / 'long_raw.jsonl'}): nothing to "
                             f"fine-tune the TA on; raise --max-new-tokens or use a stronger --teacher")
        run_step("sft", args, env, log, tag="sft_ta", model=args.ta, data=[out / "long.jsonl"], output=out / "ta_sft")
        run_step("merge", args, env, log, base=args.ta, finetuned=[out / "ta_sft"], output=out / "ta_merged")
        run_step("generate", args, env, log, tag="generate_mid", problems=args.problems,
                 output=out / "mid_raw.jsonl", model=out / "ta_merged", chat=True,
                 max_new_tokens=args.mid_max_new_tokens)
        kept = run_step("filter", args, env, log, tag="filter_mid", data=[out / "mid_raw.jsonl"],
                        output=out / "mid.jsonl")["kept"]
        if kept == 0:
            raise SystemExit(f"the filter kept no mid-CoT sample (see {out / 'mid_raw.jsonl'}): nothing to "
                             f"distill the student on")
        run_step("nll", args, env, log, model=args.student, data=[out / "long.jsonl", out / "mid.jsonl"])
        run_step("sft", args, env, log, tag="sft_student", model=args.student, data=[out / "mid.jsonl"],
                 output=out / "student_sft")
        run_step("eval", args, env, log, tag="eval_base", model=args.student, eval_files=args.eval_files,
                 output=out / "eval_base")
        run_step("eval", args, env, log, tag="eval_student", model=out / "student_sft",
                 eval_files=args.eval_files, output=out / "eval_student")
    log.close()
    dist_cleanup()


if __name__ == "__main__":
    main()
