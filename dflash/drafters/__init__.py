"""Drafters shipped inside the package, one folder each in the released checkpoint format."""

from __future__ import annotations

from pathlib import Path

from dflash.config import CONFIG_FILE, WEIGHTS_FILE

SHIPPED = Path(__file__).parent
DEFAULT_DRAFTER = "smollm2-135m-instruct"


def default_drafter_path() -> Path | None:
    """The folder of the drafter trained for the embedded default target, or None while the
    package ships none."""
    folder = SHIPPED / DEFAULT_DRAFTER
    if (folder / CONFIG_FILE).exists() and (folder / WEIGHTS_FILE).exists():
        return folder
    return None
