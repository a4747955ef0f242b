"""Tests of sft.py, the one SFT loop (policy warm start, GRM, MiCoTA TA and student). CPU, tiny
random models with the embedded default's tokenizer.

    python -m pytest -x -q tests/test_sft.py
"""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import common
import sft

ROOT = Path(__file__).resolve().parents[1]


def tiny_folder(path, seed=0):
    """A small random Llama saved as an HF folder with the embedded default's tokenizer."""
    torch.manual_seed(seed)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 32,
           "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
           "max_position_embeddings": 2048, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
    model = common.Transformer(common.ModelConfig.from_hf(cfg))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() >= 2 else None
    common.save_model(model, common.load_tokenizer(common.DEFAULT_MODEL), path)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tok():
    return common.load_tokenizer(common.DEFAULT_MODEL)


PERSONA = {"Name": "Ana", "Demographics": {"Age": 30, "Career_Information": "nurse"}}


def write_data(path, n=12, shared=False):
    """Persona records (and, with shared=True, several answers to one question: a shared prompt)."""
    rows = []
    for i in range(n):
        q = "How do I sleep better?" if shared else f"Question number {i}: what should I do about topic {i}?"
        rows.append({"persona": PERSONA, "question": q, "response": f"Answer {i}: go to bed at {i % 12 + 1} pm."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run(tiny, data, out, *extra):
    argv = ["--model", tiny, "--data", data, "--out", str(out), "--max-samples", "0", "--epochs", "1",
            "--global-batch", "4", "--save-every", "0", "--lr", "1e-3", *extra]
    return sft.main(argv)


def weights(folder):
    return common.read_hf_state(folder)


def same_weights(a, b, atol=0.0):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=atol, rtol=0) for k in wa)


def metrics(out):
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


# ------------------------------------------------------------------------------ the loss

def slow_loss(model, docs):
    """Each document alone, full logits, cross-entropy on assistant tokens: the obvious reference."""
    total, n = 0.0, 0
    for ids, mask in docs:
        logits = model(torch.tensor([ids]))[0, :-1]
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        total = total + F.cross_entropy(logits[keep], torch.tensor(ids[1:])[keep], reduction="sum")
        n += int(keep.sum())
    return total, n


@pytest.mark.parametrize("share_prefix", [False, True])
def test_packed_loss_and_gradients_equal_documents_alone(tiny, tok, share_prefix):
    model, _ = common.load_model(tiny)
    docs = [common.conversation_ids_and_mask(tok, sft.sample_messages(
        {"persona": PERSONA, "question": "How do I sleep better?", "response": f"Try idea {i}."}, "x", 1))
        for i in range(3)] + [common.conversation_ids_and_mask(tok, [{"role": "user", "content": "Hi"},
                                                                     {"role": "assistant", "content": "Hello!"}])]
    loss, n = sft.loss_sum(model, docs, "cpu", share_prefix)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    ref, n_ref = slow_loss(model, docs)
    ref.backward()
    assert n == n_ref and torch.allclose(loss, ref, atol=1e-4)
    for k, p in model.named_parameters():
        assert torch.allclose(grads[k], p.grad, atol=1e-5), k
    if share_prefix:  # the three answers to one question store their prompt once
        seqs = [d[0] for d in docs]
        assert common.packed_size(seqs, True) < common.packed_size(seqs, False) - 40


def test_assistant_mask_and_grm_records(tok):
    msgs = sft.sample_messages({"persona": PERSONA, "question": "Q?", "response": "A.", "grm_output": "<scores>x"},
                               "f", 1)
    assert msgs[0]["role"] == "system" and msgs[0]["content"] == common.GRM_RUBRIC and msgs[-1]["content"] == "<scores>x"
    ids, mask = common.conversation_ids_and_mask(tok, msgs)
    assert tok.decode([t for t, m in zip(ids, mask) if m]).startswith("<scores>x")


def test_epoch_steps_cover_every_document_once():
    docs = [([i % 5, i], [0, 1]) for i in range(23)]
    for share in (False, True):
        steps = sft.epoch_steps(docs, 4, seed=3, share_prefix=share)
        assert sorted(i for s in steps for i in s) == list(range(23)) and max(map(len, steps)) == 4


# ------------------------------------------------------------------------------ the loop

def test_token_budget_and_prefix_sharing_do_not_change_training(tiny, tmp_path):
    data = write_data(tmp_path / "d.jsonl", 8, shared=True)
    run(tiny, data, tmp_path / "a", "--token-budget", "4096")
    run(tiny, data, tmp_path / "b", "--token-budget", "64")  # every document alone
    run(tiny, data, tmp_path / "c", "--token-budget", "4096", "--share-prefix")
    la, lb = [[r["loss"] for r in metrics(tmp_path / x) if "loss" in r] for x in "ab"]
    assert len(la) == 2 and all(abs(x - y) < 1e-4 for x, y in zip(la, lb))
    assert same_weights(tmp_path / "a", tmp_path / "b", atol=1e-5)
    # share_prefix changes which documents share a step (neighbours in token order), not the math:
    # one step over all documents is the same step
    run(tiny, data, tmp_path / "d", "--global-batch", "8", "--overwrite")
    run(tiny, data, tmp_path / "e", "--global-batch", "8", "--share-prefix", "--token-budget", "300")
    assert same_weights(tmp_path / "d", tmp_path / "e", atol=1e-5)


def test_loss_falls(tiny, tmp_path):
    data = write_data(tmp_path / "d.jsonl", 16)
    run(tiny, data, tmp_path / "o", "--epochs", "6", "--lr", "2e-2", "--warmup-ratio", "0")
    losses = [r["loss"] for r in metrics(tmp_path / "o") if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "o")  # the final save loads in transformers
    ours, _ = common.load_model(tmp_path / "o")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-4)


def test_resume_equals_uninterrupted_run_and_logs_each_step_once(tiny, tmp_path):
    data = write_data(tmp_path / "d.jsonl", 12)
    common_flags = ("--epochs", "2", "--save-every", "2")
    run(tiny, data, tmp_path / "full", *common_flags)
    assert run(tiny, data, tmp_path / "cut", *common_flags, "--stop-at-step", "3") is None
    run(tiny, data, tmp_path / "cut", *common_flags, "--resume")
    assert same_weights(tmp_path / "full", tmp_path / "cut")
    steps = [r["step"] for r in metrics(tmp_path / "cut") if "step" in r]
    assert steps == sorted(set(steps)) == list(range(1, 7))
    with pytest.raises(common.DataError, match="other settings.*lr"):  # a resume with other settings
        run(tiny, data, tmp_path / "cut", *common_flags, "--resume", "--lr", "5e-4")
    with pytest.raises(common.DataError, match="finished run"):  # a finished run is not overwritten
        run(tiny, data, tmp_path / "full", *common_flags)


def test_sigkill_then_resume_equals_uninterrupted_run(tiny, tmp_path):
    data = write_data(tmp_path / "d.jsonl", 16)
    flags = ["--model", tiny, "--data", data, "--max-samples", "0", "--epochs", "2", "--global-batch", "2",
             "--save-every", "3", "--lr", "1e-3"]
    subprocess.run([sys.executable, "sft.py", *flags, "--out", str(tmp_path / "full")], cwd=ROOT, check=True,
                   capture_output=True)
    proc = subprocess.Popen([sys.executable, "sft.py", *flags, "--out", str(tmp_path / "cut")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "cut" / "ckpt_000006").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "DONE").exists(), "the run finished before it could be killed"
    subprocess.run([sys.executable, "sft.py", *flags, "--out", str(tmp_path / "cut"), "--resume"], cwd=ROOT,
                   check=True, capture_output=True)
    assert same_weights(tmp_path / "full", tmp_path / "cut")


# ------------------------------------------------------------------------------ bad input

BAD = {
    "malformed JSON": ('{"persona": {}, "question": "q", "response": ', ":2: malformed JSON"),
    "no assistant turn": ('{"messages": [{"role": "user", "content": "hi"}]}', ":2: no assistant turn"),
    "empty answer": ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}',
                     ":2: messages[1] is an empty assistant turn"),
    "bad role": ('{"messages": [{"role": "robot", "content": "hi"}]}', ":2: messages[0] needs a role"),
    "persona as a number": ('{"persona": 7, "question": "q", "response": "a"}', ":2: field 'persona' should be"),
    "missing response": ('{"persona": {}, "question": "q"}', ":2: field 'response' is missing"),
    "neither": ('{"text": "hello"}', ":2: neither 'messages' nor a persona record"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_line_is_a_one_line_error_with_file_and_line(tiny, tmp_path, case):
    line, expect = BAD[case]
    good = json.dumps({"persona": PERSONA, "question": "q", "response": "a"})
    data = tmp_path / "d.jsonl"
    data.write_text(good + "\n" + line + "\n" + good + "\n")
    proc = subprocess.run([sys.executable, "sft.py", "--model", tiny, "--data", str(data), "--out",
                           str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and f"{data}{expect}" in proc.stderr and "Traceback" not in proc.stderr
    # --skip-bad: counted and listed, the rest trains
    run(tiny, str(data), tmp_path / "s", "--skip-bad")
    event = metrics(tmp_path / "s")[0]
    assert len(event["skipped"]) == 1 and expect in event["skipped"][0] and event["train_samples"] == 2


@pytest.mark.parametrize("flags", [["--epochs", "0"], ["--global-batch", "0"], ["--lr", "-1"],
                                   ["--warmup-ratio", "1.5"], ["--max-samples", "-2"], ["--token-budget", "0"]])
def test_bad_flags_are_refused_before_anything_loads(flags):
    proc = subprocess.run([sys.executable, "sft.py", *flags], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_data_file_is_a_one_line_error(tiny, tmp_path):
    proc = subprocess.run([sys.executable, "sft.py", "--model", tiny, "--data", str(tmp_path / "nope.jsonl"),
                           "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "nope.jsonl: file not found" in proc.stderr
