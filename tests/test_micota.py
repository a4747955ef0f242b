"""Tests of distill_micota.py (SPEC 2): answer normalisation, DARE-TIES, filter, eval, loaders, NLL."""
import copy
import json

import pytest
import torch

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
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", False),  # no symbolic algebra
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


def test_filter_counts_planted(tmp_path):
    rows = [
        _row(0, "so \\boxed{\\dfrac{1}{2}}", "0.5", n_tokens=20),  # kept
        _row(1, "\\boxed{3}", "4"),  # wrong
        _row(2, "\\boxed{4}", "4", n_tokens=300),  # over the cap
        _row(3, "\\boxed{4", "4", stopped=False),  # cut off: over-long and no answer
        _row(4, "3 + 4 = 7\n#### 7", "7", kind="gsm8k", n_tokens=40),  # kept (GSM8K style)
        _row(5, "the answer is 7", "7", kind="gsm8k"),  # no extractable answer
    ]
    path = tmp_path / "raw.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept, counts = dm.filter_cot(dm.read_cot([path]), max_cot_tokens=100)
    assert [r["id"] for r in kept] == ["0", "4"]
    kept_flexible, _ = dm.filter_cot(dm.read_cot([path]), max_cot_tokens=100, last_number=True)
    assert [r["id"] for r in kept_flexible] == ["0", "4", "5"]
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
    prob = tmp_path / "mini.jsonl"
    prob.write_text("".join(json.dumps({"problem": f"What is {i}+1?", "answer": str(i + 1)}) + "\n" for i in range(4)))

    def fake_generate_cot(problems, out_path, args, model_name, chat, max_new_tokens, url=None):
        assert chat is True  # SPEC 2.6: chat template on
        rows = [{**p, "response": f"\\boxed{{{int(p['reference']) + (p['problem'].startswith('What is 3'))}}}",
                 "n_tokens": 5, "stopped": True} for p in problems]
        return rows, {}
    monkeypatch.setattr(dm, "generate_cot", fake_generate_cot)
    args = dm.parse_args(["eval"])
    res = dm.evaluate("unused", [prob], tmp_path / "ev", args)
    assert res["mini"] == {"accuracy": 0.75, "n": 4, "mean_tokens": 5.0}
    assert res["average"]["accuracy"] == 0.75
    lines = (tmp_path / "ev" / "mini.jsonl").read_text().splitlines()
    assert [json.loads(x)["correct"] for x in lines] == [True, True, True, False]


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
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"problem": "MATH-500 style", "answer": "\\frac{1}{2}", "unique_id": "x"},
        {"question": "olympiad", "final_answer": ["$3$"], "context": "Setup."},
        {"problem": "MATH train", "solution": "so \\boxed{\\frac{\\pi}{2}}"},
        {"id": 7, "problem": "amc", "answer": 27.0},
    ]) + "\n")
    p = dm.load_problems(f)
    assert [x["reference"] for x in p] == ["\\frac{1}{2}", "$3$", "\\frac{\\pi}{2}", "27.0"]
    assert p[1]["problem"] == "Setup.\n\nolympiad" and p[3]["id"] == "7"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "ok", "answer": "1"}) + "\n" + json.dumps({"problem": "no ref"}) + "\n")
    with pytest.raises(dm.DataError, match=r"bad.jsonl:2: no reference answer"):
        dm.load_problems(bad)
    bad.write_text(json.dumps({"text": "x", "answer": "1"}) + "\n")
    with pytest.raises(dm.DataError, match=r"bad.jsonl:1: field 'problem' or 'question'"):
        dm.load_problems(bad)


def test_synth_data_is_reproducible_and_consistent(tmp_path):
    rows = dm.synth_rows(50, seed=0, prefix="train")
    assert rows == dm.synth_rows(50, seed=0, prefix="train")
    for r in rows:  # the worked solution's last line computes the '#### N' answer
        last = r["answer"].split("\n")[-2]
        assert eval(last.split("=")[0].replace("/", "//")) == int(dm.gsm8k_reference(r["answer"]))
    committed = dm.SYNTH_DIR / "train.jsonl"
    if committed.exists():  # the committed default set is what `synth` writes
        rows, _ = dm.read_jsonl_checked(committed)
        assert [r for _, r in rows] == dm.synth_rows(len(rows), 0, "train")


# ---- checkpoint-level tests on a tiny random model with the real tokenizer -------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A 2-layer random llama with SmolLM2's tokenizer, saved with common.save_model."""
    import common
    tok = common.load_tokenizer(common.DEFAULT_MODEL)
    torch.manual_seed(0)
    model = common.Transformer(common.ModelConfig.from_hf(common.tiny_config("llama", vocab_size=len(tok))))
    folder = tmp_path_factory.mktemp("micota") / "tiny"
    common.save_model(model, tok, folder)
    return folder, model, tok


# ---- NLL against transformers (SPEC 2.7) --------------------------------------------------------

def test_response_nll_matches_transformers(tiny_ckpt):
    from transformers import AutoModelForCausalLM
    import common
    folder, _, _ = tiny_ckpt
    model, tok = common.load_model(folder)
    rows = [{"problem": "Ava has 3 apples and buys 4 more. How many?", "response": "3 + 4 = 7, so \\boxed{7}."},
            {"problem": "What is 10 - 6?", "response": "10 - 6 = 4. The answer is \\boxed{4}."}]
    nll, n = dm.response_nll(model, tok, rows, token_budget=8)  # a small budget: one doc per forward

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
    assert n == count and count > 10
    assert abs(nll - total / count) < 1e-4


def test_merge_checkpoints_writes_hf_folder(tmp_path, tiny_ckpt):
    """merge step on two tiny checkpoints: density 1 gives base + weight x delta in a folder that
    common.load_model reads; density 0.5 equals dare_ties_merge on the state dicts (same seed)."""
    import common
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
    args = dm.parse_args(["merge", "--density", "1.0", "--weight", "0.5"])
    args.torch_dtype = torch.float32
    stats = dm.merge_checkpoints(tmp_path / "base", [tmp_path / "ft"], tmp_path / "m1", args)
    merged = load_file(str(tmp_path / "m1" / "model.safetensors"))
    assert merged.keys() == base_sd.keys()
    for k in base_sd:
        assert torch.equal(merged[k], base_sd[k] + 0.5 * (ft_sd[k] - base_sd[k])), k
    assert stats["mean_changed_frac"] > 0.9
    common.load_model(tmp_path / "m1")  # a valid checkpoint folder
    args.density = 0.3
    dm.merge_checkpoints(tmp_path / "base", [tmp_path / "ft"], tmp_path / "m2", args)
    merged = load_file(str(tmp_path / "m2" / "model.safetensors"))
    expected = dm.dare_ties_merge(base_sd, [ft_sd], 0.3, 0.5, args.seed)
    assert all(torch.equal(merged[k], expected[k]) for k in base_sd)


def test_generate_resumes_and_skips_done_ids(tmp_path, monkeypatch):
    """Rows already in the output file are not generated again; the endpoint path (mocked) appends
    only the missing ones and returns all rows in problem order."""
    probs = [{"id": str(i), "problem": f"p{i}", "reference": str(i), "kind": "math"} for i in range(3)]
    out = tmp_path / "raw.jsonl"
    out.write_text(json.dumps({**probs[1], "response": "\\boxed{1}", "n_tokens": 3, "stopped": True}) + "\n")
    asked = []

    def fake_completion(base_url, model, prompt, max_tokens, temperature, **kw):
        asked.append(prompt)
        return {"choices": [{"text": "\\boxed{0}", "finish_reason": "stop"}], "usage": {"completion_tokens": 4}}
    monkeypatch.setattr(dm, "completion_request", fake_completion)
    args = dm.parse_args(["generate", "--api-model", "m", "--workers", "1"])
    rows, summary = dm.generate_cot(probs, out, args, "unused", chat=False, max_new_tokens=8, url="http://x")
    assert [r["id"] for r in rows] == ["0", "1", "2"] and len(asked) == 2
    assert asked[0] == dm.problem_prompt("p0") + "\n"  # SPEC 2.1 raw prompt, no chat template
    assert len(out.read_text().splitlines()) == 3 and summary["stopped_frac"] == 1.0
    rows, _ = dm.generate_cot(probs, out, args, "unused", chat=False, max_new_tokens=8, url="http://x")
    assert len(asked) == 2  # nothing left to do
