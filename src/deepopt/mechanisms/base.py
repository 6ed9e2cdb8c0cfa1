"""The one protocol every mechanism follows: the events it acts on, its state, its facts.

A mechanism is a small stateful object. :class:`~deepopt.DeepOptimizer` holds an ordered
list of them and, at each event, calls that event's method on every mechanism in list
order; it names none of them. Each method receives the optimizer, whose documented members
are what a mechanism may use: ``model``, ``optimizer`` (the user's), ``params()``,
``buffers()``, ``eval_targets()``, ``lr``, ``max_lr``, ``steps``, ``views`` (the copy-back
of the shown weights), ``show(view)``, ``hold()``, ``accept(loss)``, ``base_step(kwargs)``
and ``after_update()``.

Events, in the order a step meets them:

* :meth:`attach`: once, when activated; ``False`` drops the mechanism (nothing to act on).
* :meth:`on_train_forward`: every training forward (grad enabled, model in train mode),
  before it runs; two-pass SAM's passes count once.
* :meth:`perturbation`: the weights a training forward runs at, ``w + alpha * delta``;
  every mechanism's ``delta`` is computed at the clean weights, then all are added.
* :meth:`claims_step`: whether this mechanism runs ``step(closure)`` itself
  (:meth:`run_step`), e.g. two-pass SAM.
* :meth:`accept`: before the update; ``False`` skips it (the divergence guard).
* :meth:`replace_grads`: after ``accept``, on a ``step()`` without closure: may replace the
  user's gradients (two-pass SAM's gradient at ``w + e``, replayed); ``False`` skips the update.
* :meth:`after_update`: after the base optimizer updated the weights.
* :meth:`show_eval`: put the evaluation weights in place (``model.eval()`` forwards,
  ``state_dict()`` in either mode, the modules then in eval mode; :mod:`deepopt.checkpoint`):
  enter the view with ``opt.views.enter(...)`` first.
* :meth:`on_weights_loaded`: ``model.load_state_dict`` put new weights in.
* :meth:`detach`: ``deepopt.deactivate``: remove what :meth:`attach` installed.

Facts others ask of the list (class attributes, read by the optimizer, ``activate`` and
the drivers): :attr:`needs_closure`, :attr:`needs_one_pass`, :attr:`perturbs`,
:attr:`has_eval_view`, :attr:`unsafe_when_sharded`; :attr:`label` names it in messages,
:meth:`describe` says in one line what it did.

Example:
    >>> import torch, deepopt
    >>> from deepopt.mechanisms.base import Mechanism
    >>> class CountSteps(Mechanism):
    ...     name = "count_steps"
    ...     def __init__(self) -> None:
    ...         self.count = 0
    ...     def after_update(self, opt) -> None:
    ...         self.count += 1
    ...     def state_dict(self) -> dict:
    ...         return {"count": self.count}
    ...     def load_state_dict(self, state: dict) -> None:
    ...         self.count = state["count"]
    >>> model = torch.nn.Linear(2, 1)
    >>> counter = CountSteps()
    >>> model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                               mechanisms=[counter])
    >>> model(torch.ones(1, 2)).sum().backward(); opt.step()
    >>> counter.count, opt.state_dict()["deepopt"]["mechanisms"]["count_steps"]
    (1, {'count': 1})
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

if TYPE_CHECKING:
    from ..optimizer import DeepOptimizer

__all__ = ["Mechanism", "Perturbation", "EVENTS"]

#: ``(tensors, deltas, alpha)``: the training forward runs at ``tensors + alpha * deltas``.
Perturbation = tuple[list[Tensor], list[Tensor], float]

#: The event methods; the optimizer calls each only on the mechanisms that override it.
EVENTS = ("on_train_forward", "perturbation", "claims_step", "accept", "replace_grads", "after_update",
          "show_eval", "on_weights_loaded", "detach")


class Mechanism:
    """Base class: every event is a no-op, every fact ``False``; override what you act on.

    Attributes:
        name: the key of this mechanism's state under ``state_dict()["deepopt"]`` and in
            the registry; one mechanism per name in an activation.
        needs_closure: acts only through ``optimizer.step(closure)`` (two-pass SAM).
        needs_one_pass: needs one forward/backward per update, so it is off for optimizers
            whose ``step(closure)`` evaluates the closure itself (LBFGS).
        perturbs: may make a training forward run at other weights than the training ones.
        has_eval_view: may make ``model.eval()`` compute with other weights.
        unsafe_when_sharded: why it cannot act on a model sharded by ``fully_shard`` ("" if it can;
            an instance may set its own, e.g. for an option that cannot).
    """

    name: ClassVar[str] = ""
    needs_closure: ClassVar[bool] = False
    needs_one_pass: ClassVar[bool] = False
    perturbs: ClassVar[bool] = False
    has_eval_view: ClassVar[bool] = False
    unsafe_when_sharded: ClassVar[str] = ""

    @classmethod
    def from_settings(cls, settings: Any) -> Mechanism | None:
        """The instance :class:`deepopt.Settings` ask for, or ``None`` (the default: no knob)."""
        return None

    @classmethod
    def example(cls) -> Mechanism:
        """An instance that acts, for the registry-driven conformance tests."""
        return cls()

    # -- events ------------------------------------------------------------------------------
    def attach(self, opt: DeepOptimizer) -> bool:
        """Once, at activation: whether to act on this model and optimizer."""
        return True

    def on_train_forward(self, opt: DeepOptimizer, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Before every training forward (the batch is ``args``, ``kwargs``)."""

    def perturbation(self, opt: DeepOptimizer) -> Perturbation | None:
        """The perturbation of the coming training forward, or ``None``."""
        return None

    def claims_step(self, opt: DeepOptimizer, closure: Any) -> bool:
        """Whether :meth:`run_step` runs this ``step(closure)``."""
        return False

    def run_step(self, opt: DeepOptimizer, closure: Any, kwargs: dict) -> Any:
        """Run the whole step (closure calls, ``opt.accept``, ``opt.base_step``, ``opt.after_update``)."""
        raise NotImplementedError

    def accept(self, opt: DeepOptimizer, loss: Any) -> bool:
        """Before the update: ``False`` skips it (the weights and optimizer state stay)."""
        return True

    def replace_grads(self, opt: DeepOptimizer) -> bool:
        """After :meth:`accept` on a ``step()`` without closure: may replace ``.grad``;
        ``False`` skips the update."""
        return True

    def after_update(self, opt: DeepOptimizer) -> None:
        """After the base optimizer's update."""

    def show_eval(self, opt: DeepOptimizer, targets: list[Tensor]) -> None:
        """Put the evaluation weights into ``targets`` (parameters, then buffers)."""

    def on_weights_loaded(self, opt: DeepOptimizer, resumed: bool) -> None:
        """New weights were loaded into the model (``resumed``: the training weights of a
        checkpoint this optimizer just loaded, not new ones)."""

    def detach(self, opt: DeepOptimizer) -> None:
        """``deepopt.deactivate``: remove whatever :meth:`attach` installed."""

    # -- state and report --------------------------------------------------------------------
    def idle(self, opt: DeepOptimizer) -> str | None:
        """Why this mechanism has so far left the run as it would have been without it, or
        ``None`` if it has acted (the default). When every mechanism of an activation is idle
        at an evaluation, the optimizer says so once, with these reasons."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @property
    def label(self) -> str:
        """What this mechanism is, for one-line messages (e.g. "the divergence guard")."""
        return self.name

    def describe(self) -> str:
        """One line: what this mechanism did so far (default: :attr:`label`)."""
        return self.label

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
