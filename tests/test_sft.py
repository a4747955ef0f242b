"""Tests of the SFT stage (sft.py) and the shared SFT loop (common.sft_train), CPU, tiny models.

Run: python -m pytest -x -q tests/test_sft.py
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sft  # noqa: E402
from common import (DataError, DistEnv, ModelConfig, Transformer, conversation_ids_and_mask,  # noqa: E402
                    load_tokenizer, DEFAULT_MODEL, pack_documents, packed_sft_batch, padded_sft_batch,
                    save_model, sft_loss_sum, sft_train, tiny_config)

ROOT = Path(__file__).resolve().parents[1]
CPU = DistEnv(0, 0, 1, torch.device("cpu"))


def tiny_model(seed=0, **overrides):
    """A small random Llama with a sane init (std 0.02), so the loss starts near log(vocab)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    cfg.update(overrides)
    model = Transformer(ModelConfig.from_hf(tiny_config(**cfg)))
    for p in model.parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.02)
    return model


def synthetic_docs(n, seed=0, vocab=256, lo=6, hi=40):
    """(ids, mask) documents: a random prompt, then an 'assistant' part that counts up from the
    prompt's last token (a pattern a tiny model learns in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        p = int(torch.randint(lo, hi, (1,), generator=g))
        prompt = torch.randint(3, vocab, (p,), generator=g).tolist()
        answer = [3 + (prompt[-1] + 1 + i) % (vocab - 3) for i in range(max(2, p // 2))]
        docs.append((prompt + answer, [0] * p + [1] * len(answer)))
    return docs


def train_args(tmp_path, **kw):
    argv = ["--out", str(tmp_path), "--bf16", "off", "--eval-every", "0", "--save-every", "0"]
    args = sft.parse_args(argv)
    for k, v in kw.items():
        setattr(args, k, v)
    return args


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy shared CPU two OpenMP threads can make
    them 10-30x slower; the torchrun tests pin OMP_NUM_THREADS=1 likewise."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEFAULT_MODEL)


# ------------------------------------------------------------------------------ packing and loss

def test_pack_documents_respects_budget_and_is_deterministic():
    lengths = [5, 17, 3, 9, 12, 1, 8, 16, 7]
    bins = pack_documents(lengths, 20)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every doc exactly once
    assert all(sum(lengths[i] for i in b) <= 20 for b in bins)
    assert bins == pack_documents(lengths, 20)
    assert len(bins) == 5  # first-fit decreasing: 78 tokens in 5 bins of 20 (4 is impossible here)
    with pytest.raises(ValueError, match="more than the token budget"):
        pack_documents([30], 20)


def test_packed_batch_targets_mask_prompt_and_document_ends():
    docs = [([10, 11, 12, 13], [0, 0, 1, 1]), ([20, 21, 22], [0, 1, 1])]
    b = packed_sft_batch(docs)
    assert b["input_ids"].tolist() == [[10, 11, 12, 13, 20, 21, 22]]
    assert b["cu_seqlens"].tolist() == [0, 4, 7]
    # position j predicts token j+1 of its own document; nothing is predicted across the boundary
    assert b["targets"].tolist() == [[-100, 12, 13, -100, 21, 22, -100]]


def test_prompt_tokens_receive_no_gradient():
    model = tiny_model()
    docs = synthetic_docs(3)
    batch = packed_sft_batch(docs)
    captured = {}

    def spy(ids, cu, logits_mask, parents=None):  # the model, keeping its full logits to read their gradient
        captured["logits"] = model(ids, cu, parents=parents)
        captured["logits"].retain_grad()
        return captured["logits"][logits_mask]

    loss_sum, n = sft_loss_sum(spy, batch)
    loss_sum.backward()
    grad_rows = captured["logits"].grad[0].abs().sum(-1)  # [T]
    # positions whose next token is an assistant token of the same document, built independently
    trained = []
    for ids, mask in docs:
        trained += [bool(mask[j + 1]) for j in range(len(ids) - 1)] + [False]
    trained = torch.tensor(trained)
    assert n == int(trained.sum()) == sum(sum(m[1:]) for _, m in docs)
    assert (grad_rows[~trained] == 0).all()
    assert (grad_rows[trained] > 0).all()


def test_assistant_mask_covers_exactly_the_answer(tok):
    messages = sft.sample_messages({"persona": {"Name": "Ana"}, "question": "Hi?", "response": "Hello Ana."},
                                   "x.jsonl", 1)
    ids, mask = conversation_ids_and_mask(tok, messages)
    b = packed_sft_batch([(ids, mask)])
    trained = [t for t in b["targets"][0].tolist() if t != -100]
    assert tok.decode(trained).strip() == "Hello Ana.<|im_end|>"


def test_packed_and_unpacked_give_the_same_loss():
    torch.set_default_dtype(torch.float32)
    model = tiny_model()
    docs = synthetic_docs(5, seed=1)
    packed, n = sft_loss_sum(model, packed_sft_batch(docs))
    single = [sft_loss_sum(model, packed_sft_batch([d])) for d in docs]
    padded, n_pad = sft_loss_sum(model, padded_sft_batch(docs))
    assert n == sum(k for _, k in single) == n_pad
    single_sum = sum(l for l, _ in single)
    assert torch.allclose(packed, single_sum, rtol=1e-5, atol=0)
    assert torch.allclose(packed, padded, rtol=1e-5, atol=0)


def shared_prompt_docs(seed=0, vocab=256):
    """Documents in three families: each family's members share a long untrained prompt (a
    'persona'), some also a second untrained stretch (a 'question'), then differ; plus one loner."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    docs = []
    for family in range(3):
        persona = rand(40 + 7 * family)
        for question in range(2):
            q = rand(9)
            for answer in range(2 + family % 2):
                prompt, reply = persona + q + rand(5 + answer), rand(6 + 3 * answer)
                docs.append((prompt + reply, [0] * len(prompt) + [1] * len(reply)))
    loner = rand(30)
    docs.append((loner, [0] * 20 + [1] * 10))
    return docs


def test_shared_prefix_packing_is_exact_and_shorter():
    """share_prefix stores a prompt shared by several documents once; the loss and every gradient
    equal those of plain packing (a wrong position offset or a prefix that leaked across groups
    would change them), and no shared position predicts a trained token."""
    from common import share_prefixes, shared_tokens
    torch.set_default_dtype(torch.float32)
    docs = shared_prompt_docs()
    groups = share_prefixes(docs)
    assert sorted(i for _, m in groups for i in m) == list(range(len(docs)))  # each doc once
    for shared, members in groups:
        for i in members:
            assert docs[i][0][:shared] == docs[members[0]][0][:shared]
            assert not any(docs[i][1][:shared + 1])  # the prefix predicts no trained token
    plain, shared_batch = packed_sft_batch(docs), packed_sft_batch(docs, share_prefix=True)
    n_plain = plain["input_ids"].numel()
    assert shared_batch["input_ids"].numel() == shared_tokens(docs, groups) < 0.7 * n_plain
    model, ref = tiny_model(), tiny_model()
    loss, n = sft_loss_sum(model, shared_batch)
    expect, n_ref = sft_loss_sum(ref, plain)
    assert n == n_ref and torch.allclose(loss, expect, rtol=1e-5, atol=0)
    loss.backward(), expect.backward()
    for (k, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-5 * b.grad.abs().max(), k  # summation order only
    # the logits of every continuation equal those of its document run alone
    for shared, members in groups:
        if shared:
            i = members[-1]
            alone = model(torch.tensor([docs[i][0]]))[0]
            b = packed_sft_batch([docs[j] for j in members], share_prefix=True)
            full = model(b["input_ids"], b["cu_seqlens"], parents=b["parents"])[0]
            tail = full[-(len(docs[i][0]) - shared):]
            assert torch.allclose(tail, alone[shared:], atol=1e-5)
            break


def test_masked_head_loss_equals_full_logits_cross_entropy():
    """sft_loss_sum computes the output layer only on trained positions; the loss and gradients
    equal a plain cross-entropy over the full logits with ignored targets."""
    model = tiny_model()
    ref = tiny_model()
    ref.load_state_dict(model.state_dict())
    docs = synthetic_docs(4, seed=6)
    for make in (packed_sft_batch, padded_sft_batch):
        b = make(docs)
        loss, n = sft_loss_sum(model, b)
        logits = ref(b["input_ids"], b["cu_seqlens"])
        expect = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["targets"].reshape(-1),
                                                   ignore_index=-100, reduction="sum")
        assert n == int((b["targets"] != -100).sum()) and torch.allclose(loss, expect, rtol=1e-5, atol=0)
        loss.backward(), expect.backward()
    for (k, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7), k


def test_training_loop_loss_independent_of_token_budget(tmp_path, tok):
    """One document per micro-batch (unpacked) vs everything packed: same loss curve."""
    docs = synthetic_docs(16, seed=2)
    curves = []
    for budget in (64, 2048):
        out = tmp_path / f"b{budget}"
        model = tiny_model()
        sft_train(model, tok, docs, [], train_args(out, token_budget=budget, global_batch=8, max_steps=3,
                                                   lr=1e-2, warmup_ratio=0.0), out, CPU)
        curves.append([r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r])
    assert len(curves[0]) == 3
    assert curves[0] == pytest.approx(curves[1], rel=1e-5)


def test_shared_prefix_training_equals_unshared_steps(tmp_path, tok):
    """sft_train with share_prefix: the same loss curve whether the micro-batches can share prompts
    (large budget) or not (one document each), with fewer input tokens; every document is trained
    once per epoch."""
    from common import _sft_epoch_steps
    docs = shared_prompt_docs(seed=3)
    steps = _sft_epoch_steps(docs, 4, 0, True)
    assert sorted(i for st in steps for i in st) == list(range(len(docs))) and max(map(len, steps)) == 4
    curves, tokens = [], []
    for budget in (80, 4096):  # 80: one document per micro-batch (the longest has 78 tokens)
        out = tmp_path / f"b{budget}"
        sft_train(tiny_model(), tok, docs, [], train_args(out, token_budget=budget, global_batch=4, epochs=2,
                                                          lr=1e-2, warmup_ratio=0.0, share_prefix=True), out, CPU)
        rows = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
        curves.append([r["loss"] for r in rows])
        tokens.append(sum(r["input_tokens"] for r in rows))
    assert len(curves[0]) == 2 * len(steps)
    assert curves[0] == pytest.approx(curves[1], rel=1e-5)
    assert tokens[1] < 0.8 * tokens[0]


# ------------------------------------------------------------------------------ training loop

def test_loss_falls_over_20_steps(tmp_path, tok):
    docs = synthetic_docs(40, seed=3)
    model = tiny_model()
    args = train_args(tmp_path, global_batch=8, max_steps=20, lr=1e-2, token_budget=512, eval_every=10)
    result = sft_train(model, tok, docs[:32], docs[32:], args, tmp_path, CPU)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r and "step" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert result["eval_loss"] == evals[-1]
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("share_prefix", [False, True])
def test_resume_after_kill_equals_uninterrupted_run(tmp_path, tok, share_prefix):
    docs = shared_prompt_docs(seed=4) if share_prefix else synthetic_docs(20, seed=4)
    common_kw = dict(global_batch=4, epochs=2, lr=5e-3, token_budget=96 if not share_prefix else 256,
                     save_every=3, share_prefix=share_prefix)
    full = tiny_model()
    sft_train(full, tok, docs, [], train_args(tmp_path / "full", **common_kw), tmp_path / "full", CPU)

    # "killed" after step 7 (checkpoints at 3 and 6): step 7 is redone after the resume
    out = tmp_path / "resumed"
    part = tiny_model()
    assert sft_train(part, tok, docs, [], train_args(out, stop_at_step=7, **common_kw), out, CPU) is None
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_000003", "ckpt_000006"]
    assert not (out / "model.safetensors").exists()
    again = tiny_model(seed=123)  # different init: everything must come from the checkpoint
    sft_train(again, tok, docs, [], train_args(out, resume=True, **common_kw), out, CPU)
    for (k, a), (_, b) in zip(full.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    # the resumed run logs the same losses as the uninterrupted one from the checkpoint on
    loss_full = {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / "full" / "metrics.jsonl")) if "loss" in r}
    loss_res = {r["step"]: r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r}
    assert loss_full == loss_res and len(loss_full) == 2 * -(-len(docs) // 4)

    # a resume with a different batch plan is refused instead of silently misaligning the data
    with pytest.raises(ValueError, match="different data or batch plan"):
        sft_train(tiny_model(), tok, docs, [], train_args(out, resume=True, **{**common_kw, "global_batch": 5}),
                  out, CPU)


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, tok):
    """A real kill: sft.py in a subprocess gets SIGKILL mid-run (after step 5 is logged,
    checkpoints every 2 steps), then --resume finishes; the weights equal an uninterrupted run."""
    model_dir = tmp_path / "tiny"
    save_model(tiny_model(vocab_size=len(tok)), tok, model_dir)
    data = write_lines(tmp_path / "conv.jsonl", [
        {"messages": [{"role": "user", "content": f"Count from {i}."},
                      {"role": "assistant", "content": " ".join(str(i + k) for k in range(1 + i % 6))}]}
        for i in range(20)])
    flags = ["--model", str(model_dir), "--data", str(data), "--max-len", "128", "--token-budget", "256",
             "--global-batch", "2", "--epochs", "3", "--lr", "5e-3", "--bf16", "off", "--eval-every", "0",
             "--save-every", "2"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "sft.py", *flags, "--out", str(killed)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    try:
        while proc.poll() is None:
            if metrics.exists() and any(json.loads(l).get("step", 0) >= 5 for l in open(metrics)):
                proc.kill()
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert not (killed / "model.safetensors").exists(), "finished before the kill"
    assert (killed / "ckpt_000004").exists()
    sft.main(flags + ["--out", str(killed), "--resume"])
    sft.main(flags + ["--out", str(tmp_path / "full")])
    from safetensors.torch import load_file
    a, b = load_file(str(killed / "model.safetensors")), load_file(str(tmp_path / "full" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ sft.py: data

def write_lines(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


GOOD_CONV = {"messages": [{"role": "user", "content": "What is 2 plus 3?"},
                          {"role": "assistant", "content": "2 plus 3 is 5."}]}
GOOD_PERSONA = {"persona": {"Name": "Ana", "Demographics": {"Age": 30}}, "question": "Tea or coffee?",
                "response": "Green tea suits your mornings."}
BAD_CASES = {
    "malformed JSON": ('{"messages": [', "malformed JSON"),
    "missing role": ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}, "has no 'role'"),
    "missing field": ({"persona": {"Name": "Ana"}, "question": "Tea?"}, "field 'response' is missing"),
    "empty assistant turn": ({"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "  "}]}, "empty assistant turn"),
    "empty persona response": ({"persona": {"Name": "Ana"}, "question": "Tea?", "response": ""},
                               "'response' is an empty string"),
    "too long": ({"messages": [{"role": "user", "content": "word " * 400},
                               {"role": "assistant", "content": "ok"}]}, "longer than --max-len 256"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_an_error_naming_file_and_line(tmp_path, tok, case):
    bad, message = BAD_CASES[case]
    path = write_lines(tmp_path / "data.jsonl", [GOOD_CONV, GOOD_PERSONA, bad, GOOD_CONV])
    with pytest.raises(DataError) as e:
        sft.load_sft_docs([str(path)], tok, max_len=256, skip_bad=False)
    assert f"{path}:3:" in str(e.value) and message in str(e.value)
    docs, n_skipped, reasons = sft.load_sft_docs([str(path)], tok, max_len=256, skip_bad=True)
    assert len(docs) == 3 and n_skipped == 1 and len(reasons) == 1


def test_skip_bad_counts_and_logs_in_a_full_run(tmp_path, tok):
    """sft.py end to end on a tiny saved model: bad lines skipped, counted, listed in metrics."""
    model_dir = tmp_path / "tiny"
    save_model(tiny_model(vocab_size=len(tok)), tok, model_dir)
    lines = [GOOD_CONV, GOOD_PERSONA] * 6 + [bad for bad, _ in BAD_CASES.values()]
    data = write_lines(tmp_path / "data.jsonl", lines)
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-len", "256",
            "--token-budget", "512", "--global-batch", "4", "--max-steps", "2", "--bf16", "off"]
    with pytest.raises(DataError, match=f"{data}:13:"):
        sft.main(argv)
    result = sft.main(argv + ["--skip-bad"])
    assert result is not None
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    data_row = [r for r in rows if r.get("event") == "data"][-1]
    assert data_row["skipped"] == len(BAD_CASES) and data_row["train_samples"] + data_row["eval_samples"] == 12
    assert any(":13:" in r for r in data_row["skipped_reasons"])


def test_final_save_loads_in_transformers(tmp_path, tok):
    from transformers import AutoModelForCausalLM
    docs = synthetic_docs(8, seed=5, vocab=len(tok))
    model = tiny_model(vocab_size=len(tok))
    sft_train(model, tok, docs, [], train_args(tmp_path, global_batch=4, max_steps=2, lr=1e-3), tmp_path, CPU)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.tensor([docs[0][0]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-4)
    assert (tmp_path / "metrics.jsonl").exists()  # the final save did not replace the folder


def test_builtin_sample_is_valid(tmp_path, tok):
    path = write_lines(tmp_path / "s.jsonl", sft.builtin_sample())
    docs, n_skipped, _ = sft.load_sft_docs([str(path)], tok, max_len=1024, skip_bad=False)
    assert len(docs) == 48 and n_skipped == 0


# ------------------------------------------------------------------------------ torchrun

def run_sft(cmd, out, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r and "step" in r]


def test_torchrun_two_processes_match_one_process(tmp_path, tok):
    """2-process torchrun on CPU (gloo), DDP and FSDP2: the same loss curve as one process with the
    same global batch. Micro-batches are small, so each rank runs several (and some ranks a dummy)."""
    model_dir = tmp_path / "tiny"
    save_model(tiny_model(vocab_size=len(tok)), tok, model_dir)
    lines = []
    for i in range(30):
        a, b = i % 7, (3 * i) % 11
        lines.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                   {"role": "assistant", "content": f"{a} plus {b} is {a + b}." + " ok" * (i % 5)}]})
    data = write_lines(tmp_path / "conv.jsonl", lines)
    flags = ["sft.py", "--model", str(model_dir), "--data", str(data), "--max-len", "128",
             "--token-budget", "128", "--global-batch", "7", "--max-steps", "4", "--lr", "1e-2",
             "--bf16", "off", "--eval-every", "2", "--save-every", "2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    sft.main(flags[1:] + ["--out", str(tmp_path / "one")])  # one process: in this one (1 thread too)
    one = [r["loss"] for r in map(json.loads, open(tmp_path / "one" / "metrics.jsonl")) if "step" in r]
    ddp = run_sft(torchrun + flags + ["--out", str(tmp_path / "ddp")], tmp_path / "ddp")
    fsdp = run_sft(torchrun + flags + ["--out", str(tmp_path / "fsdp"), "--fsdp"], tmp_path / "fsdp")
    assert len(one) == 4
    assert ddp == pytest.approx(one, abs=1e-4)
    assert fsdp == pytest.approx(one, abs=1e-4)
    # a checkpoint written by 2 FSDP2 ranks resumes in one plain process: same remaining steps
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "fsdp" / "ckpt_000002", resumed / "ckpt_000002")
    sft.main(flags[1:] + ["--out", str(resumed), "--resume"])
    rest = [r["loss"] for r in map(json.loads, open(resumed / "metrics.jsonl")) if "step" in r]
    assert rest == pytest.approx(one[2:], abs=1e-4)
    # the final HF weights agree too
    from safetensors.torch import load_file
    w1, w2 = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "fsdp" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)
