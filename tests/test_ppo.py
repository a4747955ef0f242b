"""Tests of ppo_cpe.py (SPEC 1.2, 1.3): the PPO math against slow loops and hand computations,
the edit term's conditioning, edit selection, the EOS trick, temperature-scaled log-probs, the
reward path's failure handling against a loopback GRM server, and end-to-end iterations on a tiny
random model (deterministic under a seed; resume continues identically). CPU."""
import json
import math
import subprocess
import sys
from pathlib import Path

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


TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "max_position_embeddings": 2048, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}


def tiny_model(seed=0, value_head=False):
    torch.manual_seed(seed)
    model = common.Transformer(common.ModelConfig.from_hf(TINY), value_head=value_head).eval()
    with torch.no_grad():  # logits of std ~1: neither one-hot nor uniform next-token distributions
        model.model.embed_tokens.weight.normal_(0, 0.1)
    return model


def make_args(*argv, **kw):
    args = ppo_cpe.get_args(["--reward", "rubric", *argv])
    for k, v in kw.items():
        setattr(args, k, v)
    args.precision = "fp32"
    return args


ENV = common.DistEnv(0, 0, 1, torch.device("cpu"))


def test_temperature_scaled_logprobs_equal_engine_sampling_logprobs(tok):
    model = tiny_model()
    prompts = [tok("hello there, how are you")["input_ids"], tok("a b")["input_ids"]]
    gen = common.generate(model, prompts, 12, temperature=0.9, top_p=1.0, seed=1)
    seqs, starts = [p + t for p, t in zip(prompts, gen.tokens)], [len(p) for p in prompts]
    with torch.no_grad():
        a, ent = common.response_logprobs(model, seqs, starts, 0.9, with_entropy=True)
        c, _ = common.response_logprobs(model, seqs, starts, 1.0)
    for i in range(2):
        eng = torch.tensor(gen.logprobs[i])
        assert torch.allclose(a[i], eng, atol=1e-4) and not torch.allclose(c[i], eng, atol=1e-3)
        assert (ent[i] > 0).all()


def test_values_with_shared_prompts_equal_whole_sequences():
    """response_values stores a prompt shared by several samples once; values and gradients equal
    those of every sequence run whole (a wrong prediction position or offset would break this)."""
    torch.manual_seed(0)
    p1, p2 = [torch.randint(3, 200, (n,)).tolist() for n in (20, 7)]
    resp = [torch.randint(3, 200, (n,)).tolist() for n in (4, 6, 1, 3)]
    seqs, starts = [p1 + resp[0], p2 + resp[1], p1 + resp[2], p1 + resp[3]], [20, 7, 20, 20]
    critic = tiny_model(seed=1, value_head=True)
    with torch.no_grad():
        critic.value_head.weight.normal_(0, 1.0)
    vals = ppo_cpe.response_values(critic, seqs, starts)
    sum(v.sum() for v in vals).backward()
    grads = [p.grad.clone() for p in critic.parameters()]
    critic.zero_grad()
    ref = [critic.values(torch.tensor([q]))[0, st - 1:-1] for q, st in zip(seqs, starts)]
    sum(r.sum() for r in ref).backward()
    assert all(torch.allclose(v, r, atol=1e-5) for v, r in zip(vals, ref))
    assert all((g - p.grad).abs().max() <= 1e-4 * p.grad.abs().max() + 1e-7 for g, p in zip(grads, critic.parameters()))


def planted_batch(tok, actor, critic):
    """Two originals and one edit (prompt = original prompt, stored pi_e from an edit prompt)."""
    x = common.chat_prompt_ids(tok, common.persona_messages({"Name": "Ana"}, "What should I cook?"))
    x_edit = ppo_cpe.edit_prompt_ids(tok, {"Name": "Ana"}, "What should I cook?", "Pasta.", "Be specific.")
    y = [tok("Pasta with beans.")["input_ids"], tok("Rice.")["input_ids"], tok("Try a lentil soup.")["input_ids"]]
    with torch.no_grad():
        pi_e = common.response_logprobs(actor, [x_edit + y[2]], [len(x_edit)], 0.9)[0][0]
    samples = [dict(prompt_ids=x, response=y[0], reward=1.0, is_edit=False, edit_logp=None),
               dict(prompt_ids=x, response=y[1], reward=-1.0, is_edit=False, edit_logp=None),
               dict(prompt_ids=x, response=y[2], reward=2.0, is_edit=True, edit_logp=pi_e)]
    return ppo_cpe.prepare_advantages(make_args(), ENV, actor, critic, None, samples), x, x_edit, y


def test_edit_numerator_is_conditioned_on_the_original_prompt(tok):
    actor, critic = tiny_model(0), tiny_model(1, value_head=True)
    b, x, x_edit, y = planted_batch(tok, actor, critic)
    with torch.no_grad():
        o = ppo_cpe.microbatch_losses(make_args(), actor, critic, b, [2])
        under_x = common.response_logprobs(actor, [x + y[2]], [len(x)], 0.9)[0][0]
        under_edit = common.response_logprobs(actor, [x_edit + y[2]], [len(x_edit)], 0.9)[0][0]
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
        o = ppo_cpe.microbatch_losses(make_args(edit_clip=edit_clip), actor, critic, b, rows)
        (o["pg"] * o["mask"]).sum().backward()
        return o, torch.cat([p.grad.flatten() for p in actor.parameters() if p.grad is not None])

    o_free, g_orig_free = grads(False, [0, 1])
    o_clip, g_orig_clip = grads(True, [0, 1])
    assert torch.equal(o_free["pg"], o_clip["pg"]) and torch.equal(g_orig_free, g_orig_clip)
    e_free, g_edit_free = grads(False, [2])
    e_clip, _ = grads(True, [2])
    n = len(y[2])
    assert not torch.allclose(e_free["pg"][0, :n], e_clip["pg"][0, :n])
    assert e_clip["edit_bound"][0, :n].float().mean() > 0.5  # the clamp binds (logged as edit_clip_bound_frac)
    assert g_edit_free.abs().sum() > 0


def test_bt_reward_with_shared_prompts_equals_each_sequence_alone(tok):
    rm = tiny_model(seed=3, value_head=True)
    with torch.no_grad():
        rm.value_head.weight.normal_(0, 1.0)
    persona = {"Name": "Ana", "Demographics": {"Career_Information": "nurse"}}
    cases = [(persona, "What should I cook?", "Pasta."), (persona, "What should I cook?", "Lentil soup, quickly."),
             ({"Name": "Bo"}, "How do I rest?", "Sleep early."), (persona, "What should I cook?", "Rice.")]
    got = [r for r, _, _ in ppo_cpe.judge(make_args(reward="bt"), (rm, tok), cases, False, 0)]
    with torch.no_grad():
        want = [float(rm.values(torch.tensor([common.response_ids(tok, *c)]))[0, -1]) for c in cases]
    assert got == pytest.approx(want, abs=1e-5) and len(set(round(x, 4) for x in got)) == 4


def test_eos_trick_in_scoring():
    args = make_args()
    persona = {"Name": "Ana", "Demographics": {"Age": 30}}
    cases = [(persona, "How do I boil an egg?", "Put the egg in boiling water for eight minutes, then cool it.")] * 2
    rewards, scores = ppo_cpe.score_responses(args, None, cases, [True, False], 0)
    assert float(rewards[1]) == args.eos_penalty and scores[1] is None
    assert scores[0] is not None and float(rewards[0]) == pytest.approx(common.grm_reward(scores[0]))


def test_minibatches_are_counted_as_the_release_counts(tok):
    """--minibatch-size counts prompts: one optimizer step per minibatch_size x samples sequences,
    edits included (128 prompts x 4 samples + 256 edits, minibatch 64 -> 3 steps in the release)."""
    actor, critic = tiny_model(0), tiny_model(1, value_head=True)
    b, *_ = planted_batch(tok, actor, critic)  # 3 sequences
    for mb, samples, want in ((1, 1, 3), (1, 2, 2), (2, 2, 1)):
        args = make_args(minibatch_size=mb, samples=samples)
        opt_a, opt_c = torch.optim.SGD(actor.parameters(), lr=0.0), torch.optim.SGD(critic.parameters(), lr=0.0)
        assert ppo_cpe.ppo_update(args, 0, ENV, actor, critic, opt_a, opt_c, b)["minibatches"] == want


@pytest.mark.parametrize("budget", [64, 100000])
def test_update_does_not_depend_on_the_micro_token_budget(tok, budget):
    """Token-bounded micro-batches: the same step with every sequence alone or all in one pass."""
    results = []
    for mtb in (budget, 100000):
        actor, critic = tiny_model(0), tiny_model(1, value_head=True)
        b, *_ = planted_batch(tok, actor, critic)
        opt_a, opt_c = torch.optim.SGD(actor.parameters(), lr=1.0), torch.optim.SGD(critic.parameters(), lr=1.0)
        ppo_cpe.ppo_update(make_args(micro_token_budget=mtb, minibatch_size=4), 0, ENV, actor, critic, opt_a, opt_c, b)
        results.append(actor.state_dict())
    assert all(torch.allclose(results[0][k], results[1][k], atol=1e-6) for k in results[0])


# ---------------------------------------------------------------------------------------------
# end to end on a tiny random model
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("ppo")
    model = tiny_model(0)
    # make the end-of-turn token likely (its logit is the hidden state's dot product with its tied
    # embedding row, negative here: hence the sign), so that some rollouts stop and some hit the cap
    with torch.no_grad():
        model.model.embed_tokens.weight[common.stop_token_ids(tok)] *= -7
    common.save_model(model, tok, root / "sft")
    personas = [{"Name": "Ana", "Demographics": {"Age": 31, "Career_Information": "nurse"}},
                {"Name": "Bo", "Preference": {"Content_Interests": "chess"}}]
    questions = ["How do I sleep better?", "What should I read next?", "How can I save money?"]
    with open(root / "prompts.jsonl", "w") as f:
        for p in personas:
            for q in questions:
                f.write(json.dumps({"user_id": p["Name"], "persona": p, "question": q}) + "\n")
    return root


BASE = ["--prompts-per-step", "2", "--samples", "2", "--max-new-tokens", "6", "--minibatch-size", "1",
        "--micro-token-budget", "128", "--actor-lr", "1e-3", "--critic-lr", "1e-3", "--log-samples", "1"]


def run_ppo(root, out, *extra, reward="rubric"):
    ppo_cpe.main(["--sft", str(root / "sft"), "--prompts", str(root / "prompts.jsonl"), "--out", str(out),
                  "--reward", reward, *BASE, *extra])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]


def actor_weights(out):
    return common.read_hf_state(out / "actor")


@pytest.fixture(scope="module")
def full_run(tiny_run_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    return out, run_ppo(tiny_run_inputs, out, "--max-steps", "3", "--save-every", "1", "--edit-strategy", "conditional")


def test_full_iteration_is_deterministic_and_trains(full_run, tiny_run_inputs, tmp_path):
    out, full = full_run
    again = run_ppo(tiny_run_inputs, tmp_path / "again", "--max-steps", "3", "--stop-at-step", "1",
                    "--edit-strategy", "conditional")
    assert again[0] == full[0]  # two runs, same seed: the same iteration, every logged number equal
    row = full[0]
    assert row["orig_count"] == 4 and row["edit_count"] == 2  # floor(0.5 x 4) edits added
    assert row["minibatches"] == 3  # 6 sequences, 1 prompt x 2 samples per minibatch
    assert 0 < row["orig_eos_rate"] < 1  # some rollouts stopped (scored), some got the EOS penalty
    w0, w1 = common.read_hf_state(tiny_run_inputs / "sft"), actor_weights(out)
    assert any(not torch.equal(w1[k], w0[k]) for k in w1)


def test_resume_after_kill_continues_identically_and_logs_each_step_once(full_run, tiny_run_inputs, tmp_path):
    out, full = full_run
    flags = ["--max-steps", "3", "--save-every", "1", "--edit-strategy", "conditional"]
    cut = tmp_path / "cut"
    run_ppo(tiny_run_inputs, cut, *flags, "--stop-at-step", "2")
    with open(cut / "metrics.jsonl", "a") as f:  # killed during step 3, after it was logged
        f.write(json.dumps({"step": 3, "orig_reward": 99.0}) + "\n")
    resumed = run_ppo(tiny_run_inputs, cut, *flags, "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3] and resumed == full
    wf, wr = actor_weights(out), actor_weights(cut)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    samples = [json.loads(line)["step"] for line in open(cut / "samples.jsonl")]
    assert samples == sorted(samples) and samples.count(3) == samples.count(1)
    with pytest.raises(common.DataError, match="other settings.*actor_lr"):
        run_ppo(tiny_run_inputs, cut, *flags, "--resume", "--actor-lr", "5e-4")
    with pytest.raises(common.DataError, match="finished run"):
        run_ppo(tiny_run_inputs, cut, *flags)


def test_missing_inputs_name_the_command(tmp_path):
    with pytest.raises(common.DataError, match="python sft.py"):
        ppo_cpe.main(["--sft", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    with pytest.raises(common.DataError, match="--grm"):
        ppo_cpe.main(["--sft", common.DEFAULT_MODEL, "--grm", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("flags", [["--samples", "0"], ["--edit-ratio", "1.5"], ["--top-p", "0"],
                                   ["--max-reward-fail", "-0.1"], ["--actor-lr", "0"], ["--micro-token-budget", "0"]])
def test_bad_flags_are_refused(flags):
    proc = subprocess.run([sys.executable, "ppo_cpe.py", *flags], cwd=Path(ppo_cpe.__file__).parent,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# the reward path against a loopback GRM server (issue 25: a failed judge is never a reward)
# ---------------------------------------------------------------------------------------------

GOOD = "<critique>Shorter, please. Delete the last sentence.</critique>\n<scores>\nHelpfulness: 2\n" \
       "Personalization: 1\nNatural: 3\n</scores>"


def grm_server(loopback, scoring, critique=("ok",)):
    """A GRM answering chat completions from a script of behaviours, one per request (the last one
    repeats), separately for the scoring calls (temperature 0) and the critique calls: 'ok',
    'noscores' (a reply cut inside its critique, numbers and all), 'http500', 'http401', 'badjson'.
    .calls(): (kind, body) of every request."""
    scripts = {"score": list(scoring), "critique": list(critique)}

    def respond(request):
        kind = "score" if request["body"]["temperature"] == 0 else "critique"
        request["kind"] = kind
        what = scripts[kind].pop(0) if len(scripts[kind]) > 1 else scripts[kind][0]
        text = {"ok": GOOD, "noscores": "<critique>Helpfulness 4 before the deduction of"}.get(what, GOOD)
        return {"http500": (500, "oops"), "http401": (401, '{"error": "bad key"}'),
                "badjson": (200, '{"choices": [')}.get(what, (200, {"choices": [{"message": {"content": text}}]}))
    server = loopback(respond)
    server.calls = lambda: [(r["kind"], r["body"]) for r in server.requests]
    return server


def run_grm(root, out, server, *extra):
    return run_ppo(root, out, "--max-steps", "1", "--grm-url", server.url, "--grm-retries", "1",
                   "--grm-timeout", "5", "--eos-penalty", "-5", *extra, reward="grm")


def test_unparseable_reply_drops_its_prompt_group_and_is_counted(tiny_run_inputs, tmp_path, loopback):
    server = grm_server(loopback, ["noscores", "ok"])
    row = run_grm(tiny_run_inputs, tmp_path / "o", server, "--max-reward-fail", "1.0", "--no-edit")[0]
    assert row["reward_fail"] == 1 and row["groups_dropped"] == 1
    assert row["orig_count"] == 2  # the other prompt's two samples stay; none got a 0.0 reward
    assert all(b["temperature"] == 0 and b["top_p"] == 1.0 and b["top_k"] == -1 and b["repetition_penalty"] == 1.0
               for _, b in server.calls())


@pytest.mark.parametrize("failure", ["http500", "http401", "badjson", "noscores"])
def test_every_call_failing_stops_the_run_with_an_error(tiny_run_inputs, tmp_path, loopback, failure):
    server = grm_server(loopback, [failure])
    with pytest.raises(SystemExit, match="reward calls failed"):
        run_grm(tiny_run_inputs, tmp_path / "o", server, "--no-edit")
    assert not (tmp_path / "o" / "actor").exists()  # nothing was trained or saved
    retried = sum(k == "score" for k, _ in server.calls())
    assert retried >= (2 if failure in ("http500", "badjson") else 1)  # 401 is not retried


def test_failed_critique_makes_no_edit(tiny_run_inputs, tmp_path, loopback):
    server = grm_server(loopback, ["ok"], critique=["http500"])
    row = run_grm(tiny_run_inputs, tmp_path / "o", server, "--edit-ratio", "1.0")[0]
    assert row["critique_fail"] >= 1 and row["edit_count"] == 0 and row["edit_candidates"] == 0
