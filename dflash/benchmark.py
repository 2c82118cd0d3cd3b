"""`python -m dflash.benchmark`: the reference benchmark's entry point (also under torchrun)."""

import sys

from dflash.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
