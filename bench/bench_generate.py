"""Generation throughput: common.generate against transformers' generate, same model, prompts, dtype.

    python bench/bench_generate.py                 # CPU: SmolLM2-135M-Instruct, fp32
    python bench/bench_generate.py --device cuda   # GPU: random Qwen2.5-0.5B-sized model, bf16

Two settings, 128 new tokens each (no early stop on either side, so both emit the same count):
greedy at batch 1 and sampling (temperature 0.9, top-p 0.9) at batch 16. Prints tokens/s of both,
the fraction of the memory-bandwidth roofline reached at batch 1 (weight bytes per token over a
read bandwidth measured in the same run), and the speed ratios last. On CUDA also ours without
the CUDA-graph decode step (generate(..., cuda_graph=False), op by op).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
parser.add_argument("--model", default=None,
                    help="checkpoint (default: SmolLM2 on CPU, random Qwen2.5-0.5B config on CUDA)")
parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per row")
parser.add_argument("--batch", type=int, default=16, help="batch size of the sampling setting")
parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per side, the two sides "
                    "alternating (best is kept): a shared machine's drift hits both alike")
args = parser.parse_args()

device = torch.device(args.device)
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
tmp = tempfile.TemporaryDirectory()
if args.model is None and device.type == "cuda":  # Qwen2.5-0.5B shape, random weights
    cfg = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936,
           "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
           "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
           "tie_word_embeddings": True, "max_position_embeddings": 32768, "hidden_act": "silu",
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    hf_model.save_pretrained(tmp.name)
    common.load_tokenizer(common.DEFAULT_MODEL).save_pretrained(tmp.name)
    folder = tmp.name
else:
    folder = common.resolve_checkpoint(args.model or common.DEFAULT_MODEL)
ours, tok = common.load_model(folder, device=device, dtype=dtype)
hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()

questions = ["What is the capital of France?", "Give me three tips for sleeping better.",
             "Explain photosynthesis to a ten year old in a few sentences.",
             "Write a short poem about autumn leaves falling in a quiet park.",
             "How do I make a simple tomato sauce?", "Why is the sky blue?",
             "List some good habits for learning a new language every day.",
             "What should I pack for a weekend hiking trip in the mountains?"]
prompts = [common.chat_prompt_ids(tok, [{"role": "user", "content": q}]) for q in questions]


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def best_time(fn):
    fn()  # warm-up
    return min(timed(fn) for _ in range(args.repeats))


def best_times_alternating(fn_a, fn_b):
    """Best of --repeats runs of each, a and b taking turns (after one warm-up each)."""
    fn_a(), fn_b()
    runs = [(timed(fn_a), timed(fn_b)) for _ in range(args.repeats)]
    return min(a for a, _ in runs), min(b for _, b in runs)


def ours_run(batch, sample, cuda_graph=True):
    g = common.generate(ours, batch, args.new_tokens, temperature=0.9 if sample else 0.0,
                        top_p=0.9 if sample else 1.0, stop_ids=[], seed=0, cuda_graph=cuda_graph)
    assert all(len(t) == args.new_tokens for t in g.tokens)


PAD = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # newer converters set no pad


def hf_run(batch, sample):
    width = max(len(p) for p in batch)  # left padding, explicit mask (pad id == <|im_end|> here)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
    kw = dict(do_sample=True, temperature=0.9, top_p=0.9, top_k=0) if sample else dict(do_sample=False)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                          eos_token_id=None, pad_token_id=PAD, **kw)
    assert out.shape[1] == width + args.new_tokens


def read_bandwidth():
    """GB/s of a plain streaming read (sum over a buffer far larger than the caches)."""
    n = (2 << 30) // 4 if device.type == "cpu" else (8 << 30) // 2
    buf = torch.ones(n, device=device, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
    t = best_time(lambda: buf.sum())
    return buf.numel() * buf.element_size() / t / 1e9


results, eager = {}, {}
batch1 = [prompts[2]]
batchN = [prompts[i % len(prompts)] for i in range(args.batch)]
for name, batch, sample in (("greedy b1", batch1, False), (f"sample b{args.batch}", batchN, True)):
    t_ours, t_hf = best_times_alternating(lambda: ours_run(batch, sample), lambda: hf_run(batch, sample))
    n = len(batch) * args.new_tokens
    results[name] = (n / t_ours, n / t_hf)
    if device.type == "cuda":  # what the CUDA graph of the decode step is worth: ours op by op
        eager[name] = n / best_time(lambda: ours_run(batch, sample, cuda_graph=False))

# weights streamed per decode step: every parameter once (a tied embedding is read as the output layer)
weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
bandwidth = read_bandwidth()
model_name = folder if args.model else "random Qwen2.5-0.5B shape" if device.type == "cuda" else common.DEFAULT_MODEL
print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
      f"dtype {dtype}, model {model_name}, {torch.get_num_threads()} threads")
print(f"weights {weight_bytes / 1e6:.0f} MB, measured read bandwidth {bandwidth:.1f} GB/s")
for name, (ours_tps, hf_tps) in results.items():
    print(f"{name:>12}: ours {ours_tps:8.1f} tok/s   transformers {hf_tps:8.1f} tok/s")
for name, tps in eager.items():
    print(f"{name:>12}: ours without the CUDA graph (op by op) {tps:8.1f} tok/s")
b1 = results["greedy b1"][0]
print(f"batch-1 roofline: ours moves {weight_bytes * b1 / 1e9:.1f} GB/s of weights = "
      f"{100 * weight_bytes * b1 / 1e9 / bandwidth:.0f}% of read bandwidth "
      f"(transformers {100 * weight_bytes * results['greedy b1'][1] / 1e9 / bandwidth:.0f}%)")
for name, (ours_tps, hf_tps) in results.items():
    print(f"speed-up {name}: {ours_tps / hf_tps:.2f}x")
