import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    # torch.distributed.checkpoint in a single process (every test outside torchrun) is intended
    config.addinivalue_line("filterwarnings", "ignore:.*torch.distributed is disabled")
    config.addinivalue_line("markers", "slow: uses the real SmolLM2-135M-Instruct weights")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model, fp32 on CPU (converted from its GGUF once, then cached)."""
    import common
    torch.manual_seed(0)
    return common.load_model(common.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.exists():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA



class LoopbackServer:
    """An OpenAI-compatible server on 127.0.0.1 for the endpoint clients' fault tests. respond(request)
    returns (status, body as str, bytes or a JSON-able object[, extra headers]); every request is kept
    in .requests as {"path", "headers", "auth", "body", "time"}."""

    def __init__(self, respond):
        import json
        import threading
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        self.requests, lock = [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                request = {"path": self.path, "headers": dict(self.headers), "auth": self.headers.get("Authorization"),
                           "body": json.loads(self.rfile.read(int(self.headers["Content-Length"]))),
                           "time": time.monotonic()}
                with lock:
                    server.requests.append(request)
                status, data, *extra = respond(request)
                data = data if isinstance(data, bytes) else (data if isinstance(data, str) else json.dumps(data)).encode()
                try:
                    self.send_response(status)
                    for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                                 **(extra[0] if extra else {})}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

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
def loopback(monkeypatch):
    """loopback(respond) -> a started LoopbackServer, closed after the test; no proxy for 127.0.0.1."""
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    servers = []

    def start(respond):
        servers.append(LoopbackServer(respond))
        return servers[-1]
    yield start
    for s in servers:
        s.close()
