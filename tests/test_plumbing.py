"""The plumbing of common.py: JSONL reading and writing, metrics, output folders, resume
checkpoints, the LR schedule, single-process torchrun helpers, main_guard, and the
OpenAI-compatible client against a real HTTP server on 127.0.0.1. CPU only, seconds.

    cd /work/main && python -m pytest -q tests/test_plumbing.py
"""
import json
import math
import random
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import common as P


# ------------------------------------------------------------------------------------------
# JSONL reading and field checks
# ------------------------------------------------------------------------------------------


def write_lines(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else line.encode() + b"\n" for line in lines))
    return path


def test_read_jsonl_good_file_skips_blank_lines(tmp_path):
    f = write_lines(tmp_path / "a.jsonl", [b'\xef\xbb\xbf{"x": 1}\n', "", '{"x": "\u00e9"}', "   "])
    assert P.read_jsonl(f) == ([(1, {"x": 1}), (3, {"x": "\u00e9"})], [])


@pytest.mark.parametrize("bad, expect", [('{"x": 1', "malformed JSON"), ("[1, 2]", "expected a JSON object, got list"),
                                         (b'{"x": "\xff"}\n', "not valid UTF-8")])
def test_read_jsonl_error_names_file_and_line(tmp_path, bad, expect):
    f = write_lines(tmp_path / "data.jsonl", ['{"x": 1}', '{"x": 2}', bad, '{"x": 4}'])
    with pytest.raises(P.DataError) as e:
        P.read_jsonl(f)
    assert str(e.value).startswith(f"{f}:3: ") and expect in str(e.value), str(e.value)


def test_read_jsonl_skip_bad_lists_what_it_skipped(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", ['{"x": 1}', "nope", '"str"', '{"x": 4}', "{"])
    rows, skipped = P.read_jsonl(f, skip_bad=True)
    assert rows == [(1, {"x": 1}), (4, {"x": 4})]
    assert [s.split(": ", 1)[0] for s in skipped] == [f"{f}:2", f"{f}:3", f"{f}:5"]
    assert "malformed JSON" in skipped[0] and "got str" in skipped[1]


def test_read_jsonl_missing_file(tmp_path):
    for path in (tmp_path / "nope.jsonl", tmp_path):  # a folder is no file either
        with pytest.raises(P.DataError, match="file not found"):
            P.read_jsonl(path)


def test_require_field_messages():
    row = {"q": "hi", "empty": "  ", "n": 3, "flag": True, "persona": {"a": 1}}
    assert P.require_field(row, "q", "f.jsonl", 7) == "hi"
    assert P.require_field(row, "n", "f.jsonl", 7, kind=int) == 3
    assert P.require_field(row, "n", "f.jsonl", 7, kind=float) == 3  # JSON 3 is a fine float
    assert P.require_field(row, "persona", "f.jsonl", 7, kind=(dict, str)) == {"a": 1}
    cases = [("missing", str, "f.jsonl:7: field 'missing' is missing (keys: ['empty', 'flag', 'n', 'persona', 'q'])"),
             ("n", str, "f.jsonl:7: field 'n' should be str, got int (3)"),
             ("empty", str, "f.jsonl:7: field 'empty' is an empty string"),
             ("flag", int, "f.jsonl:7: field 'flag' should be int, got bool"),
             ("q", (dict, list), "field 'q' should be dict or list, got str")]
    for name, kind, expect in cases:
        with pytest.raises(P.DataError) as e:
            P.require_field(row, name, "f.jsonl", 7, kind=kind)
        assert expect in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------------
# JSONL writing, metrics, atomic folders, output folders
# ------------------------------------------------------------------------------------------


def test_json_clean_gives_plain_valid_json():
    x = {"nan": float("nan"), "inf": -math.inf, "t": torch.tensor([0.5, float("nan")]), "s": torch.tensor(2),
         "np": np.float32(0.25), "arr": np.array([[1, 2]]), "path": Path("/a/b"), 3: (1, {"k": float("inf")})}
    clean = P.json_clean(x)
    assert clean == {"nan": None, "inf": None, "t": [0.5, None], "s": 2, "np": 0.25, "arr": [[1, 2]],
                     "path": "/a/b", "3": [1, {"k": None}]}
    assert json.loads(json.dumps(clean, allow_nan=False)) == clean


def test_write_jsonl_roundtrip_nan_and_atomic_on_error(tmp_path):
    f = tmp_path / "sub" / "out.jsonl"
    P.write_jsonl(f, [{"a": 1}, {"b": "\u4e2d\u6587", "loss": float("nan")}])
    assert "\u4e2d\u6587" in f.read_text(encoding="utf-8")  # ensure_ascii=False: readable files
    assert "NaN" not in f.read_text() and [json.loads(line) for line in f.read_text().splitlines()][1]["loss"] is None
    assert [r for _, r in P.read_jsonl(f)[0]] == [{"a": 1}, {"b": "\u4e2d\u6587", "loss": None}]

    def rows_then_crash():
        yield {"new": 1}
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        P.write_jsonl(f, rows_then_crash())
    assert [r for _, r in P.read_jsonl(f)[0]] == [{"a": 1}, {"b": "\u4e2d\u6587", "loss": None}]  # untouched
    with pytest.raises(TypeError):  # not JSON-serialisable, mid-way
        P.write_jsonl(tmp_path / "new.jsonl", [{"ok": 1}, {"bad": object()}])
    assert not (tmp_path / "new.jsonl").exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out.jsonl", "sub"]  # no temp file left


def test_append_jsonl_and_drop_torn_tail(tmp_path):
    f = tmp_path / "x" / "log.jsonl"
    P.append_jsonl(f, {"i": 0})
    P.append_jsonl(f, {"i": 1, "v": float("inf")})
    assert [r for _, r in P.read_jsonl(f)[0]] == [{"i": 0}, {"i": 1, "v": None}]
    with open(f, "ab") as fh:
        fh.write(b'{"i": 2, "lo')  # a kill in the middle of a line
    P.drop_torn_tail(f)
    P.append_jsonl(f, {"i": 3})
    assert [r["i"] for _, r in P.read_jsonl(f)[0]] == [0, 1, 3]
    P.drop_torn_tail(f)  # whole lines: unchanged
    P.drop_torn_tail(tmp_path / "missing.jsonl")  # nothing to do
    assert [r["i"] for _, r in P.read_jsonl(f)[0]] == [0, 1, 3]
    one = write_lines(tmp_path / "one.jsonl", [b'{"cut'])
    P.drop_torn_tail(one)
    assert one.read_bytes() == b""


def test_metrics_logger_new_run_and_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    path = tmp_path / "run" / "metrics.jsonl"
    log = P.MetricsLogger(path)
    log.log({"event": "data", "files": ["a.jsonl"]})
    for step in range(1, 7):
        log.log({"step": step, "loss": torch.tensor(1.0 / step), "kl": np.float32(0.25)})
    rows = [r for _, r in P.read_jsonl(path)[0]]
    assert [r.get("step") for r in rows] == [None, 1, 2, 3, 4, 5, 6]
    assert rows[1]["loss"] == 1.0 and rows[1]["kl"] == 0.25 and all(abs(r["time"] - time.time()) < 60 for r in rows)

    with open(path, "ab") as f:
        f.write(b'{"step": 7, "lo')  # killed mid-line after step 6
    log = P.MetricsLogger(path, keep_until_step=4)  # resumed from the checkpoint of step 4
    for step in (5, 6, 7):
        log.log({"step": step, "loss": 0.0})
    rows = [r for _, r in P.read_jsonl(path)[0]]
    assert [r.get("step") for r in rows] == [None, 1, 2, 3, 4, 5, 6, 7]  # each step once
    assert rows[5]["loss"] == 0.0

    P.MetricsLogger(path)  # a new run in the same folder starts the file anew
    assert path.read_text() == ""

    monkeypatch.setenv("RANK", "1")  # other ranks write nothing
    other = P.MetricsLogger(tmp_path / "rank1" / "metrics.jsonl")
    other.log({"step": 1})
    assert not (tmp_path / "rank1").exists()


def test_atomic_dir(tmp_path):
    final = tmp_path / "ckpt_000001"
    with P.atomic_dir(final) as d:
        (d / "a.txt").write_text("one")
        assert not final.exists()
    assert (final / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):  # failure: the old folder stays, no temp left
        with P.atomic_dir(final) as d:
            (d / "a.txt").write_text("half")
            raise RuntimeError("crash while saving")
    assert (final / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000001"]
    with P.atomic_dir(final) as d:  # success replaces the existing folder
        (d / "b.txt").write_text("two")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000001"]


def test_atomic_dir_full_disk_says_so(tmp_path, monkeypatch):
    """A save that fails on a full disk (torch.save's own message is "unexpected pos ...") is
    reported as a full disk, naming the folder; the previous folder stays, no temp is left. With
    room on the disk the original error passes through unchanged."""
    final = tmp_path / "ckpt_000002"
    with P.atomic_dir(final) as d:
        (d / "a.txt").write_text("one")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(P.shutil, "disk_usage", lambda path: usage._replace(free=3 << 20))
    full = r"writing .*ckpt_000002 failed: its disk is full \(3 MiB free; .*unexpected pos.*intact"
    with pytest.raises(OSError, match=full):
        with P.atomic_dir(final) as d:
            (d / "a.txt").write_text("half")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1051498368 vs 105")
    assert (final / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000002"]
    monkeypatch.setattr(P.shutil, "disk_usage", lambda path: usage._replace(free=8 << 30))
    with pytest.raises(RuntimeError, match="^crash$"):
        with P.atomic_dir(final) as d:
            raise RuntimeError("crash")


def test_prepare_out(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "run"
    P.prepare_out(out)  # a new folder
    assert out.is_dir()
    for name in ("ckpt_000004", ".ckpt_000008.tmp-8", ".staging_model.tmp-ab12"):
        (out / name).mkdir()
    (out / ".metrics.jsonl.tmp-1234abcd").write_text("{")
    (out / "metrics.jsonl").write_text("{}\n")
    P.prepare_out(out, resume=True)  # a killed run: its temporary folders and files go, the checkpoint stays
    assert sorted(p.name for p in out.iterdir()) == ["ckpt_000004", "metrics.jsonl"]
    (out / "DONE").write_text("finished\n")
    with pytest.raises(P.DataError, match="finished run.*--overwrite"):
        P.prepare_out(out)
    P.prepare_out(out, resume=True)  # resuming a finished run is allowed (the stage has nothing left to do)
    assert (out / "DONE").exists()
    P.prepare_out(out, overwrite=True)  # --overwrite: the old run's checkpoints and DONE go
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


# ------------------------------------------------------------------------------------------
# resume checkpoints: an interrupted run resumes exactly
# ------------------------------------------------------------------------------------------


def tiny_model(seed):
    torch.manual_seed(seed)
    cfg = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "tie_word_embeddings": True}
    model = P.Transformer(P.ModelConfig.from_hf(cfg)).train()
    return model, P.adamw(model, lr=1e-2, weight_decay=0.1)


def train(model, opt, n):
    for _ in range(n):
        # draws from all three generators, so a missed RNG restore changes the data
        k = int(np.random.randint(3, 9)) + random.randrange(3)
        ids = torch.randint(0, 64, (2, k))
        loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def draws():
    return random.random(), float(np.random.rand()), torch.rand(2).tolist()


def test_training_state_resume_is_exact(tmp_path):
    random.seed(0), np.random.seed(0)
    model, opt = tiny_model(0)
    train(model, opt, 3)
    for group in opt.param_groups:
        group["lr"] = 5e-3  # as the schedule does; it must come back too
    ckpt = tmp_path / "ckpt_000003"
    P.save_training_state(ckpt, model, opt, 3, {"plan": {"lr": 1e-2}, "best": 1.5})
    assert (ckpt / ".metadata").exists() and not list(tmp_path.glob(".*"))
    train(model, opt, 2)
    expect_params = [p.detach().clone() for p in model.parameters()]
    expect_draws = draws()

    random.seed(123), np.random.seed(123)
    model2, opt2 = tiny_model(1)  # other weights, lr and RNG: all of it must be overwritten
    assert P.latest_checkpoint(tmp_path) == ckpt
    step, extra = P.load_training_state(ckpt, model2, opt2)
    assert step == 3 and extra == {"plan": {"lr": 1e-2}, "best": 1.5}
    assert [g["lr"] for g in opt2.param_groups] == [5e-3, 5e-3]
    train(model2, opt2, 2)
    for a, b in zip(expect_params, model2.parameters()):
        assert torch.equal(a, b)
    assert draws() == expect_draws

    P.save_training_state(ckpt, model2, opt2, 5)  # saving again over it replaces it
    assert P.load_training_state(ckpt, *tiny_model(2)) == (5, {})


def test_load_training_state_missing(tmp_path):
    model, opt = tiny_model(0)
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        P.load_training_state(tmp_path / "ckpt_000001", model, opt)
    (tmp_path / "ckpt_000002").mkdir()  # an empty folder (a copy that failed) is no checkpoint either
    with pytest.raises(FileNotFoundError, match="no .metadata"):
        P.load_training_state(tmp_path / "ckpt_000002", model, opt)


def test_latest_checkpoint_and_prune(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert P.latest_checkpoint(tmp_path / "missing") is None and P.latest_checkpoint(tmp_path) is None
    for name in ["ckpt_000002", "ckpt_000010", "ckpt_000009", ".ckpt_000099.tmp-99", "ckpt_000077_old"]:
        (tmp_path / name).mkdir()
    (tmp_path / "ckpt_000050").write_text("a file, not a checkpoint")
    assert P.latest_checkpoint(tmp_path) == tmp_path / "ckpt_000010"
    P.prune_checkpoints(tmp_path, 0)  # 0: keep all
    P.prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_000009", "ckpt_000010", "ckpt_000050",
                                                                "ckpt_000077_old"]
    # the order is by step, not by name: step 1,000,000 outgrows the six digits of the stages' names
    (tmp_path / "ckpt_999999").mkdir()
    (tmp_path / "ckpt_1000000").mkdir()
    assert P.latest_checkpoint(tmp_path) == tmp_path / "ckpt_1000000"
    P.prune_checkpoints(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*") if p.is_dir()) == ["ckpt_000077_old", "ckpt_1000000"]


def test_check_resume_names_the_differences():
    plan = {"lr": 0.03, "seed": 0, "data": "ab12"}
    P.check_resume("out/ckpt_000004", plan, dict(plan))
    with pytest.raises(P.DataError) as e:
        P.check_resume("out/ckpt_000004", plan, {**plan, "lr": 0.001, "share_prefix": True})
    msg = str(e.value)
    assert "out/ckpt_000004" in msg and "lr: 0.03 there, 0.001 now" in msg
    assert "share_prefix: None there, True now" in msg
    assert "seed" not in msg


# ------------------------------------------------------------------------------------------
# learning-rate schedule, single-process torchrun helpers, main_guard
# ------------------------------------------------------------------------------------------


def test_cosine_lr():
    lr = lambda s, **kw: P.cosine_lr(s, 110, 10, 1.0, **kw)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(4) == pytest.approx(0.5)
    assert lr(9) == pytest.approx(1.0) and lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.5)  # halfway through the decay
    assert lr(110) == pytest.approx(0.0) and lr(500) == pytest.approx(0.0)
    assert lr(110, min_ratio=0.1) == pytest.approx(0.1) and lr(60, min_ratio=0.1) == pytest.approx(0.55)
    values = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert P.cosine_lr(0, 100, 0, 3e-4) == pytest.approx(3e-4)  # no warmup
    assert P.cosine_lr(5, 1, 0, 1.0) == 0.0  # degenerate total_steps does not divide by 0


def test_single_process_dist_helpers(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    env = P.dist_init("cpu")
    assert env == P.DistEnv(0, 0, 1, torch.device("cpu")) and P.is_rank0() and not P.is_distributed()
    if not torch.cuda.is_available():
        assert P.dist_init() == env  # no torchrun, no GPU: one CPU process
    assert P.resolve_precision("auto", "cpu") == "fp32" and P.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert P.resolve_precision("auto", "cuda") == "bf16-mixed"
    with P.autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with P.autocast("cpu", "bf16-mixed"):
        assert torch.is_autocast_enabled("cpu")
    model, opt = tiny_model(0)
    assert not P.is_fsdp(model)
    assert [len(g["params"]) for g in opt.param_groups] == [15, 11]  # decay: matrices; none: norms, biases
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    sd = P.full_state_dict(model)
    assert sd.keys() == model.state_dict().keys()
    sd["model.embed_tokens.weight"].zero_()  # a copy, not a view of the live weights
    assert model.model.embed_tokens.weight.abs().sum() > 0
    with P.unsharded(model) as m:
        assert m is model
    t = torch.ones(2)
    assert P.all_reduce_sum(t) is t and t.tolist() == [1.0, 1.0]
    P.barrier()
    P.dist_cleanup()  # no process group: nothing to do
    monkeypatch.setenv("RANK", "1")
    assert not P.is_rank0()


def test_load_trainable_in_one_process(tmp_path):
    model, _ = tiny_model(0)
    P.save_model(model, P.load_tokenizer(P.DEFAULT_MODEL), tmp_path / "m")
    env = P.DistEnv(0, 0, 1, torch.device("cpu"))
    got, tok = P.load_trainable(tmp_path / "m", env, "fp32", checkpointing=True)
    assert got.training and all(b.checkpointing for b in got.layers) and not P.is_fsdp(got)
    assert got.model.embed_tokens.weight.dtype == torch.float32 and tok is not None
    critic, _ = P.load_trainable(tmp_path / "m", env, "bf16", value_head=True)
    assert critic.model.embed_tokens.weight.dtype == torch.bfloat16 and not hasattr(critic, "lm_head")
    assert not any(b.checkpointing for b in critic.layers)


def test_main_guard_bad_input_is_one_line_and_exit_2(capsys):
    def bad_data():
        raise P.DataError("data/x.jsonl:3: field 'question' is missing")

    def missing():
        raise FileNotFoundError("out/sft: not a checkpoint folder (no config.json)")

    for fn, line in ((bad_data, "error: data/x.jsonl:3: field 'question' is missing\n"),
                     (missing, "error: out/sft: not a checkpoint folder (no config.json)\n")):
        with pytest.raises(SystemExit) as e:
            P.main_guard(fn)
        assert e.value.code == 2 and capsys.readouterr().err == line
    assert P.main_guard(lambda: {"ok": 1}) == {"ok": 1}
    with pytest.raises(ZeroDivisionError):  # a bug is not bad input: its traceback stays
        P.main_guard(lambda: 1 / 0)


# ------------------------------------------------------------------------------------------
# the OpenAI-compatible client against a real HTTP server on 127.0.0.1
# ------------------------------------------------------------------------------------------

OK_REPLY = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}]}
KEY = "sk-test-4f1d0c9e"


class Server:
    """Answers POSTs from a script of behaviours: 'ok', 'http500', 'http429' (Retry-After: 1),
    'http400', 'http401', 'badjson', 'nochoices', 'slow' (sleeps past the client timeout, then
    answers). requests: (path, headers, body, arrival time)."""

    def __init__(self, loopback):
        self.script = []

        def respond(request):
            what = self.script.pop(0) if self.script else "ok"
            if what == "slow":
                time.sleep(1.0)
                what = "ok"
            code, payload = {"ok": (200, OK_REPLY), "http500": (500, "internal oops"),
                             "http429": (429, "slow down"), "http400": (400, '{"error": "bad max_tokens"}'),
                             "http401": (401, '{"error": "invalid api key"}'),
                             "badjson": (200, '{"choices": [tru'),
                             "nochoices": (200, '{"error": "overloaded"}')}[what]
            return (code, payload, {"Retry-After": "1"}) if what == "http429" else (code, payload)
        self.loop = loopback(respond)
        self.url = self.loop.url

    @property
    def requests(self):
        return [(r["path"], r["headers"], r["body"], r["time"]) for r in self.loop.requests]


@pytest.fixture
def server(loopback, monkeypatch):
    monkeypatch.setenv("TEST_KEY", KEY)
    return Server(loopback)


def call(server, **kw):
    kw = {"retries": 3, "backoff": 0.01, "timeout": 5.0, "api_key_env": "TEST_KEY", **kw}
    return P.chat_completion(server.url, "judge", [{"role": "user", "content": "hi"}], **kw)


def test_chat_completion_normal_reply(server):
    out = call(server, temperature=0.7, max_tokens=9, logprobs=True, top_logprobs=5, seed=42)
    assert out == OK_REPLY
    path, headers, body, _ = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == f"Bearer {KEY}"
    assert body == {"model": "judge", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.7,
                    "top_p": 1.0, "max_tokens": 9, "logprobs": True, "top_logprobs": 5, "seed": 42}


def test_no_key_no_header(server, monkeypatch):
    monkeypatch.delenv("TEST_KEY")
    call(server)
    assert "Authorization" not in server.requests[0][1]
    assert "logprobs" not in server.requests[0][2]  # only what the caller asked for


def test_endpoint_request_completions_route(server):
    body = {"model": "grm", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0.0}
    out = P.endpoint_request(server.url, "/completions", body, timeout=5.0, retries=0, api_key_env="TEST_KEY")
    assert out == OK_REPLY
    path, headers, got, _ = server.requests[0]
    assert path == "/v1/completions" and got == body and headers["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("failure", ["http500", "badjson", "nochoices"])
def test_retries_then_succeeds(server, failure):
    server.script = [failure, failure]
    assert call(server) == OK_REPLY
    assert len(server.requests) == 3
    assert all(r[1]["Authorization"] == f"Bearer {KEY}" for r in server.requests)  # the key on every attempt


def test_429_waits_for_retry_after(server):
    server.script = ["http429"]
    assert call(server) == OK_REPLY
    (_, _, _, t0), (_, _, _, t1) = server.requests
    assert t1 - t0 >= 0.95  # the server's Retry-After: 1, not the 0.01 s backoff


def test_timeout_then_success(server):
    server.script = ["slow"]
    t0 = time.monotonic()
    assert call(server, timeout=0.3) == OK_REPLY
    assert len(server.requests) == 2 and time.monotonic() - t0 < 5


@pytest.mark.parametrize("failure, message", [("http400", "bad max_tokens"), ("http401", "invalid api key")])
def test_client_errors_fail_fast_with_the_servers_message(server, failure, message):
    server.script = [failure]
    with pytest.raises(P.EndpointError) as e:
        call(server)
    msg = str(e.value)
    assert len(server.requests) == 1
    assert f"HTTP {failure[4:]}" in msg and message in msg and server.url in msg and "not retried" in msg
    assert KEY not in msg and "Bearer" not in msg


def test_gives_up_after_the_last_retry(server):
    server.script = ["http500"] * 10
    with pytest.raises(P.EndpointError) as e:
        call(server, retries=2)
    msg = str(e.value)
    assert len(server.requests) == 3
    assert f"{server.url}/chat/completions" in msg and "3 attempts" in msg
    assert "HTTP 500" in msg and "internal oops" in msg and KEY not in msg


def test_connection_refused(monkeypatch):
    monkeypatch.setenv("TEST_KEY", KEY)
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(P.EndpointError, match="2 attempts") as e:
        P.chat_completion(f"http://127.0.0.1:{port}", "m", [], retries=1, backoff=0.01, timeout=2.0,
                          api_key_env="TEST_KEY")
    assert "refused" in str(e.value).lower() and KEY not in str(e.value)


def test_map_concurrent_keeps_order_and_raises():
    def slow_square(x):
        time.sleep(random.random() * 0.01)
        return x * x

    assert P.map_concurrent(slow_square, range(40), max_workers=8, desc="squares") == [x * x for x in range(40)]
    assert P.map_concurrent(slow_square, []) == []
    started = []

    def boom(x):
        started.append(x)
        if x == 3:
            raise ValueError("item 3")
        time.sleep(0.05)
        return x

    with pytest.raises(ValueError, match="item 3"):
        P.map_concurrent(boom, range(40), max_workers=2)
    assert len(started) < 40  # the calls not yet started were cancelled
