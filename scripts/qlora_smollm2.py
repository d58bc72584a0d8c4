#!/usr/bin/env python
"""QLoRA on CPU with SmolLM2-135M (``benchmarks.qlora_smollm2``; ``--help`` for everything). From the repository
root, ``python -m benchmarks.qlora_smollm2`` is the same."""

from benchmarks.qlora_smollm2 import main

if __name__ == "__main__":
    main()
