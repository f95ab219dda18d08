"""trio_bg's benchmark suite: run ``bash benchmarks/run`` from the repository root."""
