"""Benchmark of sft.py's training step (sft.loss_sum on common.pack, backward, clip, AdamW) against a
transformers model loaded from the same folder, trained the usual way: right-padded batches with
attention_mask and labels (-100 outside the answers).

1. The same micro-batches: --batch documents a step, ours packed into one row (no padding; logits
   only where an answer token is predicted), transformers padded to the longest document. The two
   steps alternate (ours, theirs, ours, ...) so the machine's drift hits both alike; median of
   --steps after --warmup. Reported: real tokens/s of each, their ratio, and the first step's
   losses side by side (same weights, same documents: they agree to about 1e-5 in fp32).
2. A whole optimizer step over --docs documents of long-tailed lengths (log-normal): ours in
   micro-batches of at most --token-budget packed tokens (common.micro_batches, as sft.py does),
   transformers in padded batches of --batch documents; both the exact token mean over the step.
   With --group N > 1 the documents come N answers to a prompt (GRM data: the answers judged for
   one question) and ours stores each prompt once (--share-prefix of sft.py).
   Reported: effective (real) tokens/s of each and their ratio.
On CUDA it also prints MFU (6 x params per token plus attention, over --peak-tflops).

Run:
  python bench/bench_sft.py                       # SmolLM2-135M-Instruct, CPU-sized defaults
  python bench/bench_sft.py --tiny                # a small random Llama (seconds)
  python bench/bench_sft.py --group 4             # prompts shared by 4 answers each
  python bench/bench_sft.py --device cuda --batch 8 --steps 10 --docs 256 --median-len 600 \\
      --max-len 2048 --token-budget 16384
Ratios are printed last (> 1: ours is faster).
"""
import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sft  # noqa: E402
from common import (DEFAULT_MODEL, PRECISIONS, ModelConfig, Transformer, autocast, load_model,  # noqa: E402
                    load_tokenizer, micro_batches, packed_size, resolve_checkpoint, resolve_precision, save_model)

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", default=DEFAULT_MODEL, help="HF folder or the embedded default")
p.add_argument("--tiny", action="store_true", help="use a small random Llama instead of --model")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device")
p.add_argument("--precision", choices=PRECISIONS, default="auto",
               help="both sides (auto: bf16-mixed autocast on CUDA, fp32 on CPU); weights stay fp32")
p.add_argument("--batch", type=int, default=4, help="documents per padded batch (part 1: per step)")
p.add_argument("--steps", type=int, default=3, help="timed steps per side (part 1)")
p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first (part 1)")
p.add_argument("--repeats", type=int, default=3, help="part 2: whole steps per side, alternating (median)")
p.add_argument("--docs", type=int, default=24, help="documents in the optimizer step of part 2")
p.add_argument("--group", type=int, default=1, help="part 2: answers per prompt (> 1: ours shares the prompts)")
p.add_argument("--median-len", type=int, default=200, help="median document length in tokens")
p.add_argument("--max-len", type=int, default=768, help="longest document")
p.add_argument("--token-budget", type=int, default=0,
               help="ours: packed micro-batch size in tokens (0 = --batch x --max-len, the padded batch's "
                    "worst case)")
p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak for MFU (H100 SXM)")
p.add_argument("--seed", type=int, default=0, help="seed of lengths and tokens")
args = p.parse_args()
for name in ("batch", "steps", "repeats", "docs", "group", "median_len", "max_len"):
    if getattr(args, name) < 1:
        p.error(f"--{name.replace('_', '-')} must be at least 1")
device = torch.device(args.device)
precision = resolve_precision(args.precision, device)
if precision == "bf16":
    p.error("--precision bf16 (bf16 weights) is not compared here; use bf16-mixed")
budget = args.token_budget or args.batch * args.max_len
share = args.group > 1


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- models: ours and the transformers peer from the same folder -------------------------------
tmp = tempfile.TemporaryDirectory()
if args.tiny:
    tok = load_tokenizer(DEFAULT_MODEL)
    torch.manual_seed(0)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": len(tok), "hidden_size": 128,
           "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
           "max_position_embeddings": 4096, "hidden_act": "silu", "torch_dtype": "float32"}
    m = Transformer(ModelConfig.from_hf(cfg))
    for prm in m.parameters():
        if prm.dim() >= 2:
            torch.nn.init.normal_(prm, std=0.02)
    folder = Path(tmp.name) / "tiny"
    save_model(m, tok, folder)
    del m
else:
    folder = resolve_checkpoint(args.model)
ours, tok = load_model(folder, device=device)
ours.train()
from transformers import AutoModelForCausalLM  # noqa: E402
peer = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).train()
cfg = ours.config
n_params = sum(q.numel() for q in ours.parameters())
print(f"model: {'tiny random Llama' if args.tiny else args.model} ({n_params / 1e6:.1f}M params, "
      f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}); device {device}, precision {precision}, "
      f"torch threads {torch.get_num_threads()}")


def make_docs(n, rng, group=1):
    """(ids, mask) documents with log-normal lengths (median --median-len, sigma 0.6, clipped to
    [16, --max-len]); the first ~60% of each is prompt (mask 0), the rest the answer. group > 1:
    consecutive documents share their prompt, each with its own answer."""
    docs = []
    while len(docs) < n:
        length = int(min(args.max_len, max(16, math.exp(math.log(args.median_len) + 0.6 * rng.gauss(0, 1)))))
        prompt = [rng.randrange(10, cfg.vocab_size) for _ in range(int(0.6 * length))]
        for _ in range(min(group, n - len(docs))):
            n_answer = max(1, min(args.max_len - len(prompt), int((length - len(prompt)) * rng.uniform(0.5, 1.5))))
            docs.append((prompt + [rng.randrange(10, cfg.vocab_size) for _ in range(n_answer)],
                         [0] * len(prompt) + [1] * n_answer))
    return docs


def n_targets(docs):
    return sum(sum(m[1:]) for _, m in docs)


def ours_backward(docs, n_total, share_prefix=False):
    """sft.py's micro-step: the summed loss of a packed micro-batch over the step's target count."""
    with autocast(device, precision):
        loss_sum, _ = sft.loss_sum(ours, docs, device, share_prefix)
    (loss_sum / n_total).backward()
    return loss_sum.item()


def peer_backward(docs, n_total):
    T = max(len(d) for d, _ in docs)
    ids = torch.tensor([d + [0] * (T - len(d)) for d, _ in docs], device=device)
    attn = torch.tensor([[1] * len(d) + [0] * (T - len(d)) for d, _ in docs], device=device)
    labels = torch.tensor([[t if m else -100 for t, m in zip(d, mk)] + [-100] * (T - len(d)) for d, mk in docs],
                          device=device)
    with autocast(device, precision):
        loss = peer(input_ids=ids, attention_mask=attn, labels=labels).loss  # mean over this batch's targets
    (loss * n_targets(docs) / n_total).backward()
    return loss.item() * n_targets(docs)


def optimizer_step(model, opt):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def optimizer_for(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


# ---- part 1: the same micro-batches, ours packed against transformers padded -------------------
opt_ours, opt_peer = optimizer_for(ours), optimizer_for(peer)
gen = random.Random(args.seed)
t_ours, t_peer, first = [], [], None
for i in range(args.warmup + args.steps):
    docs = make_docs(args.batch, gen)
    n = n_targets(docs)
    dt_ours, l_ours = timed(lambda: (ours_backward(docs, n), optimizer_step(ours, opt_ours))[0] / n)
    dt_peer, l_peer = timed(lambda: (peer_backward(docs, n), optimizer_step(peer, opt_peer))[0] / n)
    first = first or (l_ours, l_peer)
    if i >= args.warmup:
        real = sum(len(d) for d, _ in docs)
        t_ours.append(real / dt_ours)
        t_peer.append(real / dt_peer)
tps_ours, tps_peer = statistics.median(t_ours), statistics.median(t_peer)
print(f"part 1: {args.steps} timed steps of {args.batch} documents (median); first-step loss ours "
      f"{first[0]:.5f} vs transformers {first[1]:.5f} (same weights and documents)")
print(f"  ours (packed):            {tps_ours:9.1f} tok/s")
print(f"  transformers (padded):    {tps_peer:9.1f} tok/s")


# ---- part 2: a whole optimizer step, ours in token-budget micro-batches -------------------------
docs = make_docs(args.docs, gen, args.group)
real, n_total = sum(len(d) for d, _ in docs), n_targets(docs)
ours_mbs = [[docs[i] for i in mb] for mb in micro_batches([d for d, _ in docs], budget, share)]
peer_mbs = [docs[i:i + args.batch] for i in range(0, len(docs), args.batch)]


def ours_step():
    for mb in ours_mbs:
        ours_backward(mb, n_total, share)
    optimizer_step(ours, opt_ours)


def peer_step():
    for mb in peer_mbs:
        peer_backward(mb, n_total)
    optimizer_step(peer, opt_peer)


ours_step(), peer_step()  # warm-up (allocator, kernels)
times_ours, times_peer = [], []
for _ in range(args.repeats):
    times_ours.append(timed(ours_step)[0])
    times_peer.append(timed(peer_step)[0])
t2_ours, t2_peer = statistics.median(times_ours), statistics.median(times_peer)
slots_ours = sum(packed_size([d for d, _ in mb], share) for mb in ours_mbs)
slots_peer = sum(len(mb) * max(len(d) for d, _ in mb) for mb in peer_mbs)
lens = sorted(len(d) for d, _ in docs)
print(f"part 2: {args.docs} documents{f' ({args.group} answers a prompt)' if share else ''}, {real} real tokens, "
      f"lengths min/median/max {lens[0]}/{lens[len(lens) // 2]}/{lens[-1]}; median of {args.repeats} steps each")
print(f"  ours: {len(ours_mbs)} packed micro-batches of <= {budget} tokens, {slots_ours} token slots "
      f"({slots_ours / real:.0%} of the real tokens): {real / t2_ours:9.1f} effective tok/s")
print(f"  transformers: {len(peer_mbs)} padded batches of {args.batch}, {slots_peer} token slots "
      f"({slots_peer / real:.0%} of the real tokens): {real / t2_peer:9.1f} effective tok/s")

if device.type == "cuda":
    # 6 N per token for the weights, plus attention 12 L h T_ctx / 2 (causal, mean context ~T/2)
    flops_tok = 6 * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * statistics.mean(lens) / 2
    for name, tps in (("ours (part 1)", tps_ours), ("transformers (part 1)", tps_peer),
                      ("ours (part 2)", real / t2_ours), ("transformers (part 2)", real / t2_peer)):
        print(f"  MFU {name}: {100 * flops_tok * tps / (args.peak_tflops * 1e12):.1f}% "
              f"(of {args.peak_tflops:.0f} TFLOP/s)")
print(f"ours / transformers, same micro-batches: {tps_ours / tps_peer:.2f}x")
print(f"ours / transformers, whole step (packed vs padded): {t2_peer / t2_ours:.2f}x")
