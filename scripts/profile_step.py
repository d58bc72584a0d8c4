#!/usr/bin/env python
"""Where a LoRA step's time and memory go (``benchmarks.profile``; ``--help`` for everything). From the repository
root, ``python -m benchmarks.profile`` is the same."""

import sys

from benchmarks.profile import main

if __name__ == "__main__":
    sys.exit(main())
