"""deepopt: one call that changes only how a PyTorch network is trained.

Example:
    >>> import torch, deepopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> model, optimizer = deepopt.activate(model, optimizer)
    >>> x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    >>> loss = torch.nn.functional.cross_entropy(model(x), y)
    >>> loss.backward(); optimizer.step(); optimizer.zero_grad()
"""

from . import experimental
from .activate import activate, deactivate
from .mechanisms.base import Mechanism
from .mechanisms.guard import DivergenceError
from .optimizer import DeepOptimizer
from .recipes import RECIPES, Settings

__all__ = ["activate", "deactivate", "DeepOptimizer", "DivergenceError", "Mechanism", "RECIPES", "Settings",
           "experimental"]
__version__ = "0.1.0"
