#!/usr/bin/env python
"""Multi-GPU measurements (``benchmarks.multi_gpu``; ``--help`` for everything). From the repository root,
``python -m benchmarks.multi_gpu`` is the same."""

import sys

from benchmarks.multi_gpu import main

if __name__ == "__main__":
    sys.exit(main())
