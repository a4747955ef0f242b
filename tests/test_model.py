"""common.py model, checkpoints, attention and generation engine, against transformers (the oracle)."""
import contextlib
import json

import pytest
import torch
import transformers

import common


def hf_reference(family, tmp_path, **overrides):
    """A random HF model of a tiny config, saved to disk; returns (hf_model, folder)."""
    cfg = common.tiny_config(family, **overrides)
    hf_cfg = transformers.AutoConfig.for_model(**cfg)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():  # random biases / norm weights so those code paths are really checked
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5 if "norm" in name else 0.1).add_(1.0 if "norm" in name else 0.0)
    hf.save_pretrained(tmp_path)
    common.load_tokenizer(common.DEFAULT_MODEL).save_pretrained(tmp_path)
    return hf, tmp_path


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_logits_match_transformers_tiny(family, tmp_path):
    hf, folder = hf_reference(family, tmp_path)
    model, _ = common.load_model(folder)
    ids = torch.randint(0, 49152, (2, 37))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-4
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    if family == "qwen3":
        assert hasattr(model.model.layers[0].self_attn, "q_norm")


def test_logits_match_transformers_smollm2(smollm2):
    model, tok = smollm2
    hf = transformers.AutoModelForCausalLM.from_pretrained(common.resolve_checkpoint(common.DEFAULT_MODEL),
                                                           dtype=torch.float32).eval()
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"]])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_greedy_generation_matches_transformers_generate(smollm2):
    model, tok = smollm2
    hf = transformers.AutoModelForCausalLM.from_pretrained(common.resolve_checkpoint(common.DEFAULT_MODEL),
                                                           dtype=torch.float32).eval()
    questions = ["Name three colours.", "Write a haiku about the sea and the wind at night.",
                 "What is 12 times 7? Explain briefly."]
    prompts = [common.chat_prompt_ids(tok, [{"role": "user", "content": q}]) for q in questions]
    assert len({len(p) for p in prompts}) == 3
    ours = common.generate(model, prompts, 64, stop_ids=[])  # no stop: compare all 64 tokens
    for p, got in zip(prompts, ours.tokens):  # one prompt at a time: no padding on the HF side
        # explicit mask: SmolLM2's pad id equals <|im_end|>, which the chat prompt contains, so
        # generate() would otherwise mask those prompt tokens out (MEASURED.md)
        x = torch.tensor([p])
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=64, do_sample=False,
                          eos_token_id=None, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert got == ref


def test_packed_equals_separate_and_kv_cache_equals_recompute(tmp_path):
    hf, folder = hf_reference("qwen2", tmp_path)
    model, _ = common.load_model(folder)
    seqs = [torch.randint(0, 49152, (n,)).tolist() for n in (5, 11, 3)]
    with torch.no_grad():
        ids, cu = common.pack_sequences(seqs)
        packed = model(ids, cu)[0]
        for s, (a, b) in zip(seqs, zip(cu[:-1].tolist(), cu[1:].tolist())):
            alone = model(torch.tensor([s]))[0]
            assert (packed[a:b] - alone).abs().max().item() <= 1e-5
        # greedy decode through the KV cache equals re-running the full sequence every step
        gen = common.generate(model, seqs, 8, stop_ids=[])
        for s, new in zip(seqs, gen.tokens):
            full = s[:]
            for t in new:
                assert model(torch.tensor([full]))[0, -1].argmax().item() == t
                full.append(t)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_cpu_decoder_equals_module_decode(family, tmp_path):
    """CpuDecoder (concatenated q/k/v and gate/up, RoPE on q and k at once) takes the same decode
    steps as the modules: batch 1 (no mask) and ragged rows (per-row slots and mask), greedy and
    seeded sampling, fp32. Its copy of the weights is reused while they stay the same, refreshed
    in place after an in-place write or a (fused AdamW) optimizer step, and rebuilt for new
    parameter tensors."""
    _, folder = hf_reference(family, tmp_path, tie_word_embeddings=family != "qwen2")
    model, _ = common.load_model(folder)
    decoder = common.CpuDecoder.for_model(model)
    assert decoder is not None and common.CpuDecoder.for_model(model) is decoder
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (7, 3, 12)]
    for batch, kw in (([prompts[0]], {}), (prompts, {}), (prompts, dict(temperature=1.0, top_p=0.95, seed=4))):
        fast = common.generate(model, batch, 20, stop_ids=[], **kw)
        slow = common.generate(model, batch, 20, stop_ids=[], cpu_decoder=False, **kw)
        assert fast.tokens == slow.tokens
        assert max(abs(a - b) for r, s in zip(fast.logprobs, slow.logprobs) for a, b in zip(r, s)) < 1e-5

    def same_as_modules(before):
        fast = common.generate(model, prompts, 20, stop_ids=[])
        slow = common.generate(model, prompts, 20, stop_ids=[], cpu_decoder=False)
        assert fast.tokens == slow.tokens and fast.tokens != before
        return fast.tokens

    before = fast.tokens
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
        model.model.layers[1].self_attn.k_proj.weight.mul_(-2.0)
        if family == "qwen2":  # q/k/v biases: concatenated anew on refresh
            model.model.layers[1].self_attn.v_proj.bias.add_(1.0)
    assert common.CpuDecoder.for_model(model) is decoder  # refreshed in place
    before = same_as_modules(before)
    with torch.no_grad():  # a new tensor behind a parameter: a new copy
        model.model.layers[1].mlp.up_proj.weight.data = model.model.layers[1].mlp.up_proj.weight * -3.0
    assert common.CpuDecoder.for_model(model) is not decoder
    decoder = common.CpuDecoder.for_model(model)
    before = same_as_modules(before)
    opt = common.adamw(model.parameters(), lr=1e-2)
    model(torch.tensor([prompts[2]])).logsumexp(-1).mean().backward()
    opt.step()
    assert common.CpuDecoder.for_model(model) is decoder
    same_as_modules(before)


@pytest.mark.parametrize("threads", [1, 3, 5])
def test_cpu_decoder_column_slices(threads, tmp_path, monkeypatch):
    """CpuDecoder stores each matrix transposed and cut into column slices, as many as the thread
    count allows (the most, up to it, that divide the width), and multiplies by one bmm. Each
    stored product equals the module's linear layers (q/k/v with biases, gate/up, o, down, the
    output layer), also where one source matrix spans two slices (q at 5 threads: 4 slices of
    32 columns for q's 64), and greedy decoding equals the modules'."""
    assert [common._column_slices(n, t) for n, t in ((960, 2), (960, 7), (576, 5), (7, 4), (49152, 1))] == \
        [2, 6, 4, 1, 1]
    _, folder = hf_reference("qwen2", tmp_path, tie_word_embeddings=False)
    model, _ = common.load_model(folder)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        decoder = common.CpuDecoder(model)
        x = torch.randn(3, model.config.intermediate_size)
        a, m = model.model.layers[1].self_attn, model.model.layers[1].mlp
        _, w_qkv, b_qkv, _, w_o, _, w_gate_up, w_down = decoder.layers[1]
        hid = model.config.hidden_size
        with torch.no_grad():
            pairs = [
                (common._sliced_matmul(x[:, :hid], w_qkv, b_qkv),
                 torch.cat([a.q_proj(x[:, :hid]), a.k_proj(x[:, :hid]), a.v_proj(x[:, :hid])], 1)),
                (common._sliced_matmul(x[:, :hid], w_o), a.o_proj(x[:, :hid])),
                (common._sliced_matmul(x[:, :hid], w_gate_up),
                 torch.cat([m.gate_proj(x[:, :hid]), m.up_proj(x[:, :hid])], 1)),
                (common._sliced_matmul(x, w_down), m.down_proj(x)),
                (common._sliced_matmul(x[:, :hid], decoder.output), model.lm_head(x[:, :hid])),
            ]
        for fast, slow in pairs:
            assert fast.shape == slow.shape and (fast - slow).abs().max().item() < 1e-5
        assert w_qkv.shape[0] == common._column_slices(w_qkv.shape[0] * w_qkv.shape[2], threads)
        prompts = [[5, 9, 200, 31], [7, 1, 2]]
        fast = common.generate(model, prompts, 12, stop_ids=[])
        slow = common.generate(model, prompts, 12, stop_ids=[], cpu_decoder=False)
        assert fast.tokens == slow.tokens
        monkeypatch.setenv("PERSONARL_CPU_SLICES", "1")  # the cap: one plain matrix each
        assert all(w.shape[0] == 1 for w in common.CpuDecoder(model).layers[0][1::3])
        monkeypatch.setenv("PERSONARL_CPU_SLICES", "two")
        with pytest.raises(ValueError, match="PERSONARL_CPU_SLICES"):
            common.CpuDecoder(model)
    finally:
        torch.set_num_threads(old_threads)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_static_decode_step_equals_module_decode(family, tmp_path):
    """The CUDA-graph step's math (CudaGraphStep, run eagerly on the CPU): slots and mask from the
    device-side lengths, attention over the whole pre-allocated cache under that mask. Same tokens
    and log-probs as the module decode, at batch 1 and for ragged rows, greedy and sampled, with
    a stop id ending rows at different steps."""
    _, folder = hf_reference(family, tmp_path)
    model, _ = common.load_model(folder)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (9, 2, 14)]
    for batch, kw in (([prompts[0]], {}), (prompts, {}), (prompts, dict(temperature=1.0, top_p=0.9, seed=3))):
        ref = common.generate(model, batch, 16, stop_ids=[], cpu_decoder=False, **kw)
        static = common.generate(model, batch, 16, stop_ids=[], cpu_decoder=False, cuda_graph="eager", **kw)
        assert static.tokens == ref.tokens
        assert max(abs(a - b) for r, s in zip(static.logprobs, ref.logprobs) for a, b in zip(r, s)) < 1e-5
    greedy = common.generate(model, prompts, 16, stop_ids=[], cpu_decoder=False)
    stop = [greedy.tokens[1][5]]  # row 1 stops at its 6th token (or earlier), the others run on or stop
    ref = common.generate(model, prompts, 16, stop_ids=stop, cpu_decoder=False)
    static = common.generate(model, prompts, 16, stop_ids=stop, cpu_decoder=False, cuda_graph="eager")
    assert static.tokens == ref.tokens and static.stopped == ref.stopped and ref.stopped[1]


def test_failed_cuda_graph_capture_falls_back_to_eager_decode(tmp_path, monkeypatch, capsys):
    """Where a capture fails (simulated on the CPU: the graph path is taken, the warm-up step runs
    and advances the cache, then the capture raises), generate() restores the cache, decodes op by
    op with the same tokens, and says so once."""
    _, folder = hf_reference("llama", tmp_path)
    model, _ = common.load_model(folder)
    prompts = [[5, 9, 13, 2, 7], [3, 4]]
    ref = common.generate(model, prompts, 12, stop_ids=[], cpu_decoder=False)

    class FakeStream:
        def wait_stream(self, other):
            pass

    def no_graph():
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(common.CudaGraphStep, "applies", staticmethod(lambda model, n: True))
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", no_graph)
    monkeypatch.setattr(common, "_GRAPH_FALLBACK_WARNED", [])
    for _ in range(2):
        got = common.generate(model, prompts, 12, stop_ids=[], cpu_decoder=False)
        assert got.tokens == ref.tokens and got.logprobs == ref.logprobs
    assert capsys.readouterr().err.count("CUDA-graph capture failed") == 1


def test_save_load_roundtrip_and_transformers_loads_ours(tmp_path):
    _, folder = hf_reference("llama", tmp_path / "src")
    model, tok = common.load_model(folder, value_head=True)
    with torch.no_grad():
        model.value_head.weight.normal_()
    common.save_model(model, tok, tmp_path / "out")
    again, _ = common.load_model(tmp_path / "out", value_head=True)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 49152, (1, 20))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-5
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"
    assert not list((tmp_path).glob("*.tmp*"))  # atomic save leaves no temp folder behind


def test_sharded_save_loads(tmp_path):
    _, folder = hf_reference("qwen3", tmp_path / "src")
    model, tok = common.load_model(folder)
    common.save_model(model, tok, tmp_path / "out", max_shard_bytes=2 << 20)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    again, _ = common.load_model(tmp_path / "out")
    ids = torch.randint(0, 49152, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


def test_prefill_with_shared_prefixes_equals_prompts_alone(tmp_path):
    """Prompts that start alike are prefilled with their common prefix computed once (the cache
    gets it in every row); greedy tokens and log-probs equal each prompt generated alone, and a
    seeded sampled batch equals the same batch without sharing (min_shared above every prefix)."""
    _, folder = hf_reference("qwen2", tmp_path)
    model, _ = common.load_model(folder)
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, 49152, (n,), generator=g).tolist()  # noqa: E731
    persona = rand(30)
    prompts = [persona + rand(4), rand(9), persona + rand(7), persona[:20] + rand(3), persona + rand(1)]
    ids, cu, parents, index, last = common.pack_shared_prefixes(prompts)
    assert parents is not None and len(ids) < sum(map(len, prompts)) - 40
    gen = common.generate(model, prompts, 10, stop_ids=[])
    for p, toks, lps in zip(prompts, gen.tokens, gen.logprobs):
        alone = common.generate(model, [p], 10, stop_ids=[])
        assert toks == alone.tokens[0]
        assert max(abs(a - b) for a, b in zip(lps, alone.logprobs[0])) < 1e-4
    sampled = common.generate(model, prompts, 10, temperature=1.0, seed=7, stop_ids=[])
    orig = common.pack_shared_prefixes.__defaults__
    try:
        common.pack_shared_prefixes.__defaults__ = (10**9,)  # no sharing
        plain = common.generate(model, prompts, 10, temperature=1.0, seed=7, stop_ids=[])
    finally:
        common.pack_shared_prefixes.__defaults__ = orig
    assert sampled.tokens == plain.tokens


def test_sampling_seeded_and_per_row_stop(tmp_path):
    _, folder = hf_reference("llama", tmp_path)
    model, _ = common.load_model(folder)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    a = common.generate(model, prompts, 16, temperature=1.0, top_p=0.9, seed=123)
    b = common.generate(model, prompts, 16, temperature=1.0, top_p=0.9, seed=123)
    assert a == b
    # make the second row's first sampled token a stop id: only that row stops, after 1 token
    greedy = common.generate(model, prompts, 6, stop_ids=[])
    stop = greedy.tokens[1][0]
    g = common.generate(model, prompts, 6, stop_ids=[stop])
    assert g.tokens[1] == [stop] and g.stopped[1]
    for i in (0, 2):
        expect = greedy.tokens[i]
        if stop in expect:
            expect = expect[:expect.index(stop) + 1]
        assert g.tokens[i] == expect


def test_top_p_keeps_the_right_mass():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen = {common.sample_next(logits, 1.0, 0.75, 0, gen)[0].item() for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.75, 0.5 + 0.3 >= 0.75: the third token is cut
    tok, lp = common.sample_next(logits, 1.0, 0.75, 0, gen)
    assert abs(lp.exp().item() - [0.5 / 0.8, 0.3 / 0.8][tok.item()]) < 1e-6
    tok, lp = common.sample_next(logits, 1.0, 1.0, 2, gen)  # top-k 2 renormalises over two tokens
    assert tok.item() in (0, 1)


def test_sequence_logprobs_match_engine_sampling_logprobs(tmp_path):
    _, folder = hf_reference("llama", tmp_path)
    model, _ = common.load_model(folder)
    prompts = [[5, 6, 7], [8, 9]]
    g = common.generate(model, prompts, 10, temperature=0.7, seed=1, stop_ids=[])
    with torch.no_grad():
        lps = common.sequence_logprobs(model, [p + t for p, t in zip(prompts, g.tokens)],
                                       [len(p) for p in prompts], temperature=0.7)
    for lp, ref in zip(lps, g.logprobs):
        assert torch.allclose(lp, torch.tensor(ref), atol=1e-5)


def test_chat_mask_covers_assistant_tokens_only(smollm2):
    _, tok = smollm2
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "No."}]
    ids, mask = common.conversation_ids_and_mask(tok, msgs)
    assert len(ids) == len(mask)
    picked = tok.decode([t for t, m in zip(ids, mask) if m])
    assert picked == "Hello! How can I help?<|im_end|>No.<|im_end|>"
    prompt = common.chat_prompt_ids(tok, msgs[:1])
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])


@pytest.mark.cuda
def test_flash_or_sdpa_flash_matches_math_path():
    q, k, v = (torch.randn(1, 300, h, 64, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
    cu = torch.tensor([0, 100, 300], dtype=torch.int32, device="cuda")
    fast = common.attention(q, k, v, cu)
    ref = torch.cat([common.attention(q[:, a:b].float(), k[:, a:b].float(), v[:, a:b].float())
                     for a, b in ((0, 100), (100, 300))], dim=1)
    assert (fast.float() - ref).abs().max().item() < 2e-2


def test_top_p_fast_path_equals_full_sort():
    """The top-k shortcuts of sample_next (k = 256, then 4096) keep exactly the nucleus a full sort keeps."""
    torch.manual_seed(0)
    # seed 0: scale 8 takes the top-256 path for every top_p, scale 1 the top-4096 path for 0.5 and
    # 0.9, and the flat ones (scale 0.3, or top_p 0.99 at scale 1) the full-sort fallback
    for temp_scale in (0.3, 1.0, 8.0):
        logits = torch.randn(4, 5000) * temp_scale
        for top_p in (0.5, 0.9, 0.99):
            sorted_p, order = torch.sort(torch.softmax(logits, -1), descending=True)
            keep = (torch.cumsum(sorted_p, -1) - sorted_p) < top_p
            expect = torch.zeros_like(keep).scatter(-1, order, keep)
            gen = torch.Generator().manual_seed(1)
            for _ in range(20):
                tok, lp = common.sample_next(logits, 1.0, top_p, 0, gen)
                assert expect[torch.arange(4), tok].all()
            mass = (torch.softmax(logits, -1) * expect).sum(-1)
            tok, lp = common.sample_next(logits, 1.0, top_p, 0, gen)
            ref = torch.log(torch.softmax(logits, -1)[torch.arange(4), tok] / mass)
            assert torch.allclose(lp, ref, atol=1e-5)


def test_sample_categorical_against_a_slow_walk_and_frequencies():
    """Inverse-CDF sampling: the index a slow running-sum walk finds for the same uniform draw, the
    right frequencies, and never an index of probability zero (even at the edges of the row)."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 2.0],
                          [1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.0, 0.4, 0.0]])
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros_like(probs)
    for _ in range(4000):
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
    assert (freq - probs / probs.sum(-1, keepdim=True)).abs().max() < 0.03
