"""Fault-injection suite: the real stack under faults, then invariants over the results.

`make chaos` runs every scenario (`python -m tests.chaos`); `tests/chaos/test_subset.py` runs
short versions of a few in `make test`.
"""
