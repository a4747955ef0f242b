"""CUDA-only checks (skipped without a GPU; bench/gpu_check.sh runs them): bf16 model, engine and
training step on the GPU against transformers and against our own fp32 path."""
import pytest
import torch
import transformers

import common

pytestmark = pytest.mark.cuda


def hf_on_cuda(dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(
        common.resolve_checkpoint(common.DEFAULT_MODEL), dtype=dtype).to("cuda").eval()


def chat_prompts(tok, questions):
    return [common.chat_prompt_ids(tok, [{"role": "user", "content": q}]) for q in questions]


QUESTIONS = ["Name three colours.", "Write a haiku about the sea and the wind at night.",
             "What is 12 times 7? Explain briefly.", "Give me one tip for a job interview."]


def test_bf16_logits_match_transformers_on_cuda():
    model, tok = common.load_model(common.DEFAULT_MODEL, device="cuda", dtype=torch.bfloat16)
    hf = hf_on_cuda(torch.bfloat16)
    ref32 = hf_on_cuda(torch.float32)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. " * 8)["input_ids"]], device="cuda")
    with torch.no_grad():
        ours, theirs, exact = model(ids).float(), hf(ids).logits.float(), ref32(ids).logits.float()
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
        assert (model(x) - hf(x).logits).abs().max().item() <= 2e-3  # TF32 matmuls may be on
    ours = common.generate(model, prompts, 32, stop_ids=[])
    agree = 0
    for p, got in zip(prompts, ours.tokens):
        x = torch.tensor([p], device="cuda")
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        agree += got == ref
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
        x = torch.tensor([p], device="cuda")
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=48, do_sample=False,
                          eos_token_id=None, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
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
            logits = model(torch.tensor([p + new], device="cuda"))[0, len(p) - 1:-1].float()
            margin = logits.max(-1).values - logits.gather(-1, torch.tensor(new, device="cuda")[:, None])[:, 0]
            assert margin.max().item() < 0.5  # each cached pick is (near-)argmax of the full recompute


def test_cuda_sampling_is_seeded_and_logprobs_match_recompute():
    model, tok = common.load_model(common.DEFAULT_MODEL, device="cuda", dtype=torch.float32)
    prompts = chat_prompts(tok, QUESTIONS)
    a = common.generate(model, prompts, 24, temperature=0.9, top_p=0.9, seed=3, stop_ids=[])
    b = common.generate(model, prompts, 24, temperature=0.9, top_p=0.9, seed=3, stop_ids=[])
    assert a.tokens == b.tokens
    g = common.generate(model, prompts, 24, temperature=0.9, seed=5, stop_ids=[])  # no top-p: full dist
    with torch.no_grad():
        lps = common.sequence_logprobs(model, [p + t for p, t in zip(prompts, g.tokens)],
                                       [len(p) for p in prompts], temperature=0.9)
    for lp, ref in zip(lps, g.logprobs):
        assert torch.allclose(lp.float().cpu(), torch.tensor(ref), atol=2e-3)


def test_bf16_training_step_gradients_match_fp32():
    """One SFT micro-step under bf16 autocast on the GPU: same loss and gradient direction as fp32."""
    model, tok = common.load_model(common.DEFAULT_MODEL, device="cuda", dtype=torch.float32)
    msgs = [[{"role": "user", "content": q}, {"role": "assistant", "content": "Sure. " * (5 + i)}]
            for i, q in enumerate(QUESTIONS)]
    docs = [common.conversation_ids_and_mask(tok, m) for m in msgs]
    batch = common.packed_sft_batch(docs, device="cuda")

    def loss_and_grads(autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss_sum, n = common.sft_loss_sum(model, batch)
        (loss_sum / n).backward()
        return (loss_sum / n).item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    loss32, g32 = loss_and_grads(False)
    loss16, g16 = loss_and_grads(True)
    assert abs(loss16 - loss32) < 0.05 * loss32
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0).item() > 0.98
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(3):  # a few bf16 steps on the same batch lower its loss
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ls, n = common.sft_loss_sum(model, batch)
        (ls / n).backward()
        opt.step()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ls, n = common.sft_loss_sum(model, batch)
    assert (ls / n).item() < loss32


def test_flash_attention_kvcache_path_matches_sdpa(monkeypatch):
    if not common.HAVE_FLASH_ATTN:
        pytest.skip("flash-attn not installed (the SDPA path is what ran above)")
    model, tok = common.load_model(common.DEFAULT_MODEL, device="cuda", dtype=torch.bfloat16)
    prompts = chat_prompts(tok, QUESTIONS)
    with torch.no_grad():
        ids, cu = common.pack_sequences(prompts, device="cuda")
        flash = model(ids, cu).float()
        monkeypatch.setenv("PERSONARL_ATTN", "sdpa")
        sdpa = model(ids, cu).float()
    assert (flash.softmax(-1) - sdpa.softmax(-1)).abs().max().item() < 2e-2


def test_shared_prefix_packing_on_cuda_matches_whole_sequences():
    """Shared-prefix packing (parents) on the GPU: flash-attn's varlen kernel with separate key
    lengths when installed, else SDPA; each answer's next-token distributions match those of its
    whole sequence run alone."""
    model, tok = common.load_model(common.DEFAULT_MODEL, device="cuda", dtype=torch.bfloat16)
    prompt = chat_prompts(tok, QUESTIONS[:1])[0]
    answers = [tok(a)["input_ids"] for a in ("Red, green and blue.", "Blue, yellow, and a warm orange.")]
    seqs, starts = [prompt + a for a in answers], [len(prompt)] * 2
    ids, cu, parents, pos, _, sizes = common.pack_shared_prompts(seqs, starts, device="cuda")
    assert parents is not None
    with torch.no_grad():
        shared = model(ids, cu, parents=parents)[0].float()[pos].split(sizes)
        for seq, got in zip(seqs, shared):
            whole = model(torch.tensor([seq], device="cuda"))[0].float()[len(prompt) - 1:-1]
            assert (got.softmax(-1) - whole.softmax(-1)).abs().max().item() < 2e-2


def test_tiny_cuda_graph_decode_equals_eager():
    """Needs no checkpoint (gpu_check.sh runs it first): a random tiny Qwen2 model in fp32, the
    graph-captured decode step against eager, greedy and sampled, ragged rows."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = common.Transformer(common.ModelConfig.from_hf(common.tiny_config("qwen2"))).eval()
    for p in model.parameters():  # larger than the default init, so greedy tokens vary
        p.data.normal_(0, 0.3)
    model.to("cuda")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 9)]
    for batch, kw in (([prompts[1]], {}), (prompts, {}), (prompts, dict(temperature=1.0, top_p=0.9, seed=1))):
        eager = common.generate(model, batch, 24, stop_ids=[], cuda_graph=False, **kw)
        graph = common.generate(model, batch, 24, stop_ids=[], **kw)
        assert graph.tokens == eager.tokens
        assert max(abs(a - b) for r, s in zip(graph.logprobs, eager.logprobs) for a, b in zip(r, s)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager(dtype):
    """The decode step captured as a CUDA graph (the default on CUDA) against the same model run
    eagerly, op by op: greedy tokens and log-probs for ragged rows, seeded sampling, a stop id
    that ends one row early, and two generate() calls in a row (each captures its own graph)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model, tok = common.load_model(common.DEFAULT_MODEL, device="cuda", dtype=dtype)
    prompts = chat_prompts(tok, QUESTIONS)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for kw in (dict(), dict(temperature=0.9, top_p=0.9, seed=7)):
        eager = common.generate(model, prompts, 40, stop_ids=[], cuda_graph=False, **kw)
        graph = common.generate(model, prompts, 40, stop_ids=[], **kw)
        again = common.generate(model, prompts, 40, stop_ids=[], **kw)
        assert graph.tokens == again.tokens
        greedy = greedy if kw else eager
        agree = [a == b for a, b in zip(graph.tokens, eager.tokens)]
        assert all(agree) if dtype == torch.float32 else sum(agree) >= len(prompts) - 1, agree
        for a, b, same in zip(graph.logprobs, eager.logprobs, agree):
            if same:
                assert max(abs(x - y) for x, y in zip(a, b)) < tol
    stop = [greedy.tokens[2][4]]  # row 2 stops by its 5th token
    eager = common.generate(model, prompts, 40, stop_ids=stop, cuda_graph=False)
    graph = common.generate(model, prompts, 40, stop_ids=stop)
    assert graph.stopped == eager.stopped and eager.stopped[2] and graph.tokens[2] == eager.tokens[2]
