"""deepopt's lab: the benchmarks behind every published figure, outside the wheel.

The installed package (``pip install deepopt``) holds what a user runs: ``activate``,
the mechanisms, the integrations, ``deepopt run`` and ``deepopt demo``. This package sits
beside it in the repository and is run from a checkout's root, never installed::

    pip install -e ".[bench]"          # deepopt itself plus the lab's packages
    python -m benchmarks --help        # seed6, ablation, overhead, mnist1d, zoo, report
    python -m benchmarks seed6 --data ../shared/data/cifar10-jpeg.tar --nets 6 --seeds 0 1
    python -m benchmarks report benchmarks/results/*.jsonl --markdown BENCHMARKS.md

It uses deepopt only through names the library exports (each module's ``__all__``), so
the library can be refactored without the lab's knowledge; nothing in ``deepopt`` imports
it. Raw rows go to ``benchmarks/results/*.jsonl``, plots to ``benchmarks/plots/``, and
one-off measurements to ``benchmarks/scripts/`` (``python -m benchmarks.scripts.NAME``).

- :mod:`benchmarks.runner`: the command (``python -m benchmarks``), resumable suites.
- :mod:`benchmarks.data`, :mod:`benchmarks.nets`, :mod:`benchmarks.train`: CIFAR-10,
  the seed's six networks and its training protocol (seed6 and the ablation).
- :mod:`benchmarks.overhead`, :mod:`benchmarks.mnist1d`, :mod:`benchmarks.zoo`: the other
  suites.
- :mod:`benchmarks.report`: BENCHMARKS.md's tables and plots from the rows; the tables
  themselves in :mod:`benchmarks.tables`, :mod:`benchmarks.plots` and
  :mod:`benchmarks.zoo_report`, their statistics in :mod:`benchmarks.stats`.

Submodules are imported on demand so that ``import benchmarks`` stays cheap.

Example:
    >>> import torch
    >>> from benchmarks.nets import build_net
    >>> build_net(6)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

__all__: list[str] = []
