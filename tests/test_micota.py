"""Tests of distill_micota.py (SPEC 2): answer normalisation, DARE-TIES, filter, eval, loaders, NLL,
the endpoint client, resumable generation, flag checks and the `all` chain (sft.py in a subprocess)
on a tiny random model."""
import copy
import json
import sys
from types import SimpleNamespace

import pytest
import torch

import common
import distill_micota as dm

# ---- normalisation and comparison (SPEC 2.1) -------------------------------------------------

# (prediction, reference, should match)
MATCH_TABLE = [
    ("\\frac{1}{2}", "\\frac12", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("\\tfrac{3}{4}", "\\frac34", True),
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", "\\frac{1}{2}", True),
    ("3/4", "0.75", True),
    ("-\\frac{2}{3}", "-2/3", True),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),  # same rational value
    ("\\frac{1}{3}", "0.333", False),
    ("90^\\circ", "90", True),
    ("90^{\\circ}", "90", True),
    ("90°", "90", True),
    ("45 degrees", "45", True),
    ("5 \\text{ cm}", "5", True),
    ("5\\text{cm}^2", "5", True),
    ("18 dollars", "18", True),
    ("\\$18", "18", True),
    ("\\$18.00", "18", True),
    ("50\\%", "50", True),
    ("50%", "50", True),
    ("27.0", "27", True),
    ("27.00", "27", True),
    ("2.50", "2.5", True),
    ("025", "25", True),
    ("007", "7", True),
    (".5", "0.5", True),
    ("-0", "0", True),
    ("1,000", "1000", True),
    ("1,234,567", "1234567", True),
    ("1,3,5", "135", False),  # a list is not a number with separators
    ("\\sqrt2", "\\sqrt{2}", True),
    ("2\\sqrt3", "2\\sqrt{3}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", True),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True),  # equal symbolically (math-verify)
    ("x = 5", "5", True),
    ("k=-3", "-3", True),
    ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("(1, 2)", "(1,2)", True),
    ("\\text{Evelyn}", "Evelyn", True),
    ("10.", "10", True),
    ("\\pi", "\\pi", True),
    ("2\\pi", "\\pi", False),
    ("5", "6", False),
    ("12", "1", False),
    ("x^2+1", "x^2 + 1", True),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    (None, "5", False),
]


@pytest.mark.parametrize("pred,ref,expected", MATCH_TABLE)
def test_answers_match_table(pred, ref, expected):
    assert dm.answers_match(pred, ref) is expected, (pred, ref, pred and dm.normalize_math_answer(pred),
                                                    dm.normalize_math_answer(ref))


def test_table_is_big_enough():
    assert len(MATCH_TABLE) >= 40


BOXED_TABLE = [
    ("so the answer is \\boxed{5}.", "5"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("nested \\boxed{\\frac{\\sqrt{3}}{2}} end", "\\frac{\\sqrt{3}}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),  # multiple boxes: the last one
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("\\fbox{7}", "7"),
    ("$\\boxed 42$", "42"),
    ("no box here, the answer is 5", None),
    ("cut off \\boxed{\\frac{1}{2", None),  # unbalanced: no answer
    ("\\boxed{a} and \\boxed{", None),
]


@pytest.mark.parametrize("text,expected", BOXED_TABLE)
def test_last_boxed_answer(text, expected):
    assert dm.last_boxed_answer(text) == expected


def test_extract_answer_gsm8k_fallback():
    assert dm.extract_answer("so 3 + 4 = 7\n#### 7", "gsm8k") == "7"
    assert dm.extract_answer("#### 1,000", "gsm8k") == "1,000"
    assert dm.extract_answer("#### 7", "math") is None  # MATH-style sets need a box
    assert dm.extract_answer("\\boxed{8} #### 7", "gsm8k") == "8"
    assert dm.extract_answer("the answer is 7 apples.", "gsm8k") is None
    assert dm.extract_answer("the answer is 1,007 apples.", "gsm8k", last_number=True) == "1,007"
    assert dm.extract_answer("write it in \\boxed{}: 5", "gsm8k", last_number=True) == "5"  # empty box
    assert dm.extract_answer("the answer is 7", "math", last_number=True) is None  # MATH: box only
    assert dm.gsm8k_reference("5 + 2 = 7\n#### 1,007") == "1007"


# ---- DARE-TIES (SPEC 2.3) --------------------------------------------------------------------

def slow_dare_ties(base_sd, ft_sds, density, weight, seed):
    """Element by element, following the description in the docstring of dm.dare_ties_merge
    (the masks come from the same per-tensor generator, drawn in the same order)."""
    out = {}
    for name, base in base_sd.items():
        g = torch.Generator().manual_seed(dm.tensor_seed(seed, name))
        keeps = [torch.rand(base.shape, generator=g) < density if density < 1
                 else torch.ones(base.shape, dtype=torch.bool) for _ in ft_sds]
        flat_base = base.float().flatten().tolist()
        result = []
        for j, b in enumerate(flat_base):
            ds = []
            for ft, keep in zip(ft_sds, keeps):
                d = ft[name].float().flatten()[j].item() - b
                ds.append(d / density if keep.flatten()[j] else 0.0)
            total = sum(ds)
            sign = (total > 0) - (total < 0)
            agree = [d for d in ds if d != 0 and ((d > 0) - (d < 0)) == sign]
            merged = sum(agree) / len(agree) if agree else 0.0
            result.append(b + weight * merged)
        out[name] = torch.tensor(result).reshape(base.shape)
    return out


def _sds(n_models, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(4, 6, generator=g), "b.bias": torch.randn(5, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n_models)]
    return base, fts


@pytest.mark.parametrize("n_models,density,weight", [(1, 0.5, 1.0), (3, 0.3, 0.7), (2, 1.0, 1.5), (3, 0.9, 1.0)])
def test_dare_ties_matches_slow_reference(n_models, density, weight):
    base, fts = _sds(n_models)
    fast = dm.dare_ties_merge(base, fts, density, weight, seed=3)
    slow = slow_dare_ties(base, fts, density, weight, seed=3)
    for k in base:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-5, atol=1e-5)


def test_dare_ties_density_one_single_model_is_exact():
    base, (ft,) = _sds(1)
    merged = dm.dare_ties_merge(base, [ft], density=1.0, weight=0.6, seed=0)
    for k in base:
        assert torch.equal(merged[k], base[k] + 0.6 * (ft[k] - base[k]))


def test_dare_ties_sign_election_planted():
    base = {"w": torch.zeros(3)}
    fts = [{"w": torch.tensor([1.0, -1.0, 2.0])},
           {"w": torch.tensor([3.0, -2.0, -2.0])},
           {"w": torch.tensor([-1.0, 4.0, 0.0])}]
    merged = dm.dare_ties_merge(base, fts, density=1.0, weight=1.0, seed=0)["w"]
    # entry 0: sum +3 -> keep +1, +3 -> mean 2; entry 1: sum +1 -> keep +4 -> 4;
    # entry 2: sum 0 -> no sign elected -> 0
    assert merged.tolist() == [2.0, 4.0, 0.0]


def test_dare_ties_seed_reproducible_and_density():
    base, fts = _sds(2)
    big_base = {"w": torch.zeros(200, 200)}
    big_ft = [{"w": torch.ones(200, 200)}]
    a = dm.dare_ties_merge(base, fts, 0.5, 1.0, seed=7)
    b = dm.dare_ties_merge(base, fts, 0.5, 1.0, seed=7)
    c = dm.dare_ties_merge(base, fts, 0.5, 1.0, seed=8)
    assert all(torch.equal(a[k], b[k]) for k in base)
    assert any(not torch.equal(a[k], c[k]) for k in base)
    w = dm.dare_ties_merge(big_base, big_ft, 0.3, 1.0, seed=0)["w"]
    kept = (w != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.02 and torch.allclose(w[w != 0], torch.tensor(1 / 0.3))
    with pytest.raises(ValueError):
        dm.dare_ties_merge(base, fts, 0.0, 1.0, seed=0)


def test_dare_ties_keeps_dtype_and_non_float():
    base = {"w": torch.randn(3, 3).to(torch.bfloat16), "step": torch.tensor([4])}
    ft = {"w": (base["w"].float() + 1).to(torch.bfloat16), "step": torch.tensor([9])}
    out = dm.dare_ties_merge(base, [ft], 1.0, 1.0, seed=0)
    assert out["w"].dtype == torch.bfloat16 and out["step"].tolist() == [4]


# ---- filter and eval scoring on planted files -------------------------------------------------

def _row(i, response, reference, kind="math", n_tokens=10, stopped=True):
    return {"id": str(i), "problem": f"p{i}", "reference": reference, "kind": kind,
            "response": response, "n_tokens": n_tokens, "stopped": stopped, "model": "planted"}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_filter_counts_planted(tmp_path):
    path = _write(tmp_path / "raw.jsonl", [
        _row(0, "so \\boxed{\\dfrac{1}{2}}", "0.5", n_tokens=20),  # kept
        _row(1, "\\boxed{3}", "4"),  # wrong
        _row(2, "\\boxed{4}", "4", n_tokens=300),  # over the cap
        _row(3, "\\boxed{4", "4", stopped=False),  # cut off: over-long and no answer
        _row(4, "3 + 4 = 7\n#### 7", "7", kind="gsm8k", n_tokens=40),  # kept (GSM8K style)
        _row(5, "the answer is 7", "7", kind="gsm8k"),  # no extractable answer
    ])
    rows, bad = dm.read_cot([path], ("problem", "response", "reference"))
    kept, counts = dm.filter_cot(rows, max_cot_tokens=100)
    assert [r["id"] for r in kept] == ["0", "4"] and bad == []
    assert kept[0]["messages"] == [{"role": "user", "content": dm.problem_prompt("p0")},
                                   {"role": "assistant", "content": "so \\boxed{\\dfrac{1}{2}}"}]  # for sft.py
    assert [r["id"] for r in dm.filter_cot(rows, max_cot_tokens=100, last_number=True)[0]] == ["0", "4", "5"]
    assert counts == {"total": 6, "kept": 2, "wrong_answer": 3, "too_long": 2,
                      "mean_tokens_all": (20 + 10 + 300 + 10 + 40 + 10) / 6, "mean_tokens_kept": 30.0}


def test_score_rows_known_accuracy():
    rows = [_row(i, f"\\boxed{{{i if i % 4 else -1}}}", str(i), n_tokens=i) for i in range(8)]
    scored, acc, mean_len = dm.score_rows(rows)
    assert acc == 6 / 8 and mean_len == 3.5
    assert [r["correct"] for r in scored] == [i % 4 != 0 for i in range(8)]


def test_eval_on_planted_file_with_fake_model(tmp_path, monkeypatch):
    """evaluate() end to end (loader -> generation -> scoring -> files) with generation replaced by
    a planted answer key: 3 of 4 right."""
    prob = _write(tmp_path / "mini.jsonl", [{"problem": f"What is {i}+1?", "answer": str(i + 1)} for i in range(4)])

    def fake_generate_cot(args, problems, out_path, model_name, chat, max_new_tokens, url=None):
        assert chat is True  # SPEC 2.6: chat template on
        rows = [{**p, "response": f"\\boxed{{{int(p['reference']) + (p['problem'].startswith('What is 3'))}}}",
                 "n_tokens": 5, "stopped": True} for p in problems]
        return rows, {}
    monkeypatch.setattr(dm, "generate_cot", fake_generate_cot)
    res = dm.evaluate(dm.parse_args(["eval"]), "unused", [prob], tmp_path / "ev")
    assert res["mini"] == {"accuracy": 0.75, "n": 4, "mean_tokens": 5.0}
    assert res["average"] == {"accuracy": 0.75, "mean_tokens": 5.0}
    lines = (tmp_path / "ev" / "mini.jsonl").read_text().splitlines()
    assert [json.loads(x)["correct"] for x in lines] == [True, True, True, False]


def test_summaries_are_valid_json(tmp_path):
    """NaN and infinities become null (json_clean), paths strings: every summary parses strictly."""
    args = dm.parse_args(["filter", "--out", str(tmp_path)])
    dm.run_step(args, "x", lambda a, data: {"nan": float("nan"), "inf": float("inf")}, data=[tmp_path / "a.jsonl"])
    strict = dict(parse_constant=lambda c: pytest.fail(f"{c} in a summary"))
    assert json.loads((tmp_path / "x_summary.json").read_text(), **strict)["nan"] is None
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1], **strict)
    assert line["inf"] is None and line["data"] == [str(tmp_path / "a.jsonl")]


# ---- loaders ----------------------------------------------------------------------------------

def test_loaders_on_real_files(shared_data):
    math_dir = shared_data / "math"
    expect = {"gsm8k_test": (1319, "gsm8k"), "aime24": (30, "math"), "amc23": (40, "math"),
              "olympiadbench": (675, "math")}
    for stem, (n, kind) in expect.items():
        probs = dm.load_problems(math_dir / f"{stem}.jsonl")
        assert len(probs) == n and all(p["kind"] == kind and p["problem"] and p["reference"] for p in probs)
    gsm = dm.load_problems(math_dir / "gsm8k_test.jsonl", limit=2)
    assert gsm[0]["reference"] == "18" and gsm[0]["id"] == "gsm8k_test-1"
    amc = dm.load_problems(math_dir / "amc23.jsonl", limit=1)[0]
    assert amc["reference"] == "27.0" and dm.answers_match("27", amc["reference"])
    aime = dm.load_problems(math_dir / "aime24.jsonl")
    assert dm.answers_match("25", [p for p in aime if p["reference"] == "025"][0]["reference"])
    oly = dm.load_problems(math_dir / "olympiadbench.jsonl", limit=1)[0]
    assert dm.answers_match("2", oly["reference"])


def test_loader_layouts_and_errors(tmp_path):
    p = dm.load_problems(_write(tmp_path / "mixed.jsonl", [
        {"problem": "MATH-500 style", "answer": "\\frac{1}{2}", "unique_id": "x"},
        {"question": "olympiad", "final_answer": ["$3$"], "context": "Setup."},
        {"problem": "MATH train", "solution": "so \\boxed{\\frac{\\pi}{2}}"},
        {"id": 7, "problem": "amc", "answer": 27.0},
    ]))
    assert [x["reference"] for x in p] == ["\\frac{1}{2}", "$3$", "\\frac{\\pi}{2}", "27.0"]
    assert p[1]["problem"] == "Setup.\n\nolympiad" and p[3]["id"] == "7"
    bad = _write(tmp_path / "bad.jsonl", [{"problem": "ok", "answer": "1"}, {"problem": "no ref"}])
    with pytest.raises(dm.DataError, match=r"bad.jsonl:2: no reference answer"):
        dm.load_problems(bad)
    with pytest.raises(dm.DataError, match=r"bad.jsonl:1: field 'problem' or 'question'"):
        dm.load_problems(_write(bad, [{"text": "x", "answer": "1"}]))


def test_synth_data_is_reproducible_and_consistent():
    rows = dm.synth_rows(50, seed=0, prefix="train")
    assert rows == dm.synth_rows(50, seed=0, prefix="train")
    for r in rows:  # the worked solution's last line computes the '#### N' answer
        last = r["answer"].split("\n")[-2]
        assert eval(last.split("=")[0].replace("/", "//")) == int(dm.gsm8k_reference(r["answer"]))
    committed = dm.SYNTH_DIR / "train.jsonl"
    if committed.exists():  # the committed default set is what `synth` writes
        rows, _ = common.read_jsonl(committed)
        assert [r for _, r in rows] == dm.synth_rows(len(rows), 0, "train")


# ---- flags ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,flag", [
    (["merge", "--finetuned", "x", "--density", "0"], "--density"),
    (["merge", "--finetuned", "x", "--density", "1.5"], "--density"),
    (["merge", "--finetuned", "x", "--weight", "nan"], "--weight"),
    (["merge"], "--finetuned"),
    (["generate", "--limit", "-1"], "--limit"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["all", "--mid-max-new-tokens", "0"], "--mid-max-new-tokens"),
    (["generate", "--workers", "0"], "--workers"),
    (["generate", "--timeout", "0"], "--timeout"),
    (["generate", "--retries", "-1"], "--retries"),
    (["generate", "--temperature", "nan"], "--temperature"),
    (["generate", "--batch-size", "0"], "--batch-size"),
    (["filter", "--max-cot-tokens", "-5"], "--max-cot-tokens"),
    (["nll", "--token-budget", "0"], "--token-budget"),
    (["generate", "--url", "http://127.0.0.1:1/v1"], "--api-model"),
    (["eval", "--eval-files", "a/x.jsonl", "b/x.jsonl"], "--eval-files"),
    (["all", "--sft-args=--lr '1e-5"], "--sft-args"),
    (["all", "--output", "x"], "--output"),
])
def test_bad_flags_stop_before_any_model_loads(argv, flag, capsys, monkeypatch):
    monkeypatch.setattr(dm, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        dm.main(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err


# ---- the OpenAI-compatible endpoint (a loopback server) and resumable generation ----------------

@pytest.fixture
def server(loopback):
    """A /v1 server on 127.0.0.1 that wants the key sk-test; the answer to problem 'pN' is \\boxed{N}."""
    def respond(request):
        body = request["body"]
        if request["auth"] != "Bearer sk-test":
            return 401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}
        prompt = body["prompt"] if "prompt" in body else body["messages"][-1]["content"]
        text = f"so \\boxed{{{prompt.split()[0][1:]}}}"
        choice = {"text": text} if "prompt" in body else {"message": {"role": "assistant", "content": text}}
        return 200, {"choices": [{**choice, "finish_reason": "stop"}], "usage": {"completion_tokens": 4}}
    srv = loopback(respond)
    return SimpleNamespace(url=srv.url, seen=srv.requests)


def _endpoint_args(server, *more):
    return dm.parse_args(["generate", "--url", server.url, "--api-model", "m", "--api-key-env", "MICOTA_TEST_KEY",
                          "--workers", "2", "--retries", "0", "--timeout", "10", *more])


def test_completions_endpoint_sends_key_and_surfaces_401(server, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MICOTA_TEST_KEY", "sk-test")
    args = _endpoint_args(server)
    assert dm.ask_endpoint(args, server.url, "p7 is a problem", False, 8) == ("so \\boxed{7}", 4, True)
    assert dm.ask_endpoint(args, server.url, "p3 too", True, 8) == ("so \\boxed{3}", 4, True)
    raw, chat = server.seen
    assert raw["path"] == "/v1/completions" and raw["auth"] == "Bearer sk-test"  # --chat off sends the key too
    assert raw["body"] == {"model": "m", "prompt": "p7 is a problem\n", "max_tokens": 8, "temperature": 0.0,
                           "top_p": 1.0}
    assert chat["path"] == "/v1/chat/completions" and chat["auth"] == "Bearer sk-test"
    monkeypatch.setenv("MICOTA_TEST_KEY", "sk-wrong")
    with pytest.raises(common.EndpointError, match="401.*Incorrect API key provided") as e:
        dm.ask_endpoint(args, server.url, "p7", False, 8)
    assert "sk-wrong" not in str(e.value)
    # the command line: one line on stderr with the server's message, exit code 2
    problems = _write(tmp_path / "probs.jsonl", [{"id": "a", "problem": "p1", "answer": "1"}])
    monkeypatch.setattr(sys, "argv", ["distill_micota.py", "generate", "--url", server.url, "--api-model", "m",
                                      "--api-key-env", "MICOTA_TEST_KEY", "--problems", str(problems),
                                      "--out", str(tmp_path / "o"), "--retries", "0"])
    with pytest.raises(SystemExit) as e:
        common.main_guard(dm.main)
    last = capsys.readouterr().err.strip().splitlines()[-1]  # above it: the progress bar
    assert e.value.code == 2 and last.startswith("error: POST ") and "401" in last
    assert "Incorrect API key provided" in last


def _probs(n):
    return [{"id": str(i), "problem": f"p{i}", "reference": str(i), "kind": "math"} for i in range(n)]


def _ids(path):
    return [r["id"] for _, r in common.read_jsonl(path, skip_bad=True)[0] if isinstance(r.get("response"), str)]


def test_generate_resumes_and_skips_done_ids(server, monkeypatch, tmp_path):
    """Rows already in the output file are not asked again; the missing ones are appended and all
    rows come back in problem order, the SPEC 2.1 raw prompt without chat template."""
    monkeypatch.setenv("MICOTA_TEST_KEY", "sk-test")
    out = _write(tmp_path / "raw.jsonl", [{**_probs(3)[1], "response": "\\boxed{1}", "n_tokens": 3, "stopped": True}])
    rows, summary = dm.generate_cot(_endpoint_args(server), _probs(3), out, "unused", False, 8, server.url)
    assert [r["id"] for r in rows] == ["0", "1", "2"] and len(server.seen) == 2
    assert sorted(s["body"]["prompt"] for s in server.seen) == [dm.problem_prompt(f"p{i}") + "\n" for i in (0, 2)]
    assert _ids(out)[0] == "1" and sorted(_ids(out)) == ["0", "1", "2"]  # appended, each id once
    assert summary["stopped_frac"] == 1.0 and summary["bad_lines"] == 0
    dm.generate_cot(_endpoint_args(server), _probs(3), out, "unused", False, 8, server.url)
    assert len(server.seen) == 2  # nothing left to do


def test_generate_resume_after_torn_last_line(server, monkeypatch, tmp_path):
    """A kill mid-write leaves a last line without its newline: it is dropped, that problem is
    answered again, and the file stays valid JSONL with every id once."""
    monkeypatch.setenv("MICOTA_TEST_KEY", "sk-test")
    out = tmp_path / "raw.jsonl"
    out.write_text(json.dumps({**_probs(3)[0], "response": "\\boxed{0}", "n_tokens": 3, "stopped": True})
                   + "\n" + '{"id": "1", "problem": "p1", "respo')
    rows, summary = dm.generate_cot(_endpoint_args(server), _probs(3), out, "unused", False, 8, server.url)
    assert [r["response"] for r in rows] == ["\\boxed{0}", "so \\boxed{1}", "so \\boxed{2}"]
    assert sorted(_ids(out)) == ["0", "1", "2"] and summary["bad_lines"] == 0
    common.read_jsonl(out)  # no bad line left


def test_generate_bad_middle_line_is_an_error_or_skipped(server, monkeypatch, tmp_path):
    monkeypatch.setenv("MICOTA_TEST_KEY", "sk-test")
    good = {**_probs(3)[0], "response": "\\boxed{0}", "n_tokens": 3, "stopped": True}
    out = tmp_path / "raw.jsonl"
    out.write_text(json.dumps(good) + "\n" + '{"id": "0", "respon\n' + json.dumps({"id": "1"}) + "\n")
    with pytest.raises(dm.DataError, match=r"raw.jsonl:2: malformed JSON.*--skip-bad"):
        dm.generate_cot(_endpoint_args(server), _probs(3), out, "unused", False, 8, server.url)
    assert not server.seen
    # --skip-bad: both bad lines counted; id 0 has a valid row (kept, not asked again), id 1 has none
    rows, summary = dm.generate_cot(_endpoint_args(server, "--skip-bad"), _probs(3), out, "unused", False, 8,
                                    server.url)
    assert summary["bad_lines"] == 2 and [r["id"] for r in rows] == ["0", "1", "2"]
    assert sorted(s["body"]["prompt"].split()[0] for s in server.seen) == ["p1", "p2"]
    assert sorted(_ids(out)) == ["0", "1", "2"]  # no id twice among the valid rows


# ---- checkpoint-level tests on a tiny random model with the real tokenizer -------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's tokenizer, saved with common.save_model."""
    tok = common.load_tokenizer(common.DEFAULT_MODEL)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": len(tok), "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
           "max_position_embeddings": 2048, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
           "torch_dtype": "float32"}
    torch.manual_seed(0)
    model = common.Transformer(common.ModelConfig.from_hf(cfg))
    folder = tmp_path_factory.mktemp("micota") / "tiny"
    common.save_model(model, tok, folder)
    return folder, model, tok


def test_response_nll_matches_transformers(tiny_ckpt):
    """SPEC 2.7 against a transformers forward, one doc per pass and packed with a shared prefix."""
    from transformers import AutoModelForCausalLM
    folder, _, _ = tiny_ckpt
    model, tok = common.load_model(folder)
    rows = [{"problem": "Ava has 3 apples and buys 4 more. How many?", "response": "3 + 4 = 7, so \\boxed{7}."},
            {"problem": "What is 10 - 6?", "response": "10 - 6 = 4. The answer is \\boxed{4}."}]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids, mask = common.conversation_ids_and_mask(tok, dm.cot_messages(r))
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
            for t in range(1, len(ids)):
                if mask[t]:
                    total -= logp[t - 1, ids[t]].item()
                    count += 1
    for budget in (8, 4096):  # one doc per forward; both in one packed forward
        nll, n = dm.response_nll(model, tok, rows, token_budget=budget)
        assert n == count and count > 10
        assert abs(nll - total / count) < 1e-4
    assert dm.response_nll(model, tok, [], 64) == (None, 0)


def test_merge_checkpoints_writes_hf_folder(tmp_path, tiny_ckpt):
    """merge on two tiny checkpoints: density 1 gives base + weight x delta in a folder that
    common.load_model reads; density 0.3 equals dare_ties_merge on the state dicts (same seed)."""
    from safetensors.torch import load_file
    folder, model, tok = tiny_ckpt
    common.save_model(model, tok, tmp_path / "base")
    base_sd = load_file(str(tmp_path / "base" / "model.safetensors"))
    ft_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in ft_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    common.save_model(ft_model, tok, tmp_path / "ft")
    ft_sd = load_file(str(tmp_path / "ft" / "model.safetensors"))
    args = dm.parse_args(["merge", "--finetuned", "x", "--density", "1.0", "--weight", "0.5"])
    args.torch_dtype = torch.float32
    stats = dm.merge_checkpoints(args, tmp_path / "base", [tmp_path / "ft"], tmp_path / "m1")
    merged = load_file(str(tmp_path / "m1" / "model.safetensors"))
    assert merged.keys() == base_sd.keys()
    for k in base_sd:
        assert torch.equal(merged[k], base_sd[k] + 0.5 * (ft_sd[k] - base_sd[k])), k
    assert stats["merged_delta_norm"] == pytest.approx(0.5 * stats["task_vector_norm"], rel=1e-4)
    common.load_model(tmp_path / "m1")  # a valid checkpoint folder
    args.density = 0.3
    dm.merge_checkpoints(args, tmp_path / "base", [tmp_path / "ft"], tmp_path / "m2")
    merged = load_file(str(tmp_path / "m2" / "model.safetensors"))
    expected = dm.dare_ties_merge(base_sd, [ft_sd], 0.3, 0.5, args.seed)
    assert all(torch.equal(merged[k], expected[k]) for k in base_sd)


def test_local_generate_writes_rows(tiny_ckpt, tmp_path):
    """The local engine (common.generate) with and without the chat template: one row per problem,
    within the token cap, resumable."""
    folder, _, _ = tiny_ckpt
    args = dm.parse_args(["generate", "--device", "cpu", "--batch-size", "2"])
    args.torch_dtype = torch.float32
    for chat in (True, False):
        out = tmp_path / f"raw_{chat}.jsonl"
        rows, summary = dm.generate_cot(args, _probs(3), out, folder, chat, 5)
        assert [r["id"] for r in rows] == ["0", "1", "2"] and all(1 <= r["n_tokens"] <= 5 for r in rows)
        assert summary["rows"] == 3 and sorted(_ids(out)) == ["0", "1", "2"]
        assert dm.generate_cot(args, _probs(3), out, folder, chat, 5)[0] == rows


# ---- the `all` chain ---------------------------------------------------------------------------

def test_all_chain_end_to_end_and_resume(tiny_ckpt, tmp_path, monkeypatch):
    """`all` on 4 synthetic problems with the tiny model as teacher, TA and student; generation is
    an answer key (a random model gets nothing right, and the filter would leave nothing to train
    on), every other step is real, the fine-tunes run sft.py in a subprocess. A second run resumes:
    nothing is generated again and the finished fine-tunes are kept."""
    folder, _, tok = tiny_ckpt
    train, test = dm.synth_rows(4, 0, "train"), dm.synth_rows(2, 1, "test")
    key = {r["question"]: dm.gsm8k_reference(r["answer"]) for r in train + test}
    calls = []

    def answer_key(model, prompts, max_new_tokens, temperature=0.0, stop_ids=None, seed=None):
        calls.append(len(prompts))
        texts = [next(f"so \\boxed{{{a}}}" for q, a in key.items() if q in tok.decode(p)) for p in prompts]
        toks = [tok(t, add_special_tokens=False)["input_ids"][:max_new_tokens - 1] + [stop_ids[0]] for t in texts]
        return SimpleNamespace(tokens=toks, stopped=[True] * len(toks))
    monkeypatch.setattr(dm, "generate", answer_key)
    out = tmp_path / "out"
    argv = ["all", "--teacher", str(folder), "--ta", str(folder), "--student", str(folder), "--device", "cpu",
            "--problems", str(_write(tmp_path / "train.jsonl", train)), "--out", str(out),
            "--eval-files", str(_write(tmp_path / "test.jsonl", test)), "--sft-args=--epochs 2 --warmup-ratio 0"]
    dm.main(argv)

    def summary(tag):
        return json.loads((out / f"{tag}_summary.json").read_text())
    assert summary("filter_long")["kept"] == 4 and summary("filter_mid")["kept"] == 4
    for tag, folder_name in (("sft_ta", "ta_sft"), ("sft_student", "student_sft")):
        final = summary(tag)["last_metrics"]  # 4 samples, global batch 8, 2 epochs: 2 steps
        assert final["final"] is True and final["final_step"] == 2 and final["train_loss"] > 0
        assert (out / folder_name / "DONE").exists() and "--epochs 2" in summary(tag)["command"]
    assert summary("merge")["merged_delta_norm"] > 0
    nll = summary("nll")
    assert nll["long"]["tokens"] > 0 and nll["mid"]["nll_per_token"] > 0
    # the student's NLL of the long CoT (SPEC 2.7) is the TA's first SFT loss: same model, tokens, mask
    first = next(r for _, r in common.read_jsonl(out / "ta_sft" / "metrics.jsonl")[0] if r.get("step") == 1)
    assert first["loss"] == pytest.approx(nll["long"]["nll_per_token"], rel=1e-5)
    assert summary("eval_base")["average"]["accuracy"] == summary("eval_student")["average"]["accuracy"] == 1.0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 10
    n_calls = len(calls)
    dm.main(argv)
    assert len(calls) == n_calls and summary("sft_ta")["kept_finished_run"] is True
