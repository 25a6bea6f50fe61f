"""asv benchmark suites of deformcp; see docs/benchmarks.md.  (``benchmarks/results/`` holds recorded comparison figures.)"""
