"""pytest's view of the lab: its modules' examples run as doctests, its scripts do not.

benchmarks/scripts holds one-off measurements that train at import (``python -m
benchmarks.scripts.NAME``); --doctest-modules would run them. results/ and plots/ hold data.
"""

collect_ignore = ["scripts", "results", "plots"]
