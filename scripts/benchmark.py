#!/usr/bin/env python
"""The training-step benchmark (``benchmarks.benchmark``; ``--help`` for everything). From the repository root,
``python -m benchmarks.benchmark`` is the same."""

import sys

from benchmarks.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
