"""``python -m bench``: the comparison suite (see bench/suite.py and docs/BENCHMARKS.md)."""

import sys

from bench.suite import main

sys.exit(main())
