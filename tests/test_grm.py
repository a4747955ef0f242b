"""Tests for train_grm.py (annotate, bt) and the GRM format helpers of common.py (SPEC 1.1).

Run: cd /work/main && python -m pytest -x -q tests/test_grm.py
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
from common import GRM_WEIGHTS, format_grm_output, grm_reward, parse_grm_critique, parse_grm_scores

import train_grm

REPO = Path(__file__).resolve().parents[1]
H, P, N = "Helpfulness", "Personalization", "Natural"


def S(h, p, n):
    return {H: h, P: p, N: n}


# ---------------------------------------------------------------------------------------------
# 1. parse_grm_scores on real-looking replies (SPEC 1.1: read only inside <scores>, clip to
#    [-5, 5], a missing dimension = 0, full-width characters, '分', '+3', no score = None)

PARSER_TABLE = [
    ("canonical", format_grm_output("Good answer. Edits: cut the intro.", S(3, 2, 1)), S(3, 2, 1)),
    ("canonical negative",
     "<critique>\nOff-topic.\n1. Delete the hiking paragraph.\n</critique>\n"
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
    ("full-width minus", "<critique>x</critique>\n<scores>\nHelpfulness: －2\nPersonalization: －3分\nNatural: 0\n</scores>",
     S(-2, -3, 0)),
    ("explicit plus sign", "<critique>ok</critique>\n<scores>\nHelpfulness: +3\nPersonalization: +2\nNatural: +1\n</scores>",
     S(3, 2, 1)),
    ("out of range clipped", "<critique>!!</critique>\n<scores>\nHelpfulness: 7\nPersonalization: 12\nNatural: -9\n</scores>",
     S(5, 5, -5)),
    ("missing Natural counts 0", "<critique>ok</critique>\n<scores>\nHelpfulness: 4\nPersonalization: 3\n</scores>",
     S(4, 3, 0)),
    ("only one dimension", "<critique>ok</critique>\n<scores>\nPersonalization: -1\n</scores>", S(0, -1, 0)),
    ("missing closing scores tag (truncated generation)",
     "<critique>\nToo long.\n</critique>\n<scores>\nHelpfulness: 1\nPersonalization: 2\nNatural: -1", S(1, 2, -1)),
    ("extra text after the block",
     "<critique>Good.</critique>\n<scores>\nHelpfulness: 3\nPersonalization: 4\nNatural: 2\n</scores>\nHope this helps!",
     S(3, 4, 2)),
    ("chatty preamble", "Sure!\n\n<critique>\nClear.\n</critique>\n<scores>\nHelpfulness: 4\nPersonalization: 3\n"
     "Natural: 2\n</scores>", S(4, 3, 2)),
    ("markdown bold keys",
     "<critique>ok</critique>\n<scores>\n**Helpfulness**: 2\n**Personalization**: 1\n**Natural**: 3\n</scores>", S(2, 1, 3)),
    ("lower-case keys", "<critique>ok</critique>\n<scores>\nhelpfulness: 2\npersonalization: -1\nnatural: 0\n</scores>",
     S(2, -1, 0)),
    ("critique mentions a dimension with a number: the scores block wins",
     "<critique>\nHelpfulness: 5 would need an example; Natural: the name costs 1.\n</critique>\n"
     "<scores>\nHelpfulness: 2\nPersonalization: 3\nNatural: -1\n</scores>", S(2, 3, -1)),
    ("'/5' suffix", "<critique>x</critique>\n<scores>\nHelpfulness: 3/5\nPersonalization: 2/5\nNatural: 4/5\n</scores>",
     S(3, 2, 4)),
    ("spaces around colon, blank lines",
     "<critique>x</critique>\n\n<scores>\n\n  Helpfulness : 1 \n\n  Personalization :  0\n  Natural :   2  \n</scores>",
     S(1, 0, 2)),
    ("score lines without a scores block", "Accurate.\nHelpfulness: 2\nPersonalization: -1\nNatural: 1", None),
    ("critique cut off before the scores, numbers inside",
     "<critique>\nHelpfulness: 4 at best; the answer never uses the persona. Edits: 1. mention the", None),
    ("empty reply", "", None),
    ("refusal, no scores", "I'm sorry, but I can't evaluate this response.", None),
    ("scores block without numbers",
     "<critique>x</critique>\n<scores>\nHelpfulness: N/A\nPersonalization: unknown\nNatural: -\n</scores>", None),
]


@pytest.mark.parametrize("name,reply,expected", PARSER_TABLE, ids=[t[0] for t in PARSER_TABLE])
def test_parse_grm_scores_table(name, reply, expected):
    assert parse_grm_scores(reply) == expected


def test_format_roundtrip_critique_and_weighted_score():
    text = format_grm_output("Cut the summary.\n1. Delete the last paragraph.", S(-1, 4, 2))
    assert parse_grm_scores(text) == S(-1, 4, 2)
    assert "Delete the last paragraph" in parse_grm_critique(text) and "<scores>" not in parse_grm_critique(text)
    assert GRM_WEIGHTS == {H: 0.35, P: 0.40, N: 0.25}
    assert grm_reward(S(3, 2, 1)) == pytest.approx(0.35 * 3 + 0.40 * 2 + 0.25 * 1)
    assert grm_reward(S(5, 5, 5)) == pytest.approx(5.0) and grm_reward(S(-5, -5, -5)) == pytest.approx(-5.0)
    with pytest.raises(ValueError):
        grm_reward(None)  # a parse failure is counted, never a reward


# ---------------------------------------------------------------------------------------------
# 2. pairs, tie dropping, data errors

PERSONAS = [{"Name": "Ana", "Demographics": {"Age": 31, "Career_Information": "nurse"},
             "Preference": {"Local_Life": {"Food_Drinks": "vegetarian"}}},
            {"Name": "Ben", "Demographics": {"Age": 45, "Career_Information": "carpenter"},
             "Preference": {"Travel": {"Leisure_Travel": "hiking"}}}]


def make_pairs(n, n_eval=2, tie_every=5):
    """Synthetic pairs: 'GOOD i' beats 'BAD i'; every tie_every-th pair is built to tie."""
    rows = []
    for i in range(n):
        tie = tie_every and i % tie_every == tie_every - 1
        rows.append({"user_id": f"u{i % 2}", "persona": PERSONAS[i % 2], "question": f"Question number {i}?",
                     "chosen": f"{'TIE' if tie else 'GOOD'} answer {i}.", "reject": f"{'TIE' if tie else 'BAD'} reply {i}.",
                     "tier": "easy", "split": "eval" if i >= n - n_eval else "train"})
    return rows


def fake_teacher_reply(response):
    scores = S(3, 3, 2) if "GOOD" in response else S(2, 2, 2) if "TIE" in response else S(1, -1, 0)
    return (f"Sure.\n<critique>\nJudging: {response}\n1. Cut the intro.\n</critique>\n<scores>\n"
            f"Helpfulness: {scores[H]}分\nPersonalization: {scores[P]:+d}\nNatural: {scores[N]}\n</scores>")


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_pair_outcomes_drop_ties_and_count_unjudged():
    # weighted: S(3,2,1)=2.1, S(1,3,2)=2.05, S(2,1,3)=1.85; S(4,0,0)=1.4=S(0,1,4)
    done = {}
    for pid, c, r in [("a", S(3, 2, 1), S(1, 3, 2)), ("b", S(2, 1, 3), S(3, 2, 1)),
                      ("c", S(4, 0, 0), S(0, 1, 4)), ("d", S(2, 2, 2), S(2, 2, 2)), ("e", S(1, 1, 1), None)]:
        done[f"{pid}:chosen"] = {"scores": c}
        if r is not None:
            done[f"{pid}:reject"] = {"scores": r}
    kept, stats = train_grm.pair_outcomes(["a", "b", "c", "d", "e", "f"], done)
    assert kept == ["a", "b"]
    assert stats == {"pairs": 6, "kept": 2, "ties": 2, "unjudged": 2, "teacher_agrees": 1}


def test_load_pairs_layouts_and_errors(tmp_path):
    pdir = tmp_path / "personas"
    pdir.mkdir()
    (pdir / "u0.json").write_text(json.dumps(PERSONAS[0]))
    pf = write_rows(tmp_path / "general_easy.jsonl", [{"user_id": "u0", "question": "q?", "chosen": "a", "reject": "b"}])
    (p,), skipped = train_grm.load_pairs([str(pf)], persona_dir=str(pdir))
    assert p["persona"] == PERSONAS[0] and p["tier"] == "easy" and p["split"] in ("train", "eval") and not skipped
    with pytest.raises(common.DataError, match="general_easy.jsonl:1: no 'persona' field"):
        train_grm.load_pairs([str(pf)])
    base = {"question": "q?", "chosen": "a", "reject": "b"}
    as_string = write_rows(tmp_path / "s.jsonl", [dict(base, persona=json.dumps(PERSONAS[1]))])
    assert train_grm.load_pairs([str(as_string)])[0][0]["persona"] == PERSONAS[1]  # a JSON string is parsed
    number = write_rows(tmp_path / "number.jsonl", [dict(base, persona=PERSONAS[0]), dict(base, persona=42)])
    with pytest.raises(common.DataError, match=r"number.jsonl:2: field 'persona' should be dict or str, got int"):
        train_grm.load_pairs([str(number)])
    bad = write_rows(tmp_path / "bad.jsonl", [dict(base, persona=PERSONAS[0]), dict(base, persona=42),
                                               "{not json", dict(base, persona=PERSONAS[0], chosen=""),
                                               dict(base, persona=PERSONAS[1])])
    with pytest.raises(common.DataError, match=r"bad.jsonl:3: malformed JSON"):
        train_grm.load_pairs([str(bad)])
    pairs, skipped = train_grm.load_pairs([str(bad)], skip_bad=True)
    assert len(pairs) == 2 and len(skipped) == 3
    assert [s.split(": ")[0] for s in skipped] == [f"{bad}:3", f"{bad}:2", f"{bad}:4"]  # JSON first, then fields
    with pytest.raises(common.DataError, match="no pairs"):
        train_grm.load_pairs([str(write_rows(tmp_path / "empty.jsonl", []))])


@pytest.mark.parametrize("flags,message", [
    (["--eval-pct", "150"], "--eval-pct 150.0 must be in [0, 100]"),
    (["--concurrency", "0"], "--concurrency 0 must be >= 1"),
    (["--timeout", "0"], "--timeout 0.0 must be > 0"),
    (["--timeout", "nan"], "--timeout nan must be > 0"),
    (["--retries", "-1"], "--retries -1 must be >= 0"),
    (["--backoff", "-0.5"], "--backoff -0.5 must be >= 0"),
    (["--teacher-max-tokens", "0"], "--teacher-max-tokens 0 must be >= 1"),
    (["--teacher-batch", "0"], "--teacher-batch 0 must be >= 1"),
    (["--max-train", "-1"], "--max-train -1 must be >= 0"),
    (["--max-len", "2049"], "--token-budget 4096 must be >= 2 x --max-len (4098)"),
    (["--global-batch", "0"], "--global-batch 0 must be >= 1"),
    (["--epochs", "0"], "--epochs 0 must be >= 1"),
    (["--lr", "inf"], "--lr inf must be > 0"),
    (["--lr", "0"], "--lr 0.0 must be > 0"),
    (["--warmup-ratio", "1"], "--warmup-ratio 1.0 must be in [0, 1)"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio 2.0 must be in [0, 1]"),
    (["--grad-clip", "0"], "--grad-clip 0.0 must be > 0"),
    (["--freeze-layers", "-2"], "--freeze-layers -2 must be >= 0"),
    (["--save-every", "-1"], "--save-every -1 must be >= 0"),
    (["--pairs", "/nonexistent/pairs.jsonl"], "--pairs /nonexistent/pairs.jsonl: file not found"),
    (["--persona-dir", "/nonexistent"], "--persona-dir /nonexistent: folder not found"),
    (["--mode", "grm"], "python sft.py --data out/grm_data.jsonl --out out/grm"),
    (["--precision", "fp16"], "invalid choice"),
    (["--epochs", "x"], "invalid int value"),
])
def test_bad_flags_are_refused_before_anything_loads(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_grm.get_args(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 3. annotate: parse, ties dropped, resumable, failed replies retried, exit codes


def annotate_args(pairs_file, out, *extra):
    return train_grm.get_args(["--pairs", str(pairs_file), "--grm-data", str(out), "--teacher-batch", "1", *extra])


def test_annotate_resume_after_a_crash_and_a_torn_line(tmp_path):
    pairs_file = write_rows(tmp_path / "pairs.jsonl", make_pairs(10))
    out = tmp_path / "grm.jsonl"
    args = annotate_args(pairs_file, out)
    pairs, _ = train_grm.load_pairs(args.pairs)
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
    assert len(first) == 9 and not out.exists()
    with open(items_file, "a") as f:
        f.write('{"item_id": "half-writ')  # a line torn by the kill
    seen2 = []

    def judge(items):
        seen2.extend(it["item_id"] for it in items)
        return [fake_teacher_reply(it["response"]) for it in items]

    rows, stats = train_grm.annotate(args, pairs, out, judge=judge)
    ids = [r["item_id"] for r in read_lines(items_file)]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 20 and not set(seen2) & set(first)
    assert stats["ties"] == 2 and stats["kept"] == 8 and stats["teacher_agrees"] == 8 and stats["unjudged"] == 0
    assert read_lines(out) == rows and len(rows) == 16
    r0 = rows[0]
    assert set(r0) == {"pair_id", "side", "user_id", "persona", "question", "response", "critique", "scores",
                       "grm_output", "split"}
    assert parse_grm_scores(r0["grm_output"]) == r0["scores"] and r0["scores"] in (S(3, 3, 2), S(1, -1, 0))
    assert r0["grm_output"].startswith("<critique>") and "Sure." not in r0["grm_output"]  # normalised format
    assert {r["split"] for r in rows} == {"train", "eval"}


def test_annotate_moves_train_rows_that_a_held_out_pair_holds(tmp_path):
    pairs = make_pairs(4, n_eval=1, tie_every=0)
    pairs[0]["reject"] = pairs[3]["reject"] = "BAD shared."  # the same question + answer in both splits
    pairs[0]["question"] = pairs[3]["question"]
    pairs_file = write_rows(tmp_path / "pairs.jsonl", pairs)
    args = annotate_args(pairs_file, tmp_path / "grm.jsonl")
    rows, stats = train_grm.annotate(args, train_grm.load_pairs(args.pairs)[0], args.grm_data,
                                     judge=lambda items: [fake_teacher_reply(it["response"]) for it in items])
    assert stats["held_out_overlap"] == 1
    assert [r["split"] for r in rows if r["response"] == "BAD shared."] == ["eval", "eval"]


class FakeTeacher:
    """An OpenAI-compatible /chat/completions; the answer being judged picks the failure:
    FLAKY: HTTP 500 once, then fine; DENY: 401; GARBLED: a body that is not JSON; NOSCORES: a
    reply without scores; SLOW: answers after the client's timeout. healed: all answer well."""
    requests, flaky_seen, healed, keys = [], set(), False, set()

    @classmethod
    def respond(cls, request):
        answer = request["body"]["messages"][-1]["content"].rsplit("\n", 1)[-1]
        cls.requests.append(answer)
        cls.keys.add(request["auth"])
        status, text = 200, fake_teacher_reply(answer)
        if not cls.healed and "FLAKY" in answer and answer not in cls.flaky_seen:
            cls.flaky_seen.add(answer)
            status = 500
        elif not cls.healed and "DENY" in answer:
            status = 401
        elif "SLOWISH" in answer:  # a teacher that takes a moment (the kill test)
            time.sleep(0.03)
        elif not cls.healed and "SLOW" in answer:
            time.sleep(1.0)
        elif not cls.healed and "NOSCORES" in answer:
            text = "<critique>Fine.</critique>"
        if not cls.healed and "GARBLED" in answer:
            return status, b"{oops"
        return status, {"choices": [{"message": {"role": "assistant", "content": text}}]}


@pytest.fixture
def fake_teacher(loopback):
    FakeTeacher.requests, FakeTeacher.flaky_seen, FakeTeacher.healed, FakeTeacher.keys = [], set(), False, set()
    return loopback(FakeTeacher.respond).url


def test_annotate_endpoint_failures_are_counted_and_retried_by_a_rerun(tmp_path, fake_teacher, monkeypatch):
    pairs = make_pairs(6, n_eval=1, tie_every=0)
    for i, (side, tag) in enumerate([("chosen", "FLAKY"), ("chosen", "DENY"), ("reject", "GARBLED"),
                                     ("chosen", "NOSCORES"), ("reject", "SLOW")], start=1):
        pairs[i][side] = f"{tag} {pairs[i][side]}"
    pairs_file = write_rows(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "grm.jsonl"
    monkeypatch.setenv("FAKE_KEY", "sk-test")
    flags = ["--pairs", str(pairs_file), "--grm-data", str(out), "--teacher", "endpoint", "--base-url", fake_teacher,
             "--teacher-model", "fake", "--api-key-env", "FAKE_KEY", "--timeout", "0.3", "--retries", "1",
             "--backoff", "0", "--concurrency", "4"]
    args = train_grm.get_args(flags)
    rows, stats = train_grm.annotate(args, train_grm.load_pairs(args.pairs)[0], out)
    assert stats == {"pairs": 6, "kept": 2, "ties": 0, "unjudged": 4, "teacher_agrees": 2, "failed_calls": 3,
                     "unparseable": 1, "held_out_overlap": 0}
    assert FakeTeacher.keys == {"Bearer sk-test"}
    n_asked = len(FakeTeacher.requests)  # 12 answers, +1 retry of FLAKY, of GARBLED and of SLOW; DENY not retried
    assert n_asked == 15
    recorded = {r["item_id"] for r in read_lines(Path(str(out) + ".items.jsonl"))}
    assert len(recorded) == 12 - 4 and len(read_lines(out)) == 4  # failures are not recorded as done

    with pytest.raises(SystemExit) as e:  # the same through main: exit code 1, one line
        train_grm.main(flags)
    assert isinstance(e.value.code, str) and "4 of 6 pairs unjudged (3 failed teacher calls, 1 replies" in e.value.code
    FakeTeacher.requests, FakeTeacher.healed = [], True
    stats = train_grm.main(flags)
    assert stats["unjudged"] == 0 and stats["kept"] == 6 and len(read_lines(out)) == 12
    assert sorted(FakeTeacher.requests) == sorted(r for p in pairs for r in (p["chosen"], p["reject"])
                                                  if any(t in r for t in ("DENY", "GARBLED", "NOSCORES", "SLOW")))


def run_script(*flags, env=None):
    return subprocess.run([sys.executable, str(REPO / "train_grm.py"), *flags], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=120)


def test_exit_codes_through_main_guard(tmp_path, fake_teacher):
    denied = write_rows(tmp_path / "pairs.jsonl", [dict(p, chosen="DENY " + p["chosen"]) for p in make_pairs(2)])
    res = run_script("--pairs", str(denied), "--grm-data", str(tmp_path / "g.jsonl"), "--teacher", "endpoint",
                     "--base-url", fake_teacher, "--retries", "0")
    assert res.returncode == 1 and "2 of 2 pairs unjudged (2 failed teacher calls" in res.stderr.splitlines()[-1]
    assert "HTTP 401" in res.stdout and not (tmp_path / "g.jsonl").exists()
    bad = write_rows(tmp_path / "bad.jsonl", [{"question": "q", "chosen": "a", "reject": "b", "persona": 7}])
    res = run_script("--pairs", str(bad), "--grm-data", str(tmp_path / "h.jsonl"))
    assert res.returncode == 2 and res.stderr.strip() == (f"error: {bad}:1: field 'persona' should be dict or str, "
                                                          f"got int (7)")
    ties = write_rows(tmp_path / "ties.jsonl", [dict(p, chosen=p["reject"] + " ") for p in make_pairs(2)])
    with pytest.raises(common.DataError, match="no GRM rows: all 2 pairs tie"):  # main_guard: exit code 2
        train_grm.main(["--pairs", str(ties), "--grm-data", str(tmp_path / "t.jsonl")])  # the rubric teacher


def test_annotate_killed_subprocess_resumes(tmp_path, fake_teacher):
    n = 30
    pairs_file = write_rows(tmp_path / "pairs.jsonl", [dict(p, chosen=p["chosen"] + " SLOWISH") for p in make_pairs(n)])
    out = tmp_path / "grm.jsonl"
    items_file = Path(str(out) + ".items.jsonl")
    cmd = [sys.executable, str(REPO / "train_grm.py"), "--teacher", "endpoint", "--base-url", fake_teacher,
           "--pairs", str(pairs_file), "--grm-data", str(out), "--concurrency", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and (not items_file.exists() or len(items_file.read_text().splitlines()) < 8):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # kill -9 part-way
    proc.wait()
    before = {r["item_id"] for r in read_lines(items_file)}
    assert 0 < len(before) < 2 * n and not out.exists()
    FakeTeacher.requests = []
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ids = [r["item_id"] for r in read_lines(items_file)]
    assert len(ids) == 2 * n == len(set(ids))                 # every item exactly once
    assert len(FakeTeacher.requests) == 2 * n - len(before)   # finished items are not asked again
    assert len(read_lines(out)) == 2 * (n - n // 5)           # tied pairs dropped


# ---------------------------------------------------------------------------------------------
# 4. bt: the loss against a slow reference, token-bounded micro-batches, kill + resume

TINY = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "max_position_embeddings": 2048}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = common.Transformer(common.ModelConfig.from_hf(TINY))
    common.save_model(model, common.load_tokenizer(common.DEFAULT_MODEL), folder)
    return folder


def test_bt_loss_by_hand():
    rc, rr = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0])
    hand = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(3))) / 3  # log(1 + e^-d)
    assert train_grm.bt_loss(rc, rr).item() == pytest.approx(hand, rel=1e-6)
    rc, rr = torch.tensor([0.5], requires_grad=True), torch.tensor([0.5], requires_grad=True)
    train_grm.bt_loss(rc, rr).backward()
    assert rc.grad.item() == pytest.approx(-0.5) and rr.grad.item() == pytest.approx(0.5)
    assert train_grm.pairwise_accuracy([2.0, 1.0, 0.0, 0.0], [1.0, 2.0, 0.0, -1.0]) == pytest.approx(2.5 / 4)


def test_bt_packed_loss_and_gradients_match_a_slow_reference(tiny_model_dir):
    model, tok = common.load_model(str(tiny_model_dir), value_head=True)
    torch.manual_seed(1)
    with torch.no_grad():
        model.value_head.weight.normal_()
    pairs = make_pairs(3, tie_every=0)
    seqs = [common.response_ids(tok, p["persona"], p["question"], p[s]) for p in pairs for s in ("chosen", "reject")]
    r = common.last_token_values(model, seqs)  # packed, the shared prompts stored once
    loss = train_grm.bt_loss(r[0::2], r[1::2])
    loss.backward()
    fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # slow: one sequence at a time, the value at its last token, the loss written out
    slow_r = [model.values(torch.tensor([s]))[0, -1] for s in seqs]
    slow = sum(torch.log1p(torch.exp(-(slow_r[2 * i] - slow_r[2 * i + 1]))) for i in range(3)) / 3
    slow.backward()
    assert torch.allclose(r, torch.stack(slow_r), atol=1e-5) and loss.item() == pytest.approx(slow.item(), abs=1e-6)
    for a, p in zip(fast, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def bt_flags(pairs_file, out, model_dir, *extra):
    return ["--mode", "bt", "--model", str(model_dir), "--pairs", str(pairs_file), "--out", str(out),
            "--max-train", "0", "--epochs", "5", "--global-batch", "4", "--lr", "3e-2", "--warmup-ratio", "0",
            "--freeze-layers", "1", "--save-every", "4", "--max-len", "256", "--token-budget", "4096", *extra]


def bt_losses(out):
    return [r["loss"] for r in read_lines(out / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def bt_pairs(tmp_path_factory):
    # the chosen answer is the longer one, a pattern a tiny model learns fast
    pairs = [dict(p, chosen=p["chosen"] + " It explains the details carefully, step by step.")
             for p in make_pairs(10, n_eval=2, tie_every=0)]
    return write_rows(tmp_path_factory.mktemp("bt") / "pairs.jsonl", pairs)


def test_bt_resume_after_kill_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, bt_pairs):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    m_whole = train_grm.main(bt_flags(bt_pairs, whole, tiny_model_dir))
    assert (whole / "DONE").exists() and (whole / "heldout_metrics.json").exists()
    losses = bt_losses(whole)
    assert len(losses) == 10 and losses[-1] + losses[-2] < 0.8 * (losses[0] + losses[1])
    assert m_whole["eval_pairs"] == 2 and m_whole["pairwise_acc"] == 1.0

    assert train_grm.main(bt_flags(bt_pairs, killed, tiny_model_dir, "--stop-at-step", "6")) is None
    assert [p.name for p in killed.glob("ckpt_*")] == ["ckpt_000004"] and not (killed / "config.json").exists()
    with pytest.raises(common.DataError, match="lr: 0.03 there, 0.001 now"):  # a resume keeps the settings
        train_grm.main(bt_flags(bt_pairs, killed, tiny_model_dir, "--resume", "--lr", "1e-3"))
    m_killed = train_grm.main(bt_flags(bt_pairs, killed, tiny_model_dir, "--resume"))
    steps = [r["step"] for r in read_lines(killed / "metrics.jsonl") if "step" in r]
    assert steps == list(range(1, 11))  # each step once: 5 and 6 replayed from ckpt_000004
    assert bt_losses(killed) == pytest.approx(losses, rel=1e-5)
    assert m_killed["pairwise_acc"] == m_whole["pairwise_acc"]
    assert m_killed["mean_margin"] == pytest.approx(m_whole["mean_margin"], rel=1e-4)
    a, _ = common.load_model(str(whole), value_head=True)
    b, _ = common.load_model(str(killed), value_head=True)
    assert a.value_head is not None and not hasattr(a, "lm_head") and a.value_head.weight.abs().sum() > 0
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6), name
    with pytest.raises(common.DataError, match="finished run"):  # DONE protects the folder
        train_grm.main(bt_flags(bt_pairs, whole, tiny_model_dir))


def test_bt_under_torchrun_fsdp2_equals_one_process(tmp_path, tiny_model_dir, bt_pairs):
    """One process with the 3 pairs of a step in one pass, against 2 ranks (FSDP2 on gloo) with one
    pair a pass (the pairs are 98-110 tokens a sequence: 220 tokens hold one pair, never two), so
    rank 1 runs an idle pass at weight 0: the step is the exact mean over its pairs either way."""
    steps = ["--max-steps", "3", "--global-batch", "3", "--save-every", "0"]
    train_grm.main(bt_flags(bt_pairs, tmp_path / "one", tiny_model_dir, *steps))
    two = bt_flags(bt_pairs, tmp_path / "two", tiny_model_dir, *steps, "--max-len", "110", "--token-budget", "220")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "train_grm.py"), *two], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert bt_losses(tmp_path / "two") == pytest.approx(bt_losses(tmp_path / "one"), rel=1e-4)
    one, two = (json.loads((tmp_path / d / "heldout_metrics.json").read_text()) for d in ("one", "two"))
    assert two["eval_pairs"] == one["eval_pairs"] == 2 and two["mean_margin"] == pytest.approx(one["mean_margin"], rel=1e-4)
