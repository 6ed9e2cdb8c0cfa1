"""Which weights the model's tensors hold, and the copy-back that restores the training ones.

The model's parameters (and buffers) are shown in one of three *views*:

* ``"train"``: the training weights ``w`` (what the base optimizer updates);
* ``"perturbed"``: ``w + e`` during a training forward/backward (sharpness-aware);
* ``"eval"``: the evaluation weights (an average, weights rescaled to match dropout).

Entering a view saves the training values of the tensors it changes; leaving it copies
them back, never subtracts, so rounding cannot drift the weights. This class is the only
code that writes the saved values back.

Example:
    >>> import torch
    >>> w = [torch.tensor([1.0])]
    >>> views = Views()
    >>> views.enter(w, "perturbed"); w[0] += 0.5
    >>> views.current, views.train_values(w)[0]
    ('perturbed', tensor([1.]))
    >>> views.leave(); views.current, w[0]
    ('train', tensor([1.]))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .distributed import local_tensors

__all__ = ["Views", "VIEWS"]

VIEWS = ("train", "perturbed", "eval")


class Views:
    """The view shown and the training values of the tensors it changed.

    Sharded parameters (DTensors, under ``fully_shard``) are saved and restored shard by
    shard, through their rank-local parts. ``on_change`` is called whenever the shown
    values change (FSDP2 must then gather them again: :func:`deepopt.distributed.reshard`).
    """

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self.current = "train"
        self.shown: list[Tensor] = []
        self.backup: list[Tensor] = []
        self.on_change = on_change

    @torch.no_grad()
    def enter(self, tensors: list[Tensor], view: str) -> None:
        """Save ``tensors`` (their training values) so :meth:`leave` can copy them back.

        Call it in the training view, before changing the tensors.
        """
        tensors = local_tensors(tensors)
        if len(self.backup) != len(tensors) or any(
            b.shape != t.shape or b.dtype != t.dtype or b.device != t.device for b, t in zip(self.backup, tensors)
        ):
            self.backup = [t.detach().clone() for t in tensors]
        else:  # the same tensors as last time: reuse the memory
            torch._foreach_copy_(self.backup, [t.detach() for t in tensors])
        self.shown, self.current = tensors, view
        if self.on_change is not None:  # before the caller writes: nothing gathers in between
            self.on_change()

    @torch.no_grad()
    def leave(self) -> None:
        """Show the training weights again (copy the saved values back)."""
        if self.current != "train":
            torch._foreach_copy_(self.shown, self.backup)
            self.current, self.shown = "train", []
            if self.on_change is not None:
                self.on_change()

    def forget(self) -> None:
        """The tensors' values are now the truth (new weights were loaded): nothing to copy back."""
        self.current, self.shown = "train", []
        if self.on_change is not None:
            self.on_change()

    def train_values(self, tensors: list[Tensor]) -> list[Tensor]:
        """Copies of the training values of ``tensors``, whatever view is shown."""
        tensors = local_tensors(tensors)
        shown = {id(t): i for i, t in enumerate(self.shown)}
        return [self.backup[shown[id(t)]].clone() if id(t) in shown else t.detach().clone() for t in tensors]
