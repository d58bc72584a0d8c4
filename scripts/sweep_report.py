"""Report on a sweep: python scripts/sweep_report.py <multirun dir> [--out DIR]

Writes sweep_report.md, sweep_report.csv (rank, alpha, trainable params, final metric, time per step, peak
memory, status) and sweep_report.png (metric against rank, one line per alpha) into the multirun folder.
"""

import sys

from lora_lightning.app.sweep_report import main

if __name__ == "__main__":
    sys.exit(main())
