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

