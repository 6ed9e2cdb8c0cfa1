"""Random weight perturbation: the gradient of a step is taken at ``w + e``, ``e`` random.

Each step's forward/backward runs at ``w + e`` with a fresh Gaussian ``e`` whose scale
follows the weights it perturbs: for every output unit (a row of a linear weight, a
filter of a convolution) the standard deviation is ``sigma`` times that unit's weight RMS
(``||w_row|| / sqrt(fan_in)``), so the noise is invariant to rescaling a layer (the
filter-wise form of RWP, Li et al., TMLR 2024, with ``gamma = sigma / sqrt(fan_in)``).
The update is applied to the clean ``w``. Because ``e`` is redrawn every step and the
weights are restored by copy, the iterates carry no accumulated noise: this is the
perturbed-gradient form of anti-correlated noise injection (Anti-PGD, Orvieto et al.,
ICML 2022), which penalises the trace of the Hessian. Zero extra passes.

The noise comes from deepopt's own generator (seeded from ``torch.initial_seed()``), so
it never moves the global RNG that draws the user's data order and dropout masks.

Example:
    >>> import torch
    >>> from deepopt.mechanisms.noise import filter_noise
    >>> g = torch.Generator().manual_seed(0)
    >>> e = filter_noise([torch.tensor([[3.0, 4.0]])], sigma=0.1, generator=g)
    >>> e[0].shape
    torch.Size([1, 2])
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["filter_noise", "WeightNoise"]


@torch.no_grad()
def filter_noise(weights: list[Tensor], sigma: float, generator: torch.Generator) -> list[Tensor]:
    """Gaussian noise whose std per output unit is ``sigma`` times that unit's weight RMS.

    Args:
        weights: the tensors to perturb; dimension 0 indexes output units (``nn.Linear``,
            ``nn.Conv*``). A 1-D tensor (bias, norm scale) is one unit.
        sigma: relative scale of the noise, ``>= 0``.
        generator: the source of randomness (on the weights' device).

    Returns:
        One noise tensor per weight; zero where a unit's weights are all zero.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> w = torch.randn(64, 1000, generator=g)
        >>> e = filter_noise([w], sigma=0.1, generator=g)[0]
        >>> ratio = (e.norm(dim=1) / w.norm(dim=1)).mean().item()
        >>> round(ratio, 1)
        0.1
    """
    out = []
    for w in weights:
        z = torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype)
        if w.dim() > 1:
            # The row norm over sqrt(fan_in): the noise's std per entry.
            scale = w.flatten(1).norm(dim=1) / (w[0].numel() ** 0.5)
            z.mul_(scale.view(-1, *([1] * (w.dim() - 1))))
        else:
            z.mul_(w.norm() / (w.numel() ** 0.5))
        out.append(z.mul_(sigma))
    return out


class WeightNoise:
    """Owns the noise generator; its state makes a resumed run draw the same noise.

    Example:
        >>> import torch
        >>> noise = WeightNoise(sigma=0.1, seed=1)
        >>> a = noise.sample([torch.ones(2, 2)])[0]
        >>> state = noise.state_dict(); b = noise.sample([torch.ones(2, 2)])[0]
        >>> noise.load_state_dict(state); torch.equal(b, noise.sample([torch.ones(2, 2)])[0])
        True
    """

    def __init__(self, sigma: float, seed: int) -> None:
        self.sigma = sigma
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._pending: dict[str, Tensor] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            key = str(device)
            if key in self._pending:  # restored state waiting for its device
                gen.set_state(self._pending.pop(key))
            self._generators[device] = gen
        return gen

    def sample(self, weights: list[Tensor]) -> list[Tensor]:
        """Noise for ``weights``, each drawn from its device's generator."""
        return [filter_noise([w], self.sigma, self._generator(w.device))[0] for w in weights]

    def state_dict(self) -> dict:
        states = {str(d): g.get_state() for d, g in self._generators.items()}
        return {"seed": self.seed, "generators": {**self._pending, **states}}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._generators = {}
        self._pending = {k: v.clone() for k, v in state["generators"].items()}
