import gzip
import json
from pathlib import Path

import pytest

from helpers import tiny_target

REGEN = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "regen" / "pools-even.jsonl.gz"


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (chat template included) without loading its weights."""
    from transformers import AutoTokenizer

    from dflash.target.loader import resolve_target

    return AutoTokenizer.from_pretrained(str(resolve_target(None)))


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory, tokenizer) -> Path:
    """A 4-layer, 64-wide random Llama with SmolLM2's vocabulary and tokenizer, saved as a
    model folder (what --target takes)."""
    folder = tmp_path_factory.mktemp("tiny-target")
    model = tiny_target("llama", vocab=49152, max_position_embeddings=2048)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def regen_file(tmp_path_factory) -> Path:
    """The first 40 conversations of the shipped regenerated data (short ones first)."""
    if not REGEN.exists():
        pytest.skip(f"regenerated data not found at {REGEN}")
    rows = []
    with gzip.open(REGEN, "rt") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == 40:
                break
    out = tmp_path_factory.mktemp("data") / "small.jsonl.gz"
    with gzip.open(out, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return out
