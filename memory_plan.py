"""memory_plan.py: the per-GPU memory of a training stage before it runs (README "Scaling to the
paper"). From a model's shapes, the world size and the stage's flags it prints the peak of each
phase of a step split into parameters, gradients, optimizer state, gathered generation weights,
KV cache and activations, and whether the largest fits a GPU.

  python memory_plan.py --model-config Qwen2.5-7B-Instruct --stage ppo --world-size 8 --gpu-gib 80 \\
      --precision bf16-mixed --checkpointing --micro-token-budget 8192 --prompts-per-step 128 \\
      --samples 4 --max-new-tokens 2048 --max-prompt-tokens 2048 --grm-max-new-tokens 1024
  python memory_plan.py --model-config /ckpt/Qwen2.5-14B-Instruct/config.json --stage sft \\
      --token-budget 16896 --checkpointing

--model-config: an HF config.json, a checkpoint folder, or a built-in name (Qwen2.5-7B-Instruct,
Qwen2.5-14B-Instruct). --stage sft and grm: sft.py (the GRM is SFT on GRM records); ppo:
ppo_cpe.py with the GRM served elsewhere (--grm-url, vLLM), so the GPUs hold actor and critic.

The arithmetic follows common.load_trainable, sft.py and ppo_cpe.py:
- Under torchrun every trained model is FSDP2-sharded: master weights, gradients and AdamW's two
  states are each 1/world of the model per GPU. bf16-mixed and fp32: 4 + 4 + 2 x 4 = 16 bytes per
  parameter / world; bf16: 8. bf16-mixed gathers bf16 copies for compute, fp32 gathers fp32.
- The root (embeddings, final norm, output layer, value head) stays gathered from the forward to
  the end of the backward (reshard_after_forward=False); decoder blocks are gathered one at a
  time, two in the backward (FSDP2 prefetches the next).
- Gradients are reduce-scattered after every micro-batch (sft.py, ppo_cpe.py, train_grm.py): only
  shards are kept between them (skipping the reduction would keep the whole model's unsharded fp32
  gradients on every GPU: 28 GiB for a 7B model).
- Every token of a micro-batch carries a loss: an upper bound (the stages compute logits only at
  trained or response positions).
- A training pass peaks either where the backward starts (the output layer's fp32 logits and
  their gradients) or inside a block's backward (two gathered blocks, the block recomputed under
  --checkpointing, its gradients); the larger is shown.
- One process (world size 1): the plain model, fused AdamW; bf16-mixed runs under autocast, which
  keeps a bf16 copy of every block matrix for the backward.
Not counted: the CUDA context, NCCL buffers and allocator fragmentation: --reserve-gib.
"""
import argparse
import json
from pathlib import Path

from common import ModelConfig

# Shapes of the paper's models (HF config.json fields), so that no download is needed.
QWEN25 = dict(model_type="qwen2", vocab_size=152064, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False)
BUILTIN = {
    "Qwen2.5-7B-Instruct": dict(QWEN25, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                num_attention_heads=28, num_key_value_heads=4),
    "Qwen2.5-14B-Instruct": dict(QWEN25, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                                 num_attention_heads=40, num_key_value_heads=8),
}
GIB = 2 ** 30
# What the stages do today, so that the plan's defaults describe them (change with the code):
# sft.py, ppo_cpe.py and train_grm.py call set_requires_gradient_sync(False) on all but a step's last
# micro-batch ("every" once they reduce-scatter after each one), and ppo_cpe.microbatch_losses
# keeps the entropy's graph (exp(log p), one more [tokens, vocab] fp32 tensor; 3 without it).
PPO_HEAD_TENSORS = 3
EDIT_PROMPT_EXTRA = 200  # tokens of ppo_cpe.EDIT_INSTRUCTION and the chat template around an edit prompt
ROWS = [("parameters", "parameters (shards + gathered)"), ("gradients", "gradients"),
        ("optimizer", "optimizer state (AdamW)"), ("generation_weights", "gathered generation weights"),
        ("kv_cache", "KV cache"), ("activations", "activations (incl. logits)")]


def read_config(name):
    """ModelConfig from a built-in name, a config.json file or a checkpoint folder."""
    builtin = {k.lower(): v for k, v in BUILTIN.items()}.get(Path(str(name)).name.lower())
    if builtin and not Path(name).exists():
        return ModelConfig.from_hf(builtin)
    path = Path(name) / "config.json" if Path(name).is_dir() else Path(name)
    return ModelConfig.from_hf(json.loads(path.read_text()))


def parameter_counts(cfg, value_head=False):
    """(all parameters, one decoder block, the root: embeddings + final norm + output layer or value head)."""
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    block = 2 * h * q + 2 * h * kv + 3 * h * cfg.intermediate_size + 2 * h  # q, o, k, v, MLP, 2 norms
    block += (q + 2 * kv) * cfg.qkv_bias + 2 * cfg.head_dim * cfg.qk_norm
    root = cfg.vocab_size * h + h + (h + 1 if value_head else 0)
    if not cfg.tie_word_embeddings and not value_head:  # a value model has no output layer
        root += cfg.vocab_size * h
    return block * cfg.num_hidden_layers + root, block, root


def element_bytes(precision, world):
    """Bytes of: a master weight, its gradient, one AdamW state, a gathered copy, a compute tensor,
    the residual stream, an unsharded accumulated gradient (FSDP2's reduce dtype)."""
    if precision == "bf16":
        return dict(master=2, grad=2, state=2, gathered=2, compute=2, residual=2, accum=2)
    mixed = precision == "bf16-mixed"
    return dict(master=4, grad=4, state=4, gathered=2 if mixed and world > 1 else 4, compute=2 if mixed else 4,
                residual=2 if mixed and world > 1 else 4, accum=4)  # autocast keeps an fp32 residual


def layer_activation_bytes(cfg, precision, world):
    """Bytes one decoder layer saves for the backward, per token (what the ops save, compute dtype b):
    the MLP's gate, silu, up and product (4 b I); q and k after RoPE, v, the attention output and
    the output projection's input (b (3 q + 2 kv)); the two RMSNorms with the residual: 16 h with a
    bf16 residual (each norm keeps an fp32 copy of its input, 4 h, and its normalised output and
    result, 2 x 2 h), 20 h in fp32, 24 h under autocast over fp32 weights (fp32 outputs and their
    bf16 casts)."""
    e = element_bytes(precision, world)
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    norms = 20 * h if precision == "fp32" else 24 * h if e["residual"] == 4 else 16 * h
    return e["compute"] * (4 * cfg.intermediate_size + 3 * q + 2 * kv) + norms


def model_training(cfg, precision, world, value_head, checkpointing, tokens, head_tensors):
    """One trained model's per-GPU bytes during a training pass of `tokens` tokens at the two
    candidate peaks: {"head": {component: bytes}, "block": {...}}."""
    e = element_bytes(precision, world)
    n, block, root = parameter_counts(cfg, value_head)
    shard = n / world
    if world == 1:  # plain model; autocast keeps bf16 copies of the blocks' matrices (bf16-mixed)
        gathered_root, gathered_blocks, block_grads = (2 * (n - root) if precision == "bf16-mixed" else 0), 0, 0
        grads = e["grad"] * n
    else:  # the root all along; in a block's backward two blocks and one block's bf16 and fp32 gradients
        gathered_root, gathered_blocks = e["gathered"] * root, 2 * e["gathered"] * block
        block_grads = (e["gathered"] + e["accum"]) * block
        grads = e["grad"] * shard  # the shards the earlier micro-batches reduce-scattered
    layer = layer_activation_bytes(cfg, precision, world)
    L, h, b = cfg.num_hidden_layers, cfg.hidden_size, e["compute"]
    # with checkpointing a block keeps only its input (the residual, r h per token); outside the
    # blocks: the embedding output (r h), the final norm (8 h), RoPE's cos and sin (2 b D)
    kept = tokens * ((e["residual"] * h if checkpointing else layer) * L + e["residual"] * h + 8 * h
                     + 2 * b * cfg.head_dim)
    base = dict(parameters=e["master"] * shard + gathered_root, gradients=grads,
                optimizer=2 * e["state"] * shard, generation_weights=0, kv_cache=0, activations=kept)
    # the output layer: head_tensors fp32 [tokens, vocab] tensors at once (sft.py's cross-entropy: 3,
    # the saved log-softmax, its gradient and the logits' gradient; PPO: PPO_HEAD_TENSORS)
    head = dict(base, activations=kept + tokens * head_tensors * 4 * cfg.vocab_size)
    # a block's backward: the block recomputed (checkpointing) and three I-wide gradients of its MLP
    in_block = tokens * ((layer if checkpointing else 0) + 3 * b * cfg.intermediate_size)
    blk = dict(base, parameters=base["parameters"] + gathered_blocks, gradients=grads + block_grads,
               activations=kept + in_block)
    return {"head": head, "block": blk}


def add(*dicts):
    return {k: sum(d[k] for d in dicts) for k in dicts[0]}


def plan(cfg, stage, world, precision, checkpointing, tokens, prompts_per_step=128,
         samples=4, max_new_tokens=2048, max_prompt_tokens=2048, grm_max_new_tokens=1024, edit_ratio=0.5,
         no_edit=False, kl_coef=0.0):
    """{phase: {component: bytes per GPU}} for the phases of a step; the peak is the largest total."""
    ppo, total = stage == "ppo", lambda d: sum(d.values())  # noqa: E731
    head_tensors = PPO_HEAD_TENSORS if ppo else 3
    actor = model_training(cfg, precision, world, False, checkpointing, tokens, head_tensors)
    if not ppo:
        training = max(actor.values(), key=total)
    else:  # actor and critic passes share one backward; one model's blocks go through theirs at a time
        critic = model_training(cfg, precision, world, True, checkpointing, tokens, 0)
        training = max(add(actor["head"], critic["head"]), add(actor["block"], critic["head"]),
                       add(actor["head"], critic["block"]), key=total)
    e = element_bytes(precision, world)
    n_actor = parameter_counts(cfg)[0]
    n_trained = n_actor + (parameter_counts(cfg, True)[0] if ppo else 0)
    reference = e["compute"] * n_actor if ppo and kl_coef > 0 else 0  # load_model: a full frozen copy per GPU
    training = dict(training, parameters=training["parameters"] + reference)
    shards, states = e["master"] * n_trained / world + reference, 2 * e["state"] * n_trained / world
    step_temp = 0 if world == 1 else e["state"] * n_actor / world  # foreach AdamW: one shard-sized temporary
    phases = {"training": training,
              "optimizer step": dict(parameters=shards, gradients=e["grad"] * n_trained / world,
                                     optimizer=states + step_temp, generation_weights=0, kv_cache=0, activations=0)}
    if ppo:
        # Generation gathers the whole actor (common.unsharded; FSDP2 can still hold the last
        # block's flat all-gather buffer; one process uses its own weights) and pre-allocates a KV
        # cache in the weights' dtype b: 2 (K and V) x layers x kv_heads x head_dim x (prompt +
        # response) tokens per row. Rollouts: this rank's prompts x samples rows; the prefill runs
        # all prompts at once, a prompt shared by its samples once. Edits: edit_ratio of the rows,
        # each prompt = original prompt + response + critique + instruction, all prefilled at once.
        # In the prefill (no autograd) a token holds, inside a block's MLP, its silu, up and product
        # (3 b I), the block's input, the residual after attention and the normalised input (3 b h),
        # and RoPE's angles (fp32, 6 D) with their cos and sin (2 b D).
        b, block = e["gathered"], parameter_counts(cfg)[1]
        gathered = b * (n_actor + block) if world > 1 else 0
        kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * b
        prefill_per_token = 3 * b * (cfg.intermediate_size + cfg.hidden_size) + (6 + 2 * b) * cfg.head_dim
        rows = prompts_per_step * samples // world
        edit_rows = 0 if no_edit else int(edit_ratio * rows)
        edit_len = max_prompt_tokens + max_new_tokens + grm_max_new_tokens + EDIT_PROMPT_EXTRA
        prompt_tokens = prompts_per_step // world * max_prompt_tokens
        for name, cached, prefilled in (("rollouts", rows * (max_prompt_tokens + max_new_tokens), prompt_tokens),
                                        ("edits", edit_rows * (edit_len + max_new_tokens), edit_rows * edit_len)):
            if cached:
                phases[name] = dict(parameters=shards, gradients=0, optimizer=states,
                                    generation_weights=gathered, kv_cache=kv_per_token * cached,
                                    activations=prefill_per_token * prefilled)
    return phases


def format_plan(phases, gpu_gib, reserve_gib):
    """(the table in GiB per GPU with the peak and FITS / DOES NOT FIT, peak GiB, fits)."""
    names = list(phases)
    lines = [f"{'GiB per GPU':<32}" + "".join(f"{n:>15}" for n in names)]
    for key, label in ROWS:
        lines.append(f"{label:<32}" + "".join(f"{phases[n][key] / GIB:>15.1f}" if phases[n][key] else f"{'-':>15}"
                                                for n in names))
    totals = {n: sum(phases[n].values()) / GIB for n in names}
    lines.append(f"{'total':<32}" + "".join(f"{totals[n]:>15.1f}" for n in names))
    peak_phase = max(totals, key=totals.get)
    peak = totals[peak_phase]
    fits = peak + reserve_gib <= gpu_gib
    lines.append(f"peak {peak:.1f} GiB ({peak_phase}) + {reserve_gib:g} GiB reserve = {peak + reserve_gib:.1f} GiB "
                 f"of {gpu_gib:g} GiB: {'FITS' if fits else 'DOES NOT FIT'}")
    return "\n".join(lines), peak, fits


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", required=True, help="config.json, checkpoint folder, or " + " / ".join(BUILTIN))
    p.add_argument("--stage", choices=["sft", "grm", "ppo"], required=True, help="sft, grm: sft.py; ppo: ppo_cpe.py")
    p.add_argument("--world-size", type=int, default=8, help="GPUs (torchrun processes) sharing the models")
    p.add_argument("--gpu-gib", type=float, default=80, help="memory of one GPU, GiB")
    p.add_argument("--reserve-gib", type=float, default=4,
                   help="kept free for the CUDA context, NCCL buffers and allocator fragmentation")
    p.add_argument("--precision", choices=["fp32", "bf16-mixed", "bf16"], default="bf16-mixed",
                   help="the stage's --precision")
    p.add_argument("--checkpointing", action="store_true", help="the stage's --checkpointing")
    p.add_argument("--token-budget", type=int, default=None, help="sft.py --token-budget (tokens per micro-batch)")
    p.add_argument("--micro-token-budget", type=int, default=None, help="ppo_cpe.py --micro-token-budget")
    p.add_argument("--prompts-per-step", type=int, default=128, help="ppo: prompts per step, all ranks")
    p.add_argument("--samples", type=int, default=4, help="ppo: rollouts per prompt")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="ppo: response cap")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="ppo: prompt cap")
    p.add_argument("--grm-max-new-tokens", type=int, default=1024, help="ppo: critique cap (edit prompts hold it)")
    p.add_argument("--edit-ratio", type=float, default=0.5, help="ppo: edits per original")
    p.add_argument("--no-edit", action="store_true", help="ppo: plain PPO (no edit generation)")
    p.add_argument("--kl-coef", type=float, default=0.0, help="ppo: > 0 loads a frozen reference model on every GPU")
    args = p.parse_args(argv)
    args.tokens = args.micro_token_budget if args.stage == "ppo" else args.token_budget
    if args.tokens is None:
        p.error("--token-budget (sft, grm) or --micro-token-budget (ppo) is needed: the micro-batch size")
    for name in ("world_size", "tokens", "prompts_per_step", "samples", "max_new_tokens", "max_prompt_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.gpu_gib <= 0 or args.reserve_gib < 0 or not 0 <= args.edit_ratio <= 1:
        p.error("--gpu-gib must be > 0, --reserve-gib >= 0, --edit-ratio in [0, 1]")
    return args


def main(argv=None):
    args = get_args(argv)
    cfg = read_config(args.model_config)
    phases = plan(cfg, args.stage, args.world_size, args.precision, args.checkpointing, args.tokens,
                  args.prompts_per_step, args.samples, args.max_new_tokens, args.max_prompt_tokens,
                  args.grm_max_new_tokens, args.edit_ratio, args.no_edit, args.kl_coef)
    n = parameter_counts(cfg)[0] / 1e9
    models = f"actor {n:.2f} B + critic {parameter_counts(cfg, True)[0] / 1e9:.2f} B parameters" \
        if args.stage == "ppo" else f"{n:.2f} B parameters"
    name = Path(str(args.model_config))
    name = name.parent.name if name.name == "config.json" else name.name
    print(f"memory plan: {name}, stage {args.stage}, {models}; {args.world_size} GPU(s), "
          f"{args.precision}, {'' if args.checkpointing else 'no '}checkpointing, micro-batch {args.tokens} tokens")
    table, peak, fits = format_plan(phases, args.gpu_gib, args.reserve_gib)
    print(table)
    return peak, fits


if __name__ == "__main__":
    main()
