"""Tests of the plumbing sections of common.py: torchrun helpers, JSONL, logging, checkpoints,
the LR schedule and the OpenAI-compatible endpoint client. CPU only, about a minute.

    cd /work/main && python -m pytest -x -q tests/test_plumbing.py
"""

import importlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # also done by tests/conftest.py; harmless twice
P = importlib.import_module("common")  # the lead changes this line to "common"


# ------------------------------------------------------------------------------------------
# JSONL reading and field checks
# ------------------------------------------------------------------------------------------


def _write_lines(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else line.encode() + b"\n"
                              for line in lines))
    return path


def test_read_jsonl_good_file_skips_blank_lines(tmp_path):
    f = _write_lines(tmp_path / "a.jsonl", [b'\xef\xbb\xbf{"x": 1}\n', "", '{"x": "é"}', "   "])
    rows, skipped = P.read_jsonl_checked(f)
    assert rows == [(1, {"x": 1}), (3, {"x": "é"})] and skipped == 0


@pytest.mark.parametrize(
    "bad, expect",
    [
        ('{"x": 1', "malformed JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        (b'{"x": "\xff"}\n', "not valid UTF-8"),
    ],
)
def test_read_jsonl_error_names_file_and_line(tmp_path, bad, expect):
    f = _write_lines(tmp_path / "data.jsonl", ['{"x": 1}', '{"x": 2}', bad, '{"x": 4}'])
    with pytest.raises(P.DataError) as e:
        P.read_jsonl_checked(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}:3:") and expect in msg, msg


def test_read_jsonl_skip_bad_counts(tmp_path):
    f = _write_lines(tmp_path / "d.jsonl", ['{"x": 1}', "nope", '"str"', '{"x": 4}', "{"])
    rows, skipped = P.read_jsonl_checked(f, skip_bad=True)
    assert [n for n, _ in rows] == [1, 4] and skipped == 3
    assert P.read_jsonl(f, skip_bad=True) == rows


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(P.DataError, match="file not found"):
        P.read_jsonl_checked(tmp_path / "nope.jsonl")


def test_require_field_messages():
    row = {"q": "hi", "empty": "  ", "n": 3, "flag": True, "persona": {"a": 1}}
    assert P.require_field(row, "q", "f.jsonl", 7) == "hi"
    assert P.require_field(row, "n", "f.jsonl", 7, kind=int) == 3
    assert P.require_field(row, "n", "f.jsonl", 7, kind=float) == 3  # JSON 3 is a fine float
    assert P.require_field(row, "persona", "f.jsonl", 7, kind=(dict, str)) == {"a": 1}
    cases = [
        ("missing", str, "f.jsonl:7: field 'missing' is missing"),
        ("n", str, "f.jsonl:7: field 'n' should be str, got int"),
        ("empty", str, "f.jsonl:7: field 'empty' is an empty string"),
        ("flag", int, "f.jsonl:7: field 'flag' should be int, got bool"),
        ("q", (dict, list), "field 'q' should be dict or list, got str"),
    ]
    for field, kind, expect in cases:
        with pytest.raises(P.DataError) as e:
            P.require_field(row, field, "f.jsonl", 7, kind=kind)
        assert expect in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------------
# JSONL writing, metrics, atomic folders
# ------------------------------------------------------------------------------------------


def test_write_jsonl_roundtrip_and_atomic_on_error(tmp_path):
    f = tmp_path / "sub" / "out.jsonl"
    P.write_jsonl(f, [{"a": 1}, {"b": "中文"}])
    assert "中文" in f.read_text(encoding="utf-8")  # ensure_ascii=False: readable files
    assert [r for _, r in P.read_jsonl_checked(f)[0]] == [{"a": 1}, {"b": "中文"}]

    def rows_then_crash():
        yield {"new": 1}
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        P.write_jsonl(f, rows_then_crash())
    assert [r for _, r in P.read_jsonl_checked(f)[0]] == [{"a": 1}, {"b": "中文"}]
    assert sorted(p.name for p in f.parent.iterdir()) == ["out.jsonl"]  # no temp left

    with pytest.raises(TypeError):  # not JSON-serialisable, also mid-way
        P.write_jsonl(tmp_path / "new.jsonl", [{"ok": 1}, {"bad": object()}])
    assert not (tmp_path / "new.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_append_jsonl(tmp_path):
    f = tmp_path / "x" / "log.jsonl"
    P.append_jsonl(f, {"i": 0})
    P.append_jsonl(f, {"i": 1})
    assert [r["i"] for _, r in P.read_jsonl_checked(f)[0]] == [0, 1]


def test_metrics_logger(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    path = tmp_path / "run" / "metrics.jsonl"
    log = P.MetricsLogger(path)
    log.log({"step": 1, "loss": torch.tensor(0.5), "kl": np.float32(0.25)})
    log.log({"step": 2, "loss": 0.25})
    log.close()
    rows = [r for _, r in P.read_jsonl_checked(path)[0]]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == 0.5 and rows[0]["kl"] == 0.25
    assert all(abs(r["time"] - time.time()) < 60 for r in rows)

    monkeypatch.setenv("RANK", "1")  # other ranks write nothing
    other = P.MetricsLogger(tmp_path / "rank1" / "metrics.jsonl")
    other.log({"step": 1})
    other.close()
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


def test_latest_checkpoint(tmp_path):
    assert P.latest_checkpoint(tmp_path / "missing") is None
    assert P.latest_checkpoint(tmp_path) is None
    for name in ["ckpt_000002", "ckpt_000010", "ckpt_000009", ".ckpt_000099.tmp-1-ab"]:
        (tmp_path / name).mkdir()
    (tmp_path / "ckpt_000050").write_text("a file, not a checkpoint")
    (tmp_path / "ckpt_000077_old").mkdir()
    assert P.latest_checkpoint(tmp_path) == tmp_path / "ckpt_000010"


# ------------------------------------------------------------------------------------------
# training state: an interrupted run resumes exactly
# ------------------------------------------------------------------------------------------


def _make_model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _train(model, opt, n):
    for _ in range(n):
        # Draws from all three generators, so a missed RNG restore changes the data.
        x = torch.randn(5, 6) + float(np.random.randn()) + random.random()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(2).tolist()


def test_training_state_resume_is_exact(tmp_path):
    random.seed(0), np.random.seed(0)
    model, opt = _make_model(0)
    _train(model, opt, 3)
    opt.param_groups[0]["lr"] = 5e-3  # as a scheduler would; must come back too
    ckpt = tmp_path / "ckpt_000003"
    P.save_training_state(ckpt, model, opt, 3, {"note": "x", "best": 1.5})
    _train(model, opt, 2)
    expect_params = [p.detach().clone() for p in model.parameters()]
    expect_draws = _draws()

    random.seed(123), np.random.seed(123)
    model2, opt2 = _make_model(1)  # different init and lr: all of it must be overwritten
    assert P.latest_checkpoint(tmp_path) == ckpt
    step, extra = P.load_training_state(ckpt, model2, opt2)
    assert step == 3 and extra == {"note": "x", "best": 1.5}
    assert opt2.param_groups[0]["lr"] == 5e-3
    _train(model2, opt2, 2)
    for a, b in zip(expect_params, model2.parameters()):
        assert torch.equal(a, b)
    assert _draws() == expect_draws


def test_load_training_state_missing(tmp_path):
    model, opt = _make_model(0)
    with pytest.raises(FileNotFoundError, match="training_state.pt"):
        P.load_training_state(tmp_path / "ckpt_000001", model, opt)


# ------------------------------------------------------------------------------------------
# learning-rate schedule
# ------------------------------------------------------------------------------------------


def test_cosine_lr():
    lr = lambda s, **kw: P.cosine_lr(s, 110, 10, 1.0, **kw)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(4) == pytest.approx(0.5)
    assert lr(9) == pytest.approx(1.0) and lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.5)  # halfway through the decay
    assert lr(110) == pytest.approx(0.0) and lr(500) == pytest.approx(0.0)
    assert lr(110, min_ratio=0.1) == pytest.approx(0.1)
    assert lr(60, min_ratio=0.1) == pytest.approx(0.55)
    values = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert P.cosine_lr(0, 100, 0, 3e-4) == pytest.approx(3e-4)  # no warmup
    assert P.cosine_lr(5, 1, 0, 1.0) == 0.0  # degenerate total_steps does not divide by 0


# ------------------------------------------------------------------------------------------
# chat_completion against a real HTTP server on 127.0.0.1
# ------------------------------------------------------------------------------------------

OK_REPLY = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}]}


class _Server:
    """Answers POSTs from a script of behaviours: 'ok', 'http500', 'http429', 'http400',
    'badjson', 'nochoices', 'slow' (sleeps past the client timeout, then answers)."""

    def __init__(self):
        self.script, self.requests = [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, dict(self.headers), body))
                what = server.script.pop(0) if server.script else "ok"
                if what == "slow":
                    time.sleep(1.0)
                    what = "ok"
                code, payload = {
                    "ok": (200, json.dumps(OK_REPLY)),
                    "http500": (500, "internal oops"),
                    "http429": (429, "slow down"),
                    "http400": (400, '{"error": "bad max_tokens"}'),
                    "badjson": (200, '{"choices": [tru'),
                    "nochoices": (200, '{"error": "overloaded"}'),
                }[what]
                data = payload.encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(monkeypatch):
    for var in ("no_proxy", "NO_PROXY"):  # never send 127.0.0.1 through a proxy
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    s = _Server()
    yield s
    s.close()


def _call(server, **kw):
    kw = {"retries": 3, "backoff": 0.01, "timeout": 5.0, **kw}
    return P.chat_completion(server.url, "judge", [{"role": "user", "content": "hi"}], **kw)


def test_chat_completion_normal_reply(server, monkeypatch):
    monkeypatch.setenv("TEST_KEY", "sk-123")
    out = _call(server, temperature=0.7, max_tokens=9, logprobs=True, top_logprobs=5,
                api_key_env="TEST_KEY", seed=42)
    assert out == OK_REPLY
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-123"
    assert body == {"model": "judge", "messages": [{"role": "user", "content": "hi"}],
                    "temperature": 0.7, "max_tokens": 9, "logprobs": True, "top_logprobs": 5,
                    "seed": 42}


def test_chat_completion_no_key_no_header(server, monkeypatch):
    monkeypatch.delenv("TEST_KEY", raising=False)
    _call(server, api_key_env="TEST_KEY")
    assert "Authorization" not in server.requests[0][1]
    assert "logprobs" not in server.requests[0][2]


@pytest.mark.parametrize("failure", ["http500", "http429", "badjson", "nochoices"])
def test_chat_completion_retries_then_succeeds(server, failure):
    server.script = [failure, failure]
    assert _call(server) == OK_REPLY
    assert len(server.requests) == 3


def test_chat_completion_timeout_then_success(server):
    server.script = ["slow"]
    t0 = time.time()
    assert _call(server, timeout=0.3) == OK_REPLY
    assert len(server.requests) == 2 and time.time() - t0 < 5


def test_chat_completion_400_fails_fast(server):
    server.script = ["http400"]
    with pytest.raises(P.EndpointError) as e:
        _call(server)
    assert len(server.requests) == 1
    assert "HTTP 400" in str(e.value) and "bad max_tokens" in str(e.value)
    assert server.url in str(e.value)


def test_chat_completion_gives_up_after_last_retry(server):
    server.script = ["http500"] * 10
    with pytest.raises(P.EndpointError) as e:
        _call(server, retries=2)
    msg = str(e.value)
    assert len(server.requests) == 3
    assert f"{server.url}/chat/completions" in msg and "3 attempts" in msg
    assert "HTTP 500" in msg and "internal oops" in msg


def test_chat_completion_connection_refused():
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(P.EndpointError, match="2 attempts"):
        P.chat_completion(f"http://127.0.0.1:{port}", "m", [], retries=1, backoff=0.01,
                          timeout=2.0)


def test_map_concurrent_keeps_order():
    def slow_square(x):
        time.sleep(random.random() * 0.02)
        return x * x

    assert P.map_concurrent(slow_square, range(40), max_workers=8, desc="squares") == [
        x * x for x in range(40)
    ]
    assert P.map_concurrent(slow_square, []) == []

    def boom(x):
        if x == 3:
            raise ValueError("item 3")
        return x

    with pytest.raises(ValueError, match="item 3"):
        P.map_concurrent(boom, range(8), max_workers=2)


# ------------------------------------------------------------------------------------------
# distributed helpers: single process, then 2 processes under torchrun (gloo)
# ------------------------------------------------------------------------------------------


def test_single_process_dist_helpers(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    env = P.dist_init("cpu")
    assert env == P.DistEnv(0, 0, 1, torch.device("cpu")) and P.is_rank0()
    model = nn.Sequential(nn.Linear(3, 3))
    for mode in ("none", "ddp", "fsdp"):
        assert P.wrap_model(model, mode, env) is model  # nothing to wrap in one process
    with pytest.raises(ValueError, match="mode"):
        P.wrap_model(model, "zero3", env)
    assert P.unwrap(model) is model
    sd = P.full_state_dict(model)
    assert sd.keys() == model.state_dict().keys()
    sd["0.weight"].zero_()  # a copy, not a view of the live weights
    assert model[0].weight.abs().sum() > 0
    with P.unsharded(model) as m:
        assert m is model
    t = torch.ones(2)
    assert P.all_reduce_sum(t) is t and t.tolist() == [1.0, 1.0]
    P.dist_cleanup()  # no process group: nothing to do


_FAULTS_OF_BIG_TENSORS = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
import common
on = common.keep_freed_cpu_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults()
for _ in range(10):
    x = torch.ones(16 * 2**20)  # 64 MB, over glibc's largest mmap threshold
    del x
print(on, faults() - before)
"""


@pytest.mark.skipif(P._glibc() is None, reason="glibc malloc only")
@pytest.mark.parametrize("keep", ["1", "0"])
def test_keep_freed_cpu_memory_stops_refaulting(keep):
    """keep_freed_cpu_memory: ten 64 MB tensors in turn reuse one block's pages instead of faulting in
    and zero-filling fresh ones each time (16k pages per tensor); PERSONARL_KEEP_CPU_MEMORY=0 is
    glibc's default, which refaults every time."""
    env = dict(os.environ, PERSONARL_KEEP_CPU_MEMORY=keep)
    out = subprocess.run([sys.executable, "-c", _FAULTS_OF_BIG_TENSORS, str(REPO)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    on, faults = out[0] == "True", int(out[1])
    pages = 16 * 2**20 * 4 // 4096
    if keep == "1":
        assert on and faults < 4 * pages, faults  # measured: 2 blocks' worth, against 10
    else:
        assert not on and faults > 8 * pages, faults


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_ddp_and_fsdp2_match_single_process(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(REPO / "tests" / "dist_fsdp_check.py"),
           str(tmp_path)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:  # a collective that never completes hangs
        pytest.fail(f"torchrun check timed out (deadlock?)\n{e.stdout}\n{e.stderr}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "DIST_CHECK_OK" in proc.stdout, out[-6000:]

    # The checkpoint written by 2 FSDP2 ranks resumes in one plain process: same weights as a
    # single-process run of the same two steps, and the same next AdamW step.
    sys.path.insert(0, str(REPO / "tests"))
    check = importlib.import_module("dist_fsdp_check")
    torch.manual_seed(1)
    batch = torch.randint(0, 32, (4, 9))
    ref = check.make_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    for _ in range(2):
        check.train_step(ref, ref_opt, batch)
    plain = check.TinyStack()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    step, extra = P.load_training_state(tmp_path / "fsdp" / "ckpt_000002", plain, plain_opt)
    assert (step, extra) == (2, {"mode": "fsdp"})
    assert check.max_diff(plain.state_dict(), ref.state_dict()) < check.TOL
    check.train_step(ref, ref_opt, batch)
    check.train_step(plain, plain_opt, batch)
    assert check.max_diff(plain.state_dict(), ref.state_dict()) < check.TOL
