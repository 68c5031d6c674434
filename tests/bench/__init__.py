"""`make bench`: the performance benchmark of issue 7 (docs/performance.md).

The real stack with production settings on 127.0.0.1 (stack.py), wrk and its Lua scripts as the
load generator (wrk.py, lua/), the stages (stages.py), CPU and memory from /proc (procstat.py),
the targets and the table (report.py).
"""
