"""CUDA-only checks (skipped without a GPU; bench/gpu_check.sh runs them). One process, no FSDP:
the bf16 model, the engine (CUDA-graph decode against op by op), flash-attn against SDPA, shared-
prefix packing and a bf16-mixed training step on the GPU, against transformers and against our
own fp32 path.

    python -m pytest -q tests/test_cuda.py
"""
import pytest
import torch
import torch.nn.functional as F
import transformers

import common
import sft

pytestmark = pytest.mark.cuda

QUESTIONS = ["Name three colours.", "Write a haiku about the sea and the wind at night.",
             "What is 12 times 7? Explain briefly.", "Give me one tip for a job interview."]


def hf_on_cuda(dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(
        common.resolve_checkpoint(common.DEFAULT_MODEL), dtype=dtype).to("cuda").eval()


def chat_prompts(tok, questions):
    return [common.chat_prompt_ids(tok, [{"role": "user", "content": q}]) for q in questions]


def hf_greedy(hf, tok, prompt, n):
    x = torch.tensor([prompt], device="cuda")
    return hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                       eos_token_id=None, pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """fp32 means fp32 here (TF32 matmuls would blur the fp32 comparisons)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def test_bf16_logits_match_transformers_on_cuda():
    model, tok = common.load_model(common.DEFAULT_MODEL, device="cuda", dtype=torch.bfloat16)
    hf, ref32 = hf_on_cuda(torch.bfloat16), hf_on_cuda(torch.float32)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. " * 8)["input_ids"]], device="cuda")
    with torch.no_grad():
        ours, theirs, exact = model(ids), hf(ids).logits.float(), ref32(ids).logits.float()
    assert ours.dtype == torch.float32  # the output layer hands out fp32 logits whatever the weights
    # both bf16 runs are as far from the fp32 logits as each other (bf16 rounding, not a bug)
    err_ours, err_theirs = (ours - exact).abs().mean().item(), (theirs - exact).abs().mean().item()
    assert err_ours <= 1.5 * err_theirs + 1e-3, (err_ours, err_theirs)
    assert (ours.argmax(-1) == exact.argmax(-1)).float().mean().item() > 0.95


def test_fp32_logits_and_greedy_match_transformers_on_cuda():
    model, tok = common.load_model(common.DEFAULT_MODEL, device="cuda", dtype=torch.float32)
    hf = hf_on_cuda(torch.float32)
    prompts = chat_prompts(tok, QUESTIONS)
    with torch.no_grad():
        x = torch.tensor([prompts[0]], device="cuda")
        assert (model(x) - hf(x).logits).abs().max().item() <= 2e-3
    ours = common.generate(model, prompts, 32, stop_ids=[])  # CUDA-graph decode
    agree = sum(got == hf_greedy(hf, tok, p, 32) for p, got in zip(prompts, ours.tokens))
    assert agree >= len(prompts) - 1  # a near-tie may flip one row on the GPU; never most of them


def test_bf16_greedy_generation_tracks_transformers_within_tolerance():
    """In bf16 two correct implementations can part at a near-tie. Up to the first difference the
    tokens agree, and at that step our pick is within a small logit margin of theirs under the
    fp32 model."""
    model, tok = common.load_model(common.DEFAULT_MODEL, device="cuda", dtype=torch.bfloat16)
    hf, ref32 = hf_on_cuda(torch.bfloat16), hf_on_cuda(torch.float32)
    prompts = chat_prompts(tok, QUESTIONS)
    ours = common.generate(model, prompts, 48, stop_ids=[])
    shared = []  # length of the common prefix per prompt
    for p, got in zip(prompts, ours.tokens):
        ref = hf_greedy(hf, tok, p, 48)
        first_diff = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
        shared.append(48 if first_diff is None else first_diff)
        if first_diff is None:
            continue
        with torch.no_grad():
            logits = ref32(torch.tensor([p + got[:first_diff]], device="cuda")).logits[0, -1].float()
        assert abs(logits[got[first_diff]] - logits[ref[first_diff]]).item() < 1.0, first_diff
    assert sum(shared) >= 48, shared  # agreement is the rule: a quarter of all tokens at the very least


def test_cuda_kv_cache_decode_equals_recompute_bf16():
    model, tok = common.load_model(common.DEFAULT_MODEL, device="cuda", dtype=torch.bfloat16)
    prompts = chat_prompts(tok, QUESTIONS[:3])
    gen = common.generate(model, prompts, 12, stop_ids=[])
    with torch.no_grad():
        for p, new in zip(prompts, gen.tokens):
            logits = model(torch.tensor([p + new], device="cuda"))[0, len(p) - 1:-1]
            margin = logits.max(-1).values - logits.gather(-1, torch.tensor(new, device="cuda")[:, None])[:, 0]
            assert margin.max().item() < 0.5  # each cached pick is (near-)argmax of the full recompute


def test_cuda_sampling_is_seeded_and_logprobs_match_recompute():
    model, tok = common.load_model(common.DEFAULT_MODEL, device="cuda", dtype=torch.float32)
    prompts = chat_prompts(tok, QUESTIONS)
    a = common.generate(model, prompts, 24, temperature=0.9, top_p=0.9, seed=3, stop_ids=[])
    b = common.generate(model, prompts, 24, temperature=0.9, top_p=0.9, seed=3, stop_ids=[])
    assert a.tokens == b.tokens
    g = common.generate(model, prompts, 24, temperature=0.9, seed=5, stop_ids=[])  # no top-p: full distribution
    with torch.no_grad():
        lps, _ = common.response_logprobs(model, [p + t for p, t in zip(prompts, g.tokens)],
                                          [len(p) for p in prompts], temperature=0.9)
    for lp, ref in zip(lps, g.logprobs):
        assert torch.allclose(lp.cpu(), torch.tensor(ref), atol=2e-3)


def sft_docs(tok):
    msgs = [[{"role": "user", "content": q}, {"role": "assistant", "content": "Sure. " * (5 + i)}]
            for i, q in enumerate(QUESTIONS)]
    return [common.conversation_ids_and_mask(tok, m) for m in msgs]


def test_bf16_mixed_training_step_matches_fp32():
    """One SFT micro-step (sft.loss_sum: packed, loss on assistant tokens) of load_trainable's
    single-process model under common.autocast("bf16-mixed"): fp32 master weights, the same loss
    and gradient direction as fp32; a few bf16-mixed AdamW steps lower the loss."""
    env = common.dist_init("cuda")
    model, tok = common.load_trainable(common.DEFAULT_MODEL, env, "bf16-mixed")
    assert model.model.embed_tokens.weight.dtype == torch.float32 and not common.is_fsdp(model)
    docs = sft_docs(tok)

    def loss_and_grads(precision):
        model.zero_grad(set_to_none=True)
        with common.autocast(env.device, precision):
            loss_sum, n = sft.loss_sum(model, docs, env.device, share_prefix=False)
        (loss_sum / n).backward()
        return (loss_sum / n).item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    loss32, g32 = loss_and_grads("fp32")
    loss16, g16 = loss_and_grads("bf16-mixed")
    assert abs(loss16 - loss32) < 0.05 * loss32
    assert F.cosine_similarity(g16, g32, dim=0).item() > 0.98
    opt = common.adamw(model, lr=1e-4, weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        with common.autocast(env.device, "bf16-mixed"):
            ls, n = sft.loss_sum(model, docs, env.device, share_prefix=False)
        (ls / n).backward()
        opt.step()
    assert model.model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad(), common.autocast(env.device, "bf16-mixed"):
        ls, n = sft.loss_sum(model, docs, env.device, share_prefix=False)
    assert (ls / n).item() < loss32


def test_activation_checkpointing_on_cuda_same_loss_and_gradients():
    model, tok = common.load_model(common.DEFAULT_MODEL, device="cuda", dtype=torch.float32)
    model.train()
    docs = sft_docs(tok)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with common.autocast("cuda", "bf16-mixed"):
            loss_sum, n = sft.loss_sum(model, docs, "cuda", share_prefix=True)
        (loss_sum / n).backward()
        return (loss_sum / n).item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    loss, grads = loss_and_grads()
    for block in model.layers:
        block.checkpointing = True
    ckpt_loss, ckpt_grads = loss_and_grads()
    assert abs(ckpt_loss - loss) < 1e-5 * abs(loss)
    assert F.cosine_similarity(grads, ckpt_grads, dim=0).item() > 0.9999


def test_flash_attention_matches_sdpa(monkeypatch):
    """flash-attn's varlen kernel (packed and shared-prefix prefill) and its KV-cache kernel (decode)
    against PyTorch SDPA on the same bf16 model."""
    if not common.HAVE_FLASH_ATTN:
        pytest.skip("flash-attn not installed (the SDPA path is what ran above)")
    model, tok = common.load_model(common.DEFAULT_MODEL, device="cuda", dtype=torch.bfloat16)
    prompts = chat_prompts(tok, QUESTIONS)
    out = {}
    for attn in ("flash", "sdpa"):
        monkeypatch.setenv("PERSONARL_ATTN", attn)
        with torch.no_grad():
            packed = common.pack(prompts, "cuda", share_prefix=True)
            assert packed.parents is not None  # the chat template's prefix is shared
            logits = model(packed.input_ids, packed.cu_seqlens, packed.parents)[0]
        out[attn] = (logits, common.generate(model, prompts, 16, stop_ids=[], cuda_graph=False))
    (flash, gen_flash), (sdpa, gen_sdpa) = out["flash"], out["sdpa"]
    assert (flash.softmax(-1) - sdpa.softmax(-1)).abs().max().item() < 2e-2
    assert sum(a == b for a, b in zip(gen_flash.tokens, gen_sdpa.tokens)) >= len(prompts) - 1


def test_flash_or_sdpa_matches_math_path():
    q, k, v = (torch.randn(1, 300, h, 64, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
    cu = torch.tensor([0, 100, 300], dtype=torch.int32, device="cuda")
    fast = common.attention(q, k, v, cu)
    ref = torch.cat([common.attention(q[:, a:b].float(), k[:, a:b].float(), v[:, a:b].float())
                     for a, b in ((0, 100), (100, 300))], dim=1)
    assert (fast.float() - ref).abs().max().item() < 2e-2


def test_shared_prefix_packing_on_cuda_matches_whole_sequences():
    """Shared-prefix packing (parents) on the GPU: flash-attn's varlen kernel with separate key
    lengths when installed, else SDPA; each answer's next-token distributions match those of its
    whole sequence run alone."""
    model, tok = common.load_model(common.DEFAULT_MODEL, device="cuda", dtype=torch.bfloat16)
    prompt = chat_prompts(tok, QUESTIONS[:1])[0]
    answers = [tok(a)["input_ids"] for a in ("Red, green and blue.", "Blue, yellow, and a warm orange.")]
    seqs = [prompt + a for a in answers]
    packed = common.pack(seqs, "cuda", share_prefix=True)
    assert packed.parents is not None
    with torch.no_grad():
        logits = model(packed.input_ids, packed.cu_seqlens, packed.parents)[0]
        for seq, where in zip(seqs, packed.where):
            got = logits[where[len(prompt) - 1:-1]]
            whole = model(torch.tensor([seq], device="cuda"))[0, len(prompt) - 1:-1]
            assert (got.softmax(-1) - whole.softmax(-1)).abs().max().item() < 2e-2


TINY_QWEN2 = {"model_type": "qwen2", "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}


def test_tiny_cuda_graph_decode_equals_op_by_op():
    """Needs no checkpoint (gpu_check.sh runs it first): a random tiny Qwen2 model in fp32, the
    graph-captured decode step against its math run eagerly (cuda_graph="eager") and against the
    op-by-op decode (cuda_graph=False), greedy and sampled, ragged rows."""
    torch.manual_seed(0)
    model = common.Transformer(common.ModelConfig.from_hf(TINY_QWEN2)).eval()
    for p in model.parameters():  # larger than the default init, so greedy tokens vary
        p.data.normal_(0, 0.3)
    model.to("cuda")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in (5, 17, 9)]
    for batch, kw in (([prompts[1]], {}), (prompts, {}), (prompts, dict(temperature=1.0, top_p=0.9, seed=1))):
        ref = common.generate(model, batch, 24, stop_ids=[], cuda_graph=False, **kw)
        for mode in (True, "eager"):
            got = common.generate(model, batch, 24, stop_ids=[], cuda_graph=mode, **kw)
            assert got.tokens == ref.tokens, mode
            assert max(abs(a - b) for r, s in zip(got.logprobs, ref.logprobs) for a, b in zip(r, s)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_op_by_op(dtype):
    """The decode step captured as a CUDA graph (the default on CUDA) against the same model run
    op by op (cuda_graph=False): greedy tokens and log-probs for ragged rows, seeded sampling, a
    stop id that ends one row early, and two generate() calls in a row (each captures its own graph)."""
    model, tok = common.load_model(common.DEFAULT_MODEL, device="cuda", dtype=dtype)
    prompts = chat_prompts(tok, QUESTIONS)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    greedy = None
    for kw in (dict(), dict(temperature=0.9, top_p=0.9, seed=7)):
        eager = common.generate(model, prompts, 40, stop_ids=[], cuda_graph=False, **kw)
        graph = common.generate(model, prompts, 40, stop_ids=[], **kw)
        again = common.generate(model, prompts, 40, stop_ids=[], **kw)
        assert graph.tokens == again.tokens
        greedy = greedy or eager
        agree = [a == b for a, b in zip(graph.tokens, eager.tokens)]
        assert all(agree) if dtype == torch.float32 else sum(agree) >= len(prompts) - 1, agree
        for a, b, same in zip(graph.logprobs, eager.logprobs, agree):
            if same:
                assert max(abs(x - y) for x, y in zip(a, b)) < tol
    stop = [greedy.tokens[2][4]]  # row 2 stops by its 5th token
    eager = common.generate(model, prompts, 40, stop_ids=stop, cuda_graph=False)
    graph = common.generate(model, prompts, 40, stop_ids=stop)
    assert graph.stopped == eager.stopped and eager.stopped[2] and graph.tokens[2] == eager.tokens[2]


def test_value_model_on_cuda_under_autocast():
    """A critic's values come out fp32 under bf16 autocast, at packed last tokens as at full rows."""
    critic, tok = common.load_model(common.DEFAULT_MODEL, device="cuda", value_head=True)
    assert not hasattr(critic, "lm_head")
    with torch.no_grad():
        critic.value_head.weight.normal_(0, 0.05)
    seqs = chat_prompts(tok, QUESTIONS)
    packed = common.pack(seqs, "cuda", share_prefix=True)
    last = torch.stack([w[-1] for w in packed.where])
    with torch.no_grad(), common.autocast("cuda", "bf16-mixed"):
        got = critic.values(packed.input_ids, packed.cu_seqlens, packed.parents, select=last)
        alone = torch.stack([critic.values(torch.tensor([s], device="cuda"))[0, -1] for s in seqs])
    assert got.dtype == torch.float32 and torch.allclose(got, alone, atol=5e-2)
