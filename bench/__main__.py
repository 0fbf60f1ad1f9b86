"""`python -m bench`: the whole benchmark suite (bench/run_all.py)."""

from bench.run_all import main

raise SystemExit(main())
