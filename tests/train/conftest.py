import gzip
import json
from pathlib import Path

import pytest

from helpers import DATA_DIR

REGEN = DATA_DIR / "regen" / "pools-even.jsonl.gz"


@pytest.fixture(scope="session")
def regen_file(tmp_path_factory) -> Path:
    """The first 40 conversations of the shipped regenerated data (short ones first)."""
    if not REGEN.exists():
        pytest.fail(f"regenerated data not found at {REGEN}: set DFLASH_DATA_DIR")
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
