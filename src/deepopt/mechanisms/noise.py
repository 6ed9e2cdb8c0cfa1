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
it never moves the global RNG that draws the user's data order and dropout masks; it is
read from windows of one Gaussian table (:class:`WeightNoise`), about 1x cost.

Example:
    >>> import torch
    >>> from deepopt.mechanisms.noise import filter_noise
    >>> g = torch.Generator().manual_seed(0)
    >>> e = filter_noise([torch.tensor([[3.0, 4.0]])], sigma=0.1, generator=g)
    >>> e[0].shape
    torch.Size([1, 2])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Mechanism, Perturbation

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
        out.append(z.mul_(_unit_rms(w)).mul_(sigma))
    return out


class WeightNoise(Mechanism):
    """Each training forward runs at ``w + e``, ``e`` Gaussian scaled per output unit (experimental).

    Measured no better than the plain run across the seed's nets and MNIST-1D
    (BENCHMARKS.md, section 1). Its state makes a resumed run draw the same noise.

    Args:
        sigma: std of the noise relative to each output unit's weight RMS, > 0.
        seed: seeds deepopt's own generator (default ``torch.initial_seed()``, read without
            drawing from, and so moving, the global RNG).

    Fresh Gaussian draws cost about 10 ns per weight on a CPU, as much as a whole
    training step of an MLP. So, as evolution strategies do (Salimans et al. 2017), one
    table of Gaussian numbers is drawn once and each step reads every tensor's noise
    from a random window of it: a step costs one integer draw per tensor and one scaled
    add over the weights.

    Example:
        >>> import torch
        >>> noise = WeightNoise(sigma=0.1, seed=1)
        >>> a = noise.sample([torch.ones(2, 2)])[0]
        >>> state = noise.state_dict(); b = noise.sample([torch.ones(2, 2)])[0]
        >>> noise.load_state_dict(state); torch.equal(b, noise.sample([torch.ones(2, 2)])[0])
        True
    """

    #: Table length: windows of one tensor overlap, but shifted, so no weight sees the
    #: same value twice in a row.
    TABLE = 1 << 21

    name = "noise"
    needs_one_pass = True
    perturbs = True
    unsafe_when_sharded = "its scale is a norm over whole output units"

    def __init__(self, sigma: float, seed: int | None = None) -> None:
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"sigma={sigma!r} is invalid: it must be a number > 0, e.g. 0.1.")
        self.sigma = sigma
        self.seed = torch.initial_seed() if seed is None else seed
        self._tables: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._offsets = torch.Generator().manual_seed(self.seed)  # CPU: offsets are host integers

    @classmethod
    def example(cls) -> WeightNoise:
        return cls(0.1)

    def perturbation(self, opt: Any) -> Perturbation | None:
        params = opt.params()
        return (params, self.sample(params), 1.0) if params else None

    @property
    def label(self) -> str:
        return f"the weight noise (noise={self.sigma})"


    def __repr__(self) -> str:
        return f"WeightNoise(sigma={self.sigma}, seed={self.seed})"

    def _table(self, w: Tensor) -> Tensor:
        key = (w.device, w.dtype)
        size = max(self.TABLE, 2 * w.numel())
        table = self._tables.get(key)
        if table is None or table.numel() < size:
            # A function of the seed and size alone: rebuilt identically after a resume.
            gen = torch.Generator().manual_seed(self.seed + 1)
            table = torch.randn(size, generator=gen).to(device=w.device, dtype=w.dtype)
            self._tables[key] = table
        return table

    @torch.no_grad()
    def sample(self, weights: list[Tensor]) -> list[Tensor]:
        """Noise for ``weights``: :func:`filter_noise`'s scales on windows of the table."""
        if not weights:
            return []
        tables = [self._table(w) for w in weights]
        starts = torch.rand(len(weights), generator=self._offsets, dtype=torch.float64).tolist()
        out = []
        for w, table, u in zip(weights, tables, starts):
            start = int(u * (table.numel() - w.numel()))
            z = table[start:start + w.numel()].view(w.shape)
            out.append(z * (_unit_rms(w) * self.sigma))
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "offsets": self._offsets.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            self.seed = int(state["seed"])
            self._tables = {}
        self._offsets.set_state(state["offsets"])


def _unit_rms(w: Tensor) -> Tensor:
    """Per output unit weight RMS, shaped to broadcast against ``w``."""
    if w.dim() > 1:
        return (w.flatten(1).norm(dim=1) / (w[0].numel() ** 0.5)).view(-1, *([1] * (w.dim() - 1)))
    return w.norm() / (w.numel() ** 0.5)
