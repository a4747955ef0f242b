"""2-process check of the torchrun plumbing, launched by tests/test_plumbing.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_fsdp_check.py OUT_DIR

For DDP and FSDP2 (gloo on CPU): one forward + backward + AdamW step on half a batch per rank
must give the same full state dict as one process doing the step on the whole batch (1e-5).
Also checks unsharded() (ranks run different numbers of forwards, no all-gathers inside),
all_reduce_sum, and save_training_state / load_training_state round trips (a third step after
loading must match too). The checkpoints are left in OUT_DIR/{ddp,fsdp}/ckpt_000002 so the test
can load the FSDP2 one in a plain single process.
Prints DIST_CHECK_OK on rank 0 when everything passed.
"""

import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (  # noqa: E402  (the lead switches this to `common`)
    all_reduce_sum,
    dist_cleanup,
    dist_init,
    full_state_dict,
    is_rank0,
    load_training_state,
    save_training_state,
    unsharded,
    unwrap,
    wrap_model,
)

TOL = 1e-5


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(self.norm(x)))


class TinyStack(nn.Module):
    """Shaped like common.Transformer where it matters: embedding, `layers` ModuleList, tied
    output weight, a value head, and methods besides forward (hidden_states, lm_head_logits,
    values) that stages call directly."""

    def __init__(self, vocab=32, d=16, n_layers=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.value_head = nn.Linear(d, 1)

    def hidden_states(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return x

    def lm_head_logits(self, h):
        return nn.functional.linear(h, self.embed.weight)

    def forward(self, ids):
        return self.lm_head_logits(self.hidden_states(ids))

    def values(self, ids):
        return self.value_head(self.hidden_states(ids)).squeeze(-1)


def make_model():
    torch.manual_seed(0)
    return TinyStack()


def loss_fn(model, ids, critic):
    logits = model(ids[:, :-1])
    lm = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    if not critic:  # DDP only averages gradients of what goes through forward()
        return lm
    return lm + model.values(ids).pow(2).mean()  # a critic-style term through .values()


def train_step(model, opt, ids, critic=True):
    opt.zero_grad(set_to_none=True)
    loss_fn(model, ids, critic).backward()
    opt.step()


def max_diff(a, b):
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main():
    out_dir = Path(sys.argv[1])
    env = dist_init()
    assert env.world_size == 2 and env.device.type == "cpu", env
    torch.manual_seed(1)
    batch = torch.randint(0, 32, (4, 9))  # same on both ranks (same seed)
    local = batch[env.rank * 2 : env.rank * 2 + 2]  # equal halves: mean of means = global mean

    for mode in ("ddp", "fsdp"):
        # DDP: the value head gets no gradient (it is not used by forward), which also checks
        # that wrap_model tolerates unused parameters. FSDP2: the loss also goes through values().
        critic = mode == "fsdp"
        # Single-process reference, computed on every rank (cheap), the whole batch.
        ref = make_model()
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
        train_step(ref, ref_opt, batch, critic)
        ref_sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}

        model = wrap_model(make_model(), mode, env)
        assert isinstance(unwrap(model), TinyStack) and not hasattr(unwrap(model), "module")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        train_step(model, opt, local, critic)
        sd = full_state_dict(model)
        if is_rank0():
            d = max_diff(sd, ref_sd)
            assert d < TOL, f"{mode}: full state dict differs from single process by {d}"
            print(f"{mode}: max |diff| vs single process = {d:.2e}", flush=True)
        else:
            assert mode == "ddp" or sd == {}, "rank0_only: other ranks get an empty dict"
        everywhere = full_state_dict(model, rank0_only=False)
        assert max_diff(everywhere, ref_sd) < TOL

        ref2, ref2_opt = copy.deepcopy((ref, ref_opt))  # together: opt must hold ref2's params
        if mode == "fsdp":
            from torch.distributed.tensor import DTensor

            assert isinstance(unwrap(model).layers[0].fc.weight, DTensor)
            # Ranks run a different number of forwards inside unsharded(): this would hang if
            # a forward still all-gathered. The generation engine calls hidden_states and
            # lm_head_logits directly; critics call values. All must match the reference.
            ids = batch[:1]
            with torch.no_grad(), unsharded(model):
                for _ in range(3 if env.rank == 0 else 1):
                    out = model(ids)
                    vals = model.values(ids)
                    split = model.lm_head_logits(model.hidden_states(ids))
                    assert not isinstance(out, DTensor)
            with torch.no_grad():
                for got, want in ((out, ref(ids)), (vals, ref.values(ids)), (split, ref(ids))):
                    d = (got - want).abs().max().item()
                    assert d < TOL, f"unsharded: output differs from reference by {d}"
            assert isinstance(unwrap(model).layers[0].fc.weight, DTensor), "resharded after"
        # A second step matches the reference (for FSDP2: training still works after unsharded).
        train_step(ref2, ref2_opt, batch, critic)
        train_step(model, opt, local, critic)
        d = max_diff(full_state_dict(model, rank0_only=False), ref2.state_dict())
        assert d < TOL, f"{mode}: second step differs by {d}"

        # Checkpoint round trip into a freshly built and wrapped model, then a third step.
        ckpt = out_dir / mode / "ckpt_000002"
        torch.manual_seed(10 + env.rank)  # per-rank RNG streams, each must come back
        save_training_state(ckpt, model, opt, step=2, extra={"mode": mode})
        expect_rand = torch.rand(3)
        torch.manual_seed(999)
        fresh = wrap_model(TinyStack(), mode, env)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
        step, extra = load_training_state(ckpt, fresh, fresh_opt)
        assert (step, extra) == (2, {"mode": mode}), (step, extra)
        assert torch.equal(torch.rand(3), expect_rand), "this rank's RNG state not restored"
        train_step(ref2, ref2_opt, batch, critic)
        train_step(fresh, fresh_opt, local, critic)
        d = max_diff(full_state_dict(fresh, rank0_only=False), ref2.state_dict())
        assert d < TOL, f"{mode}: step after load_training_state differs by {d}"

    t = all_reduce_sum(torch.tensor([float(env.rank + 1)]))
    assert t.item() == 3.0, t
    dist_cleanup()
    if env.rank == 0:
        print("DIST_CHECK_OK", flush=True)


if __name__ == "__main__":
    main()
