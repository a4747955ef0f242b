"""Personalized generative reward model (GRM) of Critique-Post-Edit, and its Bradley-Terry baseline.

SPEC 1.1. The GRM reads (persona, question, response) and writes a critique block (reasons and
2-3 concrete edits) followed by a scores block (Helpfulness / Personalization / Natural, integers
in [-5, 5]); the PPO reward is 0.35*H + 0.40*P + 0.25*N. Three modes, run in this order:

  annotate  every response of a pairs file is judged by a teacher (the persona-world rubric, an
            OpenAI-compatible endpoint such as GPT-4o-mini, or a local checkpoint; greedy), the
            reply is parsed, pairs whose weighted scores tie are dropped, and the GRM SFT file is
            written. Resumable: each judged response is appended to <grm-data>.items.jsonl
            under a stable id, and a restart skips the ids already there.
  grm       SFT of the model on grm_messages(persona, question, response) -> GRM output text
            (response-only loss, through common.sft_train: packing, DDP/FSDP2, resume, atomic
            checkpoints, as in sft.py). If the GRM file is missing it is annotated first. At the
            end: held-out pairwise accuracy (greedy GRM reply for chosen and reject, the higher
            weighted score wins, ties count 0.5; scored with the probability-weighted scores of
            common.grm_expected_scores, and with the parsed integers for comparison) and the
            parse-failure rate.
  bt        the Bradley-Terry scalar baseline (SPEC 1.1 / 1.4 ablation): a value head on the
            last token of (persona prompt, response), loss -log sigmoid(r_chosen - r_rejected),
            on the same pairs; held-out pairwise accuracy at the end.

Commands:
  python train_grm.py                      # default: the embedded SmolLM2-135M becomes a GRM on
                                           # data/persona_world (2 CPU cores) -> out/grm
  python train_grm.py --mode bt            # BT baseline on the same pairs -> out/bt
  python train_grm.py ... --resume         # continue a crashed run (same flags), either mode
  # annotate PersonaFeedback with GPT-4o-mini (or any OpenAI-compatible server, e.g. vLLM):
  python train_grm.py --mode annotate --teacher endpoint --base-url https://api.openai.com/v1 \
      --teacher-model gpt-4o-mini --pairs ../shared/data/personafeedback/general_*.jsonl \
      --persona-dir ../shared/data/personafeedback/personas --grm-data out/annot/pf_grm.jsonl
  # the paper's GRM recipe (lr 4e-5, 2 epochs, cosine, warmup 0.1, full fine-tune), 8 GPUs:
  torchrun --standalone --nproc_per_node 8 train_grm.py --model path/to/Qwen2.5-7B-Instruct --fsdp \
      --grm-data out/annot/pf_grm.jsonl --pairs ../shared/data/personafeedback/general_*.jsonl \
      --persona-dir ../shared/data/personafeedback/personas --max-train 0 --freeze-layers 0 \
      --lr 4e-5 --epochs 2 --global-batch 64 --max-len 16384 --token-budget 16384 \
      --eval-pairs 0 --eval-max-new-tokens 1024 --save-every 100
  torchrun --standalone --nproc_per_node 8 train_grm.py --mode bt --model path/to/Qwen2.5-7B-Instruct \
      --fsdp --pairs ... --persona-dir ... --max-train 0 --freeze-layers 0 --lr 1e-5 \
      --global-batch 64 --max-len 8192 --token-budget 8192 --eval-pairs 0
"""
import argparse
import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import (
    DEFAULT_MODEL, DataError, MetricsLogger, all_reduce_sum, append_jsonl, chat_completion,
    chat_prompt_ids, conversation_ids_and_mask, cosine_lr, dist_cleanup, dist_init, format_grm_output,
    generate, grm_expected_scores, grm_messages, grm_reward, grm_watch_ids, is_distributed, is_rank0,
    latest_checkpoint, load_model, load_training_state,
    map_concurrent, pack_sequences, parse_grm_critique, parse_grm_scores, persona_messages, print0,
    read_jsonl_checked, require_field, save_model, save_training_state, sft_train, stop_token_ids,
    unsharded, unwrap, wrap_model, write_jsonl,
)

WORLD = Path("data/persona_world")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["grm", "bt", "annotate"], default="grm",
                   help="grm: annotate if the GRM file is missing, then SFT the GRM; "
                        "bt: Bradley-Terry baseline; annotate: only write the GRM SFT file")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF folder or the embedded default")
    p.add_argument("--out", default=None, help="output folder (default out/grm, or out/bt for --mode bt)")
    # data
    p.add_argument("--pairs", nargs="+", default=[str(WORLD / "pairs.jsonl")],
                   help="preference pairs: the persona world's pairs.jsonl or PersonaFeedback files "
                        "(user_id, question, chosen, reject; persona from --persona-dir)")
    p.add_argument("--persona-dir", default=None,
                   help="folder of <user_id>.json personas, for pairs without an inline persona")
    p.add_argument("--eval-pct", type=float, default=10.0,
                   help="pairs without a 'split' field: this percent of users (by hash) is held out")
    p.add_argument("--grm-data", default=str(WORLD / "grm.jsonl"),
                   help="GRM SFT file (persona, question, response, grm_output, split): written by "
                        "annotate, read by grm")
    p.add_argument("--max-train", type=int, default=None,
                   help="use at most this many training examples (GRM rows / BT pairs); 0 = all "
                        "(default: all GRM rows, 128 BT pairs)")
    p.add_argument("--max-len", type=int, default=1536,
                   help="examples longer than this many tokens are dropped (and counted), not cut")
    # annotation teacher
    p.add_argument("--teacher", choices=["rubric", "endpoint", "model"], default="rubric",
                   help="rubric: the persona-world rule judge; endpoint: an OpenAI-compatible chat "
                        "API (the paper: GPT-4o-mini); model: a local checkpoint; all greedy")
    p.add_argument("--base-url", default="https://api.openai.com/v1", help="endpoint teacher: base URL")
    p.add_argument("--teacher-model", default="gpt-4o-mini",
                   help="endpoint teacher: model name; model teacher: checkpoint folder")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="endpoint teacher: env var with the key")
    p.add_argument("--concurrency", type=int, default=8, help="endpoint teacher: parallel requests")
    p.add_argument("--teacher-max-tokens", type=int, default=768, help="teacher reply length cap")
    p.add_argument("--teacher-batch", type=int, default=8,
                   help="model / rubric teacher: responses judged per call (the unit a kill can lose)")
    # training; names and meaning as in sft.py (the GRM trains through common.sft_train)
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (paper, 7B GRM: 4e-5)")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="warmup fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training data")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = epochs)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="examples per optimizer step, all ranks together (GRM documents / BT pairs; "
                        "default 4 for the GRM (with --share-prefix, mostly one question's answers), "
                        "8 for BT; README)")
    p.add_argument("--token-budget", type=int, default=4096,
                   help="GRM: tokens per packed micro-batch per rank (>= --max-len)")
    p.add_argument("--share-prefix", action=argparse.BooleanOptionalAction, default=True,
                   help="GRM: a step's documents come from neighbouring prompts (same persona and "
                        "question) and their shared prompt tokens are computed once (exact; "
                        "common.share_prefixes): about half the tokens on the persona world")
    p.add_argument("--micro-pairs", type=int, default=2,
                   help="BT: pairs per forward/backward pass (gradients accumulate over the step)")
    p.add_argument("--eval-every", type=int, default=0, help="GRM: eval loss every N steps (0 = at the end)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (0 = never)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="GRM: checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the latest ckpt_* in --out")
    p.add_argument("--stop-at-step", type=int, default=0,
                   help="stop after this step without the final save, as if killed (tests --resume)")
    p.add_argument("--freeze-layers", type=int, default=None,
                   help="freeze the embeddings and the bottom N blocks (default: 0 = full fine-tune for "
                        "the GRM, as in the paper; 18 for BT, which keeps its CPU run short)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="on",
                   help="bf16 autocast for training: on (also on CPU: ~1.3x faster on AVX512-BF16 "
                        "CPUs), auto (CUDA with bf16 support only), off")
    p.add_argument("--seed", type=int, default=0, help="data order and sampling seed")
    # held-out pairwise accuracy
    p.add_argument("--eval-pairs", type=int, default=0,
                   help="held-out pairs scored at the end (0 = the whole eval split: 65 pairs in the "
                        "persona world; fewer pairs cannot tell a weak GRM from a coin, README)")
    p.add_argument("--eval-max-new-tokens", type=int, default=224,
                   help="GRM: reply length cap at evaluation (a reply cut before its scores is a "
                        "parse failure)")
    p.add_argument("--eval-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="GRM weights while writing the held-out replies (after the fp32 model is saved): "
                        "bfloat16 about halves the evaluation time on CPU, but its greedy replies differ a "
                        "little: 63.1-66.2%% against 67.7%% in fp32 for the same GRM on 65 pairs (README); "
                        "FSDP2 keeps its dtype")
    p.add_argument("--eval-batch", type=int, default=48,
                   help="GRM replies generated together (the 130 replies of 65 pairs in three batches)")
    args = p.parse_args(argv)
    if args.token_budget < args.max_len:
        p.error(f"--token-budget {args.token_budget} must be at least --max-len {args.max_len}")
    if args.out is None:
        args.out = "out/bt" if args.mode == "bt" else "out/grm"
    if args.global_batch is None:
        args.global_batch = 8 if args.mode == "bt" else 4
    if args.max_train is None:
        args.max_train = 128 if args.mode == "bt" else 0
    if args.freeze_layers is None:  # GRM: 18 frozen blocks measured at chance (README, reward models)
        args.freeze_layers = 18 if args.mode == "bt" else 0
    return args


# ---------------------------------------------------------------------------------------------
# Data: pairs (persona world or PersonaFeedback) with a stable id per pair


def pair_id(persona, question, chosen, reject) -> str:
    """Stable id of a pair: a hash of its content, so re-ordering or extending a file keeps ids."""
    key = json.dumps([persona, question, chosen, reject], ensure_ascii=False, sort_keys=True)
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


def load_persona(persona_dir, user_id, cache):
    if user_id not in cache:
        path = Path(persona_dir) / f"{user_id}.json"
        if not path.exists():
            raise DataError(f"no persona file {path} for user_id '{user_id}'")
        cache[user_id] = json.loads(path.read_text(encoding="utf-8"))
    return cache[user_id]


def held_out(key: str, eval_pct: float) -> bool:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 10000 < eval_pct * 100


def load_pairs(paths, persona_dir=None, eval_pct=10.0):
    """All pairs of the files, each {pair_id, persona, question, chosen, reject, split, tier}."""
    pairs, personas, seen = [], {}, set()
    for path in paths:
        rows, _ = read_jsonl_checked(path, False)
        tier_from_name = Path(path).stem.split("_")[-1]  # general_easy.jsonl -> easy
        for lineno, row in rows:
            question = require_field(row, "question", path, lineno)
            chosen = require_field(row, "chosen", path, lineno)
            reject = require_field(row, "reject", path, lineno)
            if "persona" in row:
                persona = row["persona"]
            elif persona_dir is not None:
                persona = load_persona(persona_dir, require_field(row, "user_id", path, lineno), personas)
            else:
                raise DataError(f"{path}:{lineno}: no 'persona' field; pass --persona-dir")
            if isinstance(persona, str):  # accept a JSON string everywhere (API.md)
                try:
                    persona = json.loads(persona)
                except json.JSONDecodeError:
                    pass  # free-text persona: common.render_persona shows it as is
            pid = pair_id(persona, question, chosen, reject)
            if pid in seen:
                continue
            seen.add(pid)
            user = str(row.get("user_id", question))
            split = row.get("split") or ("eval" if held_out(user, eval_pct) else "train")
            pairs.append({"pair_id": pid, "user_id": row.get("user_id"), "persona": persona,
                          "question": question, "chosen": chosen, "reject": reject, "split": split,
                          "tier": row.get("tier", tier_from_name), "category": row.get("category")})
    return pairs


# ---------------------------------------------------------------------------------------------
# Annotation (SPEC 1.1): teacher critique + scores for every response, ties dropped


def rubric_teacher(items):
    from data.persona_world.rubric import rubric_grm_output
    return [rubric_grm_output(it["persona"], it["question"], it["response"]) for it in items]


def endpoint_teacher(args):
    def judge_one(it):
        try:
            out = chat_completion(args.base_url, args.teacher_model,
                                  grm_messages(it["persona"], it["question"], it["response"]),
                                  temperature=0.0, max_tokens=args.teacher_max_tokens,
                                  api_key_env=args.api_key_env)
            return out["choices"][0]["message"]["content"]
        except (common.EndpointError, KeyError, IndexError, TypeError) as e:
            print0(f"teacher call failed for {it['item_id']}: {e}")
            return None  # not recorded: a rerun retries it

    return lambda items: map_concurrent(judge_one, items, max_workers=args.concurrency)


def model_teacher(args):
    model, tok = load_model(args.teacher_model)
    model.eval()
    stops = stop_token_ids(tok)

    def judge(items):
        prompts = [chat_prompt_ids(tok, grm_messages(it["persona"], it["question"], it["response"]))
                   for it in items]
        with torch.no_grad():
            gen = generate(model, prompts, args.teacher_max_tokens, temperature=0.0, stop_ids=stops)
        return [tok.decode(t, skip_special_tokens=True) for t in gen.tokens]

    return judge


def read_done_items(path: Path) -> dict:
    """Items already judged, by item id. A line cut by a kill is removed, so appends stay valid."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:  # drop the torn last line (the process died mid-write)
            f.truncate(data.rfind(b"\n") + 1)
    rows, _ = read_jsonl_checked(str(path), True)
    return {row["item_id"]: row for _, row in rows if "item_id" in row}


def pair_outcomes(pair_ids, annotations):
    """Keep pairs whose two responses both parsed and whose weighted scores differ (SPEC 1.1).

    annotations: item id ('<pair_id>:chosen' / ':reject') -> row with 'scores' (dict or None).
    Returns (kept [{pair_id, chosen_score, reject_score}], stats)."""
    kept = []
    stats = {"pairs": 0, "kept": 0, "ties": 0, "parse_failures": 0, "missing": 0, "teacher_agrees": 0}
    for pid in pair_ids:
        stats["pairs"] += 1
        c, r = annotations.get(f"{pid}:chosen"), annotations.get(f"{pid}:reject")
        if c is None or r is None:
            stats["missing"] += 1
            continue
        if c["scores"] is None or r["scores"] is None:
            stats["parse_failures"] += 1
            continue
        sc, sr = grm_reward(c["scores"]), grm_reward(r["scores"])
        if math.isclose(sc, sr, abs_tol=1e-9):
            stats["ties"] += 1
            continue
        stats["kept"] += 1
        stats["teacher_agrees"] += int(sc > sr)
        kept.append({"pair_id": pid, "chosen_score": sc, "reject_score": sr})
    return kept, stats


def annotate(args, pairs, out_path: Path, judge=None):
    """Judge every response of `pairs`, appending to <out>.items.jsonl; then write the GRM file."""
    items_path = out_path.with_name(out_path.name + ".items.jsonl")
    items_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_done_items(items_path)
    todo = [{"item_id": f"{pr['pair_id']}:{side}", "pair_id": pr["pair_id"], "side": side,
             "persona": pr["persona"], "question": pr["question"], "response": pr[side],
             "split": pr["split"]}
            for pr in pairs for side in ("chosen", "reject")]
    todo = [it for it in todo if it["item_id"] not in done]
    print0(f"annotate: {len(pairs)} pairs, {len(done)} responses already judged, {len(todo)} to go "
           f"(teacher: {args.teacher}) -> {items_path}")
    if judge is None:
        judge = {"rubric": lambda: rubric_teacher, "endpoint": lambda: endpoint_teacher(args),
                 "model": lambda: model_teacher(args)}[args.teacher]() if todo else None
    # judged items are appended one by one, after each chunk: a kill loses at most one chunk
    chunk = max(args.concurrency * 4 if args.teacher == "endpoint" else args.teacher_batch, 1)
    n_failed_calls = 0
    bar = tqdm(total=len(todo), desc="annotate", disable=not todo)
    for i in range(0, len(todo), chunk):
        items = todo[i:i + chunk]
        for it, text in zip(items, judge(items)):
            if text is None:
                n_failed_calls += 1
                continue
            scores = parse_grm_scores(text)
            row = {k: it[k] for k in ("item_id", "pair_id", "side", "split")}
            row.update(raw=text, scores=scores, critique=parse_grm_critique(text) if scores else None)
            append_jsonl(str(items_path), row)
            done[row["item_id"]] = row
            bar.update(1)
    bar.close()

    kept, stats = pair_outcomes([pr["pair_id"] for pr in pairs], done)
    by_id = {pr["pair_id"]: pr for pr in pairs}
    rows = []
    for k in kept:
        pr = by_id[k["pair_id"]]
        for side in ("chosen", "reject"):
            a = done[f"{k['pair_id']}:{side}"]
            rows.append({"pair_id": pr["pair_id"], "side": side, "user_id": pr["user_id"],
                         "persona": pr["persona"], "question": pr["question"], "response": pr[side],
                         "critique": a["critique"], "scores": a["scores"],
                         # normalised text: the GRM learns one clean format whatever the teacher wrote
                         "grm_output": format_grm_output(a["critique"], a["scores"]),
                         "split": pr["split"]})
    stats["failed_calls"] = n_failed_calls
    if stats["missing"] == 0:
        write_jsonl(str(out_path), rows)
        print0(f"annotate: wrote {len(rows)} GRM examples to {out_path}; {stats}")
    else:
        print0(f"annotate: {stats['missing']} pairs still unjudged ({n_failed_calls} failed calls): "
               f"rerun to finish; {out_path} not written. {stats}")
    return rows, stats


# ---------------------------------------------------------------------------------------------
# GRM: SFT data and held-out pairwise accuracy


def grm_doc(tokenizer, persona, question, response, grm_output):
    """(ids, mask): the GRM prompt, then the GRM output as the assistant turn (the only loss)."""
    messages = grm_messages(persona, question, response) + [{"role": "assistant", "content": grm_output}]
    return conversation_ids_and_mask(tokenizer, messages)


def pairwise_accuracy(chosen_scores, reject_scores) -> float:
    """Fraction of pairs where chosen scores higher; a tie counts half (a coin flip)."""
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen_scores, reject_scores)]
    return sum(wins) / max(len(wins), 1)


def grm_pairwise_eval(model, tokenizer, pairs, env, max_new_tokens, batch_size):
    """Greedy GRM replies for chosen and reject of each pair; the higher weighted score wins. The
    score is the probability-weighted one (grm_expected_scores; pairwise_acc) and, for comparison,
    the one parsed from the text (pairwise_acc_parsed), where many pairs tie.

    Pairs are split over ranks. Returns (metrics, per-pair rows of all ranks)."""
    mine = pairs[env.rank::env.world_size]
    items = [(pr, side) for pr in mine for side in ("chosen", "reject")]
    prompts = [chat_prompt_ids(tokenizer, grm_messages(pr["persona"], pr["question"], pr[side]))
               for pr, side in items]
    stops, watch = stop_token_ids(tokenizer), grm_watch_ids(tokenizer)
    texts, reply_ids, watched = [], [], []
    model.eval()
    with torch.no_grad(), unsharded(model):
        for i in tqdm(range(0, len(prompts), batch_size), desc="grm eval", disable=not is_rank0()):
            gen = generate(unwrap(model), prompts[i:i + batch_size], max_new_tokens, temperature=0.0,
                           stop_ids=stops, watch_ids=watch)
            texts += [tokenizer.decode(t, skip_special_tokens=True) for t in gen.tokens]
            reply_ids += gen.tokens
            watched += gen.watched
    # probability-weighted scores of the same replies (common.grm_expected_scores, as in ppo_cpe),
    # from the score-token probabilities the engine recorded while it wrote them
    expected = [grm_reward(grm_expected_scores(None, tokenizer, prompt, reply, watched=w))
                for prompt, reply, w in zip(prompts, reply_ids, watched)]
    rows = []
    for j, pr in enumerate(mine):
        tc, tr = texts[2 * j], texts[2 * j + 1]
        pc, pr_ = parse_grm_scores(tc), parse_grm_scores(tr)
        rows.append({"pair_id": pr["pair_id"], "tier": pr.get("tier"),
                     "chosen_score": expected[2 * j], "reject_score": expected[2 * j + 1],
                     "chosen_parsed": grm_reward(pc), "reject_parsed": grm_reward(pr_),
                     "parse_failures": (pc is None) + (pr_ is None), "chosen_reply": tc, "reject_reply": tr})
    rows = gather_rows(rows, env)
    metrics = accuracy_report(rows)  # on the expected scores
    metrics["pairwise_acc_parsed"] = pairwise_accuracy([r["chosen_parsed"] for r in rows],
                                                       [r["reject_parsed"] for r in rows])
    metrics["parse_fail_rate"] = sum(r["parse_failures"] for r in rows) / max(2 * len(rows), 1)
    return metrics, rows


def accuracy_report(rows):
    """Pairwise accuracy overall and per tier, from rows with chosen_score / reject_score / tier."""
    def acc(rs):
        return pairwise_accuracy([r["chosen_score"] for r in rs], [r["reject_score"] for r in rs])
    tiers = sorted({str(r.get("tier")) for r in rows})
    return {"pairwise_acc": acc(rows), "eval_pairs": len(rows),
            "acc_by_tier": {t: round(acc([r for r in rows if str(r.get("tier")) == t]), 4) for t in tiers}}


def eval_pairs_sample(pairs, n, seed):
    held = [p for p in pairs if p["split"] != "train"]
    random.Random(seed).shuffle(held)
    return held if n <= 0 else held[:n]


def grm_training_rows(grm_path, pairs, max_train, seed):
    """GRM rows -> (train rows, eval-loss rows, responses excluded): the train split, shuffled,
    the first max_train (0 = all), without any response of a held-out pair, whatever the GRM
    file's split says; eight rows of the other split for the eval loss (the real test is the
    held-out pairwise accuracy)."""
    held_text = {(p["question"], p[s]) for p in pairs if p["split"] != "train" for s in ("chosen", "reject")}
    train_rows, eval_rows, n_held = [], [], 0
    for lineno, row in read_jsonl_checked(grm_path, False)[0]:
        require_field(row, "persona", grm_path, lineno, kind=(dict, str))
        for f in ("question", "response", "grm_output"):
            require_field(row, f, grm_path, lineno)
        if row.get("split", "train") != "train":
            eval_rows.append(row)
        elif (row["question"], row["response"]) in held_text:
            n_held += 1
        else:
            train_rows.append(row)
    random.Random(seed).shuffle(train_rows)
    random.Random(seed + 1).shuffle(eval_rows)
    return (train_rows[:max_train] if max_train > 0 else train_rows), eval_rows[:8], n_held


def run_grm(args, env):
    out = Path(args.out)
    grm_path = Path(args.grm_data)
    have_pairs = all(Path(p).exists() for p in args.pairs)
    pairs = load_pairs(args.pairs, args.persona_dir, args.eval_pct) if have_pairs else []
    if not grm_path.exists():  # annotate if needed (rank 0 judges, the others wait)
        if not pairs:
            raise DataError(f"{grm_path}: file not found, and no pairs file to annotate from: {args.pairs}")
        if is_rank0():
            annotate(args, pairs, grm_path)
        if is_distributed():
            torch.distributed.barrier()
        if not grm_path.exists():
            raise SystemExit("annotation is incomplete (failed teacher calls): rerun to continue it")

    model, tok = load_model(args.model, device=env.device)
    heldout = eval_pairs_sample(pairs, args.eval_pairs, args.seed)
    train_rows, eval_rows, n_held = grm_training_rows(grm_path, pairs, args.max_train, args.seed)

    def docs_of(rows):  # tokenised GRM conversations; over-long ones dropped (and counted)
        docs = [grm_doc(tok, r["persona"], r["question"], r["response"], r["grm_output"]) for r in rows]
        return [d for d in docs if len(d[0]) <= args.max_len], sum(len(d[0]) > args.max_len for d in docs)

    (train_docs, n_long), (eval_docs, _) = docs_of(train_rows), docs_of(eval_rows)
    print0(f"GRM data: {len(train_docs)} train / {len(eval_docs)} eval-loss examples from {grm_path} "
           f"({n_long} over --max-len dropped, {n_held} held-out responses excluded); "
           f"{len(heldout)} held-out pairs for the pairwise accuracy")

    freeze_bottom(model, args.freeze_layers)
    t0 = time.time()
    result = sft_train(model, tok, train_docs, eval_docs, args, out, env)  # wraps `model` itself
    if result is None:  # --stop-at-step
        return
    train_seconds = time.time() - t0
    # the optimizer and the training activations are freed: give their kept CPU memory back, so
    # that the evaluation's KV cache does not stack on it (common.keep_freed_cpu_memory)
    common.return_freed_cpu_memory()
    if heldout:
        t0 = time.time()
        if args.eval_dtype == "bfloat16" and not common.is_fsdp(model):
            model = unwrap(model).to(torch.bfloat16)  # the fp32 weights are saved already
        metrics, per_pair = grm_pairwise_eval(model, tok, heldout, env, args.eval_max_new_tokens,
                                              args.eval_batch)
        metrics.update(train_seconds=round(train_seconds, 1), eval_seconds=round(time.time() - t0, 1),
                       train_loss=result["train_loss"], eval_loss=result["eval_loss"])
        print0(f"GRM held-out: pairwise accuracy {metrics['pairwise_acc']:.3f} on "
               f"{metrics['eval_pairs']} pairs, parse failures {metrics['parse_fail_rate']:.1%}")
        if is_rank0():
            write_jsonl(out / "heldout_pairs.jsonl", per_pair)
            (out / "heldout_metrics.json").write_text(json.dumps(metrics, indent=2))
            with MetricsLogger(out / "metrics.jsonl") as logger:
                logger.log({"final": True, "heldout": metrics})


def freeze_bottom(model, n_layers):
    """Train only the blocks above the first n_layers (and the final norm, head, value head): the
    backward pass stops early, which roughly halves the cost of a CPU step."""
    if n_layers <= 0:
        return
    model.model.embed_tokens.weight.requires_grad_(False)  # tied to the output layer when tied
    for block in model.model.layers[:n_layers]:
        block.requires_grad_(False)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"training {n_train / 1e6:.1f}M of {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
           f"parameters (--freeze-layers {n_layers})")


def gather_rows(rows, env):
    if env.world_size == 1:
        return rows
    everyone = [None] * env.world_size
    torch.distributed.all_gather_object(everyone, rows)
    return [r for part in everyone for r in part]


# ---------------------------------------------------------------------------------------------
# Bradley-Terry baseline (SPEC 1.1 baseline, SPEC 1.4 ablation)


def bt_ids(tokenizer, persona, question, response):
    """Token ids of (persona prompt, response), ending at the response's end-of-turn token.

    The reward is the value head at the last of these ids; ppo_cpe scores rollouts the same way."""
    ids, mask = conversation_ids_and_mask(
        tokenizer, persona_messages(persona, question) + [{"role": "assistant", "content": response}])
    last = max(i for i, m in enumerate(mask) if m)
    return ids[:last + 1]


def last_token_values(values, cu_seqlens):
    """values [1, T] of a packed row -> the value at each document's last position [n_docs]."""
    return values[0, cu_seqlens[1:].long() - 1]


def bt_loss(r_chosen, r_rejected):
    """Bradley-Terry loss, mean over pairs: -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def bt_rewards(model, seqs, device):
    """Scalar reward of each sequence: one packed forward, the value head at each last token."""
    ids, cu = pack_sequences(seqs, device)
    return last_token_values(model.values(ids, cu), cu)


def bt_eval(model, tok, pairs, env, batch_pairs):
    """Held-out pairwise accuracy of the scalar reward, and corr(reward, length in characters):
    a reward that tracks length is the one PPO will hack (SPEC 1.4)."""
    mine = pairs[env.rank::env.world_size]
    rc, rr, len_c, len_r = [], [], [], []
    model.eval()
    with torch.no_grad(), unsharded(model):  # ranks may run different numbers of batches
        for i in range(0, len(mine), batch_pairs):
            batch = mine[i:i + batch_pairs]
            seqs = [bt_ids(tok, p["persona"], p["question"], p[s]) for p in batch for s in ("chosen", "reject")]
            r = bt_rewards(model, seqs, env.device).float().cpu()
            rc += r[0::2].tolist()
            rr += r[1::2].tolist()
            len_c += [len(p["chosen"]) for p in batch]
            len_r += [len(p["reject"]) for p in batch]
    model.train()
    rows = gather_rows([{"tier": p.get("tier"), "chosen_score": c, "reject_score": r, "len_c": lc, "len_r": lr}
                        for p, c, r, lc, lr in zip(mine, rc, rr, len_c, len_r)], env)
    rewards = torch.tensor([r["chosen_score"] for r in rows] + [r["reject_score"] for r in rows])
    lengths = torch.tensor([r["len_c"] for r in rows] + [r["len_r"] for r in rows], dtype=torch.float32)
    corr = torch.corrcoef(torch.stack([rewards, lengths]))[0, 1].item() if len(rows) > 1 else float("nan")
    margin = (sum(r["chosen_score"] for r in rows) - sum(r["reject_score"] for r in rows)) / max(len(rows), 1)
    return {**accuracy_report(rows), "mean_margin": margin, "corr_reward_length": corr}


def run_bt(args, env):
    out = Path(args.out)
    pairs = load_pairs(args.pairs, args.persona_dir, args.eval_pct)
    train = [p for p in pairs if p["split"] == "train"]
    random.Random(args.seed).shuffle(train)
    if args.max_train > 0:
        train = train[:args.max_train]
    heldout = eval_pairs_sample(pairs, args.eval_pairs, args.seed)

    model, tok = load_model(args.model, device=env.device, value_head=True)
    seqs = [(bt_ids(tok, p["persona"], p["question"], p["chosen"]),
             bt_ids(tok, p["persona"], p["question"], p["reject"])) for p in train]
    n_long = sum(max(len(c), len(r)) > args.max_len for c, r in seqs)
    seqs = [(c, r) for c, r in seqs if max(len(c), len(r)) <= args.max_len]
    print0(f"BT data: {len(seqs)} train pairs ({n_long} over --max-len dropped), "
           f"{len(heldout)} held-out pairs")
    if not seqs:
        raise DataError(f"no training pairs in {args.pairs}")

    # Data parallel by hand: DDP only hooks forward(), and the reward comes from .values(). Each
    # rank takes every W-th pair of the step, then gradients are averaged with one all-reduce.
    # FSDP2 is told that .values() is a forward method, so it gathers the shards around it.
    W = env.world_size
    freeze_bottom(model, args.freeze_layers)
    model.train()
    if args.fsdp and W > 1:
        from torch.distributed.fsdp import register_fsdp_forward_method
        model = wrap_model(model, "fsdp", env)
        register_fsdp_forward_method(model, "values")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = common.adamw(params, lr=args.lr, weight_decay=args.weight_decay)
    G = args.global_batch
    steps_per_epoch = math.ceil(len(seqs) / G)
    total = args.max_steps or args.epochs * steps_per_epoch
    warmup = round(args.warmup_ratio * total)
    step = 0
    ckpt = latest_checkpoint(out) if args.resume else None
    if ckpt is not None:
        step, _ = load_training_state(ckpt, model, opt)
        print0(f"resumed from {ckpt} at step {step}/{total}")
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=args.bf16 == "on" or (
        args.bf16 == "auto" and env.device.type == "cuda" and torch.cuda.is_bf16_supported()))
    logger = MetricsLogger(out / "metrics.jsonl")
    bar = tqdm(total=total, initial=step, desc="bt", disable=not is_rank0(), dynamic_ncols=True)
    t_last = time.time()
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        step_pairs = order[k * G:(k + 1) * G]  # the data position follows from the step (resume)
        mine = step_pairs[env.rank::W]
        # micro-batches of --micro-pairs pairs (chosen and rejected packed in one forward); every
        # rank runs the same number of passes (FSDP2 collectives), empty ones on one pair at weight 0
        n_passes = math.ceil(math.ceil(G / W) / args.micro_pairs)
        loss_sum, n_right, n_tok, margins = 0.0, 0, 0, []
        for j in range(n_passes):
            part = mine[j * args.micro_pairs:(j + 1) * args.micro_pairs]
            batch = [x for i in (part or step_pairs[:1]) for x in seqs[i]]  # chosen, reject, ...
            with autocast:
                r = bt_rewards(model, batch, env.device).float()
            loss = bt_loss(r[0::2], r[1::2])
            # weight by the pass's share of the step, so the sum over passes and ranks is the mean
            # over all the step's pairs (FSDP2 averages gradients over ranks: hence its factor W)
            (loss * (len(part) / len(step_pairs)) * (W if args.fsdp and W > 1 else 1)).backward()
            if part:
                loss_sum += loss.item() * len(part)
                n_right += int((r[0::2] > r[1::2]).sum())
                n_tok += sum(len(x) for x in batch)
                margins += (r[0::2] - r[1::2]).tolist()
        if W > 1 and not args.fsdp:
            for p in params:
                all_reduce_sum(p.grad)  # sum of the ranks' weighted means = the global mean
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        lr = cosine_lr(step, total, warmup, args.lr, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        stats = all_reduce_sum(torch.tensor([loss_sum, n_right, len(mine), n_tok], dtype=torch.float64))
        now = time.time()
        row = {"step": step, "epoch": round(epoch + (k + 1) / steps_per_epoch, 4),
               "loss": stats[0].item() / stats[2].item(), "acc": stats[1].item() / stats[2].item(),
               "margin": sum(margins) / max(len(margins), 1), "lr": lr, "grad_norm": float(gnorm),
               "tok_per_s": stats[3].item() / max(now - t_last, 1e-9)}
        logger.log(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['acc']:.2f}")
        bar.update(1)
        if args.save_every and step % args.save_every == 0 and step < total:
            save_training_state(out / f"ckpt_{step:06d}", model, opt, step, {"mode": "bt"})
        t_last = time.time()
        if args.stop_at_step and step == args.stop_at_step and step < total:
            bar.close()
            logger.close()
            print0(f"stopped after step {step} (--stop-at-step); continue with --resume")
            return None
    bar.close()
    metrics = bt_eval(model, tok, heldout, env, args.micro_pairs * 2)
    print0(f"BT held-out: pairwise accuracy {metrics['pairwise_acc']:.3f} on {metrics['eval_pairs']} "
           f"pairs; corr(reward, length) {metrics['corr_reward_length']:.2f}")
    logger.log({"final": True, "heldout": metrics})
    logger.close()
    save_model(model, tok, out)  # keeps metrics.jsonl and ckpt_* (collective under FSDP2)
    if is_rank0():
        (out / "heldout_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics



def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    if args.mode == "annotate":
        return annotate(args, load_pairs(args.pairs, args.persona_dir, args.eval_pct), Path(args.grm_data))
    env = dist_init()
    try:
        return run_grm(args, env) if args.mode == "grm" else run_bt(args, env)
    finally:
        dist_cleanup()


if __name__ == "__main__":
    main()
