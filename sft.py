"""Supervised fine-tuning, the one SFT loop of the repository (loss on assistant tokens only):
  - the personalization policy's warm start (SPEC 1.3: "an SFT model trained on the chosen responses");
  - the generative reward model (SPEC 1.1: the paper trains the GRM by plain SFT on critique + score
    annotations; train_grm.py writes them, one GRM record a line);
  - MiCoTA's teacher assistant on long CoT and student on mid CoT (SPEC 2.2, 2.5; distill_micota.py
    writes the CoT files and runs this script).

Input: JSONL files, one sample a line, any mix of
  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   a conversation
  {"persona": dict | JSON string, "question": str, "response": str}          a persona record
  {"persona", "question", "response", "grm_output": str}                      a GRM record
A persona record is trained as common.persona_messages(persona, question) + the response; a GRM
record as common.grm_messages(persona, question, response) + grm_output. A row whose "split" is
not "train" is held out for the eval loss. A bad line stops the run with file, line and field;
--skip-bad skips, counts and lists it instead.

Training: documents are packed into micro-batches of at most --token-budget tokens (a longer one
goes alone), --global-batch documents make one optimizer step on all ranks together, and the loss
is the exact token mean over the step (so 1 and N ranks, packed or not, follow the same curve).
AdamW, cosine schedule with warmup, gradient clipping; --precision bf16-mixed (the CUDA default)
computes in bf16 over fp32 master weights; --checkpointing recomputes activations per block;
--share-prefix stores a prompt shared by several documents once (GRM data: one question's judged
answers). Under torchrun the model is FSDP2-sharded (common.load_trainable). Resume checkpoints
are sharded (torch.distributed.checkpoint) and --resume continues where a killed run stopped.

Commands (defaults: the embedded SmolLM2-135M-Instruct on the persona world, minutes on 2 CPU cores):
  python sft.py                                                        # policy warm start -> out/sft
  python sft.py --data data/persona_world/grm.jsonl --out out/grm --share-prefix --lr 2e-4 \\
      --epochs 1 --max-len 1536 --token-budget 4096 --max-samples 0 --precision bf16-mixed  # the GRM
  python sft.py ... --resume                                            # after a crash, same flags
One node, 8 GPUs (the paper's 7B GRM recipe: lr 4e-5, 2 epochs, cosine, warmup 0.1):
  torchrun --standalone --nproc_per_node 8 sft.py --model /ckpt/Qwen2.5-7B-Instruct --data grm.jsonl \\
      --out out/grm7b --lr 4e-5 --epochs 2 --global-batch 64 --max-len 16384 --token-budget 16384 \\
      --share-prefix --checkpointing --max-samples 0 --save-every 100
(`python memory_plan.py` prints what fits; README "Scaling to the paper".)
Output (--out): HF-format model, metrics.jsonl, ckpt_XXXXXX/ resume states, DONE when finished.
"""
import argparse
import hashlib
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (DEFAULT_MODEL, PRECISIONS, DataError, MetricsLogger, adamw, all_reduce_sum, autocast, check_resume,
                    conversation_ids_and_mask, cosine_lr, dist_cleanup, dist_init, grm_messages,
                    latest_checkpoint, load_tokenizer, load_trainable, load_training_state, main_guard,
                    micro_batches, pack, persona_messages, predictions, prepare_out, print0, prune_checkpoints,
                    read_jsonl, require_field, resolve_precision, save_model, save_training_state)

REPO = Path(__file__).resolve().parent


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", nargs="+", default=[str(REPO / "data" / "persona_world" / "sft.jsonl")],
                   help="training JSONL file(s): conversations, persona records or GRM records")
    p.add_argument("--eval-data", nargs="+", default=None,
                   help="held-out JSONL file(s) for the eval loss (default: rows of --data whose split is not "
                        "'train', else --eval-frac of --data)")
    p.add_argument("--eval-frac", type=float, default=0.1, help="held-out fraction when there is no other split")
    p.add_argument("--max-eval-samples", type=int, default=8, help="eval loss on at most N samples (0 = all)")
    p.add_argument("--max-samples", type=int, default=24,
                   help="train on the first N samples after a seeded shuffle (0 = all; the default keeps the "
                        "CPU run short)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF-format folder, hub id, or the embedded default")
    p.add_argument("--out", default="out/sft", help="output folder (model, metrics.jsonl, checkpoints)")
    p.add_argument("--max-len", type=int, default=1024,
                   help="a longer sample is an error (skipped and counted with --skip-bad)")
    p.add_argument("--token-budget", type=int, default=2048,
                   help="tokens per packed micro-batch (a longer document goes alone); lower it to save memory")
    p.add_argument("--global-batch", type=int, default=4, help="documents per optimizer step, all ranks together")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training data")
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps (0 = epochs x steps per epoch)")
    p.add_argument("--lr", type=float, default=5e-5,
                   help="peak learning rate (SPEC 1.3: 5e-6 for a 7B policy; small models like more)")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="final lr as a fraction of --lr")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup, fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (matrices only)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16-mixed on CUDA, fp32 on CPU. bf16-mixed: bf16 compute, fp32 master weights "
                        "and AdamW state. bf16: bf16 weights too (half the memory; small updates are lost)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder block")
    p.add_argument("--share-prefix", action="store_true",
                   help="a step takes neighbouring documents and their shared prompt is computed once (exact; "
                        "GRM data: a question's judged answers share ~all of their prompt)")
    p.add_argument("--freeze-layers", type=int, default=0,
                   help="freeze the embeddings and the bottom N blocks (a faster, weaker CPU run)")
    p.add_argument("--eval-every", type=int, default=0, help="eval loss every N steps (0 = only at the end)")
    p.add_argument("--save-every", type=int, default=50, help="resume checkpoint every N steps (0 = never)")
    p.add_argument("--keep-checkpoints", type=int, default=1, help="resume checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the latest ckpt_* in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--skip-bad", action="store_true", help="skip bad samples (counted and listed) instead of stopping")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the shuffles and the init")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--stop-at-step", type=int, default=0, help="testing: stop after this step as if killed")
    args = p.parse_args(argv)
    for name in ("max_len", "token_budget", "global_batch", "epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("max_samples", "max_eval_samples", "max_steps", "freeze_layers", "eval_every", "save_every",
                 "keep_checkpoints", "stop_at_step"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("eval_frac", "min_lr_ratio", "warmup_ratio"):
        if not 0 <= getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    if args.lr <= 0 or args.grad_clip <= 0 or args.weight_decay < 0:
        p.error("--lr and --grad-clip must be > 0, --weight-decay >= 0")
    return args


# ------------------------------------------------------------------------------ data
ROLES = ("system", "user", "assistant")


def sample_messages(row, path, lineno):
    """A JSONL row (conversation, persona record or GRM record) -> chat messages, or DataError."""
    if "messages" in row:
        messages = require_field(row, "messages", path, lineno, kind=list)
        for t, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{path}:{lineno}: messages[{t}] needs a role in {ROLES} and a string content")
            if m["role"] == "assistant" and not m["content"].strip():
                raise DataError(f"{path}:{lineno}: messages[{t}] is an empty assistant turn")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{path}:{lineno}: no assistant turn (nothing to train on)")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "question" not in row:
        raise DataError(f"{path}:{lineno}: neither 'messages' nor a persona record ('persona', 'question', "
                        f"'response'[, 'grm_output'])")
    persona = require_field(row, "persona", path, lineno, kind=(dict, str))
    question, response = require_field(row, "question", path, lineno), require_field(row, "response", path, lineno)
    if "grm_output" in row:  # SPEC 1.1: the GRM reads (persona, question, response), writes critique + scores
        return grm_messages(persona, question, response) + [
            {"role": "assistant", "content": require_field(row, "grm_output", path, lineno)}]
    return persona_messages(persona, question) + [{"role": "assistant", "content": response}]


def load_docs(paths, tokenizer, max_len, skip_bad):
    """Read, check and tokenize -> (train docs, held-out docs, skipped reasons); a doc is (ids, mask)."""
    docs, held, skipped = [], [], []
    for path in paths:
        rows, bad = read_jsonl(path, skip_bad)
        skipped += bad
        for lineno, row in rows:
            try:
                ids, mask = conversation_ids_and_mask(tokenizer, sample_messages(row, path, lineno))
                if len(ids) > max_len:
                    raise DataError(f"{path}:{lineno}: sample has {len(ids)} tokens, more than --max-len {max_len}")
            except DataError as e:
                if not skip_bad:
                    raise
                skipped.append(str(e))
                continue
            (docs if row.get("split", "train") == "train" else held).append((ids, mask))
    return docs, held, skipped


def trained_positions(docs):
    """For each doc, the token indices j >= 1 that carry a loss (assistant tokens)."""
    return [[j for j in range(1, len(ids)) if mask[j]] for ids, mask in docs]


def loss_sum(model, docs, device, share_prefix):
    """Sum of next-token cross-entropies over the assistant tokens of a micro-batch, and their count.
    Summed, not averaged: the caller divides by the step's token count, an exact global mean."""
    seqs = [ids for ids, _ in docs]
    packed = pack(seqs, device, share_prefix)
    pos, targets = predictions(packed, seqs, trained_positions(docs))
    logits = model(packed.input_ids, packed.cu_seqlens, packed.parents, select=pos)  # fp32 [N, vocab]
    return F.cross_entropy(logits, targets, reduction="sum"), len(targets)


def epoch_steps(docs, G, seed, share_prefix):
    """The documents of each optimizer step of one epoch, G per step (the last one shorter): a fresh
    shuffle per epoch; with share_prefix, neighbours in token order share a step (and their prompt),
    and the steps are shuffled instead."""
    g = torch.Generator().manual_seed(seed)
    if not share_prefix:
        order = torch.randperm(len(docs), generator=g).tolist()
        return [order[k:k + G] for k in range(0, len(docs), G)]
    by_tokens = sorted(range(len(docs)), key=lambda i: docs[i][0])
    steps = [by_tokens[k:k + G] for k in range(0, len(docs), G)]
    return [steps[k] for k in torch.randperm(len(steps), generator=g).tolist()]


def rank_share(mbs, env):
    """Every rank takes every world_size-th micro-batch; all run the same number of passes (FSDP2's
    collectives need it), a rank with one fewer runs a pass at weight zero."""
    return mbs[env.rank::env.world_size], math.ceil(len(mbs) / env.world_size)


@torch.no_grad()
def eval_loss(model, docs, args, env, precision):
    if not docs:
        return None
    model.eval()
    order = sorted(range(len(docs)), key=lambda i: docs[i][0])
    mbs = [[order[k] for k in mb] for mb in micro_batches([docs[i][0] for i in order], args.token_budget,
                                                           args.share_prefix)]
    mine, n_passes = rank_share(mbs, env)
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    for j in range(n_passes):
        with autocast(env.device, precision):
            loss, n = loss_sum(model, [docs[i] for i in (mine[j] if j < len(mine) else mbs[0][:1])],
                               env.device, args.share_prefix)
        if j < len(mine):
            total += torch.tensor([loss.item(), n], dtype=torch.float64, device=env.device)
    total = all_reduce_sum(total)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()



# ------------------------------------------------------------------------------ main
def main(argv=None):
    args = get_args(argv)
    env = dist_init(args.device)
    precision = resolve_precision(args.precision, env.device)
    out = Path(args.out)
    prepare_out(out, args.resume, args.overwrite)
    tokenizer = load_tokenizer(args.model)  # data errors show up before the (slower) model load

    # data: the training rows, the held-out rows (their split, --eval-data or a seeded fraction)
    train_docs, held, skipped = load_docs(args.data, tokenizer, args.max_len, args.skip_bad)
    if args.eval_data:
        held, _, more = load_docs(args.eval_data, tokenizer, args.max_len, args.skip_bad)
        skipped += more
    random.Random(args.seed).shuffle(train_docs)
    if not held and not args.eval_data and len(train_docs) >= 10:
        n_eval = round(args.eval_frac * len(train_docs))
        held, train_docs = train_docs[:n_eval], train_docs[n_eval:]
    held = held[:args.max_eval_samples or None]
    train_docs = train_docs[:args.max_samples or None]
    if not train_docs:
        raise DataError(f"{', '.join(args.data)}: no training samples")
    for reason in skipped[:20]:
        print0(f"skipped: {reason}")
    n_tok = sum(len(d[0]) for d in train_docs)
    print0(f"data: {len(train_docs)} train / {len(held)} held-out samples, {n_tok} train tokens, {len(skipped)} "
           f"skipped; world size {env.world_size}, {env.device}, precision {precision}")

    # model, optimizer, schedule, resume
    G = args.global_batch
    steps_per_epoch = math.ceil(len(train_docs) / G)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_ratio * total_steps)
    h = hashlib.sha256(repr([d[0] for d in train_docs]).encode()).hexdigest()[:16]
    plan = {"model": str(args.model), "data": h, "n_train": len(train_docs), "global_batch": G,
            "total_steps": total_steps, "lr": args.lr, "min_lr_ratio": args.min_lr_ratio,
            "warmup_ratio": args.warmup_ratio, "weight_decay": args.weight_decay, "grad_clip": args.grad_clip,
            "seed": args.seed, "share_prefix": args.share_prefix, "freeze_layers": args.freeze_layers,
            "precision": precision, "world_size": env.world_size}
    torch.manual_seed(args.seed)
    model, _ = load_trainable(args.model, env, precision, checkpointing=args.checkpointing,
                              freeze_layers=args.freeze_layers)
    optimizer = adamw(model, args.lr, args.weight_decay)
    start_step, ckpt = 0, latest_checkpoint(out) if args.resume else None
    if ckpt is not None:
        start_step, extra = load_training_state(ckpt, model, optimizer)
        check_resume(ckpt, extra.get("plan", {}), plan)
        print0(f"resumed from {ckpt} at step {start_step}/{total_steps}")
    logger = MetricsLogger(out / "metrics.jsonl", keep_until_step=start_step if ckpt else None)
    if ckpt is None:
        logger.log({"event": "data", "files": args.data, "train_samples": len(train_docs),
                    "eval_samples": len(held), "train_tokens": n_tok, "skipped": skipped})

    # the loop: one optimizer step = G documents, micro-batches bounded by tokens, shared over ranks
    W, loss, held_loss, schedule = env.world_size, float("nan"), None, {}
    bar = tqdm(total=total_steps, initial=start_step, desc=f"sft {out.name}", disable=env.rank != 0)
    t_last = time.time()
    for step in range(start_step, total_steps):
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in schedule:  # the data position follows from the step: a resume loses nothing
            schedule = {epoch: epoch_steps(train_docs, G, args.seed + epoch, args.share_prefix)}
        step_docs = sorted(schedule[epoch][k], key=lambda i: train_docs[i][0])  # shared prompts adjacent
        mbs = [[step_docs[j] for j in mb] for mb in
               micro_batches([train_docs[i][0] for i in step_docs], args.token_budget, args.share_prefix)]
        n_targets = sum(len(t) for t in trained_positions([train_docs[i] for i in step_docs]))
        mine, n_passes = rank_share(mbs, env)
        local = torch.zeros(2, dtype=torch.float64, device=env.device)  # (loss sum, input tokens)
        # FSDP2 reduce-scatters each micro-batch's gradients: skipping that until the last one would hold the
        # whole model's unsharded fp32 gradients on every GPU (memory_plan.py)
        for j in range(n_passes):
            real = j < len(mine)
            docs = [train_docs[i] for i in (mine[j] if real else mbs[0][:1])]
            with autocast(env.device, precision):
                mb_loss, _ = loss_sum(model, docs, env.device, args.share_prefix)
            # FSDP2 averages gradients over ranks: W / n_targets makes the sum a global token mean
            (mb_loss * (W / max(n_targets, 1) if real else 0.0)).backward()
            if real:
                local += torch.tensor([mb_loss.item(), sum(len(d[0]) for d in docs)], dtype=torch.float64,
                                      device=env.device)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   args.grad_clip)
        lr = cosine_lr(step, total_steps, warmup_steps, args.lr, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        total = all_reduce_sum(local)
        loss, now = total[0].item() / max(n_targets, 1), time.time()
        row = {"step": step + 1, "epoch": round(epoch + (k + 1) / steps_per_epoch, 4), "loss": loss, "lr": lr,
               "grad_norm": float(grad_norm), "trained_tokens": n_targets, "input_tokens": int(total[1]),
               "micro_batches": len(mbs), "tok_per_s": total[1].item() / max(now - t_last, 1e-9)}
        if held and (step + 1 == total_steps or (args.eval_every and (step + 1) % args.eval_every == 0)):
            held_loss = row["eval_loss"] = eval_loss(model, held, args, env, precision)
        logger.log(row)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        bar.update(1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            save_training_state(out / f"ckpt_{step + 1:06d}", model, optimizer, step + 1, {"plan": plan})
            prune_checkpoints(out, args.keep_checkpoints)
        t_last = time.time()  # checkpoint and eval time do not count towards tok_per_s
        if args.stop_at_step and step + 1 == args.stop_at_step and step + 1 < total_steps:
            print0(f"stopped after step {step + 1} (--stop-at-step); continue with --resume")
            dist_cleanup()
            return None
    bar.close()

    if held and held_loss is None:
        held_loss = eval_loss(model, held, args, env, precision)
    save_model(model, tokenizer, out)
    result = {"final_step": total_steps, "train_loss": loss, "eval_loss": held_loss}
    logger.log({"final": True, **result})
    if env.rank == 0:
        (out / "DONE").write_text("finished\n")
    print0(f"saved {out} (HF format); final train loss {loss:.4f}, eval loss {held_loss}")
    dist_cleanup()
    return result


if __name__ == "__main__":
    main_guard(main)
