"""Integration tests: deepopt inside the tools people already train with."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "compile: uses torch.compile (deselect with -m 'not compile')")
