"""Griffe extension: read deepopt's docstrings as Google-style Markdown.

deepopt's docstrings are Google style with two Sphinx habits that Napoleon understands
and griffe does not:

* doctests headed ``Example:`` (griffe knows only ``Examples:``; otherwise the doctest is
  rendered as Markdown, where ``>>>`` becomes a quote and ``[...]`` output a cross-reference);
* roles such as ``:func:`deepopt.activate``` or ``:class:`~deepopt.DeepOptimizer```: a role
  whose target is a full ``deepopt.`` path becomes a cross-reference, which the strict build
  checks (a renamed target fails it); a short target (``:meth:`leave```, relative to its
  module) becomes inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|exc|obj):`(~?)([\w.]+)`")


def _role(match: re.Match) -> str:
    short, target = match.groups()
    label = target.rsplit(".", 1)[-1] if short else target
    return f"[`{label}`][{target}]" if target.startswith("deepopt.") else f"`{label}`"


class SphinxHabits(griffe.Extension):
    """Rewrite each docstring's ``Example:`` headings and Sphinx roles as objects are loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_role, _EXAMPLE.sub(r"\1Examples:", obj.docstring.value))
