"""common.py's model, checkpoints, packing, generation engine and GRM reply reading, checked
against transformers (the oracle) and against slow, obvious re-computations. CPU, tiny random
models plus the embedded SmolLM2-135M-Instruct (fixture `smollm2`).

    cd /work/main && python -m pytest -q tests/test_model.py
"""
import json

import pytest
import torch
import torch.nn.functional as F
import transformers

import common

ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
VOCAB = 2048  # small: the output layer is most of a tiny model's work (token ids stay below it)
FULL_VOCAB = 49152  # SmolLM2's tokenizer, for the tests that decode real text


def tiny_config(family="llama", **overrides):
    """An HF config.json dict of a small random model (Qwen3 unties its output layer)."""
    cfg = {"model_type": family, "architectures": [ARCH[family]], "vocab_size": VOCAB, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": family != "qwen3",
           "max_position_embeddings": 2048, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
           "torch_dtype": "float32"}
    cfg.update(overrides)
    return cfg


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread per test: a tiny model's ops are too small to split, and on a shared
    2-core machine every op of a 2-thread pool waits for a thread that another process holds (the
    SmolLM2 tests ran about 10x slower that way). Restored afterwards for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return common.load_tokenizer(common.DEFAULT_MODEL)


def hf_reference(family, folder, tokenizer, **overrides):
    """A random transformers model of a tiny config, saved to `folder`; returns it."""
    hf_cfg = transformers.AutoConfig.for_model(**tiny_config(family, **overrides))
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():  # random biases and norm weights, so those code paths are really checked
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5 if "norm" in name else 0.1).add_(1.0 if "norm" in name else 0.0)
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """tiny(family, vocab) -> (folder, transformers model): one random checkpoint per family and
    vocabulary size, made once. Tests that change weights load their own copy from the folder."""
    made = {}

    def get(family, vocab=VOCAB):
        if (family, vocab) not in made:
            folder = tmp_path_factory.mktemp(family)
            made[family, vocab] = (folder, hf_reference(family, folder, tokenizer, vocab_size=vocab))
        return made[family, vocab]
    return get


def load(tiny, family, vocab=VOCAB):
    return common.load_model(tiny(family, vocab)[0])[0]


def rand_ids(n, generator, high=VOCAB):
    return torch.randint(0, high, (n,), generator=generator).tolist()


@pytest.fixture(scope="module")
def hf_smollm2():
    return transformers.AutoModelForCausalLM.from_pretrained(common.resolve_checkpoint(common.DEFAULT_MODEL),
                                                             dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------
# 1. the model against transformers


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_logits_match_transformers_tiny(family, tiny):
    folder, hf = tiny(family)
    model, _ = common.load_model(folder)
    ids = torch.randint(0, VOCAB, (2, 37))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert ours.dtype == torch.float32 and (ours - ref).abs().max().item() <= 1e-4
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (family == "qwen2")
    assert hasattr(attn, "q_norm") == (family == "qwen3")
    assert hasattr(model, "lm_head") == (family == "qwen3")  # tied output layers have none


def test_logits_match_transformers_smollm2(smollm2, hf_smollm2):
    model, tok = smollm2
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"]])
    with torch.no_grad():
        assert (model(ids) - hf_smollm2(ids).logits).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers_generate(smollm2, hf_smollm2):
    model, tok = smollm2
    questions = ["Name three colours.", "Write a haiku about the sea and the wind at night."]
    prompts = [common.chat_prompt_ids(tok, [{"role": "user", "content": q}]) for q in questions]
    assert len({len(p) for p in prompts}) == 2  # ragged rows, and they share the chat template's prefix
    ours = common.generate(model, prompts, 64, stop_ids=[])  # no stop: compare all 64 tokens
    for p, got in zip(prompts, ours.tokens):  # one prompt at a time: no padding on the HF side
        # explicit mask: SmolLM2's pad id equals <|im_end|>, which the chat prompt contains, so
        # transformers would otherwise mask those prompt tokens out
        x = torch.tensor([p])
        ref = hf_smollm2.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=64, do_sample=False,
                                  eos_token_id=None, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert got == ref


def test_packed_equals_separate_and_kv_cache_equals_recompute(tiny):
    model = load(tiny, "qwen2")
    g = torch.Generator().manual_seed(0)
    seqs = [rand_ids(n, g) for n in (5, 11, 3)]
    with torch.no_grad():
        packed = common.pack(seqs)
        assert packed.parents is None and packed.cu_seqlens.tolist() == [0, 5, 16, 19]
        logits = model(packed.input_ids, packed.cu_seqlens)[0]
        for s, where in zip(seqs, packed.where):
            assert (logits[where] - model(torch.tensor([s]))[0]).abs().max().item() <= 1e-5
        # greedy decoding through the KV cache equals re-running the whole sequence every step
        gen = common.generate(model, seqs, 8, stop_ids=[], cuda_graph=False)
        for s, new in zip(seqs, gen.tokens):
            full = s[:]
            for t in new:
                assert model(torch.tensor([full]))[0, -1].argmax().item() == t
                full.append(t)


# ---------------------------------------------------------------------------------------------
# 2. checkpoints


def test_save_load_roundtrip_and_transformers_loads_ours(tiny, tmp_path):
    folder, _ = tiny("llama")
    model, tok = common.load_model(folder)
    common.save_model(model, tok, tmp_path / "lm")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-5
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["model_type"] == "llama"

    critic, tok = common.load_model(folder, value_head=True)  # a value model, with its head saved beside
    with torch.no_grad():
        critic.value_head.weight.normal_()
        critic.value_head.bias.fill_(0.3)
    common.save_model(critic, tok, tmp_path / "critic")
    assert (tmp_path / "critic" / "value_head.safetensors").exists()
    again, _ = common.load_model(tmp_path / "critic", value_head=True)
    assert list(critic.state_dict()) == list(again.state_dict())
    for (k, a), b in zip(critic.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob("**/*.tmp*")) and not list(tmp_path.glob("**/.staging*"))


def test_sharded_save_loads(tiny, tmp_path):
    model, tok = common.load_model(tiny("qwen3")[0])
    common.save_model(model, tok, tmp_path / "out", max_shard_bytes=256 << 10)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "out" / "model.safetensors").exists()
    again, _ = common.load_model(tmp_path / "out")
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
    common.save_model(model, tok, tmp_path / "out")  # saved again unsharded: the old shards go
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors*")) == ["model.safetensors"]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_value_model_has_no_output_layer_and_loads_from_a_causal_lm(family, tiny):
    """value_head=True: a scalar head (zero at first, so a fresh critic predicts 0) and no lm_head,
    from a causal-LM checkpoint (its lm_head, when untied, is dropped; tied embeddings stay)."""
    lm = load(tiny, family)
    critic, _ = common.load_model(tiny(family)[0], value_head=True)
    assert not hasattr(critic, "lm_head") and critic.value_head is not None
    assert torch.equal(critic.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert torch.equal(critic.values(ids), torch.zeros(2, 7))
        critic.value_head.weight.normal_()
        critic.value_head.bias.fill_(-0.5)
        h = lm.hidden_states(ids)
        assert torch.allclose(critic.values(ids), h @ critic.value_head.weight[0] - 0.5, atol=1e-5)
        packed = common.pack([ids[0].tolist(), ids[1, :4].tolist()])
        last = torch.stack([w[-1] for w in packed.where])
        got = critic.values(packed.input_ids, packed.cu_seqlens, select=last)
        assert torch.allclose(got, torch.stack([critic.values(ids)[0, -1], critic.values(ids[1:, :4])[0, -1]]),
                              atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 3. packing (section 3): shared prefixes are exact


def shared_prefix_seqs():
    """Several prompt groups, ragged answers, a duplicate, a sequence equal to another's prefix plus
    one token, and the min_shared edge: a pair sharing exactly 16 leading tokens (shared) and a
    pair sharing 15 (not shared)."""
    g = torch.Generator().manual_seed(5)
    p1, p2, edge16, edge15 = rand_ids(40, g), rand_ids(25, g), rand_ids(16, g), rand_ids(15, g)
    a = p1 + rand_ids(6, g)
    return [a, p2 + rand_ids(3, g), p1 + rand_ids(1, g), rand_ids(9, g), a + rand_ids(1, g), p2 + rand_ids(12, g),
            edge16 + rand_ids(4, g), edge15 + rand_ids(5, g), p1 + rand_ids(11, g), edge16 + rand_ids(2, g),
            edge15 + rand_ids(2, g), list(a)]


def test_prefix_groups_and_packed_size():
    seqs = shared_prefix_seqs()
    groups = {tuple(sorted(m)): shared for shared, m in common.prefix_groups(seqs)}
    assert groups[(0, 2, 4, 8, 11)] == 40  # p1's group: `a`, its duplicate and a + 1 token share all of p1
    assert groups[(1, 5)] == 25 and groups[(6, 9)] == 16
    assert groups[(7,)] == groups[(10,)] == groups[(3,)] == 0  # 15 shared tokens: below min_shared
    for share in (False, True):
        packed = common.pack(seqs, share_prefix=share)
        assert packed.input_ids.shape[1] == common.packed_size(seqs, share) == packed.cu_seqlens[-1].item()
        for s, where in zip(seqs, packed.where):  # every sequence is found at its positions
            assert packed.input_ids[0, where].tolist() == s
    assert common.packed_size(seqs, True) == common.packed_size(seqs, False) - 40 * 4 - 25 - 16
    assert common.pack(seqs[:1], share_prefix=True).parents is None


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_shared_prefix_packing_gives_the_same_logits_losses_and_gradients(family, tiny):
    model = load(tiny, family)
    model.train()
    seqs = shared_prefix_seqs()
    targets = [range(1, len(s)) for s in seqs]

    def loss_and_grads(share):
        model.zero_grad(set_to_none=True)
        packed = common.pack(seqs, share_prefix=share)
        assert (packed.parents is not None) == share
        logits = model(packed.input_ids, packed.cu_seqlens, packed.parents)[0]
        pos, tok = common.predictions(packed, seqs, targets)
        losses = [F.cross_entropy(logits[w[:-1]], torch.tensor(s[1:]), reduction="sum")
                  for s, w in zip(seqs, packed.where)]
        total = F.cross_entropy(logits[pos], tok, reduction="sum")
        total.backward()
        return logits.detach(), packed.where, torch.stack(losses).detach(), total.item(), \
            {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, where, losses, total, grads = loss_and_grads(True)
    plain_logits, plain_where, plain_losses, plain_total, plain_grads = loss_and_grads(False)
    model.zero_grad(set_to_none=True)
    alone = []
    for s in seqs:  # each sequence on its own, the slow way
        out = model(torch.tensor([s]))[0]
        alone.append(out.detach())
        F.cross_entropy(out[:-1], torch.tensor(s[1:]), reduction="sum").backward()
    for i, ref in enumerate(alone):
        assert (logits[where[i]] - ref).abs().max().item() <= 1e-5, i
        assert (plain_logits[plain_where[i]] - ref).abs().max().item() <= 1e-5, i
    ref_losses = torch.stack([F.cross_entropy(a[:-1], torch.tensor(s[1:]), reduction="sum")
                              for a, s in zip(alone, seqs)])
    assert torch.allclose(losses, ref_losses, rtol=1e-5) and torch.allclose(plain_losses, ref_losses, rtol=1e-5)
    assert total == pytest.approx(ref_losses.sum().item(), rel=1e-5) == pytest.approx(plain_total, rel=1e-5)
    for name, p in model.named_parameters():
        scale = p.grad.abs().max().item()
        assert (grads[name] - p.grad).abs().max().item() <= 1e-4 * scale + 1e-6, name
        assert (plain_grads[name] - p.grad).abs().max().item() <= 1e-4 * scale + 1e-6, name


def test_predictions_pick_the_positions_that_predict_the_targets(tiny):
    model = load(tiny, "llama")
    seqs = shared_prefix_seqs()[:6]
    targets = [[1, len(s) - 1] if i % 2 else range(len(s) - 3, len(s)) for i, s in enumerate(seqs)]
    packed = common.pack(seqs, share_prefix=True)
    pos, tok = common.predictions(packed, seqs, targets)
    assert tok.tolist() == [seqs[i][j] for i, js in enumerate(targets) for j in js]
    assert pos.tolist() == [packed.where[i][j - 1].item() for i, js in enumerate(targets) for j in js]
    with torch.no_grad():
        full = model(packed.input_ids, packed.cu_seqlens, packed.parents)[0]
        selected = model(packed.input_ids, packed.cu_seqlens, packed.parents, select=pos)
        assert torch.allclose(selected, full[pos], atol=1e-5)
        i = 3  # the positions predict the tokens of the sequence alone
        alone = model(torch.tensor([seqs[i]]))[0]
        at = [k for k, (ii, j) in enumerate((ii, j) for ii, js in enumerate(targets) for j in js) if ii == i]
        assert torch.allclose(selected[at], alone[[j - 1 for j in targets[i]]], atol=1e-5)
    empty_pos, empty_tok = common.predictions(packed, seqs, [[] for _ in seqs])
    assert empty_pos.numel() == 0 and empty_tok.numel() == 0


def test_micro_batches_respect_the_token_budget():
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(1, 60, (80,), generator=g).tolist() + [150, 3, 200]
    seqs = [rand_ids(n, g) for n in lengths]
    for share in (False, True):
        for budget in (64, 100, 300):
            mbs = common.micro_batches(seqs, budget, share)
            assert [i for mb in mbs for i in mb] == list(range(len(seqs)))  # all of them, in order
            for k, mb in enumerate(mbs):
                size = common.packed_size([seqs[i] for i in mb], share)
                assert size <= budget or len(mb) == 1  # only a lone over-long sequence goes over
                if k + 1 < len(mbs):  # and a batch closes only when the next sequence does not fit
                    assert common.packed_size([seqs[i] for i in mb + [mbs[k + 1][0]]], share) > budget
    # shared tokens count once: eight answers of 10 tokens to one 100-token prompt
    prompt = rand_ids(100, g)
    group = [prompt + rand_ids(10, g) for _ in range(8)]
    assert common.micro_batches(group, 180, share_prefix=True) == [list(range(8))]  # 100 + 8 x 10
    assert common.micro_batches(group, 180, share_prefix=False) == [[i] for i in range(8)]
    assert common.micro_batches(group, 150, share_prefix=True) == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert common.micro_batches([], 10) == []


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny):
    model = load(tiny, "qwen3")
    model.train()
    seqs = shared_prefix_seqs()
    packed = common.pack(seqs, share_prefix=True)
    pos, tok = common.predictions(packed, seqs, [range(1, len(s)) for s in seqs])

    def step():
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(packed.input_ids, packed.cu_seqlens, packed.parents, select=pos), tok)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    loss, grads = step()
    for block in model.layers:
        block.checkpointing = True
    ckpt_loss, ckpt_grads = step()
    assert ckpt_loss == loss
    for a, b in zip(grads, ckpt_grads):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)
    with torch.no_grad():  # no gradient: checkpointing steps aside (generation passes a cache)
        assert common.generate(model, seqs[:2], 3, stop_ids=[]).tokens == \
            common.generate(load(tiny, "qwen3"), seqs[:2], 3, stop_ids=[]).tokens


# ---------------------------------------------------------------------------------------------
# 4. response log-probs (PPO, evaluation) against slow loops


def slow_logprobs(model, seqs, starts, temperature):
    out = []
    for s, st in zip(seqs, starts):
        logp = torch.log_softmax(model(torch.tensor([s]))[0, st - 1:-1] / temperature, -1)
        out.append((logp.gather(-1, torch.tensor(s[st:])[:, None])[:, 0], -(logp.exp() * logp).sum(-1)))
    return out


def test_response_logprobs_equal_a_slow_loop(tiny):
    model = load(tiny, "qwen2")
    seqs = shared_prefix_seqs()
    g = torch.Generator().manual_seed(9)
    starts = [int(torch.randint(1, len(s), (1,), generator=g)) for s in seqs]
    for temperature in (1.0, 0.7):
        with torch.no_grad():
            ref = slow_logprobs(model, seqs, starts, temperature)
        for share in (True, False):
            logp, ent = common.response_logprobs(model, seqs, starts, temperature, with_entropy=True,
                                                 share_prefix=share)
            assert [len(x) for x in logp] == [len(s) - st for s, st in zip(seqs, starts)]
            for (rl, re), lp, e in zip(ref, logp, ent):
                assert torch.allclose(lp, rl, atol=1e-5) and torch.allclose(e, re, atol=1e-5)
    logp, ent = common.response_logprobs(model, seqs[:2], starts[:2])
    assert ent is None and logp[0].requires_grad  # the graph is kept for the policy loss


def test_response_logprobs_match_the_engine_sampling_logprobs(tiny):
    model = load(tiny, "llama")
    prompts = [[5, 6, 7], [8, 9]]
    g = common.generate(model, prompts, 10, temperature=0.7, seed=1, stop_ids=[])
    with torch.no_grad():
        lps, _ = common.response_logprobs(model, [p + t for p, t in zip(prompts, g.tokens)],
                                          [len(p) for p in prompts], temperature=0.7)
    for lp, ref in zip(lps, g.logprobs):
        assert torch.allclose(lp, torch.tensor(ref), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 5. the generation engine


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_static_decode_step_equals_module_decode(family, tiny):
    """The CUDA-graph step's math (CudaGraphStep, run eagerly with cuda_graph="eager"): slots and
    mask from the device-side lengths, attention over the whole pre-allocated cache under that
    mask. Same tokens and log-probs as the op-by-op decode, at batch 1 and for ragged rows, greedy
    and sampled, with a stop id ending rows at different steps."""
    model = load(tiny, family)
    g = torch.Generator().manual_seed(2)
    prompts = [rand_ids(n, g) for n in (9, 2, 14)]
    for batch, kw in (([prompts[0]], {}), (prompts, {}), (prompts, dict(temperature=1.0, top_p=0.9, seed=3))):
        ref = common.generate(model, batch, 16, stop_ids=[], cuda_graph=False, **kw)
        static = common.generate(model, batch, 16, stop_ids=[], cuda_graph="eager", **kw)
        assert static.tokens == ref.tokens
        assert max(abs(a - b) for r, s in zip(static.logprobs, ref.logprobs) for a, b in zip(r, s)) < 1e-5
    greedy = common.generate(model, prompts, 16, stop_ids=[], cuda_graph=False)
    stop = [greedy.tokens[1][5]]  # row 1 stops at its 6th token (or earlier), the others run on or stop
    ref = common.generate(model, prompts, 16, stop_ids=stop, cuda_graph=False)
    static = common.generate(model, prompts, 16, stop_ids=stop, cuda_graph="eager")
    assert static.tokens == ref.tokens and static.stopped == ref.stopped and ref.stopped[1]


def test_failed_cuda_graph_capture_falls_back_to_op_by_op_decode(tiny, monkeypatch, capsys):
    """Where a capture fails (simulated on the CPU: the graph path is taken, the warm-up step runs
    and advances the cache, then the capture raises), generate() restores the cache, decodes op by
    op with the same tokens, and says so."""
    model = load(tiny, "llama")
    prompts = [[5, 9, 13, 2, 7], [3, 4]]
    ref = common.generate(model, prompts, 12, stop_ids=[], cuda_graph=False)

    class OnCuda:  # the model as for_call sees it: its output layer "on CUDA"
        def __init__(self, m):
            self.m = m

        def __getattr__(self, name):
            return getattr(self.m, name)

        def output_weight(self):
            return type("W", (), {"is_cuda": True})()

    class FakeStream:
        def wait_stream(self, other):
            pass

    def no_graph():
        raise RuntimeError("operation not permitted when stream is capturing")
    for_call = common.CudaGraphStep.for_call
    monkeypatch.setattr(common.CudaGraphStep, "for_call", classmethod(
        lambda cls, m, cache, n, graph: for_call(OnCuda(m), cache, n, graph)))
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: __import__("contextlib").nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", no_graph)
    got = common.generate(model, prompts, 12, stop_ids=[])
    assert got.tokens == ref.tokens and got.logprobs == ref.logprobs
    assert "CUDA-graph capture failed" in capsys.readouterr().err


def test_prefill_with_shared_prefixes_equals_prompts_alone(tiny, monkeypatch):
    """Prompts that start alike are prefilled with their common prefix computed once (the cache
    gets it in every row); greedy tokens and log-probs equal each prompt generated alone, and a
    seeded sampled batch equals the same batch prefilled without sharing."""
    model = load(tiny, "qwen2")
    g = torch.Generator().manual_seed(0)
    persona = rand_ids(30, g)
    prompts = [persona + rand_ids(4, g), rand_ids(9, g), persona + rand_ids(7, g), persona[:20] + rand_ids(3, g),
               persona + rand_ids(1, g)]
    prompts += [prompts[0] + rand_ids(1, g), list(prompts[2])]  # a prompt plus one token; a duplicate
    packed = common.pack(prompts, share_prefix=True)
    assert packed.parents is not None and packed.input_ids.shape[1] < sum(map(len, prompts)) - 40
    gen = common.generate(model, prompts, 10, stop_ids=[])
    for p, toks, lps in zip(prompts, gen.tokens, gen.logprobs):
        alone = common.generate(model, [p], 10, stop_ids=[])
        assert toks == alone.tokens[0]
        assert max(abs(a - b) for a, b in zip(lps, alone.logprobs[0])) < 1e-4
    sampled = common.generate(model, prompts, 10, temperature=1.0, seed=7, stop_ids=[])
    pack = common.pack
    monkeypatch.setattr(common, "pack", lambda seqs, device="cpu", share_prefix=False: pack(seqs, device, False))
    plain = common.generate(model, prompts, 10, temperature=1.0, seed=7, stop_ids=[])
    assert sampled.tokens == plain.tokens


def test_sampling_seeded_and_per_row_stop(tiny):
    model = load(tiny, "llama")
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    a = common.generate(model, prompts, 16, temperature=1.0, top_p=0.9, seed=123)
    b = common.generate(model, prompts, 16, temperature=1.0, top_p=0.9, seed=123)
    assert a == b
    # make the second row's first greedy token a stop id: only that row stops, after 1 token
    greedy = common.generate(model, prompts, 6, stop_ids=[])
    stop = greedy.tokens[1][0]
    g = common.generate(model, prompts, 6, stop_ids=[stop])
    assert g.tokens[1] == [stop] and g.stopped[1]
    for i in (0, 2):
        expect = greedy.tokens[i]
        if stop in expect:
            expect = expect[:expect.index(stop) + 1]
        assert g.tokens[i] == expect and g.stopped[i] == (stop in greedy.tokens[i])
    assert common.generate(model, [], 5) == common.Generation([], [], [], None)
    with pytest.raises(ValueError, match="empty prompt"):
        common.generate(model, [[1], []], 5)


def test_top_p_keeps_the_right_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen = {common.sample_next(logits, 1.0, 0.75, gen)[0].item() for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.75, 0.5 + 0.3 >= 0.75: the third token is cut
    tok, lp = common.sample_next(logits, 1.0, 0.75, gen)
    assert abs(lp.exp().item() - [0.5 / 0.8, 0.3 / 0.8][tok.item()]) < 1e-6
    tok, lp = common.sample_next(logits, 0.5, 1.0, gen)  # temperature 0.5: probabilities squared, renormalised
    assert abs(lp.exp().item() - torch.softmax(logits[0] / 0.5, -1)[tok.item()].item()) < 1e-6
    tok, lp = common.sample_next(logits, 0.0, 1.0, gen)  # greedy: the argmax, its untempered log-prob
    assert tok.item() == 0 and abs(lp.item() - torch.log(torch.tensor(0.5)).item()) < 1e-6


def test_top_p_fast_path_equals_full_sort():
    """sample_next samples among the top 256 tokens when they hold top_p of every row's mass, else
    it sorts the vocabulary: both keep exactly the nucleus a full sort keeps, with its log-prob."""
    torch.manual_seed(0)
    paths = set()
    for temp_scale in (0.3, 1.0, 8.0):
        logits = torch.randn(4, 5000) * temp_scale
        probs = torch.softmax(logits, -1)
        for top_p in (0.5, 0.9, 0.99):
            paths.add(bool((torch.topk(probs, 256).values.sum(-1) >= top_p).all()))
            sorted_p, order = torch.sort(probs, descending=True)
            keep = (torch.cumsum(sorted_p, -1) - sorted_p) < top_p
            expect = torch.zeros_like(keep).scatter(-1, order, keep)
            mass = (probs * expect).sum(-1)
            gen = torch.Generator().manual_seed(1)
            for _ in range(10):
                tok, lp = common.sample_next(logits, 1.0, top_p, gen)
                assert expect[torch.arange(4), tok].all()
                assert torch.allclose(lp, torch.log(probs[torch.arange(4), tok] / mass), atol=1e-5)
    assert paths == {True, False}  # both paths ran


def test_sample_categorical_against_a_slow_walk_and_frequencies():
    """Inverse-CDF sampling: the index a slow running-sum walk finds for the same uniform draw, the
    right frequencies, and never an index of probability zero (even at the edges of the row)."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 2.0],
                          [1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.0, 0.4, 0.0]])
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros_like(probs)
    for _ in range(2000):
        replay = torch.Generator().manual_seed(0)
        replay.set_state(gen.get_state())
        picked = common.sample_categorical(probs, gen)
        u = torch.rand(len(probs), 1, generator=replay, dtype=torch.float64)[:, 0]
        for row, (p, i) in enumerate(zip(probs.double(), picked.tolist())):
            target, running, walk = u[row] * p.sum(), 0.0, None
            for j, pj in enumerate(p.tolist()):
                running += pj
                if running > target:
                    walk = j
                    break
            assert i == walk
        counts[torch.arange(len(probs)), picked] += 1
    assert (counts[probs == 0] == 0).all()
    freq = counts / counts.sum(-1, keepdim=True)
    assert (freq - probs / probs.sum(-1, keepdim=True)).abs().max() < 0.04


# ---------------------------------------------------------------------------------------------
# 6. chat formatting and GRM replies (SPEC 1.1)


def test_chat_mask_covers_assistant_tokens_only(tokenizer):
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "No."}]
    ids, mask = common.conversation_ids_and_mask(tokenizer, msgs)
    assert len(ids) == len(mask)
    picked = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert picked == "Hello! How can I help?<|im_end|>No.<|im_end|>"
    prompt = common.chat_prompt_ids(tokenizer, msgs[:1])
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
    seq = common.response_ids(tokenizer, {"name": "Ana"}, "Tea?", "Green tea.")
    assert tokenizer.decode(seq).endswith("Green tea.<|im_end|>")


def S(h, p, n):
    return {"Helpfulness": h, "Personalization": p, "Natural": n}


def test_parse_grm_scores_reads_only_the_scores_block():
    assert common.parse_grm_scores(common.format_grm_output("Fine.", S(3, -2, 1))) == S(3, -2, 1)
    critique = ("<critique>\nHelpfulness: 5 would need an example; Personalization: 4 at best; Natural: the "
                "greeting costs 1.\n")
    assert common.parse_grm_scores(critique) is None  # cut inside its critique: numbers there are no scores
    assert common.parse_grm_scores(critique + "</critique>") is None
    assert common.parse_grm_scores(critique + "</critique>\n<scores>\nHelpfulness: 2\nPersonalization: -1\n"
                                   "Natural: 0\n</scores>") == S(2, -1, 0)
    assert common.parse_grm_scores(critique + "</critique>\n<scores>\nHelpfulness: 4\nPersonal") == S(4, 0, 0)
    assert common.parse_grm_scores("Helpfulness: 2\nPersonalization: 1\nNatural: 1") is None  # no block
    assert common.parse_grm_scores("<scores>\nHelpfulness: N/A\n</scores>") is None
    assert common.parse_grm_scores(None) is None
    assert common.grm_reward(S(3, 2, 1)) == pytest.approx(0.35 * 3 + 0.40 * 2 + 0.25 * 1)
    with pytest.raises(ValueError, match="parse failure"):
        common.grm_reward(None)
    assert common.parse_grm_critique(critique + "</critique>\n<scores>") == critique.split("\n", 1)[1].strip()


def test_grm_expected_scores_from_the_engine_equal_a_teacher_forced_forward(tiny, tokenizer):
    """generate(watch_ids=grm_watch_ids) records the model's probabilities of the score tokens while
    it decodes (untempered, also when sampling). Recorded for a planted GRM reply (one engine call,
    the reply's prefixes as prompts) they give grm_expected_scores the same scores as the
    probabilities of a teacher-forced forward computed here."""
    model = load(tiny, "llama", FULL_VOCAB)  # random weights: probability spread over all the tokens
    tok, watch = tokenizer, common.grm_watch_ids(tokenizer)
    prompt = common.chat_prompt_ids(tok, common.grm_messages({"Name": "Ana"}, "What should I cook?", "Pasta."))
    reply = tok(common.format_grm_output("It answers the question in part.", S(2, -1, 3)))["input_ids"]
    with torch.no_grad():
        forced = torch.softmax(model(torch.tensor([prompt + reply]))[0, len(prompt) - 1:-1], -1)[:, watch]
    gen = common.generate(model, [prompt + reply[:j] for j in range(len(reply))], 1, watch_ids=watch, stop_ids=[])
    recorded = torch.cat(gen.watched)
    assert recorded.shape == (len(reply), len(watch)) and torch.allclose(recorded, forced, atol=1e-5)
    a = common.grm_expected_scores(tok, reply, forced)
    b = common.grm_expected_scores(tok, reply, recorded)
    assert a.keys() == b.keys() == S(0, 0, 0).keys() and all(abs(a[k] - b[k]) < 1e-5 and -5 <= a[k] <= 5 for k in a)
    with pytest.raises(ValueError, match="watched"):
        common.grm_expected_scores(tok, reply, forced[1:])
    no_scores = tok("no scores here")["input_ids"]
    assert common.grm_expected_scores(tok, no_scores, torch.zeros(len(no_scores), len(watch))) is None
    # over many decode steps, greedy and sampled, the record equals the forward on the engine's own tokens
    for kw in (dict(temperature=0.0), dict(temperature=1.5, seed=4)):
        gen = common.generate(model, [prompt, prompt[:-3]], 12, watch_ids=watch, stop_ids=[], **kw)
        for p, new, rec in zip([prompt, prompt[:-3]], gen.tokens, gen.watched):
            with torch.no_grad():
                ref = torch.softmax(model(torch.tensor([p + new]))[0, len(p) - 1:-1], -1)[:, watch]
            assert rec.shape == (len(new), len(watch)) and torch.allclose(rec, ref, atol=1e-5)
