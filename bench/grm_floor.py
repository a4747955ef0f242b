"""The least time one epoch of the default GRM training can take on this machine.

`python train_grm.py` (issue #5 asks for the whole default run, training and the 65-pair held-out
evaluation, in under 10 minutes on 2 CPU cores) trains the embedded SmolLM2-135M on every
persona-world GRM row for one epoch. This script counts that epoch's work exactly, from the
batches common.sft_train builds with train_grm.py's defaults (read from its own argument parser:
--global-batch 4, --token-budget 4096, --share-prefix, all rows, seed 0): packed
tokens, loss tokens, and attention query-key pairs (a continuation segment's queries see its
shared prompt and themselves). It prices that work with rates measured in this run:
  - matrix products: every linear layer's forward and backward shapes in bf16, timed alone
    (the best case: the training's products run inside a model, between other work);
  - attention: common.attention's forward + backward under bf16 autocast, with the dtypes the
    model gives it, on real steps' segment layouts, times the number of layers;
and compares the sum with real training steps (model forward + backward + AdamW, as sft_train).
The floor leaves out the elementwise work (norms, RoPE, SiLU, casts, the loss) and the optimizer.

    python bench/grm_floor.py                # ~1 minute on 2 CPU cores
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import train_grm  # noqa: E402


def segment_pairs(cu, parents):
    """Query-key pairs attention must score: a segment of n tokens continuing a prefix of m
    tokens scores n * m + n(n+1)/2, a segment on its own n(n+1)/2."""
    sizes = [e - s for s, e in zip(cu[:-1], cu[1:])]
    total = 0
    for j, n in enumerate(sizes):
        p = -1 if parents is None else parents[j]
        total += n * (n + 1) // 2 + (sizes[p] * n if p >= 0 else 0)
    return total


def seconds_per_call(fn, reps):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="real training steps timed (after one warm-up)")
    p.add_argument("--attn-steps", type=int, default=6, help="steps whose attention is timed")
    args = p.parse_args()
    common.keep_freed_cpu_memory()  # as dist_init does on CPU
    torch.manual_seed(0)

    model, tok = common.load_model(common.DEFAULT_MODEL)
    c = model.config
    H, KV, D, h, inter, L = (c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads,
                             c.hidden_size, c.intermediate_size, c.num_hidden_layers)
    grm = train_grm.get_args([])  # the default run's settings
    pairs = train_grm.load_pairs(grm.pairs, grm.persona_dir, grm.eval_pct)
    rows, _, _ = train_grm.grm_training_rows(Path(grm.grm_data), pairs, grm.max_train, grm.seed)
    docs = [train_grm.grm_doc(tok, r["persona"], r["question"], r["response"], r["grm_output"]) for r in rows]
    docs = [d for d in docs if len(d[0]) <= grm.max_len]  # as run_grm (none is longer by default)
    steps = common._sft_epoch_steps(docs, grm.global_batch, grm.seed, grm.share_prefix)
    batches = [[common.packed_sft_batch([docs[i] for i in mb], share_prefix=grm.share_prefix)
                for mb in common._sft_microbatches(docs, step, grm.token_budget, grm.share_prefix)]
               for step in steps]

    # the epoch's work
    tokens = sum(b["input_ids"].numel() for bs in batches for b in bs)
    loss_tokens = sum(int((b["targets"] != -100).sum()) for bs in batches for b in bs)
    qk_pairs = sum(segment_pairs(b["cu_seqlens"].tolist(), b.get("parents")) for bs in batches for b in bs)
    shapes = [(h, H * D), (h, KV * D), (h, KV * D), (H * D, h), (h, inter), (h, inter), (inter, h)]
    linear_params = L * sum(i * o for i, o in shapes)
    mm_flops = 6 * linear_params * tokens + 6 * c.vocab_size * h * loss_tokens  # fwd + 2x bwd
    attn_flops = 3 * L * qk_pairs * 4 * H * D  # QK^T and PV, 2 flops a multiply-add; bwd = 2x fwd
    print(f"one epoch: {len(rows)} rows, {len(steps)} steps, {tokens:,} packed tokens "
          f"({tokens / len(steps):.0f} a step), {loss_tokens:,} loss tokens, {qk_pairs:,} query-key pairs a layer")
    print(f"  matrix products {mm_flops / 1e12:.1f} TFLOP, attention {attn_flops / 1e12:.1f} TFLOP")

    # rate of the matrix products: the linear layers' forward and backward shapes in bf16
    M = 2048
    mm_time, mm_work = 0.0, 0
    for i, o in shapes:
        x, w, g = (torch.randn(M, i, dtype=torch.bfloat16), torch.randn(i, o, dtype=torch.bfloat16),
                   torch.randn(M, o, dtype=torch.bfloat16))
        for a, b in ((x, w), (g, w.t()), (x.t(), g)):  # forward, input grad, weight grad
            mm_time += seconds_per_call(lambda: a @ b, 10)
            mm_work += 2 * M * i * o
    mm_rate = mm_work / mm_time
    print(f"  bf16 matrix products at the model's shapes: {mm_rate / 1e9:.0f} GFLOP/s")

    # rate of attention: real steps' layouts (evenly spaced through the epoch), forward + backward
    attn_time, attn_pairs = 0.0, 0
    for bs in batches[::max(len(batches) // args.attn_steps, 1)][:args.attn_steps]:
        for b in bs:
            T, cu, parents = b["input_ids"].shape[1], b["cu_seqlens"], b.get("parents")
            q = torch.randn(1, T, H, D, requires_grad=True)
            k = torch.randn(1, T, KV, D, requires_grad=True)
            v = torch.randn(1, T, KV, D, dtype=torch.bfloat16, requires_grad=True)  # as the model gives it

            def fwd_bwd():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = common.attention(q, k, v, cu, parents)
                out.float().sum().backward()
            attn_time += seconds_per_call(fwd_bwd, 2)
            attn_pairs += segment_pairs(cu.tolist(), parents)
    attn_s_per_pair = attn_time / attn_pairs
    print(f"  attention forward + backward, one layer: {attn_pairs / attn_time / 1e6:.1f}M query-key pairs/s "
          f"({3 * 4 * H * D * attn_pairs / attn_time / 1e9:.0f} GFLOP/s)")

    floor_mm = mm_flops / mm_rate
    floor_attn = L * qk_pairs * attn_s_per_pair
    print(f"floor of one epoch: {floor_mm + floor_attn:.0f} s (matrix products {floor_mm:.0f} s at the "
          f"bf16 rate, attention {floor_attn:.0f} s)")

    # real steps through the training code: forward + backward + clip + AdamW
    optimizer = common.adamw(model.parameters(), lr=1e-5)

    def train_step(bs):
        for b in bs:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss_sum, _ = common.sft_loss_sum(model, b)
            loss_sum.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    train_step(batches[0])
    timed = batches[1:1 + args.steps]
    t = time.perf_counter()
    for bs in timed:
        train_step(bs)
    real = time.perf_counter() - t
    real_tokens = sum(b["input_ids"].numel() for bs in timed for b in bs)
    print(f"real training steps: {real / len(timed):.1f} s a step, {real_tokens / real:.0f} tokens/s "
          f"-> one epoch {tokens * real / real_tokens:.0f} s at that rate")


if __name__ == "__main__":
    main()
