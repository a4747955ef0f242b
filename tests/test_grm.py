"""Tests for train_grm.py and the GRM format helpers of common.py (SPEC 1.1).

Run: cd /work/main && python -m pytest -x -q tests/test_grm.py
"""
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import common
from common import GRM_WEIGHTS, format_grm_output, grm_reward, parse_grm_critique, parse_grm_scores

import train_grm

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# 1. parse_grm_scores on real-looking replies (SPEC 1.1: clip to [-5, 5], missing dimension = 0,
#    full-width characters, the '分' unit of the original Chinese format, '+3', no score = None)

H, P, N = "Helpfulness", "Personalization", "Natural"


def S(h, p, n):
    return {H: h, P: p, N: n}


PARSER_TABLE = [
    ("canonical", format_grm_output("Good answer. Edits: cut the intro.", S(3, 2, 1)), S(3, 2, 1)),
    ("canonical negative",
     "<critique>\nOff-topic: the user asked about rent, the answer talks about hiking.\n"
     "1. Delete the hiking paragraph.\n2. Answer the rent question first.\n</critique>\n"
     "<scores>\nHelpfulness: -3\nPersonalization: -2\nNatural: 0\n</scores>", S(-3, -2, 0)),
    ("one line with slashes (SPEC example)",
     "<critique>Fine but long.</critique>\n<scores> Helpfulness: 2 / Personalization: 3 / Natural: 1 </scores>",
     S(2, 3, 1)),
    ("unit character of the original format",
     "<critique>\n回答准确。\n</critique>\n<scores>\nHelpfulness: 3分\nPersonalization: 2分\nNatural: 1分\n</scores>",
     S(3, 2, 1)),
    ("full-width digits, colon and unit",
     "<critique>\n偏离问题。\n</critique>\n<scores>\nHelpfulness：３分\nPersonalization：２分\nNatural：１分\n</scores>",
     S(3, 2, 1)),
    ("full-width minus",
     "<critique>x</critique>\n<scores>\nHelpfulness: －2\nPersonalization: －3分\nNatural: 0\n</scores>",
     S(-2, -3, 0)),
    ("explicit plus sign",
     "<critique>Solid.</critique>\n<scores>\nHelpfulness: +3\nPersonalization: +2\nNatural: +1\n</scores>",
     S(3, 2, 1)),
    ("out of range clipped",
     "<critique>Excellent!!</critique>\n<scores>\nHelpfulness: 7\nPersonalization: 12\nNatural: -9\n</scores>",
     S(5, 5, -5)),
    ("missing Natural counts 0",
     "<critique>ok</critique>\n<scores>\nHelpfulness: 4\nPersonalization: 3\n</scores>", S(4, 3, 0)),
    ("only one dimension",
     "<critique>ok</critique>\n<scores>\nPersonalization: -1\n</scores>", S(0, -1, 0)),
    ("no scores block tags, score lines present",
     "The answer is accurate but ignores the user's diet.\nHelpfulness: 2\nPersonalization: -1\nNatural: 1",
     S(2, -1, 1)),
    ("missing closing scores tag (truncated generation)",
     "<critique>\nToo long for a simple question.\n</critique>\n<scores>\nHelpfulness: 1\nPersonalization: 2\nNatural: -1",
     S(1, 2, -1)),
    ("extra text after the block",
     "<critique>Good.</critique>\n<scores>\nHelpfulness: 3\nPersonalization: 4\nNatural: 2\n</scores>\n"
     "I hope this evaluation helps! Let me know if you need anything else.", S(3, 4, 2)),
    ("chatty preamble before the block",
     "Sure! Here is my evaluation of the response.\n\n<critique>\nClear and specific.\n</critique>\n"
     "<scores>\nHelpfulness: 4\nPersonalization: 3\nNatural: 2\n</scores>", S(4, 3, 2)),
    ("markdown bold keys",
     "<critique>ok</critique>\n<scores>\n**Helpfulness**: 2\n**Personalization**: 1\n**Natural**: 3\n</scores>",
     S(2, 1, 3)),
    ("lower-case keys",
     "<critique>ok</critique>\n<scores>\nhelpfulness: 2\npersonalization: -1\nnatural: 0\n</scores>", S(2, -1, 0)),
    ("critique mentions a dimension with a number: the scores block wins",
     "<critique>\nHelpfulness: 5 would need a worked example; Natural: the name address costs 1.\n"
     "Edits: 1. add an example 2. drop the greeting\n</critique>\n"
     "<scores>\nHelpfulness: 2\nPersonalization: 3\nNatural: -1\n</scores>", S(2, 3, -1)),
    ("'/5' suffix", "<critique>x</critique>\n<scores>\nHelpfulness: 3/5\nPersonalization: 2/5\nNatural: 4/5\n</scores>",
     S(3, 2, 4)),
    ("spaces around colon and extra blank lines",
     "<critique>x</critique>\n\n<scores>\n\n  Helpfulness : 1 \n\n  Personalization :  0\n  Natural :   2  \n\n</scores>",
     S(1, 0, 2)),
    ("empty reply", "", None),
    ("refusal, no scores", "I'm sorry, but I can't evaluate this response.", None),
    ("critique only, cut off before the scores",
     "<critique>\nThe answer is generic and never uses the persona. Edits: 1. mention the user's", None),
    ("scores block without numbers",
     "<critique>x</critique>\n<scores>\nHelpfulness: N/A\nPersonalization: unknown\nNatural: -\n</scores>", None),
    ("degenerate repetition",
     "<critique>\nThe the the the the the the the the the the the the the the the the the the the the", None),
]


@pytest.mark.parametrize("name,reply,expected", PARSER_TABLE, ids=[t[0] for t in PARSER_TABLE])
def test_parse_grm_scores_table(name, reply, expected):
    assert parse_grm_scores(reply) == expected


def test_parser_table_is_big_enough():
    assert len(PARSER_TABLE) >= 20
    assert sum(t[2] is None for t in PARSER_TABLE) >= 4


def test_format_roundtrip_and_critique():
    text = format_grm_output("Cut the summary.\n1. Delete the last paragraph.", S(-1, 4, 2))
    assert parse_grm_scores(text) == S(-1, 4, 2)
    assert "Delete the last paragraph" in parse_grm_critique(text)
    assert "<scores>" not in parse_grm_critique(text)


# ---------------------------------------------------------------------------------------------
# 2. weighted score, tie dropping, BT loss


def test_weighted_score_by_hand():
    assert GRM_WEIGHTS == {H: 0.35, P: 0.40, N: 0.25}
    assert grm_reward(S(3, 2, 1)) == pytest.approx(0.35 * 3 + 0.40 * 2 + 0.25 * 1)  # 2.1
    assert grm_reward(S(5, 5, 5)) == pytest.approx(5.0)
    assert grm_reward(S(-5, -5, -5)) == pytest.approx(-5.0)
    assert grm_reward({H: 4, P: 0, N: 0}) == pytest.approx(1.4)
    assert grm_reward(None) == 0.0  # parse failure -> reward 0


def _ann(pid, side, scores):
    return {"item_id": f"{pid}:{side}", "pair_id": pid, "side": side, "scores": scores}


def test_pair_outcomes_drop_ties_and_failures():
    # weighted: S(3,2,1)=2.1; S(1,3,2)=0.35+1.2+0.5=2.05; S(2,1,3)=0.7+0.4+0.75=1.85
    # tie with different dimensions: S(4,0,0)=1.4 == S(0,0,... ) -> use S(0,1,4)=0.4+1.0=1.4
    anns = {}
    for pid, c, r in [("a", S(3, 2, 1), S(1, 3, 2)),      # chosen wins
                      ("b", S(2, 1, 3), S(3, 2, 1)),      # reject wins (kept: teacher disagrees)
                      ("c", S(4, 0, 0), S(0, 1, 4)),      # weighted tie 1.4 == 1.4 -> dropped
                      ("d", S(2, 2, 2), S(2, 2, 2)),      # identical -> dropped
                      ("e", None, S(1, 1, 1))]:           # parse failure -> dropped
        anns[f"{pid}:chosen"] = _ann(pid, "chosen", c)
        anns[f"{pid}:reject"] = _ann(pid, "reject", r)
    kept, stats = train_grm.pair_outcomes(["a", "b", "c", "d", "e", "f"], anns)
    assert [k["pair_id"] for k in kept] == ["a", "b"]
    assert stats == {"pairs": 6, "kept": 2, "ties": 2, "parse_failures": 1, "missing": 1,
                     "teacher_agrees": 1}


def test_bt_loss_by_hand():
    rc = torch.tensor([1.0, 0.0, -2.0])
    rr = torch.tensor([0.0, 0.0, 1.0])
    # -log sigmoid(d) = log(1 + exp(-d)); d = 1, 0, -3
    hand = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(3))) / 3
    assert train_grm.bt_loss(rc, rr).item() == pytest.approx(hand, rel=1e-6)
    # gradient pushes chosen up, rejected down
    rc = torch.tensor([0.5], requires_grad=True)
    rr = torch.tensor([0.5], requires_grad=True)
    train_grm.bt_loss(rc, rr).backward()
    assert rc.grad.item() == pytest.approx(-0.5) and rr.grad.item() == pytest.approx(0.5)


def test_last_token_values_from_packed():
    values = torch.arange(10, dtype=torch.float32)[None]  # one packed row, T = 10
    cu = torch.tensor([0, 3, 7, 10], dtype=torch.int32)
    assert train_grm.last_token_values(values, cu).tolist() == [2.0, 6.0, 9.0]


def test_pairwise_accuracy_counts_ties_half():
    acc = train_grm.pairwise_accuracy([2.0, 1.0, 0.0, 0.0], [1.0, 2.0, 0.0, -1.0])
    assert acc == pytest.approx((1 + 0 + 0.5 + 1) / 4)


# ---------------------------------------------------------------------------------------------
# 3. annotation: parse, weighted score, ties dropped, resumable


PERSONAS = [
    {"Name": "Ana", "Demographics": {"Age": 31, "Career_Information": "nurse"},
     "Preference": {"Local_Life": {"Food_Drinks": "vegetarian"}}},
    {"Name": "Ben", "Demographics": {"Age": 45, "Career_Information": "carpenter"},
     "Preference": {"Travel": {"Leisure_Travel": "hiking"}}},
]


def make_pairs(n, n_eval=2, tie_every=5):
    """Synthetic pairs: 'GOOD i' beats 'BAD i'; every tie_every-th pair is built to tie."""
    rows = []
    for i in range(n):
        tie = tie_every and i % tie_every == tie_every - 1
        rows.append({"user_id": f"u{i % 2}", "persona": PERSONAS[i % 2], "question": f"Question number {i}?",
                     "chosen": f"{'TIE' if tie else 'GOOD'} answer {i}.", "reject": f"{'TIE' if tie else 'BAD'} reply {i}.",
                     "tier": "easy", "category": "specific", "split": "eval" if i >= n - n_eval else "train"})
    return rows


def fake_teacher_reply(response_text):
    scores = S(3, 3, 2) if "GOOD" in response_text else S(2, 2, 2) if "TIE" in response_text else S(1, -1, 0)
    return f"Sure.\n<critique>\nJudging: {response_text}\n1. Cut the intro.\n</critique>\n" \
           f"<scores>\nHelpfulness: {scores[H]}分\nPersonalization: {scores[P]:+d}\nNatural: {scores[N]}\n</scores>"


def write_pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_lines(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_annotate_resume_in_process(tmp_path):
    pairs_file = write_pairs(tmp_path / "pairs.jsonl", make_pairs(10))
    out = tmp_path / "grm.jsonl"
    args = train_grm.get_args(["--mode", "annotate", "--pairs", str(pairs_file), "--grm-data", str(out),
                               "--concurrency", "1", "--teacher-batch", "1"])
    pairs = train_grm.load_pairs(args.pairs)
    seen = []

    def crashing_judge(items):
        if len(seen) >= 9:
            raise RuntimeError("killed")
        seen.extend(it["item_id"] for it in items)
        return [fake_teacher_reply(it["response"]) for it in items]

    with pytest.raises(RuntimeError):
        train_grm.annotate(args, pairs, out, judge=crashing_judge)
    items_file = Path(str(out) + ".items.jsonl")
    first = [r["item_id"] for r in read_lines(items_file)]
    assert 0 < len(first) < 20 and not out.exists()
    with open(items_file, "a") as f:  # a line torn by the kill
        f.write('{"item_id": "half-writ')
    seen2 = []

    def judge(items):
        seen2.extend(it["item_id"] for it in items)
        return [fake_teacher_reply(it["response"]) for it in items]

    rows, stats = train_grm.annotate(args, pairs, out, judge=judge)
    ids = [r["item_id"] for r in read_lines(items_file)]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 20   # each item exactly once
    assert not set(seen2) & set(first)                          # nothing judged twice
    assert stats["ties"] == 2 and stats["kept"] == 8 and stats["teacher_agrees"] == 8
    assert len(read_lines(out)) == 16 == len(rows)
    r0 = rows[0]
    assert parse_grm_scores(r0["grm_output"]) == r0["scores"] and r0["scores"] in (S(3, 3, 2), S(1, -1, 0))
    assert "<critique>" in r0["grm_output"] and "Sure." not in r0["grm_output"]  # normalised format


class FakeTeacher(BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions that answers like a slow GRM teacher."""
    requests = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        answer = body["messages"][-1]["content"].rsplit("\n", 1)[-1]
        FakeTeacher.requests.append(answer)
        time.sleep(0.05)
        data = json.dumps({"choices": [{"message": {"role": "assistant",
                                                    "content": fake_teacher_reply(answer)}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_annotate_killed_subprocess_resumes(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTeacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        n = 30
        pairs_file = write_pairs(tmp_path / "pairs.jsonl", make_pairs(n))
        out = tmp_path / "grm.jsonl"
        items_file = Path(str(out) + ".items.jsonl")
        cmd = [sys.executable, str(REPO / "train_grm.py"), "--mode", "annotate", "--teacher", "endpoint",
               "--base-url", f"http://127.0.0.1:{server.server_port}/v1", "--teacher-model", "fake",
               "--pairs", str(pairs_file), "--grm-data", str(out), "--concurrency", "2"]
        env = {**os.environ, "OPENAI_API_KEY": ""}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and (not items_file.exists() or len(items_file.read_text().splitlines()) < 2 * n // 3):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # kill -9 half-way
        proc.wait()
        before = {r["item_id"]: r for r in read_lines(items_file)}
        assert 0 < len(before) < 2 * n and not out.exists()
        done_answers = {f"{'GOOD' if r['side'] == 'chosen' else 'BAD'}" for r in before.values()}
        assert done_answers
        FakeTeacher.requests = []
        subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ids = [r["item_id"] for r in read_lines(items_file)]
        assert len(ids) == 2 * n and len(set(ids)) == 2 * n      # every item exactly once
        assert len(FakeTeacher.requests) == 2 * n - len(before)  # finished items are not asked again
        rows = read_lines(out)
        assert len(rows) == 2 * (n - n // 5)                       # tied pairs dropped
        assert {r["split"] for r in rows} == {"train", "eval"}
    finally:
        server.shutdown()


def test_load_pairs_personafeedback_layout(tmp_path):
    pdir = tmp_path / "personas"
    pdir.mkdir()
    (pdir / "u0.json").write_text(json.dumps(PERSONAS[0]))
    f = tmp_path / "general_easy.jsonl"
    f.write_text(json.dumps({"user_id": "u0", "question": "q?", "chosen": "a", "reject": "b"}) + "\n")
    (p,) = train_grm.load_pairs([str(f)], persona_dir=str(pdir))
    assert p["persona"] == PERSONAS[0] and p["tier"] == "easy" and p["split"] in ("train", "eval")
    with pytest.raises(common.DataError, match="persona"):
        train_grm.load_pairs([str(f)])


# ---------------------------------------------------------------------------------------------
# 4. tiny training runs: the loss goes down and the saved model loads


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = common.Transformer(common.ModelConfig.from_hf(common.tiny_config()))
    common.save_model(model, common.load_tokenizer(common.DEFAULT_MODEL), folder)
    return folder


def _grm_rows(pairs):
    rows = []
    for p in pairs:
        for side in ("chosen", "reject"):
            scores = S(3, 3, 2) if side == "chosen" else S(1, -1, 0)
            rows.append({"persona": p["persona"], "question": p["question"], "response": p[side],
                         "critique": "Cut the intro.", "scores": scores,
                         "grm_output": format_grm_output("Cut the intro.", scores), "split": p["split"]})
    return rows


def test_tiny_grm_training_lowers_loss_and_loads(tmp_path, tiny_model_dir):
    pairs = make_pairs(3, n_eval=1, tie_every=0)  # 4 train documents, 2 eval-loss documents
    pairs_file = write_pairs(tmp_path / "pairs.jsonl", pairs)
    grm_file = write_pairs(tmp_path / "grm.jsonl", _grm_rows(pairs))
    out = tmp_path / "grm_out"
    train_grm.main(["--model", str(tiny_model_dir), "--pairs", str(pairs_file), "--grm-data", str(grm_file),
                    "--out", str(out), "--max-train", "0", "--epochs", "4", "--global-batch", "2",
                    "--lr", "3e-3", "--warmup-ratio", "0", "--freeze-layers", "0", "--eval-pairs", "1",
                    "--eval-max-new-tokens", "4", "--eval-dtype", "bfloat16"])
    log = [r for r in read_lines(out / "metrics.jsonl") if "loss" in r and "step" in r]
    assert len(log) == 8
    assert log[-1]["loss"] + log[-2]["loss"] < 0.7 * (log[0]["loss"] + log[1]["loss"])
    m = json.loads((out / "heldout_metrics.json").read_text())
    assert m["eval_pairs"] == 1 and 0.0 <= m["pairwise_acc"] <= 1.0 and 0.0 <= m["parse_fail_rate"] <= 1.0
    model, tok = common.load_model(str(out))
    assert isinstance(model, common.Transformer) and model.value_head is None
    # the held-out replies were written in bf16 (--eval-dtype), after the fp32 weights were saved
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float32}


def test_tiny_bt_training_lowers_loss_loads_and_resumes(tmp_path, tiny_model_dir):
    # BT pairs: the chosen answer is the longer one, a pattern a tiny model learns fast
    pairs = [dict(p, chosen=p["chosen"] + " It explains the details carefully, step by step.")
             for p in make_pairs(10, n_eval=2, tie_every=0)]
    pairs_file = write_pairs(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "bt_out"
    flags = ["--mode", "bt", "--model", str(tiny_model_dir), "--pairs", str(pairs_file), "--out", str(out),
             "--max-train", "0", "--epochs", "5", "--global-batch", "4", "--lr", "3e-3",
             "--warmup-ratio", "0", "--freeze-layers", "1", "--save-every", "4"]
    train_grm.main(flags + ["--stop-at-step", "6"])       # "killed" after step 6, checkpoint at 4
    assert (out / "ckpt_000004").is_dir() and not (out / "config.json").exists()
    metrics = train_grm.main(flags + ["--resume"])
    log = [r for r in read_lines(out / "metrics.jsonl") if "loss" in r and "step" in r]
    assert [r["step"] for r in log] == list(range(1, 7)) + list(range(5, 11))  # resumed at step 4
    assert log[4]["loss"] == pytest.approx(log[6]["loss"], rel=1e-4)  # step 5 replayed exactly
    assert log[-1]["loss"] + log[-2]["loss"] < 0.8 * (log[0]["loss"] + log[1]["loss"])
    assert metrics["eval_pairs"] == 2 and metrics["pairwise_acc"] == 1.0
    model, tok = common.load_model(str(out), value_head=True)
    assert model.value_head is not None and model.value_head.weight.abs().sum() > 0


def _expected_scores_reference(model, tok, prompt, reply):
    """Slow and obvious: for each dimension, find the score's first token by re-decoding prefixes,
    run the model on the prefix alone for the sign/space distribution and on prefix + the written
    sign for the digit distribution, then apply grm_expected_scores' rule by hand."""
    kinds = common._grm_value_tokens(tok)  # which tokens are signs or digits: a definition, not the math under test

    def next_probs(ids):
        with torch.no_grad():
            return torch.softmax(model(torch.tensor([ids]))[0, -1].float(), -1)

    text = tok.decode(reply)
    block = text.rindex("<scores>") + len("<scores>")
    out = {}
    for name in GRM_WEIGHTS:
        colon = text.index(name + ":", block) + len(name + ":")
        j = next(i for i in range(len(reply)) if len(tok.decode(reply[:i])) >= colon and reply[i] in kinds)
        p = next_probs(prompt + reply[:j])
        mass = {"+": 0.0, "-": 0.0}
        direct = 0.0
        for i, k in kinds.items():
            if isinstance(k, str):
                mass[k] += float(p[i])
            else:
                direct += float(p[i]) * min(k, 5)
        total = mass["+"] + mass["-"] + sum(float(p[i]) for i, k in kinds.items() if not isinstance(k, str))
        q = next_probs(prompt + reply[:j + 1])
        digit_mass = sum(float(q[i]) for i, k in kinds.items() if not isinstance(k, str))
        e_digit = sum(float(q[i]) * min(k, 5) for i, k in kinds.items() if not isinstance(k, str)) / digit_mass
        taken = kinds[reply[j]]
        e_plus = e_digit if taken == "+" else 0.0
        e_minus = -e_digit if taken == "-" else -1.0
        out[name] = (mass["+"] * e_plus + mass["-"] * e_minus + direct) / total
    return out


def test_expected_scores_match_a_slow_reference(smollm2):
    model, tok = smollm2
    prompt = common.chat_prompt_ids(tok, common.grm_messages({"Name": "Ana"}, "What should I cook?",
                                                             "Pasta with tomatoes."))
    for scores in ({"Helpfulness": 2, "Personalization": -1, "Natural": 3},
                   {"Helpfulness": -4, "Personalization": 0, "Natural": 1}):
        reply = tok(format_grm_output("It answers the question in part.", scores))["input_ids"]
        got = common.grm_expected_scores(model, tok, prompt, reply)
        ref = _expected_scores_reference(model, tok, prompt, reply)
        for name in GRM_WEIGHTS:
            assert abs(got[name] - ref[name]) < 1e-4, (name, got, ref)
            assert -5 <= got[name] <= 5
    assert common.grm_expected_scores(model, tok, prompt, tok("no scores here")["input_ids"]) is None


def test_engine_watched_probs_give_the_same_expected_scores(smollm2):
    """generate(watch_ids=grm_watch_ids) records the probabilities grm_expected_scores needs while it
    decodes; scoring from them (no second forward) equals the teacher-forced forward, on a planted
    GRM reply (greedy decoding forced onto it by a prompt that ends just before it) and on the
    engine's own greedy continuation."""
    model, tok = smollm2
    watch = common.grm_watch_ids(tok)
    prompt = common.chat_prompt_ids(tok, common.grm_messages({"Name": "Ana"}, "What should I cook?", "Pasta."))
    gen = common.generate(model, [prompt], 24, temperature=0.0, watch_ids=watch)
    reply = gen.tokens[0]
    with torch.no_grad():
        forced = torch.softmax(model(torch.tensor([prompt + reply]))[0, len(prompt) - 1:-1].float(), -1)[:, watch]
    assert gen.watched[0].shape == (len(reply), len(watch))
    assert torch.allclose(gen.watched[0], forced, atol=1e-4)
    scored = tok(format_grm_output("It answers the question in part.",
                                   {"Helpfulness": 2, "Personalization": -1, "Natural": 3}))["input_ids"]
    with torch.no_grad():
        watched = torch.softmax(model(torch.tensor([prompt + scored]))[0, len(prompt) - 1:-1].float(), -1)[:, watch]
    a = common.grm_expected_scores(model, tok, prompt, scored)
    b = common.grm_expected_scores(None, tok, prompt, scored, watched=watched)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)
