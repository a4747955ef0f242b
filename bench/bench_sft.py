"""Benchmark of the SFT step of sft.py (common.sft_loss_sum + backward + clip + AdamW).

1. Our step vs a plain transformers model (LlamaForCausalLM loaded from the same folder, same
   weights) doing forward/backward with `labels` and the same AdamW, on the same right-padded
   batches, timed interleaved (ours, theirs, ours, ...) so machine noise hits both alike.
   Reported: training tokens/s (real, non-pad tokens) and the ratio ours / transformers.
2. Packing vs padding, both with our model: one optimizer step over the same documents, whose
   lengths follow a realistic long-tailed spread (log-normal), either packed into micro-batches
   of --token-budget tokens (sft.py's way) or as right-padded batches of --batch documents.
   Reported: effective (non-pad) tokens/s and the ratio packed / padded.
On CUDA it also reports MFU (model FLOPs utilisation, 6 x params per token plus attention, over
the GPU's dense bf16 peak from --peak-tflops).

Run:
  python bench/bench_sft.py                       # SmolLM2-135M-Instruct, CPU-sized defaults
  python bench/bench_sft.py --tiny                # a small random model (seconds)
  python bench/bench_sft.py --batch 8 --steps 10 --docs 256 --median-len 600 --max-len 2048 \
      --token-budget 16384                        # on a GPU
Ratios are printed last.
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
from common import (DEFAULT_MODEL, ModelConfig, Transformer, load_model, load_tokenizer,  # noqa: E402
                    pack_documents, packed_sft_batch, padded_sft_batch, resolve_checkpoint, save_model,
                    sft_loss_sum, tiny_config)

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", default=DEFAULT_MODEL, help="HF folder or the embedded default")
p.add_argument("--tiny", action="store_true", help="use a small random Llama instead of --model")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device")
p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
               help="bf16 autocast for both sides (auto: on for CUDA, off on CPU)")
p.add_argument("--batch", type=int, default=4, help="documents per padded batch")
p.add_argument("--steps", type=int, default=3, help="timed steps per side (part 1)")
p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
p.add_argument("--repeats", type=int, default=3, help="part 2: padded/packed steps, interleaved (median)")
p.add_argument("--docs", type=int, default=24, help="documents in the packing vs padding step (part 2)")
p.add_argument("--median-len", type=int, default=200, help="median document length in tokens")
p.add_argument("--max-len", type=int, default=768, help="longest document")
p.add_argument("--token-budget", type=int, default=0,
               help="packed micro-batch size in tokens (0 = --batch x --max-len, the padded batch's "
                    "worst-case memory)")
p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak for MFU (H100 SXM)")
p.add_argument("--seed", type=int, default=0, help="seed for lengths and tokens")
args = p.parse_args()
device = torch.device(args.device)
use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and device.type == "cuda")
autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else \
    (lambda: torch.autocast(device.type, enabled=False))


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- models: ours and the transformers peer from the same folder -------------------------------
tmp = tempfile.TemporaryDirectory()
if args.tiny:
    tok = load_tokenizer(DEFAULT_MODEL)
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_hf(tiny_config(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                                    num_attention_heads=4, num_key_value_heads=2, head_dim=32)))
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
      f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}); device {device}, "
      f"{'bf16 autocast' if use_bf16 else 'fp32'}, torch threads {torch.get_num_threads()}")


def make_docs(n, rng):
    """Documents with log-normal lengths (median --median-len, sigma 0.6, clipped to
    [16, --max-len]); the first ~60% of each is prompt (mask 0), the rest the answer."""
    docs = []
    for _ in range(n):
        length = int(min(args.max_len, max(16, math.exp(math.log(args.median_len) + 0.6 * rng.gauss(0, 1)))))
        ids = [rng.randrange(10, cfg.vocab_size) for _ in range(length)]
        n_prompt = int(0.6 * length)
        docs.append((ids, [0] * n_prompt + [1] * (length - n_prompt)))
    return docs


gen = random.Random(args.seed)


def optimizer_for(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


# ---- part 1: our step vs transformers on the same padded batches -------------------------------
def our_step(model, opt, batch):
    with autocast():
        loss_sum, n = sft_loss_sum(model, batch)
    (loss_sum / n).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return (loss_sum / n).item()


def hf_step(model, opt, docs):
    T = max(len(d) for d, _ in docs)
    ids = torch.tensor([d + [0] * (T - len(d)) for d, _ in docs], device=device)
    attn = torch.tensor([[1] * len(d) + [0] * (T - len(d)) for d, _ in docs], device=device)
    labels = torch.tensor([[t if m else -100 for t, m in zip(d, mk)] + [-100] * (T - len(d)) for d, mk in docs],
                          device=device)
    with autocast():
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


opt_ours, opt_peer = optimizer_for(ours), optimizer_for(peer)
batches = [make_docs(args.batch, gen) for _ in range(args.warmup + args.steps)]
t_ours, t_peer, first = [], [], None
for i, docs in enumerate(batches):
    batch = padded_sft_batch(docs, device)
    sync(); t0 = time.perf_counter()
    l_ours = our_step(ours, opt_ours, batch)
    sync(); t1 = time.perf_counter()
    l_peer = hf_step(peer, opt_peer, docs)
    sync(); t2 = time.perf_counter()
    if first is None:
        first = (l_ours, l_peer)
    if i >= args.warmup:
        n_tok = sum(len(d) for d, _ in docs)
        t_ours.append(n_tok / (t1 - t0))
        t_peer.append(n_tok / (t2 - t1))
print(f"part 1: {args.steps} timed steps of {args.batch} padded documents (median of steps); "
      f"first-step loss ours {first[0]:.5f} vs transformers {first[1]:.5f} (same weights and batch)")
tps_ours, tps_peer = statistics.median(t_ours), statistics.median(t_peer)
print(f"  sft step (ours):        {tps_ours:9.1f} tok/s")
print(f"  transformers step:      {tps_peer:9.1f} tok/s")
del peer, opt_peer
if device.type == "cuda":
    torch.cuda.empty_cache()


# ---- part 2: packing vs padding, one optimizer step over the same documents -------------------
def one_step(docs, packed):
    budget = args.token_budget or args.batch * args.max_len
    if packed:
        groups = pack_documents([len(d) for d, _ in docs], budget)
        micro = [packed_sft_batch([docs[i] for i in grp], device) for grp in groups]
    else:
        micro = [padded_sft_batch(docs[i:i + args.batch], device) for i in range(0, len(docs), args.batch)]
    n_target = sum(sum(m[1:]) for _, m in docs)
    sync(); t0 = time.perf_counter()
    for batch in micro:
        with autocast():
            loss_sum, _ = sft_loss_sum(ours, batch)
        (loss_sum / n_target).backward()
    torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
    opt_ours.step()
    opt_ours.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t0, len(micro), sum(b["input_ids"].numel() for b in micro)


docs = make_docs(args.docs, gen)
real = sum(len(d) for d, _ in docs)
one_step(docs[: args.batch], True)  # warm-up (allocator, kernels)
times_pad, times_pack = [], []
for _ in range(args.repeats):  # interleaved, median: shared machines are noisy
    t, n_pad, slots_pad = one_step(docs, packed=False)
    times_pad.append(t)
    t, n_pack, slots_pack = one_step(docs, packed=True)
    times_pack.append(t)
t_pad, t_pack = statistics.median(times_pad), statistics.median(times_pack)
lens = sorted(len(d) for d, _ in docs)
print(f"part 2: {args.docs} documents, {real} real tokens, lengths min/median/max "
      f"{lens[0]}/{lens[len(lens) // 2]}/{lens[-1]}; median of {args.repeats} interleaved steps each")
print(f"  padded: {n_pad} batches of {args.batch}, {slots_pad} token slots ({real / slots_pad:.0%} real): "
      f"{real / t_pad:9.1f} effective tok/s")
print(f"  packed: {n_pack} micro-batches, {slots_pack} token slots ({real / slots_pack:.0%} real):     "
      f"{real / t_pack:9.1f} effective tok/s")

if device.type == "cuda":
    # 6 N per token for the weights, plus attention 12 L h T_ctx / 2 (causal, mean context ~T/2)
    mean_ctx = statistics.mean(lens) / 2
    flops_tok = 6 * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * mean_ctx
    for name, tps in (("sft step (padded, part 1)", tps_ours), ("transformers (part 1)", tps_peer),
                      ("packed step (part 2)", real / t_pack)):
        print(f"  MFU {name}: {100 * flops_tok * tps / (args.peak_tflops * 1e12):.1f}% "
              f"(of {args.peak_tflops:.0f} TFLOP/s)")
print(f"ours / transformers, same padded batches: {tps_ours / tps_peer:.2f}x")
print(f"packed / padded, effective tokens per second: {t_pad / t_pack:.2f}x")
