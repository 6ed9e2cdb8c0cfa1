"""Benchmark infrastructure for the seed6 protocol (protocol/seed6.md).

- :mod:`deepopt.bench.data`: CIFAR-10 loading, caching and per-image standardization.
- :mod:`deepopt.bench.nets`: the six networks of the seed benchmark.
- :mod:`deepopt.bench.train`: the protocol's training loop and the JSON-lines result rows.

Submodules are imported on demand so that ``import deepopt.bench`` stays cheap.
"""

__all__ = ["data", "nets", "train"]
