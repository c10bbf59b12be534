"""samba-hf's benchmarks: one runner, one module per suite, one results file per suite.

    python -m benchmarks.run list                                   # the suites and their cases
    python -m benchmarks.run SUITE [--cases A,B] [--budget-s N]     # on a GPU: writes benchmarks/results/SUITE.*
    python -m benchmarks.run SUITE --smoke                          # every code path at tiny sizes, on the CPU

Run from the repository root with `PYTHONPATH=src:kernels` (or samba-hf installed).
"""
