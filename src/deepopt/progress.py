"""Progress bars: tqdm on a terminal; one line per update in a log file or a pipe.

tqdm redraws its bar with carriage returns, which a file or a pipe (``deepopt demo >
log.txt 2>&1``, a CI log) keeps as one ever-growing line. There, each update (an epoch)
prints one line instead.

Example:
    >>> import io, contextlib
    >>> log = io.StringIO()
    >>> with contextlib.redirect_stderr(log):
    ...     for epoch in progress_bar(range(2), desc="train", unit="epoch"):
    ...         pass
    >>> print(log.getvalue(), end="")
    train: epoch 1/2
    train: epoch 2/2
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (or ``total=`` updates) on a terminal, else :class:`Lines`.

    Args:
        iterable: what to iterate over, or ``None`` for manual ``update()`` calls.
        enabled: ``False`` shows nothing.
        **kwargs: ``total``, ``desc``, ``unit``, ``initial``, as for ``tqdm``.
    """
    stderr = sys.stderr
    # A notebook's stderr is no terminal either, but tqdm.auto draws a widget there.
    if enabled and not (getattr(stderr, "isatty", lambda: False)() or "ipykernel" in sys.modules):
        return Lines(iterable, file=stderr, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, **kwargs)


class Lines:
    """The part of tqdm's interface deepopt uses, writing one line per update."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, file: Any = None) -> None:
        self.iterable = iterable
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total  # type: ignore[arg-type]
        self.desc, self.unit, self.n, self.file = desc, unit, initial, file or sys.stderr
        self.postfix = ""

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)  # after the loop body, which may have set the postfix

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        of = "" if self.total is None else f"/{self.total}"
        extra = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {self.unit} {self.n}{of}{extra}", file=self.file, flush=True)

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass
