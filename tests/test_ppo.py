"""Tests of ppo_cpe.py (SPEC 1.2, 1.3): the PPO math against slow loops and hand computations,
the edit term's conditioning, edit selection, the EOS trick, temperature-scaled log-probs, and
end-to-end iterations on a tiny random model (deterministic under a seed; resume continues
identically). CPU, well under 2 minutes."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import common
import ppo_cpe
from ppo_cpe import (apply_eos_penalty, edit_offpolicy_loss, gae_advantages, masked_whiten, pad_right,
                     ppo_clip_loss, select_edits, token_rewards, value_clip_loss)


# ---------------------------------------------------------------------------------------------
# math
# ---------------------------------------------------------------------------------------------

def ragged(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64) for n in lengths]


def slow_gae(values, rewards, gamma, lam):
    """Textbook per-token loop on one sequence (plain floats)."""
    T = len(values)
    adv = [0.0] * T
    last = 0.0
    for t in reversed(range(T)):
        next_v = values[t + 1] if t + 1 < T else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.8), (0.99, 0.0)])
def test_gae_matches_slow_loop(gamma, lam):
    lengths = [5, 1, 9, 3]
    vals, rews = ragged(lengths, 0), ragged(lengths, 1)
    V, mask = pad_right(vals, value=7.0)  # garbage in the padding must not leak in
    R, _ = pad_right(rews, value=-3.0)
    adv, ret = gae_advantages(V, R, mask, gamma, lam)
    for i, n in enumerate(lengths):
        a, r = slow_gae(vals[i].tolist(), rews[i].tolist(), gamma, lam)
        assert torch.allclose(adv[i, :n], torch.tensor(a, dtype=torch.float64))
        assert torch.allclose(ret[i, :n], torch.tensor(r, dtype=torch.float64))
        assert (adv[i, n:] == 0).all() and (ret[i, n:] == 0).all()


def test_gae_gamma_lambda_one_is_reward_minus_value():
    V, mask = pad_right([torch.tensor([0.5, 1.0, -0.5]), torch.tensor([2.0])])
    R = token_rewards(torch.tensor([3.0, -1.0]), mask)
    adv, ret = gae_advantages(V, R, mask)
    assert torch.allclose(adv[0], torch.tensor([2.5, 2.0, 3.5]))
    assert torch.allclose(adv[1], torch.tensor([-3.0, 0.0, 0.0]))
    assert torch.allclose(ret[0], torch.tensor([3.0, 3.0, 3.0]))


def test_token_rewards_on_last_real_token():
    _, mask = pad_right([torch.zeros(4), torch.zeros(2), torch.zeros(1)])
    r = token_rewards(torch.tensor([1.0, 2.0, 3.0]), mask)
    assert r.tolist() == [[0, 0, 0, 1], [0, 2, 0, 0], [3, 0, 0, 0]]


def test_masked_whiten_uses_only_masked_entries():
    rows = ragged([6, 2, 4], 3)
    x, mask = pad_right(rows, value=100.0)
    w = masked_whiten(x, mask)
    flat = torch.cat(rows)
    expect = (flat - flat.mean()) / flat.std(unbiased=True)
    got = torch.cat([w[i, :len(r)] for i, r in enumerate(rows)])
    assert torch.allclose(got, expect, atol=1e-6)
    assert (w[mask == 0] == 0).all()
    x2 = x.clone()
    x2[mask == 0] = -55.0  # padding values never matter
    assert torch.equal(masked_whiten(x2, mask), w)
    keep = masked_whiten(x, mask, shift_mean=False)
    assert torch.allclose(torch.cat([keep[i, :len(r)] for i, r in enumerate(rows)]), expect + flat.mean(),
                          atol=1e-6)


def test_ppo_clip_loss_hand_computed():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -2.0, -2.0]])
    loss, ratio, clipped = ppo_clip_loss(logp, old, adv, 0.2, 0.2)
    # A>0, r=1.5: max(-1.5, -1.2) = -1.2 (clipped); A>0, r=0.5: max(-0.5, -0.8) = -0.5
    # A<0, r=1.1: max(2.2, 2.2) = 2.2;        A<0, r=0.7: max(1.4, 1.6) = 1.6 (clipped)
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5, 2.2, 1.6]]), atol=1e-6)
    assert clipped.tolist() == [[True, False, False, True]]
    assert torch.allclose(ratio, torch.tensor([[1.5, 0.5, 1.1, 0.7]]))
    # clip-higher: a wider upper side lets r=1.5 through up to 1.28
    loss_h, _, _ = ppo_clip_loss(logp, old, adv, 0.2, 0.28)
    assert math.isclose(float(loss_h[0, 0]), -1.28, abs_tol=1e-6)
    # token-mean over a minibatch of two ragged rows
    lp, mask = pad_right([torch.log(torch.tensor([1.5, 0.5])), torch.log(torch.tensor([1.0]))])
    l2, _, _ = ppo_clip_loss(lp, torch.zeros_like(lp), torch.tensor([[1.0, 1.0], [3.0, 9.0]]))
    assert math.isclose(float(ppo_cpe.masked_mean(l2, mask)), (-1.2 - 0.5 - 3.0) / 3, abs_tol=1e-6)


def test_value_clip_loss_hand_computed():
    v = torch.tensor([[1.0, 0.0, 2.0]])
    old = torch.tensor([[0.0, 0.0, 1.8]])
    ret = torch.tensor([[0.0, 1.0, 0.0]])
    loss, clipped = value_clip_loss(v, old, ret, clip=0.5)
    # token 0: clip(1.0) = 0.5: max(1, 0.25) = 1 -> 0.5; token 1: v = old: 0.5 * 1 = 0.5
    # token 2: clip(2.0 around 1.8) = 2.0 -> 0.5 * 4 = 2.0
    assert torch.allclose(loss, torch.tensor([[0.5, 0.5, 2.0]]))
    v2 = torch.tensor([[-1.0]])
    loss2, clipped2 = value_clip_loss(v2, torch.tensor([[0.0]]), torch.tensor([[1.0]]), clip=0.5)
    # unclipped (−1−1)^2 = 4, clipped (−0.5−1)^2 = 2.25: max = 4 -> 2.0, clipped branch not chosen
    assert math.isclose(float(loss2), 2.0) and not bool(clipped2)
    loss3, clipped3 = value_clip_loss(torch.tensor([[3.0]]), torch.tensor([[0.0]]), torch.tensor([[0.0]]), 0.5)
    assert math.isclose(float(loss3), 4.5) and not bool(clipped3)
    loss4, clipped4 = value_clip_loss(torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.tensor([[0.0]]), 0.5)
    assert math.isclose(float(loss4), 0.5 * 1.5 ** 2) and bool(clipped4)


def test_edit_offpolicy_loss_probability_ratio_and_clip():
    logp = torch.log(torch.tensor([[0.2, 0.5, 0.9]])).requires_grad_()
    elogp = torch.log(torch.tensor([[0.4, 0.5, 0.3]]))
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, ratio, bound = edit_offpolicy_loss(logp, elogp, adv)
    expect = torch.tensor([0.2 / (0.4 + 1e-6), 0.5 / (0.5 + 1e-6), 0.9 / (0.3 + 1e-6)])
    assert torch.allclose(ratio[0], expect)
    assert torch.allclose(loss[0], -adv[0] * expect)
    assert not bound.any()
    loss.sum().backward()
    assert torch.allclose(logp.grad[0], -adv[0] * expect)  # d ratio / d logp = ratio: never zero
    logp.grad = None
    loss_c, ratio_c, bound_c = edit_offpolicy_loss(logp, elogp, adv, clip=(0.2, 0.2))
    assert torch.allclose(ratio_c[0], torch.tensor([0.8, 0.5 / (0.5 + 1e-6), 1.2]))
    assert bound_c.tolist() == [[True, False, True]]
    loss_c.sum().backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 2] == 0 and logp.grad[0, 1] != 0  # the SPEC 1.2 caveat


def test_apply_eos_penalty():
    r = apply_eos_penalty(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True]), -5.0)
    assert r.tolist() == [1.0, -5.0, 3.0]


# ---------------------------------------------------------------------------------------------
# edit selection
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["random", "reward_rank", "conditional"])
def test_select_edits_counts(strategy):
    for n_q, n_s in [(8, 4), (3, 2), (5, 3), (1, 1), (7, 1)]:
        n = n_q * n_s
        groups = [q for q in range(n_q) for _ in range(n_s)]
        g = torch.Generator().manual_seed(0)
        ro, re_ = torch.randn(n, generator=g).tolist(), torch.randn(n, generator=g).tolist()
        for ratio in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0):
            picked = select_edits(strategy, ratio, groups, ro, re_, generator=g)
            assert len(picked) == math.floor(ratio * n), (strategy, n, ratio)
            assert len(set(picked)) == len(picked) and all(0 <= i < n for i in picked)


def test_select_edits_reward_rank_and_conditional_on_planted_batch():
    groups = [0, 0, 1, 1, 2, 2]
    r_orig = [0.0, 4.5, 0.0, 1.0, -1.0, 3.0]
    r_edit = [1.0, 5.0, 3.0, 3.5, 0.0, 4.0]
    # reward-rank: per question the best edit by R_e
    assert select_edits("reward_rank", 0.5, groups, r_orig, r_edit) == [1, 3, 5]
    # conditional: per question the best improvement R_e - R_o = [1, .5, 3, 2.5, 1, 1]
    assert select_edits("conditional", 0.5, groups, r_orig, r_edit) == [0, 2, 4]
    # with fewer slots than questions the largest keys among the per-question bests win
    assert select_edits("reward_rank", 2 / 6, groups, r_orig, r_edit) == [1, 5]
    assert select_edits("conditional", 2 / 6, groups, r_orig, r_edit) == [2, 4] or \
        select_edits("conditional", 2 / 6, groups, r_orig, r_edit) == [0, 2]
    # more slots than questions: every question's best first, then the best second-ranked
    assert select_edits("reward_rank", 4 / 6, groups, r_orig, r_edit) == [1, 2, 3, 5]


def test_select_edits_random_is_seeded():
    groups = list(range(20))
    a = select_edits("random", 0.5, groups, generator=torch.Generator().manual_seed(3))
    b = select_edits("random", 0.5, groups, generator=torch.Generator().manual_seed(3))
    c = select_edits("random", 0.5, groups, generator=torch.Generator().manual_seed(4))
    assert a == b and a != c and len(a) == 10


# ---------------------------------------------------------------------------------------------
# tiny random model
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return common.load_tokenizer(common.DEFAULT_MODEL)


def tiny_model(seed=0, value_head=False):
    torch.manual_seed(seed)
    cfg = common.ModelConfig.from_hf(common.tiny_config("llama"))
    model = common.Transformer(cfg, value_head=value_head).eval()
    with torch.no_grad():  # logits of std ~1: neither one-hot nor uniform next-token distributions
        model.model.embed_tokens.weight.normal_(0, 0.1)
    return model


def test_temperature_scaled_logprobs_equal_engine_sampling_logprobs(tok):
    model = tiny_model()
    prompts = [tok("hello there, how are you")["input_ids"], tok("a b")["input_ids"]]
    gen = common.generate(model, prompts, 12, temperature=0.9, top_p=1.0, seed=1)
    seqs = [p + t for p, t in zip(prompts, gen.tokens)]
    starts = [len(p) for p in prompts]
    with torch.no_grad():
        a, _ = ppo_cpe.response_logprobs(model, seqs, starts, 0.9)
        b, ent = ppo_cpe.response_logprobs(model, seqs, starts, 0.9, with_entropy=True)
        c, _ = ppo_cpe.response_logprobs(model, seqs, starts, 1.0)
    for i in range(2):
        eng = torch.tensor(gen.logprobs[i])
        assert torch.allclose(a[i], eng, atol=1e-4) and torch.allclose(b[i], eng, atol=1e-4)
        assert not torch.allclose(c[i], eng, atol=1e-3)  # the temperature matters
        assert (ent[i] > 0).all()


def test_fused_update_equals_separate_old_forwards(tok):
    """--fused-update (one optimizer step per PPO step): the update's forwards double as pi_old and
    V_old. The step it takes equals the unfused one's (separate no-grad forwards, then the update),
    edits, reference KL in the reward and the critic included; the ratio is exactly 1."""
    prompts = [tok("hello there, how are you")["input_ids"], tok("a b c")["input_ids"]]
    sampler = tiny_model(0)
    gen = common.generate(sampler, [p for p in prompts for _ in range(3)], 8, temperature=1.0, seed=2)
    samples = [dict(prompt_ids=prompts[i // 3], response=y, reward=float(i % 4) - 1.5, is_edit=i in (2, 4),
                    edit_logp=torch.randn(len(y)) - 2 if i in (2, 4) else None)
               for i, y in enumerate(gen.tokens)]
    env = common.dist_init()
    args = ppo_cpe.get_args(["--minibatch-size", "6", "--micro-batch-size", "2", "--kl-coef", "0.1"])
    results = []
    for fuse in (True, False):
        actor, critic, ref = tiny_model(0), tiny_model(1, value_head=True), tiny_model(0)
        with torch.no_grad():
            critic.value_head.weight.normal_(0, 0.5)
        actor.train(), critic.train()
        opt_a = torch.optim.SGD(actor.parameters(), lr=1.0)  # the weight change is minus the (clipped) gradient
        opt_c = torch.optim.SGD(critic.parameters(), lr=1.0)
        args.fused_update = fuse
        fused = ppo_cpe.fused_forwards(args, env, actor, critic, samples)
        assert (fused is not None) == fuse
        b = ppo_cpe.prepare_advantages(args, env, actor, critic, ref, samples, fused)
        stats = ppo_cpe.ppo_update(args, 0, env, actor, critic, opt_a, opt_c, b, fused)
        results.append((b, stats, actor.state_dict(), critic.state_dict()))
    (b1, s1, a1, c1), (b0, s0, a0, c0) = results
    for k in ("old_logp", "values", "advantages", "returns"):
        assert torch.allclose(b1[k], b0[k], atol=1e-5), k
    assert s1["ratio_mean"] == 1.0 and s1["clipfrac"] == 0.0 and s1["approx_kl"] == 0.0
    assert s0["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    for k in ("pg_loss", "vf_loss", "edit_ratio_mean", "grad_norm"):
        assert s1[k] == pytest.approx(s0[k], rel=1e-4, abs=1e-6), k
    for w1, w0 in ((a1, a0), (c1, c0)):
        assert all(torch.allclose(w1[k], w0[k], atol=1e-6) for k in w1)
    moved = tiny_model(0).state_dict()
    assert any((a1[k] - moved[k]).abs().max() > 1e-4 for k in a1)  # it did take a step
    args.minibatch_size = 3  # two optimizer steps per PPO step: nothing to fuse
    args.fused_update = True
    assert ppo_cpe.fused_forwards(args, env, actor, critic, samples) is None


def test_shared_prompt_packing_equals_whole_sequences():
    """response_logprobs / response_values store a prompt shared by several samples once
    (common.pack_shared_prompts); log-probs, entropies, values and gradients equal those of every
    sequence run whole (a wrong prediction position or position offset would break this)."""
    torch.manual_seed(0)
    p1, p2, p3 = [torch.randint(3, 200, (n,)).tolist() for n in (11, 7, 5)]
    resp = [torch.randint(3, 200, (n,)).tolist() for n in (4, 6, 1, 3, 5)]
    seqs = [p1 + resp[0], p2 + resp[1], p1 + resp[2], p3 + resp[3], p1 + resp[4]]
    starts = [11, 7, 11, 5, 11]
    ids, cu, parents, pos, targets, sizes = common.pack_shared_prompts(seqs, starts)
    assert ids.shape[1] == 11 + sum(map(len, resp)) + 7 + 5 and sizes == [4, 6, 1, 3, 5]
    assert parents is not None and sum(q >= 0 for q in parents) == 3  # p1's three samples
    actor, critic = tiny_model(), tiny_model(seed=1, value_head=True)
    with torch.no_grad():
        critic.value_head.weight.normal_(0, 1.0)
    lp, ent = ppo_cpe.response_logprobs(actor, seqs, starts, 0.9, with_entropy=True, entropy_grad=True)
    vals = ppo_cpe.response_values(critic, seqs, starts)
    (sum(x.sum() for x in lp) + sum(x.sum() for x in ent) + sum(x.sum() for x in vals)).backward()
    grads = [p.grad.clone() for p in list(actor.parameters()) + list(critic.parameters()) if p.grad is not None]
    actor.zero_grad(), critic.zero_grad()
    total = 0
    for seq, st, a, e, v in zip(seqs, starts, lp, ent, vals):
        ref = torch.log_softmax(actor(torch.tensor([seq]))[0, st - 1:-1] / 0.9, -1)
        ref_lp = ref.gather(-1, torch.tensor(seq[st:])[:, None])[:, 0]
        ref_ent = -(ref.exp() * ref).sum(-1)
        ref_v = critic.values(torch.tensor([seq]))[0, st - 1:-1]
        assert torch.allclose(a, ref_lp, atol=1e-5) and torch.allclose(e, ref_ent, atol=1e-5)
        assert torch.allclose(v, ref_v, atol=1e-5)
        total = total + ref_lp.sum() + ref_ent.sum() + ref_v.sum()
    total.backward()
    ref_grads = [p.grad for p in list(actor.parameters()) + list(critic.parameters()) if p.grad is not None]
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() <= 1e-4 * r.abs().max() + 1e-7


def make_args(**kw):
    args = ppo_cpe.get_args(["--reward", "rubric"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def planted_batch(tok, actor, critic):
    """Two originals and one edit (prompt = original prompt, stored pi_e from an edit prompt)."""
    x = common.chat_prompt_ids(tok, common.persona_messages({"Name": "Ana"}, "What should I cook?"))
    x_edit = ppo_cpe.edit_prompt_ids(tok, {"Name": "Ana"}, "What should I cook?", "Pasta.", "Be specific.")
    y = [tok("Pasta with beans.")["input_ids"], tok("Rice.")["input_ids"], tok("Try a lentil soup.")["input_ids"]]
    with torch.no_grad():
        pi_e = common.sequence_logprobs(actor, [x_edit + y[2]], [len(x_edit)], 0.9)[0]
    samples = [dict(prompt_ids=x, response=y[0], reward=1.0, is_edit=False, edit_logp=None),
               dict(prompt_ids=x, response=y[1], reward=-1.0, is_edit=False, edit_logp=None),
               dict(prompt_ids=x, response=y[2], reward=2.0, is_edit=True, edit_logp=pi_e)]
    env = common.DistEnv(0, 0, 1, torch.device("cpu"))
    b = ppo_cpe.prepare_advantages(make_args(), env, actor, critic, None, samples)
    return b, x, x_edit, y


def test_bt_reward_with_shared_prompts_equals_each_sequence_alone(tok):
    """--reward bt scores a batch whose samples share prompts with one packed forward (prefixes
    once, common.pack_shared_prefixes); each reward equals the value head at the last token of its
    sequence run alone."""
    rm = tiny_model(seed=3, value_head=True)
    with torch.no_grad():
        rm.value_head.weight.normal_(0, 1.0)
    persona = {"Name": "Ana", "Demographics": {"Career_Information": "nurse"}}
    cases = [(persona, "What should I cook?", "Pasta."), (persona, "What should I cook?", "Lentil soup, quickly."),
             ({"Name": "Bo"}, "How do I rest?", "Sleep early."), (persona, "What should I cook?", "Rice.")]
    got = [r for r, _, _ in ppo_cpe.judge(make_args(reward="bt", grm_batch_size=8), (rm, tok), cases, False, 0, {})]
    with torch.no_grad():
        want = [float(rm.values(torch.tensor([ppo_cpe.bt_ids(tok, *c)]))[0, -1]) for c in cases]
    assert got == pytest.approx(want, abs=1e-5) and len(set(round(x, 4) for x in got)) == 4


def test_edit_numerator_is_conditioned_on_the_original_prompt(tok):
    actor, critic = tiny_model(0), tiny_model(1, value_head=True)
    b, x, x_edit, y = planted_batch(tok, actor, critic)
    with torch.no_grad():
        o = ppo_cpe.microbatch_losses(make_args(), actor, critic, b, [2])
        under_x = common.sequence_logprobs(actor, [x + y[2]], [len(x)], 0.9)[0]
        under_edit = common.sequence_logprobs(actor, [x_edit + y[2]], [len(x_edit)], 0.9)[0]
    n = len(y[2])
    assert torch.allclose(o["logp"][0, :n], under_x, atol=1e-5)
    assert not torch.allclose(under_x, under_edit, atol=1e-3)
    expect_ratio = torch.exp(under_x) / (torch.exp(under_edit) + 1e-6)
    assert torch.allclose(o["edit_ratio"][0, :n], expect_ratio, atol=1e-5)
    assert torch.allclose(o["pg"][0, :n], -b["advantages"][2, :n] * expect_ratio, atol=1e-5)
    # an original row is the PPO surrogate against pi_old (ratio 1 before any update)
    o2 = ppo_cpe.microbatch_losses(make_args(), actor, critic, b, [0])
    assert torch.allclose(o2["ratio"][0, :len(y[0])], torch.ones(len(y[0])), atol=1e-5)


def test_edit_clip_flag_changes_only_the_edit_term(tok):
    actor, critic = tiny_model(0), tiny_model(1, value_head=True)
    b, _, _, y = planted_batch(tok, actor, critic)
    b["edit_logp"][2] += 1.0  # pi_e above pi_theta, as after a critique: ratios ~ e^-1 < 0.8

    def grads(edit_clip, rows):
        actor.zero_grad()
        o = ppo_cpe.microbatch_losses(make_args(edit_clip=edit_clip), actor, None, b, rows)
        (o["pg"] * o["mask"]).sum().backward()
        return o, torch.cat([p.grad.flatten() for p in actor.parameters() if p.grad is not None])

    o_free, g_orig_free = grads(False, [0, 1])
    o_clip, g_orig_clip = grads(True, [0, 1])
    assert torch.equal(o_free["pg"], o_clip["pg"]) and torch.equal(g_orig_free, g_orig_clip)
    e_free, g_edit_free = grads(False, [2])
    e_clip, g_edit_clip = grads(True, [2])
    n = len(y[2])
    assert not torch.allclose(e_free["pg"][0, :n], e_clip["pg"][0, :n])
    assert e_clip["edit_bound"][0, :n].float().mean() > 0.5  # the clamp binds (logged as edit_clip_bound_frac)
    assert g_edit_free.abs().sum() > 0


def test_eos_trick_in_scoring():
    args = make_args()
    persona = {"Name": "Ana", "Demographics": {"Age": 30}}
    cases = [(persona, "How do I boil an egg?", "Put the egg in boiling water for eight minutes, then cool it.")] * 2
    counts = {"parse_fail": 0, "endpoint_fail": 0}
    rewards, scores = ppo_cpe.score_responses(args, None, cases, [True, False], 0, counts)
    assert float(rewards[1]) == args.eos_penalty and scores[1] is None
    assert scores[0] is not None and float(rewards[0]) == pytest.approx(common.grm_reward(scores[0]))


# ---------------------------------------------------------------------------------------------
# end to end on a tiny random model
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("ppo")
    model = tiny_model(0)
    # make the end-of-turn token likely (~0.4 after these prompts; its logit is the hidden state's
    # dot product with its tied embedding row, negative here: hence the sign), so that some
    # rollouts stop and get scored and some hit the cap
    with torch.no_grad():
        model.model.embed_tokens.weight[common.stop_token_ids(tok)] *= -7
    common.save_model(model, tok, root / "sft")
    personas = [{"Name": "Ana", "Demographics": {"Age": 31, "Career_Information": "nurse"}},
                {"Name": "Bo", "Preference": {"Content_Interests": "chess"}}]
    questions = ["How do I sleep better?", "What should I read next?", "How can I save money?"]
    with open(root / "prompts.jsonl", "w") as f:
        for p in personas:
            for q in questions:
                f.write(json.dumps({"user_id": p["Name"], "persona": p, "question": q, "category": "general"}) + "\n")
    return root


def run_ppo(root, out, *extra):
    ppo_cpe.main(["--sft", str(root / "sft"), "--prompts", str(root / "prompts.jsonl"), "--out", str(out),
                  "--reward", "rubric", "--prompts-per-step", "2", "--samples", "2", "--max-new-tokens", "6",
                  "--minibatch-size", "3", "--micro-batch-size", "2", "--actor-lr", "1e-3", "--critic-lr", "1e-3",
                  "--log-samples", "0", *extra])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    for r in rows:
        for k in [k for k in r if k.startswith("time")]:
            r.pop(k)
    return rows


def actor_weights(out):
    return common.load_model(str(out / "actor"))[0].state_dict()


@pytest.fixture(scope="module")
def runs(tiny_run_inputs, tmp_path_factory):
    """A 2-step run, and a run stopped after its step-1 checkpoint (as if killed during step 2)
    then resumed to step 2. Both use the full Critique-Post-Edit path (conditional selection)."""
    tmp = tmp_path_factory.mktemp("runs")
    flags = ["--save-every", "1", "--edit-strategy", "conditional"]
    full = run_ppo(tiny_run_inputs, tmp / "full", "--max-steps", "2", *flags)
    cut = run_ppo(tiny_run_inputs, tmp / "cut", "--max-steps", "1", *flags)
    resumed = run_ppo(tiny_run_inputs, tmp / "cut", "--max-steps", "2", "--resume", *flags)
    return tmp, full, cut, resumed


def test_full_iteration_is_deterministic(runs, tiny_run_inputs):
    tmp, full, cut, _ = runs
    assert cut[0] == full[0]  # two runs, same seed: the same iteration, every logged number equal
    row = full[0]
    assert row["orig_count"] == 4 and row["edit_count"] == 2  # floor(0.5 x 4) edits added
    assert row["ratio_mean"] == pytest.approx(1.0, abs=0.3)
    assert 0 < row["orig_eos_rate"] < 1  # some rollouts stopped (scored), some got the EOS penalty
    w0 = common.load_model(str(tiny_run_inputs / "sft"))[0].state_dict()
    w1 = actor_weights(tmp / "full")
    assert any(not torch.equal(w1[k], w0[k]) for k in w1)  # it did train


def test_resume_after_stop_continues_identically(runs):
    tmp, full, _, resumed = runs
    assert [r["step"] for r in resumed] == [1, 2]
    assert resumed == full
    wf, wr = actor_weights(tmp / "full"), actor_weights(tmp / "cut")
    assert all(torch.equal(wf[k], wr[k]) for k in wf)


def test_save_every_zero_checkpoints_only_at_the_end(tiny_run_inputs, tmp_path):
    rows = run_ppo(tiny_run_inputs, tmp_path / "o", "--max-steps", "2", "--save-every", "0", "--no-edit")
    assert [r["step"] for r in rows] == [1, 2]
    assert sorted(d.name for d in (tmp_path / "o").glob("ckpt_*")) == ["ckpt_000002"]
    assert (tmp_path / "o" / "actor" / "config.json").exists()


def test_missing_inputs_name_the_command(tmp_path):
    with pytest.raises(SystemExit, match="python sft.py"):
        ppo_cpe.main(["--sft", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="python train_grm.py"):
        ppo_cpe.main(["--sft", common.DEFAULT_MODEL, "--grm", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])


def test_torchrun_fsdp2_fused_update_equals_separate_forwards(tiny_run_inputs, tmp_path):
    """2 processes (gloo, FSDP2), one optimizer step per PPO step: the fused update (each rank's
    batch in one micro-batch) takes the step the separate forwards take; with several micro-batches
    per rank it falls back to them (FSDP2 cannot run a backward after a later forward)."""
    root = tiny_run_inputs
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "ppo_cpe.py", "--sft", str(root / "sft"), "--prompts", str(root / "prompts.jsonl"),
                "--reward", "rubric", "--prompts-per-step", "2", "--samples", "2", "--max-new-tokens", "6",
                "--minibatch-size", "6", "--actor-lr", "1e-3", "--critic-lr", "1e-3", "--max-steps", "2",
                "--log-samples", "0"]
    runs = {}
    for name, extra in (("fused", ["--micro-batch-size", "3"]),
                        ("separate", ["--micro-batch-size", "3", "--no-fused-update"]),
                        ("fallback", ["--micro-batch-size", "1"])):
        r = subprocess.run(torchrun + ["--out", str(tmp_path / name), *extra], capture_output=True, text=True,
                           timeout=300, cwd=os.path.dirname(ppo_cpe.__file__),
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        runs[name] = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    assert [r["ratio_mean"] for r in runs["fused"]] == [1.0, 1.0]  # pi_old is the update's own forward
    for a, b in zip(runs["fused"], runs["separate"]):
        assert a["pg_loss"] == pytest.approx(b["pg_loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    wf, ws = actor_weights(tmp_path / "fused"), actor_weights(tmp_path / "separate")
    assert all(torch.allclose(wf[k], ws[k], atol=1e-5) for k in wf)
    assert runs["fallback"][0]["pg_loss"] == pytest.approx(runs["separate"][0]["pg_loss"], rel=1e-4)
