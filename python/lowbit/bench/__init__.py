"""Kernel microbenchmarks: ``python -m lowbit.bench --help``."""
