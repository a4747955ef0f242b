"""Tests of eval_persona.py: the length-controlled win rate (SPEC 1.4) against a slow reference and
on planted biases; the PersonaFeedback loaders on the real files (both published layouts and
pairs.jsonl); order swapping and the accuracy table; the local judges (model / GRM / scalar RM)
with tiny random models (packed = one by one); the endpoint judge against a real HTTP server on
127.0.0.1 with a fault matrix; failed judgments (issue 25) and a bad-input matrix."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import eval_persona as ep

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "data" / "persona_world" / "pairs.jsonl"


def _read(path):
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _strict_json(path):
    """json.loads that refuses NaN / Infinity (what Python writes but JSON forbids)."""
    def bad(c):
        raise ValueError(f"bare {c} in {path}")
    return json.loads(Path(path).read_text(), parse_constant=bad)


def _small_pairs(tmp_path, n_per_tier=1, cut=100, mark=False):
    """A pairs.jsonl of the persona world's eval split, n cases per (category, tier), with the
    persona reduced to name and demographics and the responses cut short (fast tiny models);
    mark: end every chosen response with " #good<i>" and every reject with " #bad<i>"."""
    rows, seen = [], {}
    for r in _read(PAIRS):
        key = (r["category"], r["tier"])
        if r["split"] == "eval" and seen.get(key, 0) < n_per_tier:
            seen[key] = seen.get(key, 0) + 1
            tags = (f" #good{len(rows)}", f" #bad{len(rows)}") if mark else ("", "")
            rows.append({**r, "persona": {k: r["persona"][k] for k in ("Name", "Demographics")},
                         "chosen": r["chosen"][:cut] + tags[0], "reject": r["reject"][:cut] + tags[1]})
    path = tmp_path / "pairs.jsonl"
    _write_jsonl(path, rows)
    return path


# ---------------------------------------------------------------------------------------------
# Length-controlled win rate (SPEC 1.4)

def slow_lc_reference(p_win, len_model, len_ref, l2=1e-4):
    """Brute force: evaluate the same penalised logistic loss on a 41 x 41 grid of (theta, phi),
    then zoom in around the best point, again and again."""
    y = np.asarray(p_win, float)
    d = np.asarray(len_model, float) - np.asarray(len_ref, float)
    x = np.tanh(d / d.std(ddof=1))
    center, half = np.zeros(2), 8.0
    for _ in range(20):
        th, ph = np.meshgrid(*(np.linspace(c - half, c + half, 41) for c in center), indexing="ij")
        z = th[..., None] + ph[..., None] * x
        loss = (np.logaddexp(0, z) - y * z).sum(-1) + 0.5 * l2 * (th ** 2 + ph ** 2)
        i = np.unravel_index(loss.argmin(), loss.shape)
        center, half = np.array([th[i], ph[i]]), half / 4
    return center


def synthetic_judgments(n, theta0, phi0, mean_dlen, seed, soft=False):
    rng = np.random.default_rng(seed)
    len_ref = rng.integers(300, 1500, n).astype(float)
    dlen = rng.normal(mean_dlen, 400, n)
    x = np.tanh(dlen / dlen.std(ddof=1))
    p = 1 / (1 + np.exp(-(theta0 + phi0 * x)))
    return (p if soft else (rng.random(n) < p).astype(float)), len_ref + dlen, len_ref


@pytest.mark.parametrize("soft", [False, True])
def test_lc_fit_matches_slow_reference(soft):
    y, lm, lr = synthetic_judgments(200, 0.3, 1.2, 150, seed=1, soft=soft)
    if not soft:
        y[::7] = 0.5  # ties are allowed
    theta, phi = ep.fit_length_logistic(y, lm, lr)
    theta_ref, phi_ref = slow_lc_reference(y, lm, lr)
    assert theta == pytest.approx(theta_ref, abs=1e-4) and phi == pytest.approx(phi_ref, abs=1e-4)
    r = ep.length_controlled_winrate(y, lm, lr)
    assert r["lc_winrate"] == pytest.approx(100 / (1 + np.exp(-theta_ref)), abs=1e-3)
    assert r["winrate"] == pytest.approx(100 * y.mean())


def test_lc_removes_planted_length_bias_and_equals_raw_without_it():
    # the judge likes longer answers (phi0 > 0) and the policy writes longer ones: the raw win rate
    # is inflated, the LC win rate recovers the equal-length rate sigmoid(theta0) = 50%
    r = ep.length_controlled_winrate(*synthetic_judgments(6000, 0.0, 2.0, 300, seed=2))
    assert r["winrate"] > 65 and abs(r["lc_winrate"] - 50.0) < 3.0 and r["phi"] == pytest.approx(2.0, abs=0.3)
    r = ep.length_controlled_winrate(*synthetic_judgments(6000, 0.6, 0.0, 300, seed=3))
    assert abs(r["lc_winrate"] - r["winrate"]) < 2.5 and abs(r["lc_winrate"] - 100 / (1 + np.exp(-0.6))) < 3.0


def test_lc_edge_cases_and_bootstrap():
    lm, lr = np.arange(20) * 10.0 + 100, np.full(20, 150.0)
    r = ep.length_controlled_winrate(np.full(20, 0.5), lm, lr)
    assert r["lc_winrate"] == pytest.approx(50.0) and r["phi"] == pytest.approx(0.0, abs=1e-9)
    r = ep.length_controlled_winrate(np.ones(20), lm, lr)  # perfect separation stays finite
    assert 99.0 < r["lc_winrate"] <= 100.0 and np.isfinite(r["theta"])
    r = ep.length_controlled_winrate([1.0, 0.0, 1.0], [5, 5, 5], [5, 5, 5])  # no length variance
    assert r["lc_winrate"] == pytest.approx(r["winrate"], abs=0.01)
    y, lm, lr = synthetic_judgments(200, 0.4, 1.0, 100, seed=4)
    ci1, ci2 = ep.bootstrap_ci(y, lm, lr, n_boot=200, seed=7), ep.bootstrap_ci(y, lm, lr, n_boot=200, seed=7)
    assert ci1 == ci2
    lc = ep.length_controlled_winrate(y, lm, lr)
    assert ci1["lc_winrate"][0] < lc["lc_winrate"] < ci1["lc_winrate"][1]
    assert ci1["winrate"][0] < lc["winrate"] < ci1["winrate"][1]


# ---------------------------------------------------------------------------------------------
# Loaders (SPEC 3 layouts) on the real files in ../shared/data

def _real_rows(pf, name, n, start=0):
    lines = (pf / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines[start:start + n]]


def _persona(pf, uid):
    return json.loads((pf / "personas" / f"{uid}.json").read_text(encoding="utf-8"))


def _key(c):
    return (c["category"], c["tier"], c["user_id"], c["question"], c["chosen"], c["reject"],
            json.dumps(c["persona"], ensure_ascii=False, sort_keys=True))


def test_release_layout_real_files(shared_data):
    pf = shared_data / "personafeedback"
    cases, skipped = ep.load_personafeedback(pf, categories=("general",))
    assert skipped == []
    counts = {t: sum(c["tier"] == t for c in cases) for t in ("easy", "medium", "hard")}
    assert counts == {"easy": 1510, "medium": 1321, "hard": 1010}
    assert all(isinstance(c["persona"], dict) and "Name" in c["persona"] for c in cases[:50])
    assert cases[0]["user_id"] == _real_rows(pf, "general_easy.jsonl", 1)[0]["user_id"]
    sample = ep.sample_per_tier(cases, 5, seed=0)
    assert len(sample) == 15 and sample == ep.sample_per_tier(cases, 5, seed=0)
    assert sample != ep.sample_per_tier(cases, 5, seed=1)


def test_public_and_release_layouts_built_from_real_files_agree(shared_data, tmp_path):
    pf = shared_data / "personafeedback"
    tiers = {"easy": "easy", "medium": "mid", "hard": "hard"}
    rows = {t: _real_rows(pf, f"general_{f}.jsonl", 6) for t, f in tiers.items()}
    specific = _real_rows(pf, "general_easy.jsonl", 4, start=100)  # stands in for the Specific half
    uids = sorted({r["user_id"] for rs in [*rows.values(), specific] for r in rs})
    public = tmp_path / "public"  # data/{general,spedific}/{easy,medium,hard}.jsonl + persona/all_personas.jsonl
    for t, rs in rows.items():
        _write_jsonl(public / "data" / "general" / f"{t}.jsonl", rs)
    _write_jsonl(public / "data" / "spedific" / "easy.jsonl", specific)
    _write_jsonl(public / "persona" / "all_personas.jsonl", [{"user_id": u, "persona": _persona(pf, u)} for u in uids])
    release = tmp_path / "release"  # rm_benchmark_all/{general,specific}_{easy,mid,hard}.jsonl + persona_all/
    for t, f in tiers.items():
        _write_jsonl(release / "rm_benchmark_all" / f"general_{f}.jsonl", rows[t])
    _write_jsonl(release / "rm_benchmark_all" / "specific_easy.jsonl", specific)
    (release / "persona_all").mkdir()
    for u in uids:
        (release / "persona_all" / f"{u}.json").write_text(json.dumps(_persona(pf, u), ensure_ascii=False))
    a, _ = ep.load_personafeedback(public)
    b, _ = ep.load_personafeedback(release)
    c, _ = ep.load_personafeedback(release / "rm_benchmark_all")  # personas found in the parent folder
    assert len(a) == 22 and sorted(map(_key, a)) == sorted(map(_key, b)) == sorted(map(_key, c))
    assert sum(x["category"] == "specific" for x in a) == 4
    assert len(ep.load_personafeedback(public, categories=("specific",), tiers=("easy",))[0]) == 4


def test_pairs_jsonl_layout(shared_data, tmp_path):
    pf = shared_data / "personafeedback"
    rows = []
    for i, r in enumerate(_real_rows(pf, "general_hard.jsonl", 4)):
        persona = _persona(pf, r["user_id"])
        rows.append({**r, "persona": json.dumps(persona, ensure_ascii=False) if i % 2 else persona,
                     "tier": ["easy", "mid", "hard", "hard"][i], "category": "specific" if i else "general",
                     "split": "eval" if i < 3 else "train"})
    _write_jsonl(tmp_path / "pairs.jsonl", rows)
    cases, _ = ep.load_personafeedback(tmp_path / "pairs.jsonl")
    assert [c["tier"] for c in cases] == ["easy", "medium", "hard"]
    assert [c["category"] for c in cases] == ["general", "specific", "specific"]
    assert len(ep.load_personafeedback(tmp_path, split="all")[0]) == 4
    # the repository's own persona world: 65 held-out pairs
    assert len(ep.load_personafeedback(PAIRS)[0]) == 65


def test_missing_persona_is_never_skipped(shared_data, tmp_path):
    pf = shared_data / "personafeedback"
    rows = _real_rows(pf, "general_easy.jsonl", 3)
    rows[1]["user_id"] = "nobody_Zz9q"
    _write_jsonl(tmp_path / "general_easy.jsonl", rows)
    (tmp_path / "persona_all").mkdir()
    for r in rows[::2]:
        (tmp_path / "persona_all" / f"{r['user_id']}.json").write_text(json.dumps(_persona(pf, r["user_id"])))
    for skip_bad in (False, True):
        with pytest.raises(common.DataError, match=r"general_easy\.jsonl:2: .*nobody_Zz9q"):
            ep.load_personafeedback(tmp_path, skip_bad=skip_bad)


def test_malformed_line_and_empty_response(shared_data, tmp_path):
    pf = shared_data / "personafeedback"
    rows = _real_rows(pf, "general_mid.jsonl", 4)
    (tmp_path / "personas").mkdir()
    for r in rows:
        (tmp_path / "personas" / f"{r['user_id']}.json").write_text(json.dumps(_persona(pf, r["user_id"])))
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines[2] = lines[2][:40]  # truncated JSON on line 3
    (tmp_path / "general_mid.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(common.DataError, match=r"general_mid\.jsonl:3: malformed JSON"):
        ep.load_personafeedback(tmp_path)
    cases, skipped = ep.load_personafeedback(tmp_path, skip_bad=True)
    assert len(cases) == 3 and len(skipped) == 1 and "general_mid.jsonl:3" in skipped[0]
    rows[1]["reject"] = "   "
    _write_jsonl(tmp_path / "general_mid.jsonl", rows)
    with pytest.raises(common.DataError, match=r"general_mid\.jsonl:2: field 'reject' is an empty string"):
        ep.load_personafeedback(tmp_path)
    cases, skipped = ep.load_personafeedback(tmp_path, skip_bad=True)
    assert len(cases) == 3 and skipped == [f"{tmp_path / 'general_mid.jsonl'}:2: field 'reject' is an empty string"]


def test_eval_rows_real_file(shared_data):
    path = shared_data / "cpe_eval300" / "gpt-4o.jsonl"
    rows, skipped = ep.load_eval_rows(path, limit=30, seed=0)
    assert len(rows) == 30 and skipped == [] and rows == ep.load_eval_rows(path, limit=30, seed=0)[0]
    assert all(isinstance(r["persona"], str) and r["reference"] for r in rows)
    assert "Name" in common.render_persona(rows[0]["persona"])


# ---------------------------------------------------------------------------------------------
# Order swapping, pointwise ties and failed judgments in the accuracy table

def _fake_cases(n):
    return [{"id": f"c{i}", "user_id": f"u{i}", "persona": {"Name": f"P{i}"}, "question": f"q{i}",
             "chosen": f"good {i}", "reject": f"bad {i}", "category": ["general", "specific"][i % 2],
             "tier": ["easy", "medium", "hard"][i % 3]} for i in range(n)]


def test_order_swapping_cancels_an_always_A_judge():
    always_a = lambda items, desc=None: [{"p_a": 1.0} for _ in items]
    table = ep.accuracy_table(ep.judge_cases(_fake_cases(12), "pair", always_a, order="both"))
    assert table["total"]["accuracy"] == 50.0 and table["total"]["n"] == 24
    assert all(r["accuracy"] == 50.0 for r in table["rows"])
    assert table["by_order"]["chosen_first"]["accuracy"] == 100.0
    oracle = lambda items, desc=None: [{"p_a": 0.9 if it[2].startswith("good") else 0.2} for it in items]
    assert ep.accuracy_table(ep.judge_cases(_fake_cases(12), "pair", oracle))["total"]["accuracy"] == 100.0
    # random order: one judgment per case, seeded per case (the same whatever the chunking)
    r1 = ep.judge_cases(_fake_cases(40), "pair", always_a, order="random", seed=3)
    r2 = ep.judge_cases(_fake_cases(40)[:17], "pair", always_a, order="random", seed=3)
    assert len(r1) == 40 and [r["chosen_first"] for r in r1[:17]] == [r["chosen_first"] for r in r2]
    assert 10 < sum(r["chosen_first"] for r in r1) < 30


def test_pointwise_ties_count_half_and_each_response_is_scored_once():
    calls = []

    def scorer(items, desc=None):
        calls.append(len(items))
        return [{"score": 1.0 if it[2].startswith("good") and it[0]["Name"] != "P0" else
                 (0.5 if it[0]["Name"] == "P1" else 0.0)} for it in items]
    records = ep.judge_cases(_fake_cases(3), "point", scorer, order="both")
    assert calls == [6]  # each distinct response scored once although both orders are recorded
    assert [r["correct"] for r in records] == [0.5, 0.5, 1.0, 1.0, 1.0, 1.0]


def test_failed_judgments_are_excluded_never_a_tie():
    def flaky(items, desc=None):  # fails on every case of user u1 and u4
        return [{"score": None, "error": "no <scores>"} if it[0]["Name"] in ("P1", "P4") else
                {"score": 1.0 if it[2].startswith("good") else 0.0} for it in items]
    records = ep.judge_cases(_fake_cases(6), "point", flaky)
    failed = [r for r in records if "error" in r]
    assert len(failed) == 4 and all(r["p_chosen"] is None and r["correct"] is None for r in failed)
    assert "A: no <scores>" in failed[0]["error"] and "B: no <scores>" in failed[0]["error"]
    table = ep.accuracy_table(records)
    assert (table["total"]["n"], table["total"]["n_failed"], table["total"]["accuracy"]) == (8, 4, 100.0)
    # a tier with only failed judgments: accuracy NaN in memory, null in the JSON
    table = ep.accuracy_table(ep.judge_cases(_fake_cases(2)[1:], "point", flaky))
    assert np.isnan(table["total"]["accuracy"])
    assert json.loads(json.dumps(common.json_clean(table), allow_nan=False))["total"]["accuracy"] is None


# ---------------------------------------------------------------------------------------------
# Local judges with tiny random models

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the test machine is shared: one intra-op thread avoids OpenMP oversubscription
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_tokenizer():
    """A byte-level BPE tokenizer with a ChatML template, trained in milliseconds (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Which answer fits this user better? Reply with a single letter: A or B. The user's persona",
              "question Helpfulness Personalization Natural <scores> </scores> <critique> critique"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def tiny_config(vocab_size):
    """An HF config.json dict for a small random Llama (what common.tiny_config used to build)."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab_size,
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": True, "max_position_embeddings": 32768, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, model, tokenizer): a tiny random Llama with tied embeddings and a value head, saved
    as an HF folder (load_model reads it as an LM, or with value_head=True as a scalar RM)."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = common.Transformer(common.ModelConfig.from_hf(tiny_config(len(tok))), value_head=True)
    torch.nn.init.normal_(model.value_head.weight, std=0.5)
    folder = tmp_path_factory.mktemp("tiny") / "ckpt"
    common.save_model(model, tok, folder)
    return folder, model.eval(), tok


def _items(tmp_path, n_per_tier=1, mark=False):
    cases, _ = ep.load_personafeedback(_small_pairs(tmp_path, n_per_tier, mark=mark))
    return cases, [(c["persona"], c["question"], *ab) for c in cases
                   for ab in ((c["chosen"], c["reject"]), (c["reject"], c["chosen"]))]


def test_model_judge_packed_equals_one_by_one(tiny, tmp_path):
    _, model, tok = tiny
    cases, items = _items(tmp_path)
    items = items[:6]
    packed = ep.model_choice_probs(model, tok, items, token_budget=100000)
    alone = ep.model_choice_probs(model, tok, items, token_budget=1, share_prefix=False)  # one per forward
    assert [r["p_a"] for r in packed] == pytest.approx([r["p_a"] for r in alone], abs=1e-5)
    assert [r["choice_mass"] for r in packed] == pytest.approx([r["choice_mass"] for r in alone], abs=1e-6)
    with torch.no_grad():  # and both equal a plain forward of the whole prompt
        ids = common.chat_prompt_ids(tok, ep.pairwise_messages(*items[3]))
        a_id, b_id = (tok.encode(x, add_special_tokens=False)[0] for x in "AB")
        logits = model(torch.tensor([ids]))[0, -1]
    assert packed[3]["p_a"] == pytest.approx(torch.softmax(logits[[a_id, b_id]], -1)[0].item(), abs=1e-5)
    # the two orders of a pair share the persona + question prefix: far fewer tokens run
    seqs = [common.chat_prompt_ids(tok, ep.pairwise_messages(*it)) for it in items]
    assert common.packed_size(seqs, share_prefix=True) < 0.8 * common.packed_size(seqs)
    # bounded by tokens: a budget below one pair still gives the same answers
    small = ep.model_choice_probs(model, tok, items, token_budget=len(seqs[0]) + 10)
    assert [r["p_a"] for r in small] == pytest.approx([r["p_a"] for r in packed], abs=1e-5)


def test_rm_judge_packed_equals_one_by_one(tiny, tmp_path):
    _, model, tok = tiny
    cases, _ = _items(tmp_path)
    items = [(c["persona"], c["question"], c[f]) for c in cases[:3] for f in ("chosen", "reject")]
    values = [r["score"] for r in ep.rm_scores(model, tok, items, token_budget=100000)]
    with torch.no_grad():
        alone = [model.values(torch.tensor([common.response_ids(tok, *it)]))[0, -1].item() for it in items]
    assert values == pytest.approx(alone, abs=1e-4)
    assert len(set(np.round(values, 4))) > 1
    records = ep.judge_cases(cases[:3], "point", lambda its, desc: ep.rm_scores(model, tok, its, 400))
    assert all(r["correct"] in (0.0, 1.0) for r in records)


def fake_grm_generate(tok, broken="#bad0"):
    """A stand-in for common.generate: a GRM that writes Personalization 4 for a response marked
    #good, 1 otherwise, and no <scores> block for the one marked `broken`; the watched
    probabilities are one-hot at the tokens it writes."""
    watch = common.grm_watch_ids(tok)
    col = {t: c for c, t in enumerate(watch)}

    def generate(model, prompts, max_new_tokens, watch_ids=None, **kw):
        tokens, watched = [], []
        for p in prompts:
            text = tok.decode(p)
            if f"{broken}<|im_end|>" in text:  # the response ends the user turn
                reply = "<critique>cut off before the sc"
            else:
                score = 4 if "#good" in text else 1
                reply = common.format_grm_output("fine", {"Helpfulness": 1, "Personalization": score, "Natural": 0})
            ids = tok.encode(reply, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
            w = torch.zeros(len(ids), len(watch))
            for i, t in enumerate(ids):
                if t in col:
                    w[i, col[t]] = 1.0
            tokens.append(ids)
            watched.append(w)
        return common.Generation(tokens, [[0.0] * len(t) for t in tokens], [True] * len(tokens), watched)
    return generate


def test_grm_judge_scores_and_parse_failures(tiny, tmp_path, monkeypatch):
    folder, model, tok = tiny
    cases, _ = _items(tmp_path, mark=True)
    monkeypatch.setattr(common, "generate", fake_grm_generate(tok))
    for score in ("expected", "parsed"):
        judge = lambda its, desc: ep.grm_scores(model, tok, its, batch_size=3, score=score)
        records = ep.judge_cases(cases, "point", judge)
        ok = [r for r in records if "error" not in r]
        assert len(ok) == 2 * len(cases) - 2 and all(r["correct"] == 1.0 for r in ok)
        assert ok[0]["a"]["score"] == pytest.approx(0.35 * 1 + 0.40 * 4)  # expected == parsed for one-hot
        assert "GRM reply has no <scores> block" in records[0]["error"]


def test_grm_accuracy_cli_on_persona_world_pairs(tiny, tmp_path, monkeypatch, capsys):
    """The GRM's held-out accuracy (train_grm.py no longer measures it), as run.sh and report.py use it."""
    folder, _, tok = tiny
    pairs = _small_pairs(tmp_path, n_per_tier=2, mark=True)
    out = tmp_path / "out" / "eval" / "acc_grm"
    argv = ["accuracy", "--data", str(pairs), "--split", "eval", "--judge", "grm", "--model", str(folder),
            "--out", str(out), "--grm-max-new-tokens", "3", "--chunk", "4"]
    # a random tiny model writes no <scores>: every judgment fails, no accuracy, status 1
    with pytest.raises(SystemExit) as e:
        ep.main(argv)
    assert e.value.code == 1
    captured = capsys.readouterr()
    assert "judgments failed" in captured.err and "no accuracy reported" in captured.err
    assert "| total |" not in captured.out and not (out / "accuracy_summary.json").exists()
    judged = _read(out / "accuracy_judgments.jsonl")
    # stopped after the first chunk (4 cases, 8 judgments): the run could no longer pass
    assert len(judged) == 8 and all(r["correct"] is None and "no <scores>" in r["error"] for r in judged)

    monkeypatch.setattr(common, "generate", fake_grm_generate(tok))
    s = ep.main(argv + ["--max-fail-rate", "0.2"])  # 2 of 24 judgments fail
    assert (s["n_cases"], s["n_judgments"], s["n_valid"], s["n_failed"]) == (12, 24, 22, 2)
    assert s["accuracy"] == 100.0 and len(s["failures"]) == 2
    saved = _strict_json(out / "accuracy_summary.json")
    assert saved["table"]["total"]["n_failed"] == 2 and len(_read(out / "accuracy_judgments.jsonl")) == 24
    assert "2 of 24 judgments failed" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ep.main(argv + ["--max-fail-rate", "0.05"])
    assert not (out / "accuracy_summary.json").exists()  # a failed run leaves no old metric behind
    ep.main(argv + ["--max-fail-rate", "0.2"])
    report = subprocess.run([sys.executable, "report.py", "--out", str(tmp_path / "out")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert "| grm | 12 | 100.0 |" in report.stdout


def test_model_judge_accuracy_and_winrate_cli(tiny, tmp_path):
    folder, _, _ = tiny
    out = tmp_path / "out"
    s = ep.main(["accuracy", "--data", str(_small_pairs(tmp_path)), "--judge", "model", "--model", str(folder),
                 "--out", str(out), "--tiers", "easy,mid", "--chunk", "3"])
    assert s["n_cases"] == 4 and s["n_judgments"] == 8 and s["n_failed"] == 0
    assert len(_read(out / "accuracy_judgments.jsonl")) == 8
    assert _strict_json(out / "accuracy_summary.json")["table"]["total"]["n"] == 8
    assert "| general | easy | 2 | 0 |" in (out / "accuracy_summary.md").read_text()
    assert (out / "metrics.jsonl").exists()

    rows = [{**r, "persona": {"Name": r["persona"]["Name"]}, "response": r["response"][:120]}
            for r in _read(ROOT / "data" / "persona_world" / "eval.jsonl")[:4]]
    _write_jsonl(tmp_path / "eval.jsonl", rows)
    flags = ["--eval-file", str(tmp_path / "eval.jsonl"), "--out", str(out), "--bootstrap", "20"]
    s = ep.main(["winrate", "--policy", str(folder), "--judge", "rubric", "--max-new-tokens", "6", *flags])
    assert s["n"] == 4 and 0 <= s["lc_winrate"] <= 100 and len(s["lc_ci95"]) == 2
    assert s["mean_len_tokens_model"] is not None and len(_read(out / "winrate_answers.jsonl")) == 4
    # the saved answers judged again by the model judge (pairwise: seeded random sides)
    s2 = ep.main(["winrate", "--answers", str(out / "winrate_answers.jsonl"), "--judge", "model",
                  "--model", str(folder), *flags])
    judged = _read(out / "winrate_judgments.jsonl")
    assert s2["n"] == 4 and all(0 <= j["p_model_wins"] <= 1 for j in judged)
    assert {j["model_is_a"] for j in judged} == {True, False}
    assert "LC win rate" in (out / "winrate_summary.md").read_text()
    _strict_json(out / "winrate_summary.json")


def test_default_model_judge_shares_the_prefix_exactly(smollm2, tmp_path):
    model, tok = smollm2
    cases, items = _items(tmp_path)
    packed = ep.model_choice_probs(model, tok, items[:2], token_budget=100000)
    alone = ep.model_choice_probs(model, tok, items[:2], token_budget=1, share_prefix=False)
    assert [r["p_a"] for r in packed] == pytest.approx([r["p_a"] for r in alone], abs=1e-4)
    assert all(r["choice_mass"] > 0.05 for r in packed)  # an instruct model does answer with a letter


# ---------------------------------------------------------------------------------------------
# Endpoint judge against a real HTTP server on 127.0.0.1

def _reply(content, logprobs=None):
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


@pytest.fixture
def chat_server(loopback):
    """chat_server(script) speaks POST /v1/chat/completions; `script` is a list of actions consumed one
    per request (the last one repeats): ("json", body) | ("status", code) | ("garbage",) | ("sleep", s, body)."""
    def start(script):
        script, lock = list(script), threading.Lock()

        def respond(request):
            with lock:
                action = script.pop(0) if len(script) > 1 else script[0]
            if action[0] == "sleep":
                time.sleep(action[1])
                action = ("json", action[2])
            if action[0] == "status":
                return action[1], {"error": {"message": f"status {action[1]}"}}
            return 200, b"{not json" if action[0] == "garbage" else action[1]
        server = loopback(respond)
        server.script = script  # a test may load a new script
        return server
    return start


ITEM = ({"Name": "Ana"}, "How do I start running?", "Answer one", "Answer two")


def _endpoint_args(url, *extra):
    return ep.parse_args(["accuracy", "--judge", "endpoint", "--base-url", url, "--endpoint-model", "judge-x",
                          "--timeout", "0.5", "--retries", "3", "--backoff", "0.01", "--concurrency", "2",
                          "--api-key-env", "EVAL_PERSONA_TEST_KEY", *extra])


def test_endpoint_logprobs_and_request_shape(chat_server, monkeypatch):
    monkeypatch.setenv("EVAL_PERSONA_TEST_KEY", "sk-test")
    top = [{"token": "A", "logprob": -0.2}, {"token": "B", "logprob": -1.8}, {"token": " A", "logprob": -4.0}]
    srv = chat_server([("json", _reply("A", [{"token": "A", "logprob": -0.2, "top_logprobs": top}]))])
    out = ep.endpoint_choice_probs(_endpoint_args(srv.url), [ITEM])
    p = np.exp(np.logaddexp(-0.2, -4.0)) / (np.exp(np.logaddexp(-0.2, -4.0)) + np.exp(-1.8))
    assert out[0]["how"] == "logprobs" and out[0]["p_a"] == pytest.approx(p, rel=1e-6)
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "judge-x" and body["logprobs"] is True and body["top_logprobs"] == 5
    assert body["temperature"] == 0 and body["top_p"] == 1.0 and body["max_tokens"] == 8  # sent explicitly
    assert "Answer one" in body["messages"][-1]["content"]
    ep.endpoint_choice_probs(_endpoint_args(srv.url, "--no-logprobs"), [ITEM])
    assert "logprobs" not in srv.requests[-1]["body"] and "top_logprobs" not in srv.requests[-1]["body"]


def test_endpoint_choice_parsing():
    # a leading "**" token: the letter is found at the next position; an unlisted letter is
    # below the smallest listed log-prob
    lp = [{"token": "**", "logprob": -0.1, "top_logprobs": []},
          {"token": "B", "logprob": -0.05, "top_logprobs": [{"token": "B", "logprob": -0.05},
                                                            {"token": "C", "logprob": -3.0}]}]
    p, how = ep.endpoint_choice(_reply("**B**", lp))
    assert how == "logprobs" and p == pytest.approx(1 / (1 + np.exp(-0.05 + 3.0)))
    assert ep.endpoint_choice(_reply("B")) == (0.0, "text")
    assert ep.endpoint_choice(_reply("I prefer answer A because it is shorter."))[0] == 1.0
    assert ep.endpoint_choice(_reply("The better one is B."))[0] == 0.0
    assert ep.endpoint_choice(_reply("Both are fine.")) == (None, "unparsed")  # never a 50/50


def _endpoint_cli(url, pairs, out, *extra):
    return ep.main(["accuracy", "--data", str(pairs), "--judge", "endpoint", "--base-url", url,
                    "--timeout", "0.3", "--retries", "1", "--backoff", "0.01", "--concurrency", "1",
                    "--api-key-env", "EVAL_PERSONA_TEST_KEY", "--out", str(out), "--tiers", "easy", *extra])


# 2 cases, both orders: 4 judgments; --chunk 1 judges one case (2 judgments) at a time and stops
# as soon as the run can no longer pass.
# fault -> (script, extra flags, exit status (0 = a summary), valid judgments, failed, requests made)
NO_LETTER = [("json", _reply("A")), ("json", _reply("I cannot decide.")), ("json", _reply("B"))]
FAULTS = {
    "http500-then-ok": ([("status", 500), ("json", _reply("A"))], [], 0, 4, 0, 5),  # retried
    "http401": ([("status", 401)], ["--chunk", "1"], 1, 0, 2, 2),  # not retried
    "malformed-json": ([("garbage",)], ["--chunk", "1"], 1, 0, 2, 4),  # retried once, then failed
    "no-letter": (NO_LETTER, ["--max-fail-rate", "0.25"], 0, 3, 1, 4),
    "no-letter-over-limit": (NO_LETTER, ["--chunk", "1"], 1, 1, 1, 2),
    "timeout": ([("sleep", 1.0, _reply("A"))], ["--chunk", "1", "--retries", "0"], 1, 0, 2, 2),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_endpoint_fault_matrix(fault, chat_server, tmp_path, capsys):
    script, extra, status, n_valid, n_failed, n_requests = FAULTS[fault]
    srv = chat_server(script)
    out = tmp_path / "out"
    pairs = _small_pairs(tmp_path)  # 2 easy cases -> 4 judgments
    if status:
        with pytest.raises(SystemExit) as e:
            _endpoint_cli(srv.url, pairs, out, *extra)
        assert e.value.code == status
        captured = capsys.readouterr()
        assert f"{n_failed} of 4 judgments failed" in captured.err and "no accuracy reported" in captured.err
        assert "accuracy %" not in captured.out and not (out / "accuracy_summary.json").exists()
    else:
        s = _endpoint_cli(srv.url, pairs, out, *extra)
        assert (s["n_valid"], s["n_failed"]) == (n_valid, n_failed)
        assert _strict_json(out / "accuracy_summary.json")["fail_rate"] == n_failed / 4
    judged = _read(out / "accuracy_judgments.jsonl")  # written as judged, also when the run failed
    assert sum("error" in r for r in judged) == n_failed and sum("error" not in r for r in judged) == n_valid
    assert len(srv.requests) == n_requests


def test_endpoint_winrate_failures(chat_server, tmp_path, capsys):
    rows = _read(ROOT / "data" / "persona_world" / "eval.jsonl")[:6]
    _write_jsonl(tmp_path / "eval.jsonl", rows)
    answers = [{"idx": i, "question": r["question"], "answer": r["response"][:40 + 30 * i]} for i, r in enumerate(rows)]
    _write_jsonl(tmp_path / "answers.jsonl", answers)
    srv = chat_server([("json", _reply("nothing to say"))] + [("json", _reply("A")), ("json", _reply("B"))] * 3)
    argv = ["winrate", "--answers", str(tmp_path / "answers.jsonl"), "--eval-file", str(tmp_path / "eval.jsonl"),
            "--judge", "endpoint", "--base-url", srv.url, "--concurrency", "1", "--retries", "0",
            "--out", str(tmp_path / "out"), "--bootstrap", "10"]
    with pytest.raises(SystemExit) as e:
        ep.main(argv)
    assert e.value.code == 1 and "no win rate reported" in capsys.readouterr().err
    srv.script[:] = [("json", _reply("nothing to say"))] + [("json", _reply("A")), ("json", _reply("B"))] * 3
    s = ep.main(argv + ["--max-fail-rate", "0.2"])
    assert (s["n"], s["n_failed"], s["n_questions"]) == (5, 1, 6) and s["failures"][0]["idx"] == 0
    assert s["winrate"] in (0.0, 20.0, 40.0, 60.0, 80.0, 100.0)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line, exit status 2, before any model loads

BAD_FLAGS = [
    (["accuracy", "--per-tier", "-1"], "--per-tier must be >= 0"),
    (["accuracy", "--token-budget", "0"], "--token-budget must be >= 1"),
    (["accuracy", "--max-fail-rate", "1.5"], "--max-fail-rate must be in [0, 1]"),
    (["accuracy", "--max-fail-rate", "nan"], "--max-fail-rate must be in [0, 1]"),
    (["accuracy", "--timeout", "0"], "--timeout must be > 0"),
    (["accuracy", "--retries", "-1"], "--retries must be >= 0"),
    (["accuracy", "--tiers", "easy,impossible"], "--tiers: unknown ['impossible']"),
    (["accuracy", "--categories", "genral"], "--categories: unknown"),
    (["accuracy", "--judge", "oracle"], "invalid choice: 'oracle'"),
    (["winrate", "--limit", "-3"], "--limit must be >= 0"),
    (["winrate", "--bootstrap", "0"], "--bootstrap must be >= 1"),
    (["winrate", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["winrate", "--top-p", "0"], "0 < --top-p <= 1"),
    (["winrate", "--top-p", "1.2"], "0 < --top-p <= 1"),
    (["winrate", "--temperature", "-0.1"], "--temperature >= 0"),
    (["winrate", "--chunk", "0"], "--chunk must be >= 1"),
]


@pytest.mark.parametrize("argv,message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        ep.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def _guarded(argv, capsys):
    """main under common.main_guard, as `python eval_persona.py ...` runs it: (status, stderr)."""
    try:
        common.main_guard(lambda: ep.main(argv))
        return 0, capsys.readouterr().err
    except SystemExit as e:
        return e.code, capsys.readouterr().err


def test_bad_lines_and_paths(tmp_path, capsys):
    pairs = _small_pairs(tmp_path)
    lines = pairs.read_text().splitlines()
    row = json.loads(lines[3])
    lines[1] = lines[1][:50]  # truncated JSON
    lines[3] = json.dumps({k: v for k, v in row.items() if k != "question"})  # a field missing
    lines.append(json.dumps({**row, "chosen": ""}))  # an empty response
    lines.append("[1, 2]")  # not an object
    pairs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    base = ["accuracy", "--data", str(pairs), "--judge", "rubric", "--out", str(out)]
    status, err = _guarded(base, capsys)
    assert status == 2 and err.count("\n") == 1 and f"error: {pairs}:2: malformed JSON" in err
    status, err = _guarded(base + ["--skip-bad"], capsys)
    s = _strict_json(out / "accuracy_summary.json")
    assert status == 0 and s["n_skipped_lines"] == 4 and s["n_cases"] == len(lines) - 4
    assert [x.split(": ")[0] for x in s["skipped_lines"]] == [f"{pairs}:{i}" for i in (2, 8, 4, 7)]
    assert "field 'question' is missing" in s["skipped_lines"][2] and "is an empty string" in s["skipped_lines"][3]
    # the win rate's eval file and answers file
    rows = _read(ROOT / "data" / "persona_world" / "eval.jsonl")[:4]
    evals = tmp_path / "eval.jsonl"
    evals.write_text("\n".join([json.dumps(rows[0]), "{oops", json.dumps({**rows[1], "question": 3}),
                                *map(json.dumps, rows[2:])]) + "\n")
    answers = tmp_path / "answers.jsonl"
    valid = [rows[0], *rows[2:]]  # what --skip-bad keeps, numbered 0, 1, 2
    _write_jsonl(answers, [{"idx": i, "question": r["question"], "answer": "Short."} for i, r in enumerate(valid)])
    with answers.open("a") as f:
        f.write("not json\n")
    wr = ["winrate", "--eval-file", str(evals), "--answers", str(answers), "--out", str(out), "--bootstrap", "5"]
    status, err = _guarded(wr, capsys)
    assert status == 2 and f"{evals}:2: malformed JSON" in err
    status, err = _guarded(wr + ["--skip-bad"], capsys)
    s = _strict_json(out / "winrate_summary.json")
    assert status == 0 and s["n"] == 3 and s["n_skipped_lines"] == 3, err
    assert "field 'question' should be str" in s["skipped_lines"][1] and f"{answers}:4" in s["skipped_lines"][2]
    # bad paths: data, eval file, answers, checkpoint, an --out that cannot be written (checked
    # before the missing model would be loaded)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for argv, message in [
            (["accuracy", "--data", str(tmp_path / "nowhere")], "no PersonaFeedback files found"),
            (["accuracy", "--data", str(pairs), "--split", "test", "--skip-bad"], "no cases"),
            (["winrate", "--eval-file", str(tmp_path / "none.jsonl")], "none.jsonl: file not found"),
            (["winrate", "--eval-file", str(ROOT / "data" / "persona_world" / "eval.jsonl"), "--answers", str(PAIRS)],
             "no answer for question 0"),
            (["accuracy", "--data", str(pairs), "--skip-bad", "--judge", "model", "--model", str(tmp_path / "nope")],
             "no such checkpoint folder"),
            (["accuracy", "--data", str(pairs), "--skip-bad", "--judge", "model", "--model", str(tmp_path / "nope"),
              "--out", str(blocker / "out")], "--out"),
    ]:
        status, err = _guarded(argv + (["--out", str(out)] if "--out" not in argv else []), capsys)
        assert status == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)


def test_report_scores_each_answer_with_its_own_rows_persona(tmp_path):
    """Held-out personas share general questions: report.py must re-judge answer i with row i's
    persona, not with whichever persona last asked the same question; mismatched rows are refused."""
    from data.persona_world.rubric import rubric_judge
    personas = [json.loads(line)["persona"] for line in open(ROOT / "data" / "persona_world" / "personas.jsonl")]
    avoids = [p for p in personas if "exclamation" in p["Checkable_Preferences"]["avoid"]]
    others = [p for p in personas if "exclamation" not in p["Checkable_Preferences"]["avoid"]]
    question, answer = "How can I sleep better?", "Great idea! Keep a fixed bedtime, dim the lights and skip late coffee."
    rows = [{"persona": avoids[0], "question": question, "response": "Keep a fixed bedtime."},
            {"persona": others[0], "question": question, "response": "Keep a fixed bedtime."}]
    expected = [rubric_judge(r["persona"], question, answer)[1]["Personalization"] for r in rows]
    assert expected[0] != expected[1]
    folder = tmp_path / "out" / "eval" / "sft"
    folder.mkdir(parents=True)
    common.write_jsonl(tmp_path / "eval.jsonl", rows)
    (folder / "winrate_summary.json").write_text(json.dumps(
        {"n": 2, "lc_winrate": 50.0, "lc_ci95": [0.0, 100.0], "winrate": 50.0, "mean_len_tokens_model": 16,
         "eval_file": str(tmp_path / "eval.jsonl")}))
    judged = [{"idx": i, "question": question, "answer": answer} for i in range(2)]
    common.write_jsonl(folder / "winrate_judgments.jsonl", judged)
    cmd = [sys.executable, "report.py", "--out", str(tmp_path / "out"), "--policies", "sft", "--ppo-runs", "none"]
    report = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    row = next(line for line in report.stdout.splitlines() if line.startswith("| sft | 2 |"))
    assert row.split(" | ")[6] == f"{sum(expected) / 2:+.2f}"
    judged[1]["question"] = "Something else?"
    common.write_jsonl(folder / "winrate_judgments.jsonl", judged)
    report = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert report.returncode != 0 and "do not match" in report.stderr
