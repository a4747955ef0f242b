"""Supervised fine-tuning (SFT): the warm start of the personalization policy (SPEC 1.3: "policy
initialised from an SFT model trained on the chosen responses") and the same recipe used for the
MiCoTA TA and student fine-tunes (SPEC 2, steps 2 and 5). Loss on assistant tokens only.

Input: JSONL files, one sample a line, in either format (mixed freely):
  conversations    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  persona records  {"persona": dict | JSON string, "question": str, "response": str}
A persona record becomes common.persona_messages(persona, question) + one assistant turn, i.e. the
prompt every stage renders. Bad lines (malformed JSON, missing role or field, empty assistant turn,
a sample longer than --max-len) stop the run with an error naming file and line; with --skip-bad
they are skipped, counted and listed in the log instead.

Data default: data/persona_world/sft.jsonl (the repository's persona world). If that file does not
exist yet, the run makes a small built-in persona sample (48 templated records, see
builtin_sample()) and writes it to <out>/builtin_sample.jsonl so the run is reproducible.

Training: documents packed into micro-batches of --token-budget tokens (document-causal attention,
positions restart per document), gradient accumulation to --global-batch documents per optimizer
step (exact token mean over the global batch), AdamW, cosine schedule with warmup, gradient
clipping, bf16 autocast on CUDA (--bf16 on for CPU too), eval loss on a held-out split,
checkpoints every --save-every steps, --resume. The loop is common.sft_train.

Run (defaults: embedded SmolLM2-135M-Instruct, a few minutes on 2 CPU cores):
  python sft.py
  python sft.py --data my.jsonl --out out/my_sft --epochs 3 --lr 5e-6 --max-samples 0 --max-eval-samples 0
One node, 8 GPUs (DDP; add --fsdp for FSDP2):
  torchrun --standalone --nproc_per_node 8 sft.py --model path/to/hf_model --global-batch 64 \
      --token-budget 16384 --max-len 16384 --lr 5e-6 --epochs 2 --max-samples 0 --max-eval-samples 0
Several nodes: torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d \
      --rdzv-endpoint HOST:29500 sft.py ... (same flags)
Continue after a crash: the same command plus --resume.
Output (--out, default out/sft): HF-format model (config.json, safetensors, tokenizer files, loadable
by transformers), metrics.jsonl, ckpt_XXXXXX/ training states.
"""
import argparse
import random
import sys
from pathlib import Path

import torch

from common import (DEFAULT_MODEL, DataError, MetricsLogger, conversation_ids_and_mask, dist_cleanup,
                    dist_init, load_model, load_tokenizer, persona_messages, print0, read_jsonl_checked,
                    require_field, sft_train, write_jsonl)

REPO = Path(__file__).resolve().parent
DEFAULT_DATA = REPO / "data" / "persona_world" / "sft.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", nargs="+", default=None,
                   help=f"training JSONL file(s) (conversations or persona records); default "
                        f"{DEFAULT_DATA.relative_to(REPO)}, or a built-in sample while it is absent")
    p.add_argument("--eval-data", nargs="+", default=None,
                   help="held-out JSONL file(s); default: split --eval-frac of --data off")
    p.add_argument("--eval-frac", type=float, default=0.1,
                   help="fraction of the samples held out for eval loss when --eval-data is not given")
    p.add_argument("--max-eval-samples", type=int, default=8,
                   help="use at most N held-out samples for the eval loss (0 = all)")
    p.add_argument("--max-samples", type=int, default=24,
                   help="train on only N samples (0 = all; a random subset when the held-out split is "
                        "made from --data, else the first N); the default keeps the CPU run short")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF-format folder or the embedded default")
    p.add_argument("--out", default="out/sft", help="output folder (model, metrics.jsonl, checkpoints)")
    p.add_argument("--max-len", type=int, default=1024,
                   help="context length: a longer sample is an error (or skipped with --skip-bad)")
    p.add_argument("--token-budget", type=int, default=2048,
                   help="tokens per packed micro-batch (>= --max-len); lower it to save memory")
    p.add_argument("--global-batch", type=int, default=4,
                   help="documents per optimizer step, over all ranks and micro-batches")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training data")
    p.add_argument("--max-steps", type=int, default=0,
                   help="optimizer steps (0 = epochs x ceil(samples / global batch)); sets the schedule")
    p.add_argument("--lr", type=float, default=5e-5,
                   help="peak learning rate (SPEC 1.3 uses 5e-6 for a 7B policy; small models like more)")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="final lr as a fraction of --lr")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup, fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (matrices only)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast: auto = on for CUDA GPUs with bf16, off on CPU")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP under torchrun")
    p.add_argument("--eval-every", type=int, default=4, help="eval loss every N steps (0 = only at the end)")
    p.add_argument("--save-every", type=int, default=50, help="training checkpoint every N steps (0 = never)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many ckpt_* folders to keep")
    p.add_argument("--resume", action="store_true", help="continue from the latest ckpt_* in --out")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad samples (counted and listed in the log) instead of stopping")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, shuffles and init")
    p.add_argument("--device", default=None, help="device (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--stop-at-step", type=int, default=0,
                   help="testing: stop after this step without the final save, as if killed")
    args = p.parse_args(argv)
    if args.token_budget < args.max_len:
        p.error(f"--token-budget ({args.token_budget}) must be at least --max-len ({args.max_len})")
    return args


# ------------------------------------------------------------------------------ data
ROLES = ("system", "user", "assistant")


def sample_messages(row, path, lineno):
    """A JSONL row (conversation or persona record) -> chat messages, or DataError."""
    if "messages" in row:
        messages = require_field(row, "messages", path, lineno, kind=list)
        if not messages:
            raise DataError(f"{path}:{lineno}: field 'messages' is empty")
        for t, m in enumerate(messages):
            if not isinstance(m, dict):
                raise DataError(f"{path}:{lineno}: messages[{t}] is not an object")
            role, content = m.get("role"), m.get("content")
            if role is None:
                raise DataError(f"{path}:{lineno}: messages[{t}] has no 'role'")
            if role not in ROLES:
                raise DataError(f"{path}:{lineno}: messages[{t}] has role {role!r}, not one of {ROLES}")
            if not isinstance(content, str):
                raise DataError(f"{path}:{lineno}: messages[{t}] has no string 'content'")
            if role == "assistant" and not content.strip():
                raise DataError(f"{path}:{lineno}: messages[{t}] is an empty assistant turn")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{path}:{lineno}: no assistant turn (nothing to train on)")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "persona" not in row and "question" not in row:
        raise DataError(f"{path}:{lineno}: neither 'messages' nor a persona record "
                        f"('persona', 'question', 'response')")
    persona = require_field(row, "persona", path, lineno, kind=(dict, str))
    question = require_field(row, "question", path, lineno)
    response = require_field(row, "response", path, lineno)
    if not question.strip():
        raise DataError(f"{path}:{lineno}: field 'question' is empty")
    if not response.strip():
        raise DataError(f"{path}:{lineno}: field 'response' is empty (an empty assistant turn)")
    try:
        prompt = persona_messages(persona, question)
    except (ValueError, TypeError) as e:  # e.g. a persona string that is not JSON
        raise DataError(f"{path}:{lineno}: bad 'persona' ({e})") from e
    return prompt + [{"role": "assistant", "content": response}]


def load_sft_docs(paths, tokenizer, max_len, skip_bad):
    """Read, validate and tokenize samples -> (docs [(ids, mask)], n_skipped, reasons [str])."""
    docs, n_skipped, reasons = [], 0, []
    for path in paths:
        rows, n_bad_json = read_jsonl_checked(path, skip_bad)
        if n_bad_json:  # name the lines: the non-blank ones that read_jsonl_checked did not return
            n_skipped += n_bad_json
            kept = {lineno for lineno, _ in rows}
            with open(path, "rb") as f:
                bad = [i for i, raw in enumerate(f, 1) if raw.strip() and i not in kept]
            reasons += [f"{path}:{i}: malformed JSON or not a UTF-8 JSON object" for i in bad]
        for lineno, row in rows:
            try:
                ids, mask = conversation_ids_and_mask(tokenizer, sample_messages(row, path, lineno))
                if len(ids) > max_len:
                    raise DataError(f"{path}:{lineno}: sample has {len(ids)} tokens, longer than "
                                    f"--max-len {max_len}")
                if sum(mask[1:]) == 0:
                    raise DataError(f"{path}:{lineno}: no assistant tokens after tokenization")
            except DataError as e:
                if not skip_bad:
                    raise
                n_skipped += 1
                reasons.append(str(e))
                continue
            docs.append((ids, mask))
    return docs, n_skipped, reasons


PERSONAS = [
    {"Name": "Mei", "Demographics": {"Age": 34, "Gender": "Female", "Nationality": "Singapore",
     "Language": "English", "Career_Information": "pediatric nurse on night shifts"},
     "Personality": {"MBTI": "ISFJ", "Values_and_Interests": "family, calm routines, baking"},
     "Preference": {"Local_Life": "hawker food", "Travel": "short trips", "Social": "small groups",
                    "Productivity": "checklists", "Content_Interests": "cooking videos"}},
    {"Name": "Tomas", "Demographics": {"Age": 22, "Gender": "Male", "Nationality": "Brazil",
     "Language": "English", "Career_Information": "computer science student"},
     "Personality": {"MBTI": "ENTP", "Values_and_Interests": "open source, football, debate"},
     "Preference": {"Local_Life": "cheap eats", "Travel": "backpacking", "Social": "big parties",
                    "Productivity": "pomodoro", "Content_Interests": "tech podcasts"}},
    {"Name": "Greta", "Demographics": {"Age": 67, "Gender": "Female", "Nationality": "Germany",
     "Language": "English", "Career_Information": "retired teacher"},
     "Personality": {"MBTI": "INFJ", "Values_and_Interests": "gardening, history, grandchildren"},
     "Preference": {"Local_Life": "farmers markets", "Travel": "train journeys", "Social": "book club",
                    "Productivity": "paper diary", "Content_Interests": "documentaries"}},
    {"Name": "Omar", "Demographics": {"Age": 41, "Gender": "Male", "Nationality": "Egypt",
     "Language": "English", "Career_Information": "civil engineer managing a team"},
     "Personality": {"MBTI": "ESTJ", "Values_and_Interests": "efficiency, running, mentoring"},
     "Preference": {"Local_Life": "early gym sessions", "Travel": "business trips", "Social": "colleagues",
                    "Productivity": "calendar blocking", "Content_Interests": "leadership books"}},
]
QUESTIONS = [
    ("How can I sleep better?", "sleep"),
    ("What should I cook this weekend?", "cook"),
    ("How do I stay motivated to exercise?", "exercise"),
    ("Can you suggest a way to relax after work?", "relax"),
    ("How should I plan a short holiday?", "holiday"),
    ("How can I learn something new this month?", "learn"),
    ("What is a good way to organise my week?", "organise"),
    ("How can I make new friends?", "friends"),
    ("What is a simple way to save money?", "money"),
    ("How do I keep my home tidy?", "tidy"),
    ("What book or show should I try next?", "media"),
    ("How can I reduce stress?", "stress"),
]


def builtin_sample():
    """48 templated persona records (4 personas x 12 questions) whose answers use the persona:
    a stand-in until data/persona_world/sft.jsonl exists. Deterministic."""
    rows = []
    for persona in PERSONAS:
        d, pr, pf = persona["Demographics"], persona["Personality"], persona["Preference"]
        for question, topic in QUESTIONS:
            response = (
                f"Since you work as a {d['Career_Information']}, keep it practical. "
                f"For {topic}, start small: pick one step you can do this week and tie it to "
                f"something you already enjoy, like {pr['Values_and_Interests'].split(', ')[0]}. "
                f"Track it with {pf['Productivity']}, and if it helps, involve your {pf['Social']}. "
                f"For ideas, {pf['Content_Interests']} are a good source. Review after two weeks "
                f"and keep what worked.")
            rows.append({"persona": persona, "question": question, "response": response})
    return rows


def split_eval(docs, frac, seed):
    """Deterministic held-out split: shuffle with the seed, the first round(frac*n) are eval."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_eval = round(frac * len(docs)) if len(docs) >= 10 else 0
    return [docs[i] for i in order[n_eval:]], [docs[i] for i in order[:n_eval]]


# ------------------------------------------------------------------------------ main
def main(argv=None):
    args = parse_args(argv)
    env = dist_init(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.model)  # data errors show up before the (slower) model load

    data = args.data
    if data is None:
        if DEFAULT_DATA.exists():
            data = [str(DEFAULT_DATA)]
        else:
            data = [str(out / "builtin_sample.jsonl")]
            if env.rank == 0:
                write_jsonl(data[0], builtin_sample())
            if env.world_size > 1:
                torch.distributed.barrier()
            print0(f"{DEFAULT_DATA} not found: using the built-in sample, written to {data[0]}")
    docs, n_skipped, reasons = load_sft_docs(data, tokenizer, args.max_len, args.skip_bad)
    if args.eval_data:
        eval_docs, n_eval_skipped, eval_reasons = load_sft_docs(args.eval_data, tokenizer,
                                                                args.max_len, args.skip_bad)
        n_skipped += n_eval_skipped
        reasons += eval_reasons
        train_docs = docs
    else:
        train_docs, eval_docs = split_eval(docs, args.eval_frac, args.seed)
    if args.max_eval_samples and len(eval_docs) > args.max_eval_samples:
        print0(f"--max-eval-samples {args.max_eval_samples}: eval loss on {args.max_eval_samples} of "
               f"{len(eval_docs)} held-out samples")
        eval_docs = eval_docs[:args.max_eval_samples]
    if args.max_samples and len(train_docs) > args.max_samples:
        print0(f"--max-samples {args.max_samples}: training on {args.max_samples} of {len(train_docs)} "
               f"samples (pass --max-samples 0 for all)")
        train_docs = train_docs[:args.max_samples]
    if n_skipped:
        print0(f"skipped {n_skipped} bad sample(s) (--skip-bad):")
        for r in reasons[:20]:
            print0("  " + r)
        if len(reasons) > 20:
            print0(f"  ... and {len(reasons) - 20} more (all listed in {out / 'metrics.jsonl'})")
    n_tok = sum(len(d[0]) for d in train_docs)
    print0(f"data: {len(train_docs)} train / {len(eval_docs)} eval samples, {n_tok} train tokens, "
           f"{n_skipped} skipped; world size {env.world_size}, device {env.device}")
    logger = MetricsLogger(out / "metrics.jsonl")
    logger.log({"event": "data", "files": data, "train_samples": len(train_docs),
                "eval_samples": len(eval_docs), "train_tokens": n_tok, "skipped": n_skipped,
                "skipped_reasons": reasons})
    logger.close()

    model, _ = load_model(args.model, device=env.device)
    result = sft_train(model, tokenizer, train_docs, eval_docs, args, out, env)
    if result is not None:
        print0(f"final eval loss: {result['eval_loss']:.4f}")
    dist_cleanup()
    return result


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
