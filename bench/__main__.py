"""`python -m bench`: the benchmark suite (bench/run.py)."""

import sys

from bench.run import main

sys.exit(main())
