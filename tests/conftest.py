import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

from helpers import DATA_DIR  # noqa: E402


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run fastest on one thread (and OpenMP spin-waits badly when cores are
    shared); the real target gets every core."""
    torch.set_num_threads(os.cpu_count() or 1 if "smollm" in request.fixturenames else 1)
    yield


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct, float32 on CPU: (transformers model, tokenizer)."""
    from dflash import load_target

    runtime, tokenizer = load_target(device="cpu", cpu_weights="float32")
    return runtime.model, tokenizer


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "eval").is_dir():
        pytest.fail(f"evaluation data not found at {DATA_DIR}: set DFLASH_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (chat template included) without loading its weights."""
    from transformers import AutoTokenizer

    from dflash.runtime.loader import resolve_target

    return AutoTokenizer.from_pretrained(str(resolve_target(None)))


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory, tokenizer) -> Path:
    """A 4-layer, 64-wide random Llama with SmolLM2's vocabulary and tokenizer, saved as a
    model folder (what --target takes)."""
    folder = tmp_path_factory.mktemp("tiny-target")
    from helpers import tiny_target

    model = tiny_target("llama", vocab=49152, max_position_embeddings=2048)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_drafter_dir(tmp_path_factory, tiny_target_dir) -> Path:
    """A random 1-layer drafter (block 4) for the tiny target, saved in the released format."""
    from transformers import AutoModelForCausalLM

    from dflash import DFlashDraftModel

    target = AutoModelForCausalLM.from_pretrained(str(tiny_target_dir))
    torch.manual_seed(0)
    drafter = DFlashDraftModel.from_target(target, num_layers=1, block_size=4, target_layer_ids=[0, 2])
    folder = tmp_path_factory.mktemp("tiny-drafter")
    drafter.save_pretrained(str(folder))
    return folder
