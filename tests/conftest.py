import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

DATA_DIR = Path(os.environ.get("DFLASH_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "datasets"))


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run fastest on one thread (and OpenMP spin-waits badly when cores are
    shared); the real target gets every core."""
    torch.set_num_threads(os.cpu_count() or 1 if "smollm" in request.fixturenames else 1)
    yield


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct, float32 on CPU: (model, tokenizer)."""
    from dflash import load_target

    return load_target(device="cpu")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "eval").is_dir():
        pytest.fail(f"evaluation data not found at {DATA_DIR}: set DFLASH_DATA_DIR")
    return DATA_DIR
