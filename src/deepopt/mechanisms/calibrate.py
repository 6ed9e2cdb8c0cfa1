"""Start-up calibration for networks whose signal vanishes or explodes with depth.

On the first training batch, one forward pass measures the standard deviation of the
output of every linear and convolutional layer. If some layer's output is more than
``threshold`` times smaller (or larger) than the first layer's, the signal does
not propagate and plain training stalls (the seed's Net 4, 20 plain conv layers with
Xavier init, stays at 10% accuracy). Only then are the layers rescaled, first to last,
so that each layer's output has unit standard deviation on that batch
(LSUV, Mishkin & Matas, ICLR 2016, without the orthonormal pre-init, which would
change the user's init). Networks whose signal already propagates are left alone:
rescaling them ends lower (calibration.md, Net 1).

Cost: a handful of forward passes on one batch, once. Under ``torch.distributed``
(data-parallel training, e.g. DDP) the standard deviations are those of the global
batch (all-reduced over the default process group), so every rank rescales alike. Under
FSDP2 (``fully_shard``) they are measured on the gathered weights, each layer's output
being a full activation, and each rank rescales its shard of the weights.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from deepopt.mechanisms.calibrate import layer_output_stds, calibrate_
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> net = nn.Sequential(*[m for _ in range(30) for m in (nn.Linear(32, 32, bias=False), nn.ReLU())])
    >>> x = torch.randn(64, 32)
    >>> stds = layer_output_stds(net, (x,), {})
    >>> stds[-1] / stds[0] < 1e-3
    True
    >>> calibrate_(net, (x,), {})
    True
    >>> abs(layer_output_stds(net, (x,), {})[-1] - 1.0) < 0.1
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import fsdp_modules, reshard
from .base import Mechanism

__all__ = ["layer_output_stds", "signal_ratio", "calibrate_", "Calibration"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _LAYERS) and m.weight.requires_grad]


def _data_parallel() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def _stds(model: nn.Module, layers: list[nn.Module], args: tuple, kwargs: dict) -> list[float]:
    # Under torch.distributed (data parallel: every rank runs this on its share of the
    # batch), the stds are those of the global batch, so every rank rescales alike.
    spread = _data_parallel()
    stds: dict[nn.Module, Any] = {}

    def record(module: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.numel() > 1 and module not in stds:
            if spread:
                o = out.detach().double()
                stds[module] = torch.stack([o.new_tensor(o.numel()), o.sum(), o.square().sum()])
            else:
                stds[module] = out.float().std(correction=0).item()

    handles = [m.register_forward_hook(record) for m in layers]
    try:
        model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    found = [stds[m] for m in layers if m in stds]
    if spread and found:
        moments = torch.stack(found)
        dist.all_reduce(moments)
        n, total, squares = moments.unbind(1)
        found = (squares / n - (total / n).square()).clamp_min(0).sqrt().tolist()
    return found


def layer_output_stds(model: nn.Module, args: tuple, kwargs: dict) -> list[float]:
    """Standard deviation of each linear/conv layer's output, in call order."""
    return _stds(model, _layers(model), args, kwargs)


def signal_ratio(stds: list[float]) -> float:
    """The most extreme ``std(layer k) / std(first layer)``: below 1 vanishing, above exploding.

    The extreme over depth rather than the last layer alone, because a bias in the last
    layer can hide a signal that died on the way.
    """
    if len(stds) < 2 or stds[0] == 0:
        return 1.0
    ratios = [s / stds[0] for s in stds[1:]]
    return max(ratios, key=lambda r: abs(math.log(r)) if r > 0 else math.inf)


@torch.no_grad()
def calibrate_(
    model: nn.Module, args: tuple, kwargs: dict, threshold: float = 1e-3, iters: int = 3
) -> bool | None:
    """Rescale layer weights in place if the signal vanishes/explodes; return whether it did.

    Returns ``None`` (weights untouched) when the first layer's output is already NaN/inf:
    the batch itself is bad, nothing can be measured on it (dividing by a NaN std would
    destroy the weights), so the caller decides on a later batch. A non-finite std further
    down (an exploding signal) is calibrated; no layer is ever divided by a non-finite std.

    Args:
        model: the network (its mode, RNG and buffers are the caller's to protect).
        args, kwargs: one batch of inputs, as the model's forward takes them.
        threshold: calibrate when ``signal_ratio`` is below ``threshold`` or above
            ``1 / threshold``.
        iters: LSUV passes per layer (each divides the weight by the measured std).
    """
    fsdp = fsdp_modules(model)
    reshard(fsdp)  # FSDP2: the modules hold their sharded weights, the ones to rescale
    layers = _layers(model)
    weights = [layer.weight for layer in layers]
    stds = _stds(model, layers, args, kwargs)
    if stds and not math.isfinite(stds[0]):
        return None
    ratio = signal_ratio(stds)
    if threshold <= ratio <= 1.0 / threshold:
        return False
    for layer, weight in zip(layers, weights):
        for _ in range(iters):
            std = _stds(model, [layer], args, kwargs)
            if not std or not math.isfinite(std[0]) or std[0] == 0 or abs(std[0] - 1.0) < 0.02:
                break
            weight.div_(std[0])
            reshard(fsdp)  # the next forward gathers the rescaled shards
    return True


class Calibration(Mechanism):
    """Calibrates on the first training batch (:func:`calibrate_`), only if the signal vanishes.

    ``calibrated`` is ``None`` until decided (a batch with non-finite activations leaves it
    undecided), then whether the weights were rescaled.

    Args:
        threshold: vanishing/exploding limit of the last/first layer output std ratio.

    Example:
        >>> import torch, deepopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> _ = model(torch.randn(8, 4))
        >>> opt.mechanism("calibrate").calibrated  # this net's signal propagates
        False
    """

    name = "calibrate"

    def __init__(self, threshold: float = 1e-3) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold={threshold!r} is invalid: it must lie in (0, 1), e.g. 1e-3.")
        self.threshold = threshold
        self.calibrated: bool | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> Calibration | None:
        return cls() if settings.calibrate else None

    def on_train_forward(self, opt: Any, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.calibrated is not None:  # every training forward passes here: keep it cheap
            return
        # Measuring must not change the trajectory of a net that needs no calibration:
        # keep the RNG (dropout) and the BatchNorm running statistics as they were.
        rng = torch.get_rng_state()
        buffers = list(module.buffers())
        saved = [b.clone() for b in buffers]
        try:
            with opt.hold(), torch.no_grad():
                # A torch.compile'd module is measured through its original module, eagerly.
                self.calibrated = calibrate_(getattr(module, "_orig_mod", module), args, kwargs, self.threshold)
        finally:
            torch.set_rng_state(rng)
            for b, s in zip(buffers, saved):
                b.copy_(s)

    def idle(self, opt: Any) -> str | None:
        if self.calibrated is False:
            return "calibration found the signal healthy through the layers and left the initial weights as they were"
        return None

    def state_dict(self) -> dict:
        return {"calibrated": self.calibrated}

    def load_state_dict(self, state: dict) -> None:
        self.calibrated = state["calibrated"]

    @property
    def label(self) -> str:
        return "start-up calibration"

    def describe(self) -> str:
        done = {None: "not yet decided", True: "rescaled the init", False: "not needed"}[self.calibrated]
        return f"start-up calibration ({done})"

    def __repr__(self) -> str:
        return f"Calibration(threshold={self.threshold})"
