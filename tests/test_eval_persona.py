"""Tests of eval_persona.py: the length-controlled win rate (SPEC 1.4) against a slow reference and
on planted biases, the PersonaFeedback loaders on the real files (both published layouts and
pairs.jsonl), the endpoint judge against a real local HTTP server, order swapping, and the local
judges (model / GRM / scalar RM) end to end with tiny random models."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import eval_persona as ep

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PF = SHARED / "personafeedback"
EVAL300 = SHARED / "cpe_eval300" / "gpt-4o.jsonl"
need_pf = pytest.mark.skipif(not (PF / "general_easy.jsonl").is_file(),
                             reason=f"real PersonaFeedback files not found at {PF}")
need_eval300 = pytest.mark.skipif(not EVAL300.is_file(), reason=f"{EVAL300} not found")


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
    len_model = len_ref + dlen
    x = np.tanh(dlen / dlen.std(ddof=1))
    p = 1 / (1 + np.exp(-(theta0 + phi0 * x)))
    y = p if soft else (rng.random(n) < p).astype(float)
    return y, len_model, len_ref


@pytest.mark.parametrize("soft", [False, True])
def test_lc_fit_matches_slow_reference(soft):
    y, lm, lr = synthetic_judgments(200, 0.3, 1.2, 150, seed=1, soft=soft)
    if not soft:
        y[::7] = 0.5  # ties are allowed
    theta, phi = ep.fit_length_logistic(y, lm, lr)
    theta_ref, phi_ref = slow_lc_reference(y, lm, lr)
    assert theta == pytest.approx(theta_ref, abs=1e-4)
    assert phi == pytest.approx(phi_ref, abs=1e-4)
    r = ep.length_controlled_winrate(y, lm, lr)
    assert r["lc_winrate"] == pytest.approx(100 / (1 + np.exp(-theta_ref)), abs=1e-3)
    assert r["winrate"] == pytest.approx(100 * y.mean())


def test_lc_removes_planted_length_bias():
    # the judge likes longer answers (phi0 > 0) and the policy writes longer answers: the raw win
    # rate is inflated, the LC win rate recovers the equal-length rate sigmoid(theta0) = 50%
    y, lm, lr = synthetic_judgments(6000, 0.0, 2.0, 300, seed=2)
    r = ep.length_controlled_winrate(y, lm, lr)
    assert r["winrate"] > 65
    assert abs(r["lc_winrate"] - 50.0) < 3.0
    assert r["phi"] == pytest.approx(2.0, abs=0.3)


def test_lc_equals_raw_without_bias():
    y, lm, lr = synthetic_judgments(6000, 0.6, 0.0, 300, seed=3)
    r = ep.length_controlled_winrate(y, lm, lr)
    assert abs(r["lc_winrate"] - r["winrate"]) < 2.5
    assert abs(r["lc_winrate"] - 100 / (1 + np.exp(-0.6))) < 3.0


def test_lc_edge_cases_and_bootstrap():
    lm, lr = np.arange(20) * 10.0 + 100, np.full(20, 150.0)
    r = ep.length_controlled_winrate(np.full(20, 0.5), lm, lr)
    assert r["lc_winrate"] == pytest.approx(50.0) and r["phi"] == pytest.approx(0.0, abs=1e-9)
    r = ep.length_controlled_winrate(np.ones(20), lm, lr)  # perfect separation stays finite
    assert 99.0 < r["lc_winrate"] <= 100.0 and np.isfinite(r["theta"])
    r = ep.length_controlled_winrate([1.0, 0.0, 1.0], [5, 5, 5], [5, 5, 5])  # no length variance
    assert r["lc_winrate"] == pytest.approx(r["winrate"], abs=0.01)  # the tiny ridge, n=3
    y, lm, lr = synthetic_judgments(200, 0.4, 1.0, 100, seed=4)
    ci1 = ep.bootstrap_ci(y, lm, lr, n_boot=200, seed=7)
    ci2 = ep.bootstrap_ci(y, lm, lr, n_boot=200, seed=7)
    assert ci1 == ci2
    lc = ep.length_controlled_winrate(y, lm, lr)
    assert ci1["lc_winrate"][0] < lc["lc_winrate"] < ci1["lc_winrate"][1]
    assert ci1["winrate"][0] < lc["winrate"] < ci1["winrate"][1]


# ---------------------------------------------------------------------------------------------
# Loaders (SPEC 3 layouts) on the real files

def _real_rows(name, n, start=0):
    lines = (PF / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines[start:start + n]]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _persona(uid):
    return json.loads((PF / "personas" / f"{uid}.json").read_text(encoding="utf-8"))


def _key(c):
    return (c["category"], c["tier"], c["user_id"], c["question"], c["chosen"], c["reject"],
            json.dumps(c["persona"], ensure_ascii=False, sort_keys=True))


@need_pf
def test_release_layout_real_files():
    cases, skipped = ep.load_personafeedback(PF, categories=("general",))
    assert skipped == 0
    counts = {t: sum(c["tier"] == t for c in cases) for t in ("easy", "medium", "hard")}
    assert counts == {"easy": 1510, "medium": 1321, "hard": 1010}
    assert all(isinstance(c["persona"], dict) and "Name" in c["persona"] for c in cases[:50])
    assert cases[0]["user_id"] == _real_rows("general_easy.jsonl", 1)[0]["user_id"]
    sample = ep.sample_per_tier(cases, 5, seed=0)
    assert len(sample) == 15 and sample == ep.sample_per_tier(cases, 5, seed=0)
    assert sample != ep.sample_per_tier(cases, 5, seed=1)


@need_pf
def test_public_and_release_layouts_built_from_real_files_agree(tmp_path):
    tiers = {"easy": "easy", "medium": "mid", "hard": "hard"}
    rows = {t: _real_rows(f"general_{f}.jsonl", 6) for t, f in tiers.items()}
    specific = _real_rows("general_easy.jsonl", 4, start=100)  # stands in for the Specific half
    uids = sorted({r["user_id"] for rs in [*rows.values(), specific] for r in rs})

    public = tmp_path / "public"  # data/{general,spedific}/{easy,medium,hard}.jsonl + persona/all_personas.jsonl
    for t, rs in rows.items():
        _write_jsonl(public / "data" / "general" / f"{t}.jsonl", rs)
    _write_jsonl(public / "data" / "spedific" / "easy.jsonl", specific)
    _write_jsonl(public / "persona" / "all_personas.jsonl", [{"user_id": u, "persona": _persona(u)} for u in uids])

    release = tmp_path / "release"  # rm_benchmark_all/{general,specific}_{easy,mid,hard}.jsonl + persona_all/
    for t, f in tiers.items():
        _write_jsonl(release / "rm_benchmark_all" / f"general_{f}.jsonl", rows[t])
    _write_jsonl(release / "rm_benchmark_all" / "specific_easy.jsonl", specific)
    (release / "persona_all").mkdir()
    for u in uids:
        (release / "persona_all" / f"{u}.json").write_text(json.dumps(_persona(u), ensure_ascii=False), encoding="utf-8")

    a, _ = ep.load_personafeedback(public)
    b, _ = ep.load_personafeedback(release)
    c, _ = ep.load_personafeedback(release / "rm_benchmark_all")  # personas found in the parent folder
    assert len(a) == 22
    assert sorted(map(_key, a)) == sorted(map(_key, b)) == sorted(map(_key, c))
    assert sum(x["category"] == "specific" for x in a) == 4
    only, _ = ep.load_personafeedback(public, categories=("specific",), tiers=("easy",))
    assert len(only) == 4


@need_pf
def test_pairs_jsonl_layout(tmp_path):
    src = _real_rows("general_hard.jsonl", 4)
    rows = []
    for i, r in enumerate(src):
        persona = _persona(r["user_id"])
        rows.append({**r, "persona": json.dumps(persona, ensure_ascii=False) if i % 2 else persona,
                     "tier": ["easy", "medium", "hard", "hard"][i], "category": "specific" if i else "general",
                     "split": "eval" if i < 3 else "train"})
    _write_jsonl(tmp_path / "pairs.jsonl", rows)
    cases, _ = ep.load_personafeedback(tmp_path / "pairs.jsonl")
    assert [c["tier"] for c in cases] == ["easy", "medium", "hard"]
    assert [c["category"] for c in cases] == ["general", "specific", "specific"]
    assert len(ep.load_personafeedback(tmp_path, split="all")[0]) == 4


@need_pf
def test_missing_persona_names_the_user(tmp_path):
    rows = _real_rows("general_easy.jsonl", 3)
    rows[1]["user_id"] = "nobody_Zz9q"
    _write_jsonl(tmp_path / "general_easy.jsonl", rows)
    (tmp_path / "persona_all").mkdir()
    for r in rows:
        if r["user_id"] != "nobody_Zz9q":
            (tmp_path / "persona_all" / f"{r['user_id']}.json").write_text(json.dumps(_persona(r["user_id"])))
    with pytest.raises(common.DataError, match="nobody_Zz9q"):
        ep.load_personafeedback(tmp_path)
    with pytest.raises(common.DataError, match="nobody_Zz9q"):  # never silently skipped
        ep.load_personafeedback(tmp_path, skip_bad=True)


@need_pf
def test_malformed_line_and_empty_response(tmp_path):
    rows = _real_rows("general_mid.jsonl", 4)
    (tmp_path / "personas").mkdir()
    for r in rows:
        (tmp_path / "personas" / f"{r['user_id']}.json").write_text(json.dumps(_persona(r["user_id"])))
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines[2] = lines[2][:40]  # truncated JSON on line 3
    (tmp_path / "general_mid.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(common.DataError, match=r"general_mid\.jsonl.*3"):
        ep.load_personafeedback(tmp_path)
    cases, skipped = ep.load_personafeedback(tmp_path, skip_bad=True)
    assert (len(cases), skipped) == (3, 1)

    rows[1]["reject"] = "   "
    _write_jsonl(tmp_path / "general_mid.jsonl", rows)
    with pytest.raises(common.DataError, match=r"general_mid\.jsonl:2: field 'reject' is an empty string"):
        ep.load_personafeedback(tmp_path)
    cases, skipped = ep.load_personafeedback(tmp_path, skip_bad=True)
    assert (len(cases), skipped) == (3, 1)


@need_eval300
def test_eval_rows_real_file():
    rows, skipped = ep.load_eval_rows(EVAL300, limit=30, seed=0)
    assert len(rows) == 30 and skipped == 0
    assert rows == ep.load_eval_rows(EVAL300, limit=30, seed=0)[0]
    assert all(isinstance(r["persona"], str) and r["reference"] for r in rows)
    assert "Name" in common.render_persona(rows[0]["persona"])


# ---------------------------------------------------------------------------------------------
# Order swapping and the accuracy table

def _fake_cases(n):
    return [{"id": f"c{i}", "user_id": f"u{i}", "persona": {"Name": f"P{i}"}, "question": f"q{i}",
             "chosen": f"good {i}", "reject": f"bad {i}", "category": ["general", "specific"][i % 2],
             "tier": ["easy", "medium", "hard"][i % 3]} for i in range(n)]


def test_order_swapping_cancels_an_always_A_judge():
    always_a = lambda items, desc=None: [{"p_a": 1.0} for _ in items]
    records = ep.judge_cases(_fake_cases(12), "pair", always_a, order="both")
    table = ep.accuracy_table(records)
    assert table["total"]["accuracy"] == 50.0 and table["total"]["n"] == 24
    assert all(r["accuracy"] == 50.0 for r in table["rows"])
    assert table["by_order"]["chosen_first"]["accuracy"] == 100.0
    # a judge that knows the answer scores 100 in both orders
    oracle = lambda items, desc=None: [{"p_a": 0.9 if it[2].startswith("good") else 0.2} for it in items]
    assert ep.accuracy_table(ep.judge_cases(_fake_cases(12), "pair", oracle))["total"]["accuracy"] == 100.0
    # random order: seeded, one judgment per case
    r1 = ep.judge_cases(_fake_cases(40), "pair", always_a, order="random", seed=3)
    assert len(r1) == 40 and [r["chosen_first"] for r in r1] == \
        [r["chosen_first"] for r in ep.judge_cases(_fake_cases(40), "pair", always_a, order="random", seed=3)]


def test_pointwise_ties_count_half():
    scorer = lambda items, desc=None: [{"score": 1.0 if it[2].startswith("good") and it[0]["Name"] != "P0" else
                                        (0.5 if it[0]["Name"] == "P1" else 0.0)} for it in items]
    calls = []
    counting = lambda items, desc=None: (calls.append(len(items)), scorer(items))[1]
    records = ep.judge_cases(_fake_cases(3), "point", counting, order="both")
    assert calls == [6]  # each distinct response scored once although both orders are recorded
    assert [r["correct"] for r in records] == [0.5, 0.5, 1.0, 1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Endpoint judge against a real HTTP server on 127.0.0.1

def _reply(content, logprobs=None):
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


class ChatServer:
    """Speaks POST /v1/chat/completions. `script` is a list of actions consumed one per request
    (the last one repeats): ("json", body) | ("status", code) | ("garbage",) | ("sleep", s, body)."""

    def __init__(self, script):
        self.script, self.requests, self.lock = list(script), [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "body": body,
                                            "auth": self.headers.get("Authorization")})
                    action = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                try:
                    if action[0] == "sleep":
                        time.sleep(action[1])
                        action = ("json", action[2])
                    if action[0] == "status":
                        self.send_response(action[1])
                        self.send_header("Content-Length", "2")
                        self.end_headers()
                        self.wfile.write(b"{}")
                        return
                    data = b"{not json" if action[0] == "garbage" else json.dumps(action[1]).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat_server():
    servers = []

    def start(script):
        servers.append(ChatServer(script))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def _endpoint_args(url, **kw):
    args = ep.parse_args(["accuracy", "--judge", "endpoint", "--base-url", url, "--endpoint-model", "judge-x",
                          "--timeout", "0.5", "--retries", "3", "--backoff", "0.01", "--concurrency", "2",
                          "--api-key-env", "EVAL_PERSONA_TEST_KEY"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


ITEM = ({"Name": "Ana"}, "How do I start running?", "Answer one", "Answer two")


def test_endpoint_logprobs_and_request_shape(chat_server, monkeypatch):
    monkeypatch.setenv("EVAL_PERSONA_TEST_KEY", "sk-test")
    top = [{"token": "A", "logprob": -0.2}, {"token": "B", "logprob": -1.8}, {"token": " A", "logprob": -4.0}]
    srv = chat_server([("json", _reply("A", [{"token": "A", "logprob": -0.2, "top_logprobs": top}]))])
    out = ep.EndpointPairJudge(_endpoint_args(srv.url))([ITEM])
    p = np.exp(np.logaddexp(-0.2, -4.0)) / (np.exp(np.logaddexp(-0.2, -4.0)) + np.exp(-1.8))
    assert out[0]["how"] == "logprobs" and out[0]["p_a"] == pytest.approx(p, rel=1e-6)
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-x" and req["body"]["logprobs"] is True
    assert req["body"]["top_logprobs"] == 5 and req["body"]["temperature"] == 0
    assert "Answer one" in req["body"]["messages"][-1]["content"]


def test_endpoint_choice_parsing():
    # a leading "**" token: the letter is found at the next position; an unlisted letter is
    # below the smallest listed log-prob
    lp = [{"token": "**", "logprob": -0.1, "top_logprobs": []},
          {"token": "B", "logprob": -0.05, "top_logprobs": [{"token": "B", "logprob": -0.05},
                                                            {"token": "C", "logprob": -3.0}]}]
    p, how = ep.endpoint_choice(_reply("**B**", lp))
    assert how == "logprobs" and p == pytest.approx(1 / (1 + np.exp(-0.05 + 3.0)))
    assert ep.endpoint_choice(_reply("B"))[0] == 0.0
    assert ep.endpoint_choice(_reply("I prefer answer A because it is shorter."))[0] == 1.0
    assert ep.endpoint_choice(_reply("The better one is B."))[0] == 0.0
    assert ep.endpoint_choice(_reply("Both are fine.")) == (0.5, "unparsed")


def test_endpoint_text_fallback(chat_server):
    srv = chat_server([("json", _reply("B")), ("json", _reply("Answer: A")), ("json", _reply("no idea"))])
    judge = ep.EndpointPairJudge(_endpoint_args(srv.url, concurrency=1))
    out = judge([ITEM, ITEM, ITEM])
    assert [o["p_a"] for o in out] == [0.0, 1.0, 0.5] and judge.n_unparsed == 1


@pytest.mark.parametrize("first", [("status", 500), ("garbage",), ("sleep", 1.5, _reply("A"))],
                         ids=["http500", "malformed-json", "timeout"])
def test_endpoint_retries_then_succeeds(chat_server, first):
    srv = chat_server([first, ("json", _reply("B"))])
    out = ep.EndpointPairJudge(_endpoint_args(srv.url))([ITEM])
    assert out[0]["p_a"] == 0.0 and len(srv.requests) == 2


def test_endpoint_clear_error_after_last_retry(chat_server):
    srv = chat_server([("status", 500)])
    with pytest.raises(common.EndpointError, match="500"):
        ep.EndpointPairJudge(_endpoint_args(srv.url, retries=2))([ITEM])
    assert len(srv.requests) == 3  # the first try and 2 retries


@need_pf
def test_endpoint_always_A_on_real_cases_scores_exactly_half(chat_server, tmp_path):
    srv = chat_server([("json", _reply("A"))])
    cases, _ = ep.load_personafeedback(PF, categories=("general",))
    cases = ep.sample_per_tier(cases, 2, seed=0)
    records = ep.judge_cases(cases, "pair", ep.EndpointPairJudge(_endpoint_args(srv.url)), order="both")
    assert ep.accuracy_table(records)["total"]["accuracy"] == 50.0
    assert len(srv.requests) == 12


# ---------------------------------------------------------------------------------------------
# Local judges with tiny random models

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the test machine is shared by many processes: one intra-op thread avoids OpenMP
    # oversubscription, which slows these small forwards down by an order of magnitude
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
    corpus = ["Which answer fits this user better? Reply with a single letter: A or B.",
              "The user's persona and question. Helpfulness Personalization Natural scores critique"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, model, tokenizer): a tiny random Llama saved as an HF folder with a value head."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = common.tiny_config("llama", vocab_size=len(tok), max_position_embeddings=32768)
    model = common.Transformer(common.ModelConfig.from_hf(cfg), value_head=True)
    torch.nn.init.normal_(model.value_head.weight, std=0.5)
    folder = tmp_path_factory.mktemp("tiny") / "ckpt"
    common.save_model(model, tok, folder)
    return folder, model.eval(), tok


def _short_cases(n, seed=0):
    """Real cases with the persona reduced to name and demographics and the responses cut short,
    so tiny-model tests stay fast (the byte-level test tokenizer spends ~3 tokens per Chinese character)."""
    cases, _ = ep.load_personafeedback(PF, categories=("general",))
    cases = ep.sample_per_tier(cases, n, seed)
    return [{**c, "persona": {k: c["persona"][k] for k in ("Name", "Demographics")},
             "chosen": c["chosen"][:120], "reject": c["reject"][:100]} for c in cases]


def test_shared_prefix_logits_equal_separate_forwards(tiny):
    _, model, _ = tiny
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    rand = lambda n: torch.randint(0, V, (n,), generator=g).tolist()
    prefixes = [rand(30), rand(5), rand(17)]
    groups = [[rand(12), rand(3)], [rand(40)], [rand(1), rand(9), rand(20)]]
    shared = ep.shared_prefix_logits(model, prefixes, groups)
    plain = ep.last_token_logits(model, [p + s for p, ss in zip(prefixes, groups) for s in ss])
    assert shared.shape == plain.shape == (6, V)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    assert ep.split_shared_prefix([[1, 2, 3, 4], [1, 2, 5]]) == ([1, 2], [[3, 4], [5]])
    assert ep.split_shared_prefix([[1, 2, 3], [1, 2, 3]]) == ([1, 2], [[3], [3]])


@need_pf
def test_model_judge_on_real_cases(tiny):
    _, model, tok = tiny
    cases = _short_cases(1)
    shared = ep.ModelPairJudge(model, tok, token_budget=6000)
    plain = ep.ModelPairJudge(model, tok, token_budget=1, share_prefix=False)  # one sequence per forward
    r1 = ep.judge_cases(cases, "pair", shared, "both")
    r2 = ep.judge_cases(cases, "pair", plain, "both")
    assert [r["p_chosen"] for r in r1] == pytest.approx([r["p_chosen"] for r in r2], abs=1e-5)
    assert all(0 <= r["p_chosen"] <= 1 and 0 <= r["choice_mass"] <= 1 for r in r1)
    assert shared.n_tokens < 0.9 * plain.n_tokens  # the persona + question prefix is run once per pair


@need_pf
def test_grm_and_rm_judges_on_real_cases(tiny):
    _, model, tok = tiny
    cases = _short_cases(1)[:2]
    grm = ep.GRMScorer(model, tok, batch_size=4, max_new_tokens=3)
    records = ep.judge_cases(cases, "point", grm, "both")
    assert grm.n_failed == 4  # a random model writes no scores: reward 0 for both, a tie
    assert [r["correct"] for r in records] == [0.5] * 4
    rm = ep.RMScorer(model, tok, token_budget=100000)
    items = [(c["persona"], c["question"], c[f]) for c in cases for f in ("chosen", "reject")]
    values = [o["score"] for o in rm(items)]
    with torch.no_grad():
        for item, v in zip(items, values):
            ids = ep.rm_sequence_ids(tok, *item)
            alone = model.values(torch.tensor([ids]))[0, -1].item()
            assert v == pytest.approx(alone, abs=1e-4)
    records = ep.judge_cases(cases, "point", rm, "both")
    assert all(r["correct"] in (0.0, 1.0) for r in records)


@need_pf
def test_accuracy_cli_end_to_end(tiny, tmp_path):
    folder, _, _ = tiny
    data = tmp_path / "bench"
    for f in ("easy", "mid", "hard"):
        rows = [{**r, "chosen": r["chosen"][:80], "reject": r["reject"][:80]} for r in _real_rows(f"general_{f}.jsonl", 3)]
        _write_jsonl(data / f"general_{f}.jsonl", rows)
    (data / "personas").mkdir()
    for uid in {json.loads(x)["user_id"] for f in data.glob("*.jsonl") for x in f.read_text().splitlines()}:
        persona = {k: _persona(uid)[k] for k in ("Name", "Demographics")}
        (data / "personas" / f"{uid}.json").write_text(json.dumps(persona, ensure_ascii=False))
    out = tmp_path / "out"
    summary = ep.main(["accuracy", "--data", str(data), "--judge", "model", "--model", str(folder),
                       "--per-tier", "2", "--out", str(out)])
    assert summary["n_cases"] == 6 and summary["n_judgments"] == 12
    lines = (out / "accuracy_judgments.jsonl").read_text().splitlines()
    assert len(lines) == 12
    saved = json.loads((out / "accuracy_summary.json").read_text())
    assert saved["table"]["total"]["n"] == 12 and "| general | easy | 4 |" in (out / "accuracy_summary.md").read_text()
    assert (out / "metrics.jsonl").exists()


@need_eval300
def test_winrate_cli_end_to_end(tiny, tmp_path):
    folder, _, _ = tiny
    rows = [json.loads(x) for x in EVAL300.read_text(encoding="utf-8").splitlines()[:4]]
    rows = [{**r, "persona": r["persona"][:200], "response": r["response"][:150]} for r in rows]
    _write_jsonl(tmp_path / "eval.jsonl", rows)
    out = tmp_path / "out"
    common_flags = ["--eval-file", str(tmp_path / "eval.jsonl"), "--out", str(out), "--bootstrap", "50"]
    s = ep.main(["winrate", "--policy", str(folder), "--judge", "model", "--model", str(folder),
                 "--max-new-tokens", "8", *common_flags])
    assert s["n"] == 4 and 0 <= s["lc_winrate"] <= 100 and len(s["lc_ci95"]) == 2
    assert s["mean_len_tokens_model"] is not None
    judged = [json.loads(x) for x in (out / "winrate_judgments.jsonl").read_text().splitlines()]
    assert len(judged) == 4 and all(0 <= j["p_model_wins"] <= 1 for j in judged)
    assert "LC win rate" in (out / "winrate_summary.md").read_text()
    # reuse the saved answers with a pointwise judge (GRM, a random model: all ties -> 50%)
    s2 = ep.main(["winrate", "--answers", str(out / "winrate_answers.jsonl"), "--judge", "grm",
                  "--model", str(folder), "--grm-max-new-tokens", "2", *common_flags])
    assert s2["winrate"] == 50.0 and s2["grm_parse_failures"] == 8
