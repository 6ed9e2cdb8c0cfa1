"""Dropout-matched evaluation: evaluate a dropout net as the net that training saw.

``model.eval()`` turns dropout off and relies on inverted dropout's rescaling to keep
each layer's output where training had it. Through a deep stack with heavy dropout it
does not: training saw the layers' outputs of a noisy net, evaluation computes a net
whose deep layers' outputs are several times smaller, so the learned biases swamp them.
The seed's net 2 (keep probability 0.3-0.5 on 10 of 14 hidden layers) scores 10.45% in
eval mode after 19 epochs while one dropout sample of it scores 25.42% (BENCHMARKS.md).

This mechanism changes only the weights that are *evaluated*. On a training batch it
measures each linear/conv layer's mean absolute output with dropout on (averaged over
a few dropout samples) and, in one eval-mode pass, scales each layer's weight and bias
so that its output matches (first to last, so every layer sees its rescaled inputs).
Rescaling costs accuracy where eval mode is not broken (-1.05 points on MNIST-1D MLPs
with dropout 0.5), so it is kept only where it brings the eval-mode output at least
``gate`` times closer (mean squared distance) to the mean output of the dropout
samples, the ensemble that the deterministic net is meant to stand for. Nets without
dropout are left alone without a single extra pass.

Cost: ``samples + 2`` forward passes on one training batch at the first evaluation
after new training steps. Under ``torch.distributed`` every rank measures on its own
last batch and no collective is run (evaluation often runs on one rank only), so ranks
may evaluate with slightly different factors. Under FSDP2 (``fully_shard``), where every
rank runs every evaluation forward, the factors are averaged over the ranks (kept only if
every rank keeps them), so that all shards of a weight are scaled alike.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from deepopt.mechanisms.dropout_match import has_dropout, matched_scales
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 4)).eval()
    >>> has_dropout(net)
    True
    >>> scales, closer = matched_scales(net, (torch.randn(32, 8),), {})
    >>> len(scales), scales[0]   # no dropout upstream of the first layer: factor 1
    (2, 1.0)
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from ..distributed import fsdp_modules, reshard
from .base import Mechanism

__all__ = ["has_dropout", "weighted_layers", "batch_size", "matched_scales", "DropoutMatch"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def has_dropout(model: nn.Module) -> bool:
    """Whether ``model`` holds a dropout module that drops anything (``p > 0``)."""
    return any(isinstance(m, _DropoutNd) and m.p > 0 for m in model.modules())


def weighted_layers(model: nn.Module, trained: set[int] | None = None) -> list[nn.Module]:
    """The linear and conv layers of ``model`` whose weight is a parameter, in module order.

    With ``trained`` (the ``id`` s of the parameters being trained), only the layers whose
    weight and bias are all among them: the caller can put only those back.
    """
    return [
        m for m in model.modules()
        if isinstance(m, _LAYERS) and isinstance(m.weight, nn.Parameter)
        and (trained is None or all(id(p) in trained for p in m.parameters(recurse=False)))
    ]


def batch_size(args: tuple, kwargs: dict) -> int:
    """The leading size of the first tensor among a forward's inputs (0 if none).

    Example:
        >>> batch_size((torch.zeros(16, 3),), {}), batch_size((), {"input_ids": torch.zeros(4, 9)})
        (16, 4)
    """
    for t in (*args, *kwargs.values()):
        if isinstance(t, Tensor) and t.dim() > 0:
            return t.shape[0]
    return 0


def _tensors(out: Any) -> list[Tensor]:
    """The floating-point tensors in a model's output (a tensor, tuple, list or dict)."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _flat(out: Any) -> Tensor:
    parts = [t.detach().float().reshape(-1) for t in _tensors(out)]
    return torch.cat(parts) if parts else torch.zeros(0)


@torch.no_grad()
def matched_scales(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    *,
    layers: list[nn.Module] | None = None,
    samples: int = 4,
    gate: float = 2.0,
) -> tuple[list[float], bool]:
    """The weight factors that match eval-mode layer outputs to training's, and whether to keep them.

    ``model`` must be in eval mode; its dropout modules are switched on for the
    dropout samples and off again, its parameters are left as they were, and the RNG
    is the caller's to protect. Returns one factor per entry of ``layers`` and ``True`` when the rescaled net's output is at least ``gate`` times closer (mean
    squared distance) to the mean output of ``samples`` dropout samples than the plain
    eval-mode net's output is.

    Args:
        model: the network, in eval mode.
        args, kwargs: one batch of inputs, as the model's forward takes them.
        layers: the layers to rescale (default: :func:`weighted_layers`); others keep factor 1.
        samples: dropout samples to average (targets and ensemble).
        gate: how many times closer the rescaled output must be to be kept.
    """
    layers = weighted_layers(model) if layers is None else layers
    index = {id(m): k for k, m in enumerate(layers)}
    targets = [0.0] * len(layers)
    seen: set[int] = set()

    def measure(module: nn.Module, _inp: Any, out: Any) -> None:
        # A layer called more than once per forward (shared weights) counts its first call.
        if isinstance(out, Tensor) and id(module) not in seen:
            seen.add(id(module))
            targets[index[id(module)]] += out.detach().float().abs().mean().item() / samples

    drops = [m for m in model.modules() if isinstance(m, _DropoutNd)]
    ensemble: Tensor | None = None
    handles = [m.register_forward_hook(measure) for m in layers]
    try:
        for m in drops:
            m.train()
        for _ in range(samples):
            seen.clear()
            out = _flat(model(*args, **kwargs))
            ensemble = out / samples if ensemble is None else ensemble + out / samples
    finally:
        for m in drops:
            m.eval()
        for h in handles:
            h.remove()

    plain = _flat(model(*args, **kwargs))
    scales = [1.0] * len(layers)
    scaled: set[int] = set()

    def rescale(module: nn.Module, _inp: Any, out: Any) -> Any:
        # Scaling weight and bias by s scales this layer's output by s: one pass computes
        # the rescaled net, each layer measured on the outputs of the rescaled ones before it.
        if not isinstance(out, Tensor):
            return None
        k = index[id(module)]
        if id(module) not in scaled:
            scaled.add(id(module))
            current = out.detach().float().abs().mean().item()
            s = targets[k] / current if current > 0 else 1.0
            scales[k] = s if math.isfinite(s) and s > 0 else 1.0
        return out * scales[k]

    handles = [m.register_forward_hook(rescale) for m in layers]
    try:
        matched = _flat(model(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()
    if ensemble is None or not torch.isfinite(matched).all():
        return scales, False
    far = (plain - ensemble).square().mean().item()
    near = (matched - ensemble).square().mean().item()
    keep = math.isfinite(far) and far > 0 and near * gate <= far
    return scales, keep


def _agreed(scales: list[float], keep: bool) -> tuple[list[float], bool]:
    """The factors averaged over the ranks, and whether every rank keeps them (one all-reduce)."""
    import torch.distributed as dist

    t = torch.tensor([*scales, 1.0 if keep else 0.0], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return t[:-1].tolist(), bool(t[-1].item() == 1.0)


class DropoutMatch(Mechanism):
    """Evaluates a dropout net at weights rescaled by :func:`matched_scales`, where kept.

    Measured on the last full training batch at the first evaluation after new steps;
    ``scales`` are the factors in use, ``keep`` whether they are, ``step`` the step count
    they were measured at. Attached only to models with dropout.

    Example:
        >>> state = DropoutMatch()
        >>> state.scales is None, state.state_dict()
        (True, {'scales': None, 'keep': False, 'step': -1})
    """

    name = "dropout_match"

    @property
    def has_eval_view(self) -> bool:  # type: ignore[override]
        return not self.off

    def __init__(self) -> None:
        self.scales: list[float] | None = None
        self.keep = False
        self.step = -1
        self.off = False  # the model cannot run a training batch in eval mode
        self._last_batch: tuple[tuple, dict] | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> DropoutMatch | None:
        return cls() if settings.dropout_match else None

    def attach(self, opt: Any) -> bool:
        return has_dropout(opt.model)

    @torch.no_grad()
    def apply_(self, layers: list[nn.Module]) -> None:
        """Multiply each layer's weight and bias by its factor, in place (if kept)."""
        if not self.keep or self.scales is None or len(self.scales) != len(layers):
            return
        for layer, s in zip(layers, self.scales):
            if s != 1.0:
                layer.weight.mul_(s)
                if isinstance(layer.bias, Tensor):
                    layer.bias.mul_(s)

    # -- events ------------------------------------------------------------------------------
    def on_train_forward(self, opt: Any, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # An epoch's short last batch would make a noisy measurement: keep the one before
        # it (any training inputs will do; the weights measured are current).
        if self._last_batch is None or 2 * batch_size(args, kwargs) >= batch_size(*self._last_batch):
            self._last_batch = (args, kwargs)

    def show_eval(self, opt: Any, targets: list[Tensor]) -> None:
        measure = self.step != opt.steps and self._last_batch is not None and not self.off
        if not measure and not self.keep:  # every eval forward passes here: keep it cheap
            return
        model = getattr(opt.model, "_orig_mod", opt.model)
        fsdp = fsdp_modules(model)
        reshard(fsdp)  # FSDP2: the layers hold their sharded weights, the ones apply_() scales
        layers = weighted_layers(model, {id(p) for p in opt.params()})
        if measure:
            cuda = sorted({t.device.index or 0 for t in targets if t.is_cuda})
            try:
                # The dropout samples must not move the user's RNG (the training trajectory).
                with opt.hold(), torch.random.fork_rng(devices=cuda):
                    self.scales, self.keep = matched_scales(model, *self._last_batch, layers=layers)
                if fsdp:
                    self.scales, self.keep = _agreed(self.scales, self.keep)
                reshard(fsdp)
                self.step = opt.steps
            except Exception as e:  # noqa: BLE001 - the user's evaluation must go on
                # A model that cannot run a training batch in eval mode: evaluate it plainly.
                self.off, self.keep = True, False
                warnings.warn(
                    f"deepopt: dropout-matched evaluation is off for this run: the model raised "
                    f"{type(e).__name__}: {e} on its last training batch in eval mode. Evaluation "
                    "uses the plain weights; pass dropout_match=False to activate() to silence this.",
                    stacklevel=2,
                )
                return
        if self.keep:
            if opt.views.current != "eval":
                opt.views.enter(targets, "eval")
            self.apply_(layers)

    def on_weights_loaded(self, opt: Any, resumed: bool) -> None:
        if not resumed:
            self.step = -1  # new weights: measure again

    def idle(self, opt: Any) -> str | None:
        if self.off or (self.step >= 0 and not self.keep):
            return "dropout-matched evaluation kept the plain weights (rescaling did not bring eval closer to training)"
        return None

    def state_dict(self) -> dict:
        return {"scales": None if self.scales is None else list(self.scales), "keep": self.keep, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.scales = None if state["scales"] is None else [float(s) for s in state["scales"]]
        self.keep, self.step = bool(state["keep"]), int(state["step"])

    @property
    def label(self) -> str:
        return "dropout-matched evaluation"

    def describe(self) -> str:
        return f"dropout-matched evaluation ({'rescaled' if self.keep else 'plain'} weights)"
