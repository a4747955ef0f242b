"""Data for the personalized generative reward model (GRM) of Critique-Post-Edit, and its
Bradley-Terry baseline (SPEC 1.1).

The GRM reads (persona, question, response) and writes a critique (reasons, 2-3 concrete edits),
then three scores (Helpfulness / Personalization / Natural, integers in [-5, 5]); the PPO reward is
0.35*H + 0.40*P + 0.25*N. The paper trains it by plain SFT on teacher annotations: this stage
writes that SFT file, sft.py trains on it. Two modes:

  annotate  (default) a teacher judges every response of the pairs, greedy: the persona-world
            rubric (data/persona_world/rubric.py), an OpenAI-compatible endpoint (the paper:
            GPT-4o-mini) or a local checkpoint. A failed call or a reply without critique or scores
            is counted and left for a rerun (exit code 1 while pairs remain unjudged); pairs whose
            weighted scores tie are dropped; each response of the others is a row {pair_id, side,
            user_id, persona, question, response, critique, scores, grm_output, split} of the GRM
            SFT file. Resumable: judged responses go to <grm-data>.items.jsonl, a rerun skips them.
  bt        the Bradley-Terry scalar reward model (SPEC 1.1 baseline, SPEC 1.4 ablation): a value
            head on the last token of (persona prompt, response), loss -log sigmoid(r_c - r_r), on
            the same pairs; held-out pairwise accuracy and corr(reward, length) go to
            <out>/heldout_metrics.json, the model to <out> (HF format + value_head.safetensors).

The persona world on 2 CPU cores with the embedded SmolLM2-135M:
  python train_grm.py                                    # rubric teacher -> out/grm_data.jsonl
  python sft.py --data out/grm_data.jsonl --out out/grm --max-samples 0 --epochs 1 --lr 2e-4
  python eval_persona.py accuracy --data data/persona_world/pairs.jsonl --judge grm --model out/grm
  python train_grm.py --mode bt                          # -> out/bt (--resume after a kill)
PersonaFeedback judged by GPT-4o-mini (or any OpenAI-compatible server, e.g. vLLM), then the BT
baseline on 8 GPUs (FSDP2); the paper's GRM is sft.py on that file (lr 4e-5, 2 epochs, warmup 0.1):
  python train_grm.py --teacher endpoint --teacher-model gpt-4o-mini --persona-dir \
      ../shared/data/personafeedback/personas --pairs ../shared/data/personafeedback/general_*.jsonl \
      --grm-data out/annot/pf_grm.jsonl
  torchrun --standalone --nproc_per_node 8 train_grm.py --mode bt --model path/to/Qwen2.5-7B-Instruct \
      --pairs ../shared/data/personafeedback/general_*.jsonl --persona-dir ... --max-train 0 \
      --freeze-layers 0 --lr 1e-5 --global-batch 64 --max-len 8192 --token-budget 16384 --checkpointing
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
from common import DataError, append_jsonl, grm_reward, print0, read_jsonl, require_field


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["annotate", "bt", "grm"], default="annotate",
                   help="annotate: write the GRM SFT file; bt: train the Bradley-Terry baseline (grm: now sft.py)")
    p.add_argument("--pairs", nargs="+", default=["data/persona_world/pairs.jsonl"],
                   help="JSONL pairs {user_id, question, chosen, reject, persona (or --persona-dir), split}")
    p.add_argument("--persona-dir", default=None, help="folder of <user_id>.json personas (PersonaFeedback)")
    p.add_argument("--eval-pct", type=float, default=10.0, help="pairs without 'split': %% of users held out")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad pair lines instead of stopping")
    p.add_argument("--grm-data", default="out/grm_data.jsonl", help="annotate: the GRM SFT file written")
    p.add_argument("--teacher", choices=["rubric", "endpoint", "model"], default="rubric",
                   help="rubric: the persona-world rule judge; endpoint: a chat API; model: a local checkpoint")
    p.add_argument("--teacher-model", default="gpt-4o-mini", help="endpoint: served model name; model: a folder")
    p.add_argument("--base-url", default="https://api.openai.com/v1", help="endpoint: base URL")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="endpoint: env var holding the key")
    p.add_argument("--concurrency", type=int, default=8, help="endpoint: parallel requests")
    p.add_argument("--timeout", type=float, default=60.0, help="endpoint: seconds per request")
    p.add_argument("--retries", type=int, default=3, help="endpoint: retries of a failed request")
    p.add_argument("--backoff", type=float, default=1.0, help="endpoint: first retry wait in s (doubles)")
    p.add_argument("--teacher-max-tokens", type=int, default=768, help="teacher reply length cap")
    p.add_argument("--teacher-batch", type=int, default=8, help="model / rubric teacher: responses per call")
    p.add_argument("--model", default=common.DEFAULT_MODEL, help="bt: HF folder or the embedded default")
    p.add_argument("--out", default="out/bt", help="bt: output folder")
    p.add_argument("--max-train", type=int, default=128, help="bt: training pairs used (0 = all)")
    p.add_argument("--max-len", type=int, default=1536, help="bt: pairs with a longer sequence are dropped")
    p.add_argument("--token-budget", type=int, default=4096,
                   help="bt: tokens per micro-batch per rank (>= 2 x --max-len: a pair stays together)")
    p.add_argument("--global-batch", type=int, default=8, help="bt: pairs per optimizer step, all ranks")
    p.add_argument("--epochs", type=int, default=1, help="bt: passes over the training pairs")
    p.add_argument("--max-steps", type=int, default=0, help="bt: optimizer steps (0 = from --epochs)")
    p.add_argument("--lr", type=float, default=2e-4, help="bt: peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="bt: cosine floor, fraction of --lr")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="bt: linear warmup, fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="bt: AdamW weight decay (matrices)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="bt: gradient norm clip")
    p.add_argument("--freeze-layers", type=int, default=18,
                   help="bt: freeze the embeddings and the bottom N blocks (18 of 30: a short CPU run; 0 = none)")
    p.add_argument("--precision", choices=common.PRECISIONS, default="auto", help="bt: auto: bf16-mixed on CUDA")
    p.add_argument("--checkpointing", action="store_true", help="bt: recompute activations in the backward")
    p.add_argument("--eval-pairs", type=int, default=0, help="bt: held-out pairs scored at the end (0 = all)")
    p.add_argument("--save-every", type=int, default=50, help="bt: training checkpoint every N steps (0 = never)")
    p.add_argument("--resume", action="store_true", help="bt: continue from the latest ckpt_* in --out")
    p.add_argument("--overwrite", action="store_true", help="bt: replace a finished run in --out")
    p.add_argument("--stop-at-step", type=int, default=0, help="bt: stop after this step as if killed (tests)")
    p.add_argument("--seed", type=int, default=0, help="data order seed")
    a = p.parse_args(argv)
    if a.mode == "grm":
        p.error(f"--mode grm is gone: the GRM is plain SFT on the annotated file: python sft.py --data {a.grm_data} "
                f"--out out/grm ... (its accuracy: python eval_persona.py accuracy --judge grm --model out/grm ...)")
    at_least = {"concurrency": 1, "teacher_max_tokens": 1, "teacher_batch": 1, "max_len": 1, "global_batch": 1,
                "epochs": 1, "retries": 0, "backoff": 0, "max_train": 0, "max_steps": 0, "weight_decay": 0,
                "freeze_layers": 0, "eval_pairs": 0, "save_every": 0, "stop_at_step": 0}
    rules = [(k, getattr(a, k) >= low, f">= {low}") for k, low in at_least.items()] + [
        (k, getattr(a, k) > 0, "> 0") for k in ("timeout", "lr", "grad_clip")] + [
        ("eval_pct", 0 <= a.eval_pct <= 100, "in [0, 100]"), ("min_lr_ratio", 0 <= a.min_lr_ratio <= 1, "in [0, 1]"),
        ("warmup_ratio", 0 <= a.warmup_ratio < 1, "in [0, 1)"),
        ("token_budget", a.token_budget >= 2 * a.max_len, f">= 2 x --max-len ({2 * a.max_len})")]
    for name, ok, want in rules:
        if not ok or not math.isfinite(getattr(a, name)):
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)} must be {want}")
    for path in a.pairs:
        if not Path(path).is_file():
            p.error(f"--pairs {path}: file not found")
    if a.persona_dir is not None and not Path(a.persona_dir).is_dir():
        p.error(f"--persona-dir {a.persona_dir}: folder not found")
    return a


# ---------------------------------------------------------------------------------------------
# Pairs (persona world or PersonaFeedback), each with a stable id

def row_persona(row, path, lineno, persona_dir, cache):
    """The pair's persona, inline or from <persona_dir>/<user_id>.json: a dict, a JSON string of one
    (parsed) or free text; anything else is a DataError naming file and line."""
    if "persona" in row:
        persona = require_field(row, "persona", path, lineno, kind=(dict, str))
    elif persona_dir is None:
        raise DataError(f"{path}:{lineno}: no 'persona' field; pass --persona-dir")
    else:
        file = Path(persona_dir) / f"{require_field(row, 'user_id', path, lineno, kind=(str, int))}.json"
        if file not in cache:
            try:
                cache[file] = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise DataError(f"{path}:{lineno}: persona file {file}: {e}") from None
        persona = cache[file]
    try:
        persona = json.loads(persona) if isinstance(persona, str) else persona
    except json.JSONDecodeError:
        return persona  # free text: common.render_persona shows it as is
    if not isinstance(persona, (dict, str)):
        raise DataError(f"{path}:{lineno}: persona should be an object, got {type(persona).__name__}")
    return persona

def load_pairs(paths, persona_dir=None, eval_pct=10.0, skip_bad=False):
    """(pairs, skipped): every distinct pair of the files as {pair_id, user_id, persona, question,
    chosen, reject, split, tier, category}; with skip_bad, bad lines are listed, not raised."""
    pairs, skipped, personas, seen = [], [], {}, set()
    for path in paths:
        rows, bad = read_jsonl(path, skip_bad)
        skipped += bad
        tier_from_name = Path(path).stem.split("_")[-1]  # general_easy.jsonl -> easy
        for lineno, row in rows:
            try:
                question, chosen, reject = (require_field(row, k, path, lineno) for k in ("question", "chosen", "reject"))
                persona = row_persona(row, path, lineno, persona_dir, personas)
            except DataError as e:
                if not skip_bad:
                    raise
                skipped.append(str(e))
                continue
            # the id hashes the content: re-ordering or extending a file keeps the ids (resume)
            key = json.dumps([persona, question, chosen, reject], ensure_ascii=False, sort_keys=True)
            pid = hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]
            if pid in seen:
                continue
            seen.add(pid)
            user_hash = int(hashlib.sha1(str(row.get("user_id", question)).encode()).hexdigest()[:8], 16)
            split = row.get("split") or ("eval" if user_hash % 10000 < eval_pct * 100 else "train")  # by user
            pairs.append({"pair_id": pid, "user_id": row.get("user_id"), "persona": persona, "question": question,
                          "chosen": chosen, "reject": reject, "split": split,
                          "tier": row.get("tier", tier_from_name), "category": row.get("category")})
    if skipped:
        print0(f"skipped {len(skipped)} bad pair lines (--skip-bad), first: {skipped[0]}")
    if not pairs:
        raise DataError(f"no pairs in {' '.join(map(str, paths))}")
    return pairs, skipped


# ---------------------------------------------------------------------------------------------
# annotate (SPEC 1.1): teacher critique + scores for every response, ties dropped

def rubric_teacher(items):
    from data.persona_world.rubric import rubric_grm_output
    return [rubric_grm_output(it["persona"], it["question"], it["response"]) for it in items]

def endpoint_teacher(args):
    """items -> replies: the reply text, or the EndpointError of a call that failed for good."""
    def judge_one(it):
        try:
            out = common.chat_completion(args.base_url, args.teacher_model,
                                         common.grm_messages(it["persona"], it["question"], it["response"]),
                                         temperature=0.0, max_tokens=args.teacher_max_tokens, timeout=args.timeout,
                                         retries=args.retries, backoff=args.backoff, api_key_env=args.api_key_env)
            return out["choices"][0]["message"]["content"]
        except (common.EndpointError, KeyError, IndexError, TypeError) as e:  # KeyError...: no message content
            return e
    return lambda items: common.map_concurrent(judge_one, items, max_workers=args.concurrency)

def model_teacher(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = common.load_model(args.teacher_model, device, torch.bfloat16 if device == "cuda" else torch.float32)
    stops = common.stop_token_ids(tok)

    def judge(items):
        prompts = [common.chat_prompt_ids(tok, common.grm_messages(it["persona"], it["question"], it["response"]))
                   for it in items]
        gen = common.generate(model, prompts, args.teacher_max_tokens, temperature=0.0, stop_ids=stops)
        return [tok.decode(t, skip_special_tokens=True) for t in gen.tokens]
    return judge

def pair_outcomes(pair_ids, done):
    """Keep the pairs whose two responses are judged and whose weighted scores differ (SPEC 1.1:
    ties are dropped). done: item id ('<pair_id>:chosen' / ':reject') -> row with 'scores'."""
    kept, stats = [], dict.fromkeys(("pairs", "kept", "ties", "unjudged", "teacher_agrees"), 0)
    for pid in pair_ids:
        c, r = done.get(f"{pid}:chosen"), done.get(f"{pid}:reject")
        sc, sr = (grm_reward(c["scores"]), grm_reward(r["scores"])) if c and r else (None, None)
        outcome = "unjudged" if sc is None else "ties" if math.isclose(sc, sr, abs_tol=1e-9) else "kept"
        stats["pairs"] += 1
        stats[outcome] += 1
        if outcome == "kept":
            kept.append(pid)
            stats["teacher_agrees"] += int(sc > sr)
    return kept, stats

def annotate(args, pairs, out_path, judge=None):
    """Judge every response not yet in <out>.items.jsonl, then write the GRM SFT file from the
    judged pairs. Returns (rows, stats); main turns unjudged pairs into exit code 1."""
    out_path = Path(out_path)
    items_path = out_path.with_name(out_path.name + ".items.jsonl")
    common.drop_torn_tail(items_path)  # a line a kill cut short; appends after it stay valid
    old, _ = read_jsonl(items_path, skip_bad=True) if items_path.exists() else ([], [])
    done = {r["item_id"]: r for _, r in old if r.get("item_id") and r.get("scores")}
    todo = [{"item_id": f"{pr['pair_id']}:{side}", "pair_id": pr["pair_id"], "side": side, "split": pr["split"],
             "persona": pr["persona"], "question": pr["question"], "response": pr[side]}
            for pr in pairs for side in ("chosen", "reject") if f"{pr['pair_id']}:{side}" not in done]
    print0(f"annotate: {len(pairs)} pairs, {len(done)} responses judged before, {len(todo)} to judge "
           f"(teacher: {args.teacher}) -> {items_path}")
    if judge is None and todo:
        judge = {"rubric": lambda: rubric_teacher, "endpoint": lambda: endpoint_teacher(args),
                 "model": lambda: model_teacher(args)}[args.teacher]()  # built only when needed
    chunk = args.concurrency * 4 if args.teacher == "endpoint" else args.teacher_batch
    failed = unparseable = 0  # counted, not recorded: a rerun asks again
    for i in tqdm(range(0, len(todo), chunk), desc="annotate", disable=not todo):
        items = todo[i:i + chunk]
        for it, reply in zip(items, judge(items)):
            if isinstance(reply, Exception):
                failed += 1
                if failed <= 3:
                    print0(f"annotate: teacher call failed for {it['item_id']}: {type(reply).__name__}: {reply}")
                continue
            scores, critique = common.parse_grm_scores(reply), common.parse_grm_critique(reply)
            if scores is None or not critique:
                unparseable += 1
                if unparseable <= 3:
                    print0(f"annotate: no critique or scores in the reply for {it['item_id']}: {reply[:160]!r}")
                continue
            row = {k: it[k] for k in ("item_id", "pair_id", "side", "split")}
            row.update(raw=reply, scores=scores, critique=critique)
            append_jsonl(items_path, row)
            done[row["item_id"]] = row
        if failed == i + len(items):  # not one call has worked: a wrong URL or key, a server down
            print0(f"annotate: all {failed} teacher calls so far failed; stopping")
            break

    kept, stats = pair_outcomes([pr["pair_id"] for pr in pairs], done)
    # a response of a train pair that a held-out pair also holds stays out of training
    held = {(pr["question"], pr[s]) for pr in pairs if pr["split"] != "train" for s in ("chosen", "reject")}
    by_id, rows, n_overlap = {pr["pair_id"]: pr for pr in pairs}, [], 0
    for pid in kept:
        pr = by_id[pid]
        for side in ("chosen", "reject"):
            a, leak = done[f"{pid}:{side}"], pr["split"] == "train" and (pr["question"], pr[side]) in held
            n_overlap += leak
            rows.append({"pair_id": pid, "side": side, "user_id": pr["user_id"], "persona": pr["persona"],
                         "question": pr["question"], "response": pr[side], "critique": a["critique"],
                         "scores": a["scores"], "split": "eval" if leak else pr["split"],
                         # one clean format for the GRM to learn, whatever the teacher's layout
                         "grm_output": common.format_grm_output(a["critique"], a["scores"])})
    stats.update(failed_calls=failed, unparseable=unparseable, held_out_overlap=n_overlap)
    if rows:
        common.write_jsonl(out_path, rows)
    print0(f"annotate: {len(rows)} GRM rows -> {out_path if rows else '(nothing written)'}; {stats}")
    return rows, stats


# ---------------------------------------------------------------------------------------------
# bt: the Bradley-Terry scalar reward model (SPEC 1.1 baseline, SPEC 1.4 ablation)

def bt_loss(r_chosen, r_rejected):
    """Bradley-Terry loss, mean over pairs: -log sigmoid(r_chosen - r_rejected) (SPEC 1.1)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()

def pairwise_accuracy(chosen, rejected) -> float:
    """Fraction of pairs where chosen scores higher; a tie counts half (a coin flip)."""
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)) / max(len(chosen), 1)

def bt_eval(model, tok, pairs, env, token_budget, precision):
    """Held-out pairwise accuracy (overall, per tier) and corr(reward, length in characters): a
    reward that tracks length is the one PPO learns to hack (SPEC 1.4). Pairs split over ranks."""
    mine = pairs[env.rank::env.world_size]
    seqs = [common.response_ids(tok, p["persona"], p["question"], p[s]) for p in mine for s in ("chosen", "reject")]
    rewards = []
    with torch.no_grad(), common.unsharded(model), common.autocast(env.device, precision):
        for idx in common.micro_batches(seqs, token_budget, share_prefix=True):  # ranks may differ in count
            rewards += common.last_token_values(model, [seqs[i] for i in idx]).float().tolist()
    rows = [{"tier": str(p.get("tier")), "c": rewards[2 * j], "r": rewards[2 * j + 1],
             "chars": (len(p["chosen"]), len(p["reject"]))} for j, p in enumerate(mine)]
    if env.world_size > 1:
        everyone = [None] * env.world_size
        torch.distributed.all_gather_object(everyone, rows)
        rows = [x for part in everyone for x in part]

    def acc(rows):
        return pairwise_accuracy([x["c"] for x in rows], [x["r"] for x in rows])
    reward = [x["c"] for x in rows] + [x["r"] for x in rows]
    chars = [x["chars"][0] for x in rows] + [x["chars"][1] for x in rows]
    corr = torch.corrcoef(torch.tensor([reward, chars], dtype=torch.float64))[0, 1].item() if rows else float("nan")
    return {"pairwise_acc": acc(rows), "eval_pairs": len(rows), "corr_reward_length": corr,
            "acc_by_tier": {t: acc([x for x in rows if x["tier"] == t]) for t in sorted({x["tier"] for x in rows})},
            "mean_margin": sum(x["c"] - x["r"] for x in rows) / max(len(rows), 1)}

def run_bt(args, env):
    out = Path(args.out)
    common.prepare_out(out, args.resume, args.overwrite)
    pairs, _ = load_pairs(args.pairs, args.persona_dir, args.eval_pct, args.skip_bad)
    train, heldout = ([p for p in pairs if (p["split"] == "train") == t] for t in (True, False))
    for part in (train, heldout):
        random.Random(args.seed).shuffle(part)
    train, heldout = train[:args.max_train or None], heldout[:args.eval_pairs or None]
    n_layers = json.loads((common.resolve_checkpoint(args.model) / "config.json").read_text())["num_hidden_layers"]
    if args.freeze_layers > n_layers:  # before loading, like the flags
        raise DataError(f"--freeze-layers {args.freeze_layers}: {args.model} has only {n_layers} blocks")

    precision = common.resolve_precision(args.precision, env.device)
    model, tok = common.load_trainable(args.model, env, precision, value_head=True, checkpointing=args.checkpointing,
                                       freeze_layers=args.freeze_layers)
    seqs = [[common.response_ids(tok, p["persona"], p["question"], p[s]) for s in ("chosen", "reject")] for p in train]
    n_long = sum(max(map(len, pair)) > args.max_len for pair in seqs)
    seqs = [pair for pair in seqs if max(map(len, pair)) <= args.max_len]
    print0(f"BT: {len(seqs)} train pairs ({n_long} over --max-len dropped), {len(heldout)} held-out pairs, "
           f"precision {precision}, {env.world_size} rank(s)")
    if not seqs:
        raise DataError(f"no training pairs in {' '.join(args.pairs)} (split 'train', <= --max-len tokens)")
    opt = common.adamw(model, args.lr, args.weight_decay)
    G, W = args.global_batch, env.world_size
    steps_per_epoch = math.ceil(len(seqs) / G)
    total = args.max_steps or args.epochs * steps_per_epoch
    plan = {k: getattr(args, k) for k in ("model", "pairs", "persona_dir", "eval_pct", "max_train", "max_len",
                                          "global_batch", "epochs", "max_steps", "lr", "min_lr_ratio", "warmup_ratio",
                                          "weight_decay", "grad_clip", "freeze_layers", "seed")}
    plan["precision"] = precision  # what a resumed run must share with its checkpoint (check_resume)
    step, ckpt = 0, common.latest_checkpoint(out) if args.resume else None
    if ckpt is not None:
        step, extra = common.load_training_state(ckpt, model, opt)
        common.check_resume(ckpt, extra.get("plan", {}), plan)
        print0(f"resumed from {ckpt} at step {step}/{total}")
    logger = common.MetricsLogger(out / "metrics.jsonl", keep_until_step=step if ckpt else None)

    while step < total:
        t0 = time.time()
        epoch, k = divmod(step, steps_per_epoch)
        order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        step_pairs = order[k * G:(k + 1) * G]  # the data position follows from the step (resume)
        # micro-batches bounded by tokens, a pair's two sequences together (sized without the shared
        # prompt: an upper bound of the packed row); every rank runs as many passes as the busiest
        # (FSDP2 collectives), an idle rank on one pair at weight 0
        per_rank = [common.micro_batches([seqs[i][0] + seqs[i][1] for i in step_pairs[r::W]], args.token_budget)
                    for r in range(W)]
        mine, n_passes = step_pairs[env.rank::W], max(map(len, per_rank))
        loss_sum, n_right, n_tok = 0.0, 0, 0
        for j in range(n_passes):
            part = [mine[i] for i in per_rank[env.rank][j]] if j < len(per_rank[env.rank]) else []
            with common.autocast(env.device, precision):
                r = common.last_token_values(model, [x for i in (part or step_pairs[:1]) for x in seqs[i]]).float()
            loss = bt_loss(r[0::2], r[1::2])
            # weighted by the pass's share of the step's pairs, so that the sum over passes and ranks
            # is the exact mean over the step; FSDP2 averages gradients over ranks: hence the W
            (loss * len(part) / len(step_pairs) * (W if common.is_fsdp(model) else 1)).backward()
            if part:
                loss_sum += loss.item() * len(part)
                n_right += int((r[0::2] > r[1::2]).sum())
                n_tok += sum(len(seqs[i][0]) + len(seqs[i][1]) for i in part)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # a DTensor under FSDP2
        lr = common.cosine_lr(step, total, round(args.warmup_ratio * total), args.lr, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss_sum, n_right, n_pairs, n_tok = common.all_reduce_sum(
            torch.tensor([loss_sum, n_right, len(mine), n_tok], dtype=torch.float64)).tolist()
        logger.log({"step": step, "epoch": round(epoch + (k + 1) / steps_per_epoch, 4), "loss": loss_sum / n_pairs,
                    "acc": n_right / n_pairs, "lr": lr, "grad_norm": float(gnorm),
                    "tok_per_s": n_tok / (time.time() - t0)})
        print0(f"step {step}/{total}: loss {loss_sum / n_pairs:.4f}, acc {n_right / n_pairs:.2f}, lr {lr:.2e}")
        if args.save_every and step % args.save_every == 0 and step < total:
            common.save_training_state(out / f"ckpt_{step:06d}", model, opt, step, {"plan": plan})
            common.prune_checkpoints(out, 1)  # a checkpoint is complete once in place (atomic rename)
        if step == args.stop_at_step and step < total:
            print0(f"stopped after step {step} (--stop-at-step); continue with --resume")
            return None

    metrics = bt_eval(model, tok, heldout, env, args.token_budget, precision)
    print0(f"BT held-out: pairwise accuracy {metrics['pairwise_acc']:.3f} on {metrics['eval_pairs']} pairs; "
           f"corr(reward, length) {metrics['corr_reward_length']:.2f}")
    logger.log({"final": True, "heldout": metrics})
    common.save_model(model, tok, out)  # collective under FSDP2; keeps metrics.jsonl and ckpt_*
    if common.is_rank0():
        (out / "heldout_metrics.json").write_text(json.dumps(common.json_clean(metrics), indent=2))
        (out / "DONE").write_text(f"step {step}\n")
    return metrics

def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    if args.mode == "annotate":
        pairs, _ = load_pairs(args.pairs, args.persona_dir, args.eval_pct, args.skip_bad)
        rows, stats = annotate(args, pairs, args.grm_data)
        if stats["unjudged"]:
            wrote = f"{args.grm_data} holds the {stats['kept']} pairs kept so far" if rows else "nothing written"
            raise SystemExit(f"annotate: {stats['unjudged']} of {stats['pairs']} pairs unjudged "
                             f"({stats['failed_calls']} failed teacher calls, {stats['unparseable']} replies "
                             f"without critique or scores); {wrote}; rerun the same command to retry them")
        if not rows:
            raise DataError(f"annotate: no GRM rows: all {stats['pairs']} pairs tie on the weighted score")
        return stats
    env = common.dist_init()
    try:
        return run_bt(args, env)
    finally:
        common.dist_cleanup()

if __name__ == "__main__":
    common.main_guard(main)
