"""The 2-process FSDP2 checks of issue 22, launched by tests/test_distributed.py (gloo on CPU):

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_fsdp_check.py MODEL MEM_MODEL OUT.json

MODEL and MEM_MODEL are tiny random HF folders (common.save_model); every check loads them with
common.load_trainable, as the stages do. The checks only measure: rank 0 writes one JSON entry per
check and the test asserts on the numbers, so a failing check reports figures instead of
leaving a rank waiting in a collective.

  meta_load       the meta-device build + rank-0 broadcast equals the checkpoint on every rank
  precision       FSDP2 bf16-mixed (and fp32) vs one process with fp32 weights + bf16 autocast
                  (and plain fp32): losses of 2 AdamW steps and the weights after them
  small_lr        lr 1e-6, 2 AdamW steps: the fraction of a block matrix's master entries that
                  changed, bf16-mixed (fp32 master weights) and bf16 (bf16 weights)
  checkpointing   gradients with and without activation checkpointing
  micro_batches   one step of sft.py's loop with token-bounded micro-batches vs one micro-batch,
                  and vs one process on the whole batch: loss and gradients
  memory          peak bytes allocated in SFT and PPO training steps, with memory_plan's figures
"""
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import memory_plan  # noqa: E402
import ppo_cpe  # noqa: E402
from sft import loss_sum, rank_share, trained_positions  # noqa: E402

ONE = common.DistEnv(0, 0, 1, torch.device("cpu"))  # the single-process reference


def make_docs(n, vocab, seed, lengths=(23, 31, 40, 17, 29, 36, 25, 44)):
    """(ids, mask) documents of random tokens; the loss is on the second half of each."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(n):
        length = lengths[i % len(lengths)]
        docs.append((torch.randint(0, vocab, (length,), generator=g).tolist(),
                     [0] * (length // 2) + [1] * (length - length // 2)))
    return docs


def accumulate(model, docs, token_budget, env, precision):
    """The gradient part of one step of sft.py's loop on `docs` (all ranks together): micro-batches
    bounded by tokens, every rank the same number of passes (a rank short of one runs a pass at
    weight zero), gradients reduce-scattered after every pass, the loss an exact token mean. Returns
    the step's loss and its number of micro-batches."""
    mbs = common.micro_batches([d[0] for d in docs], token_budget)
    n_targets = sum(len(t) for t in trained_positions(docs))
    mine, n_passes = rank_share(mbs, env)
    total = torch.zeros(1, dtype=torch.float64)
    for j in range(n_passes):
        real = j < len(mine)
        with common.autocast(env.device, precision):
            loss, _ = loss_sum(model, [docs[i] for i in (mine[j] if real else mbs[0][:1])], env.device, False)
        (loss * (env.world_size / n_targets if real else 0.0)).backward()
        total += loss.item() if real else 0.0
    if env.world_size > 1:
        common.all_reduce_sum(total)
    return total.item() / n_targets, len(mbs)


def sft_step(model, opt, docs, token_budget, env, precision, lr):
    """One optimizer step of sft.py's loop (clipping, AdamW at lr); returns the step's loss."""
    loss, _ = accumulate(model, docs, token_budget, env, precision)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def full(t):
    """A parameter or gradient as a full tensor (collective for DTensors: every rank calls it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def params(model):
    return {k: full(p.detach()).float().clone() for k, p in model.named_parameters()}


def check_meta_load(folder, env):
    out = {}
    for precision, value_head in (("fp32", False), ("bf16-mixed", False), ("bf16-mixed", True)):
        model, _ = common.load_trainable(folder, env, precision, value_head=value_head)
        want = common.fit_state(model, common.read_hf_state(folder, value_head), folder)
        diff, sharded = 0.0, True
        for k, p in model.named_parameters():  # every rank gathers and compares
            diff = max(diff, (full(p.detach()) - want[k]).abs().max().item())
            sharded &= p.to_local().numel() < p.numel() or p.shape[0] < env.world_size  # dim 0 is split
        rope = (model.inv_freq - common.rope_inv_freq(model.config)).abs().max().item()
        gathered = common.full_state_dict(model)  # rank 0 only
        rank0 = max((gathered[k] - want[k]).abs().max().item() for k in want) if env.rank == 0 else 0.0
        per_rank = common.all_reduce_sum(torch.tensor([diff, rope, float(not sharded)]))
        out[f"{precision}{'-value' if value_head else ''}"] = {
            "max_diff_any_rank": per_rank[0].item(), "inv_freq_diff": per_rank[1].item(),
            "ranks_not_sharded": int(per_rank[2].item()), "full_state_dict_diff": rank0,
            "keys_match": env.rank != 0 or sorted(gathered) == sorted(want),
            "dtype": str(next(model.parameters()).dtype),
            "lm_head": hasattr(model, "lm_head"), "value_head_zero": not value_head or bool(
                (full(model.value_head.weight.detach()) == 0).all())}
    return out


def check_precision(folder, env, docs):
    """FSDP2 (2 ranks) against one process, 2 AdamW steps at lr 1e-3 over micro-batches."""
    out = {}
    for fsdp_precision, ref_precision in (("bf16-mixed", "bf16-mixed"), ("fp32", "fp32")):
        runs = {}
        for name, e, precision in (("fsdp", env, fsdp_precision), ("one", ONE, ref_precision)):
            torch.manual_seed(0)
            model = common.load_trainable(folder, e, precision)[0] if e.world_size > 1 else \
                common.load_model(folder)[0].train()
            start = params(model)
            grads = step_gradients(model, docs[0::2], 60, e, precision)[1]  # the first step's, then the steps
            opt = common.adamw(model, 1e-3, 0.01)
            losses = [sft_step(model, opt, docs[k::2], 60, e, precision, 1e-3) for k in range(2)]
            runs[name] = (losses, start, params(model), grads)
        (lf, w0, wf, gf), (lo, _, wo, go) = runs["fsdp"], runs["one"]
        # each tensor's update (w - w0) compared with the single process's: |difference| / |update|
        update_err = {k: ((wf[k] - w0[k]) - (wo[k] - w0[k])).norm().item() / (wo[k] - w0[k]).norm().item()
                      for k in wo}
        out[fsdp_precision] = {"loss_fsdp": lf, "loss_one": lo,
                               "loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(lf, lo)),
                               "grad_rel_err": max((gf[k] - go[k]).norm().item() / go[k].norm().item() for k in go),
                               "weight_max_abs_diff": max((wf[k] - wo[k]).abs().max().item() for k in wo),
                               "update_rel_err": update_err}
    return out


def check_small_lr(folder, env, docs):
    """The fraction of layers[0].mlp.gate_proj.weight's stored (master) entries changed by two
    AdamW steps at lr 1e-6."""
    out = {}
    for precision in ("bf16-mixed", "bf16"):
        model, _ = common.load_trainable(folder, env, precision)
        w = model.layers[0].mlp.gate_proj.weight
        before = full(w.detach()).clone()
        opt = common.adamw(model, 1e-6, 0.01)
        for k in range(2):
            sft_step(model, opt, docs[k::2], 60, env, precision, 1e-6)
        after = full(w.detach())
        out[precision] = {"changed": (after != before).float().mean().item(), "dtype": str(after.dtype)}
    return out


def check_checkpointing(folder, env, docs):
    """The same forward and backward with and without activation checkpointing: loss and gradients."""
    out = {}
    for precision in ("bf16-mixed", "fp32"):
        got = []
        for checkpointing in (False, True):
            model, _ = common.load_trainable(folder, env, precision, checkpointing=checkpointing)
            with common.autocast(env.device, precision):
                loss, _ = loss_sum(model, docs[env.rank::2], env.device, False)
            loss.backward()
            got.append((loss.item(), {k: p.grad.to_local().clone() for k, p in model.named_parameters()}))
        (l0, g0), (l1, g1) = got
        diff = common.all_reduce_sum(torch.tensor([max((g0[k] - g1[k]).abs().max().item() for k in g0),
                                                   abs(l0 - l1)]))
        out[precision] = {"grad_max_abs_diff": diff[0].item(), "loss_abs_diff": diff[1].item()}
    return out


def step_gradients(model, docs, token_budget, env, precision):
    """Loss, full gradients and micro-batch count of one step of sft.py's loop, without its update."""
    loss, n_micro = accumulate(model, docs, token_budget, env, precision)
    grads = {k: full(p.grad).float().clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss, grads, n_micro


def check_micro_batches(folder, env, docs):
    out = {}
    for precision in ("fp32", "bf16-mixed"):
        model, _ = common.load_trainable(folder, env, precision)
        l_small, g_small, n_small = step_gradients(model, docs, 50, env, precision)  # one or two docs each
        l_big, g_big, n_big = step_gradients(model, docs, 10 ** 6, env, precision)  # one micro-batch
        ref = common.load_model(folder)[0].train()
        l_one, g_one, _ = step_gradients(ref, docs, 10 ** 6, ONE, precision)
        rel = lambda a, b: max((a[k] - b[k]).norm().item() / b[k].norm().item() for k in b)  # noqa: E731
        out[precision] = {"micro_batches": [n_small, n_big], "loss": [l_small, l_big, l_one],
                          "grad_rel_small_vs_big": rel(g_small, g_big), "grad_rel_big_vs_one": rel(g_big, g_one),
                          "loss_rel_small_vs_big": abs(l_small - l_big) / l_big}
    return out


# ------------------------------------------------------------------------------------- memory

def peak_allocated(fn):
    """Peak bytes of tensors allocated while fn() runs, above what was live before, from the CPU
    allocator's events as torch.profiler records them (profile_memory=True): each allocation and
    free with its size, replayed in time order. Counted: allocations by the training thread, freed
    by any thread. Left out: gloo's own temporaries (allocations on its worker threads or inside
    its collectives: its CPU reduce-scatter clones the input, its all-gather stages a copy), which
    nccl keeps outside PyTorch's allocator on GPUs; with them the figure varies from run to run with
    how the two processes interleave."""
    from torch._C._profiler import _EventType
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], [(e, False) for e in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        e, in_gloo = stack.pop()
        in_gloo = in_gloo or e.name.startswith(("c10d::", "gloo:"))
        if e.typed[0] == _EventType.Allocation:
            events.append((e.start_time_ns, e.typed[1].alloc_size, e.typed[1].ptr, e.start_tid, in_gloo))
        stack.extend((c, in_gloo) for c in e.children)
    events.sort()
    threads = [tid for _, size, _, tid, _ in events if size > 0]
    main_thread = max(set(threads), key=threads.count)
    live, now, peak = {}, 0, 0
    for _, size, ptr, tid, in_gloo in events:
        if size > 0 and tid == main_thread and not in_gloo:
            live[ptr] = size
            now += size
        elif size < 0 and ptr in live:
            now -= live.pop(ptr)
        peak = max(peak, now)
    return peak


def live_bytes(*tensor_lists):
    """Bytes of the local storage of parameters, buffers, optimizer states (DTensors: this rank's shard)."""
    seen = {}
    for ts in tensor_lists:
        for t in ts:
            t = t.to_local() if hasattr(t, "to_local") else t
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def check_memory(folder, env):
    """Measured peaks of two training steps against memory_plan (every token carries a loss: the
    plan's bound). sft.py's loop in three configurations, and a PPO update."""
    tokens, out = 512, {}
    cfg = common.ModelConfig.from_hf(json.loads((Path(folder) / "config.json").read_text()))
    g = torch.Generator().manual_seed(0)
    docs = [(torch.randint(0, cfg.vocab_size, (tokens,), generator=g).tolist(), [1] * tokens)
            for _ in range(2 * env.world_size)]  # two micro-batches per rank
    for precision, checkpointing in (("fp32", False), ("bf16-mixed", True), ("bf16-mixed", False)):
        model, _ = common.load_trainable(folder, env, precision, checkpointing=checkpointing)
        before = live_bytes(model.parameters(), model.buffers())
        opt = common.adamw(model, 1e-3, 0.01)

        def two_steps():  # noqa: B023
            for _ in range(2):  # the second step has AdamW's states
                mine, n_passes = rank_share([[i] for i in range(len(docs))], env)
                for j in range(n_passes):
                    with common.autocast(env.device, precision):
                        loss, _ = loss_sum(model, [docs[i] for i in mine[j]], env.device, False)
                    (loss / len(docs) / tokens).backward()
                    del loss
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        measured = before + peak_allocated(two_steps)
        phases = memory_plan.plan(cfg, "sft", env.world_size, precision, checkpointing, tokens)
        out[f"sft {precision} {'checkpointing' if checkpointing else 'no checkpointing'}"] = {
            "measured": measured, "planned": max(sum(p.values()) for p in phases.values())}

    # A PPO update (ppo_cpe.microbatch_losses: actor and critic in one backward), three micro-batches
    # per rank of one sequence each, every token a response token, two steps
    args = ppo_cpe.get_args([])
    actor, _ = common.load_trainable(folder, env, "bf16-mixed", checkpointing=True)
    critic, _ = common.load_trainable(folder, env, "bf16-mixed", value_head=True, checkpointing=True)
    before = live_bytes(actor.parameters(), actor.buffers(), critic.parameters(), critic.buffers())
    n = 3 * env.world_size
    zeros = torch.zeros(n, tokens - 1)
    b = dict(seqs=[torch.randint(0, cfg.vocab_size, (tokens,), generator=g).tolist() for _ in range(n)],
             starts=[1] * n, mask=torch.ones(n, tokens - 1), advantages=zeros + 0.1, returns=zeros + 1.0,
             is_edit=torch.zeros(n, dtype=torch.bool), old_logp=zeros - 8.0, edit_logp=zeros - 8.0, ref_logp=None,
             values=zeros)
    opts = [common.adamw(m, 1e-3, 0.01) for m in (actor, critic)]

    def ppo_steps():  # noqa: B023
        for _ in range(2):
            mine, n_passes = rank_share([[i] for i in range(n)], env)
            for j in range(n_passes):
                with common.autocast(env.device, "bf16-mixed"):
                    o = ppo_cpe.microbatch_losses(args, actor, critic, b, mine[j])
                ((o["pg"] * o["mask"]).sum() + (o["vf"] * o["mask"]).sum()).backward()
                del o
            for m, opt in zip((actor, critic), opts):
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
    measured = before + peak_allocated(ppo_steps)
    phases = memory_plan.plan(cfg, "ppo", env.world_size, "bf16-mixed", True, tokens)
    out["ppo update bf16-mixed checkpointing"] = {
        "measured": measured, "planned": max(sum(phases[k].values()) for k in ("training", "optimizer step"))}
    return out


def main():
    folder, mem_folder, out_path = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    env = common.dist_init("cpu")
    assert env.world_size == 2, env
    cfg = common.ModelConfig.from_hf(json.loads((Path(folder) / "config.json").read_text()))
    docs = make_docs(8, cfg.vocab_size, seed=1)
    results = {"meta_load": check_meta_load(folder, env),
               "precision": check_precision(folder, env, docs),
               "small_lr": check_small_lr(folder, env, docs),
               "checkpointing": check_checkpointing(folder, env, docs),
               "micro_batches": check_micro_batches(folder, env, docs),
               "memory": check_memory(mem_folder, env)}
    if env.rank == 0:
        out_path.write_text(json.dumps(results, indent=1))
    common.dist_cleanup()


if __name__ == "__main__":
    main()
