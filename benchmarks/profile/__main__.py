"""``python -m benchmarks.profile``: see `benchmarks.profile`."""

import sys

from benchmarks.profile import main

if __name__ == "__main__":
    sys.exit(main())
