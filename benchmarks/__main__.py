"""``python -m benchmarks COMMAND ...``: the lab's command, run from the repository's root.

The commands are :func:`benchmarks.runner.main`'s (seed6, ablation, overhead, mnist1d, zoo,
report). This module adds one thing: a missing package of the ``bench`` extra stops the
command with one line saying what to install, not a traceback. The demo's packages are
checked before any command starts (``--help`` needs none); scikit-learn where the zoo
imports it; ema-pytorch is an optional peer the zoo leaves out, saying so.

Example:
    >>> needs_extra(["scikit-learn"])
    "python -m benchmarks needs the bench extra: pip install -e '.[bench]' (missing: scikit-learn)"
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

__all__ = ["EXTRA_PACKAGES", "needs_extra", "main"]

#: The packages of the ``bench`` extra, by the module each is imported as.
EXTRA_PACKAGES = {"tqdm": "tqdm", "matplotlib": "matplotlib", "mnist1d": "mnist1d", "PIL": "pillow",
                  "sklearn": "scikit-learn", "ema_pytorch": "ema-pytorch"}
#: The modules every command may reach (deepopt's demo extra), checked before it starts.
_UP_FRONT = ("tqdm", "matplotlib", "mnist1d", "PIL")


def needs_extra(packages: Sequence[str]) -> str:
    """The one line naming the missing ``packages`` and the install command that brings them."""
    return (f"python -m benchmarks needs the bench extra: pip install -e '.[bench]' "
            f"(missing: {', '.join(packages)})")


def _absent(module: str) -> bool:
    # sys.modules[module] = None is how a test (or a user) blocks an import
    return sys.modules[module] is None if module in sys.modules else importlib.util.find_spec(module) is None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m benchmarks`` with ``argv`` (default ``sys.argv[1:]``); the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    missing = [EXTRA_PACKAGES[m] for m in _UP_FRONT if _absent(m)]
    if missing and not {"-h", "--help"} & set(argv):
        print(needs_extra(missing), file=sys.stderr)
        return 2
    from .runner import main as run

    try:
        return run(argv)
    except ModuleNotFoundError as e:
        package = EXTRA_PACKAGES.get((e.name or "").split(".")[0])
        if package is None:
            raise
        print(needs_extra([package]), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
