"""Griffe extension: read a Google-style ``Example:`` section as ``Examples:``.

deepopt's docstrings head their doctests ``Example:`` (Napoleon reads both spellings);
griffe knows only ``Examples:`` and would otherwise render the doctest as Markdown inside
an admonition, where ``>>>`` becomes a quote and ``[...]`` output a broken cross-reference.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename each ``Example:`` section heading to ``Examples:`` as objects are loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
