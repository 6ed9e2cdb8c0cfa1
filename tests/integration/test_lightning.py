"""Lightning: Trainer(callbacks=[DeepOpt()]) with an unchanged LightningModule equals a plain
deepopt loop, validates on the evaluation weights, and resumes exactly from checkpoints."""

from __future__ import annotations

import runpy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import deepopt  # noqa: E402
from deepopt.checkpoint import training_state_dict  # noqa: E402
from deepopt.integrations.lightning import DeepOpt  # noqa: E402

# A plain EMA folded in every step (the default recipe folds every 4th step and widens the
# weight of each fold as StepLR halves the LR), so the folds can be counted and the
# evaluation weights stay an average of the trajectory, away from the training weights.
SETTINGS = {"rho": 0.1, "average": "ema", "ema_decay": 0.9, "average_every": 1, "average_follows_lr": False}
BATCHES = 4  # training batches per epoch
BATCH = 8


class Net(pl.LightningModule):
    """An ordinary LightningModule; ``seen_in_validation`` is the test's probe."""

    def __init__(self, call_self: bool = True, scheduler: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
        self.call_self = call_self
        self.scheduler = scheduler
        self.seen_in_validation: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x) if self.call_self else self.net(x)
        return nn.functional.cross_entropy(out, y)

    def validation_step(self, batch, batch_idx):
        self.seen_in_validation.append(self.net[0].weight.detach().clone())
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        if not self.scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * BATCHES * BATCH, 10, generator=g)
    return torch.utils.data.TensorDataset(x, (x.sum(1) > 0).long() + (x[:, 0] > 1).long())


def loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset(), batch_size=BATCH, shuffle=False)


def trainer(tmp_path, epochs: int, callbacks=(), **kwargs) -> pl.Trainer:
    opts = dict(accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=BATCHES,
                limit_val_batches=2, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    opts.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **opts)


def weights(module: nn.Module) -> dict[str, list[torch.Tensor]]:
    was = module.training
    module.train()
    train = list(training_state_dict(module).values())
    module.eval()
    evals = [t.clone() for t in module.state_dict().values()]
    module.train(was)
    return {"train": train, "eval": evals}


def assert_same(a: dict, b: dict, tol: float = 0.0) -> None:
    for key in a:
        for x, y in zip(a[key], b[key]):
            torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def plain_loop(epochs: int, accumulate: int = 1, clip: float | None = None, bf16: bool = False,
               scheduler: bool = False) -> nn.Module:
    """What the Trainer runs, written by hand with deepopt.activate."""
    module = Net(scheduler=scheduler)
    conf = module.configure_optimizers()
    opt = conf["optimizer"] if scheduler else conf
    sched = conf["lr_scheduler"] if scheduler else None
    model, opt = deepopt.activate(module.net, opt, **SETTINGS)
    batches = list(loader())[:BATCHES]
    for _ in range(epochs):
        model.train()
        for i, (x, y) in enumerate(batches):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = nn.functional.cross_entropy(model(x), y)
            (loss / accumulate).backward()
            if (i + 1) % accumulate == 0:
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                opt.zero_grad()
        if sched is not None:
            sched.step()
    return module


@pytest.mark.parametrize("call_self", [True, False], ids=["self(x)", "self.net(x)"])
def test_fit_equals_a_plain_deepopt_loop_and_validates_on_evaluation_weights(tmp_path, call_self):
    module, callback = Net(call_self=call_self), DeepOpt(**SETTINGS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, epochs=2, callbacks=[callback]).fit(module, loader(), loader())
    opt = callback.optimizer
    assert isinstance(opt, deepopt.DeepOptimizer) and opt.steps == 2 * BATCHES
    calibration_warned = any("calibration skipped" in str(w.message) for w in caught)
    assert calibration_warned is not call_self
    assert_same(weights(module), weights(plain_loop(epochs=2)))

    # the last validation ran after the last step: it saw the evaluation weights
    ema_first_weight = opt.mechanism("average").tensors[0]
    assert torch.equal(module.seen_in_validation[-1], ema_first_weight)
    assert not torch.equal(ema_first_weight, opt.views.train_values(opt.eval_targets())[0])
    # and so does a validate() after fit
    module.seen_in_validation.clear()
    trainer(tmp_path, epochs=1).validate(module, loader(), verbose=False)
    assert torch.equal(module.seen_in_validation[0], ema_first_weight)


def test_optimizer_replaced_in_the_strategy_schedulers_share_param_groups(tmp_path):
    module, callback = Net(scheduler=True), DeepOpt(**SETTINGS)
    t = trainer(tmp_path, epochs=1, callbacks=[callback])
    t.fit(module, loader())
    opt = callback.optimizer
    assert t.strategy.optimizers == [opt]
    assert module.optimizers().optimizer is opt  # LightningOptimizer around the DeepOptimizer
    sched = t.lr_scheduler_configs[0].scheduler
    assert sched.optimizer is opt.optimizer and sched.optimizer.param_groups is opt.param_groups
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)  # StepLR stepped once
    assert opt.total_steps == t.estimated_stepping_batches > 0  # where a budget puts its SAM steps


def test_accumulation_clipping_scheduler_and_bf16_mixed_equal_the_plain_loop(tmp_path):
    module, callback = Net(scheduler=True), DeepOpt(**SETTINGS)
    trainer(tmp_path, epochs=2, callbacks=[callback], accumulate_grad_batches=2,
            gradient_clip_val=0.05, precision="bf16-mixed").fit(module, loader())
    assert callback.optimizer.steps == callback.optimizer.mechanism("average").count == BATCHES  # 2 epochs / 2
    reference = plain_loop(epochs=2, accumulate=2, clip=0.05, bf16=True, scheduler=True)
    assert_same(weights(module), weights(reference), tol=1e-6)


SAM_EVERY_STEP = {"budget": 2.25}  # two passes on every step (the radius ramps over 1,000 steps)


def sam_loop(epochs: int, accumulate: int, clip: float) -> nn.Module:
    """Exact two-pass SAM by hand: the closure takes the gradient of all the step's
    micro-batches (each loss divided by ``accumulate``), then clips, at ``w`` and at ``w + e``."""
    module = Net()
    model, opt = deepopt.activate(module.net, module.configure_optimizers(), **SAM_EVERY_STEP)
    opt.mechanism("sam").warmup = 0
    batches = list(loader())[:BATCHES]
    for _ in range(epochs):
        model.train()
        for i in range(0, BATCHES, accumulate):
            def closure(window=batches[i:i + accumulate]) -> torch.Tensor:
                opt.zero_grad()
                for x, y in window:
                    loss = nn.functional.cross_entropy(model(x), y) / accumulate
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                return loss

            opt.step(closure)
    return module


@pytest.mark.parametrize("accumulate", [1, 2])
def test_thorough_with_accumulation_and_clipping_equals_a_hand_written_sam_loop(tmp_path, accumulate):
    # Lightning's closure holds only the last micro-batch of a step; SAM's pass at w + e
    # must see them all (the callback runs the earlier ones) and be clipped like the first.
    module, callback = Net(), DeepOpt(**SAM_EVERY_STEP)
    fit_start = callback.on_fit_start

    def full_radius(*args):  # no ramp: SAM's radius shows in 8 steps
        fit_start(*args)
        callback.optimizer.mechanism("sam").warmup = 0

    callback.on_fit_start = full_radius
    trainer(tmp_path, epochs=2, callbacks=[callback], accumulate_grad_batches=accumulate,
            gradient_clip_val=0.05).fit(module, loader())
    opt = callback.optimizer
    assert opt.steps == opt.mechanism("sam").two_pass_steps == 2 * BATCHES // accumulate
    assert_same(weights(module), weights(sam_loop(epochs=2, accumulate=accumulate, clip=0.05)))


def test_checkpoint_holds_evaluation_weights_and_resumes_exactly(tmp_path):
    full, callback = Net(scheduler=True), DeepOpt(**SETTINGS)
    trainer(tmp_path / "a", epochs=2, callbacks=[callback]).fit(full, loader(), loader())

    first, cb1 = Net(scheduler=True), DeepOpt(**SETTINGS)
    t1 = trainer(tmp_path / "b", epochs=1, callbacks=[cb1])
    t1.fit(first, loader(), loader())
    path = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert "deepopt" in ckpt["optimizer_states"][0]
    first.eval()
    for (key, value), evaluated in zip(ckpt["state_dict"].items(), first.state_dict().values()):
        assert torch.equal(value, evaluated), key  # the checkpoint's weights are the EMA
    first.train()

    resumed, cb2 = Net(scheduler=True), DeepOpt(**SETTINGS)
    trainer(tmp_path / "c", epochs=2, callbacks=[cb2]).fit(resumed, loader(), loader(), ckpt_path=path)
    assert cb2.optimizer.steps == callback.optimizer.steps == 2 * BATCHES
    assert_same(weights(resumed), weights(full))


def test_model_checkpoint_keeps_the_weights_whose_val_loss_picked_it(tmp_path):
    module, callback = Net(scheduler=True), DeepOpt(**SETTINGS)
    best = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
    trainer(tmp_path, epochs=3, callbacks=[callback, best], enable_checkpointing=True).fit(module, loader(), loader())
    ckpt = torch.load(best.best_model_path, weights_only=False)
    plain = Net()  # no deepopt: the deployed model
    plain.load_state_dict(ckpt["state_dict"])
    x, y = next(iter(torch.utils.data.DataLoader(dataset(), batch_size=2 * BATCH)))  # limit_val_batches=2
    with torch.no_grad():
        loss = nn.functional.cross_entropy(plain.eval().net(x), y)
    torch.testing.assert_close(loss, best.best_model_score, rtol=1e-6, atol=1e-6)  # mean of 2 batch means
    opt_state = ckpt["optimizer_states"][0]["deepopt"]
    assert not torch.equal(ckpt["state_dict"]["net.0.weight"], opt_state["train_values"][0])


def test_disabled_callback_changes_nothing(tmp_path):
    on, off = Net(), Net()
    trainer(tmp_path, epochs=1, callbacks=[DeepOpt(enabled=False, **SETTINGS)]).fit(on, loader())
    trainer(tmp_path, epochs=1).fit(off, loader())
    assert_same(weights(on), weights(off))


def test_a_second_fit_replaces_the_first_wrapper(tmp_path):
    module, callback = Net(), DeepOpt(**SETTINGS)
    trainer(tmp_path, epochs=1, callbacks=[callback]).fit(module, loader())
    first = callback.optimizer
    trainer(tmp_path, epochs=1, callbacks=[callback]).fit(module, loader())
    assert callback.optimizer is not first and callback.optimizer.steps == BATCHES
    assert len(module._forward_pre_hooks) == 1  # the first wrapper's hooks are gone


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match="unknown override"):
        DeepOpt(rhoo=0.1)


def test_example_script_runs():
    example = Path(__file__).resolve().parents[2] / "examples" / "lightning_train.py"
    runpy.run_path(str(example))["main"](epochs=1)
