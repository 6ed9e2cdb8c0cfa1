"""Checkpoints with the ordinary idiom continue the exact same trajectory, for every recipe."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import deepopt
from conftest import assert_equal, bn_cnn, data, mlp, train
from deepopt.checkpoint import training_state_dict
from deepopt.experimental import legacy_kwargs

RECIPE_CASES = [
    {"recipe": "default"},
    {"recipe": "safe"},
    {"recipe": "default", "rho": 0.2},
    {"recipe": "default", "rho": 0.2, "adaptive": True, "rho_follows_lr": True},
    {"recipe": "default", "average": "ema"},
    {"recipe": "default", "average": "phase", "rho": 0.1},
    {"recipe": "thorough", "closure": True},
    {"recipe": "default", "lookahead_k": 3, "rho": 0.1},
]


def build(kwargs, factory, opt_cls):
    torch.manual_seed(0)
    model = factory()
    kwargs = dict(kwargs)
    kwargs.pop("closure", None)
    opt = opt_cls(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, 4, gamma=0.5)
    model, opt = deepopt.activate(model, opt, **legacy_kwargs(kwargs))
    return model, opt, sched


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kwargs", RECIPE_CASES, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("factory, kind", [(mlp, "vec"), (bn_cnn, "img")], ids=["mlp", "bn_cnn"])
@pytest.mark.parametrize("save_in_eval", [False, True])
def test_resume_equals_uninterrupted(kwargs, factory, kind, save_in_eval):
    x, y = data(kind)
    closure = kwargs.get("closure", False)
    opt_cls = lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=1e-3)  # noqa: E731

    model, opt, sched = build(kwargs, factory, opt_cls)
    train(model, opt, x, y, steps=12, scheduler=sched, closure=closure)
    model.eval()
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched = build(kwargs, factory, opt_cls)
    train(model, opt, x, y, steps=5, scheduler=sched, closure=closure)
    if save_in_eval:
        model.eval()
        with torch.no_grad():
            model(x)
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})

    model2, opt2, sched2 = build(kwargs, factory, opt_cls)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    # the remaining 7 steps use batches 5..11 as in the uninterrupted run
    train(model2, opt2, x, y, steps=7, scheduler=sched2, closure=closure, start=5)
    model2.eval()
    for k, v in model2.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_optimizer_loaded_before_model_still_resumes():
    x, y = data()
    kwargs = {"average": "ema", "rho": 0.1}
    opt_cls = lambda p, lr: torch.optim.Adam(p, lr=lr * 0.1)  # noqa: E731
    model, opt, sched = build(kwargs, mlp, opt_cls)
    train(model, opt, x, y, steps=8, scheduler=sched)
    reference = [p.detach().clone() for p in model.parameters()]

    model, opt, sched = build(kwargs, mlp, opt_cls)
    train(model, opt, x, y, steps=4, scheduler=sched)
    model.eval()
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    model2, opt2, sched2 = build(kwargs, mlp, opt_cls)
    opt2.load_state_dict(ckpt["opt"])
    model2.load_state_dict(ckpt["model"])  # eval weights: must not replace the training weights
    sched2.load_state_dict(ckpt["sched"])
    train(model2, opt2, x, y, steps=4, scheduler=sched2, start=4)
    for p, r in zip(model2.parameters(), reference):
        assert torch.equal(p, r)


def test_plain_optimizer_state_loads_into_activated_optimizer():
    model = mlp()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = data()
    train(model, plain, x, y, steps=2)
    sd = plain.state_dict()
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    opt.load_state_dict(sd)
    assert torch.equal(opt.state[model[0].weight]["momentum_buffer"], plain.state[model[0].weight]["momentum_buffer"])


def test_future_format_version_fails_clearly():
    model = nn.Linear(2, 2)
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1))
    sd = opt.state_dict()
    sd["deepopt"]["version"] = 99
    with pytest.raises(ValueError, match="format version 99"):
        opt.load_state_dict(sd)


def test_model_state_dict_holds_no_perturbation_mid_step():
    torch.manual_seed(0)
    model = mlp()
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.5)
    x, y = data()
    train(model, opt, x, y, steps=3)
    clean = {k: v.clone() for k, v in model.state_dict().items()}
    loss = nn.functional.cross_entropy(model(x), y)  # perturbed now
    loss.backward()
    for k, v in model.state_dict().items():
        assert torch.equal(v, clean[k])


# -- what a checkpoint holds: the evaluated weights (deepopt.checkpoint) ----------------------
# an EMA folded every step, its window not widened as StepLR halves the LR: it stays apart from the iterate
AVERAGED = {"average": "ema", "ema_decay": 0.8, "average_every": 1, "average_follows_lr": False, "rho": 0.1}


def evaluate(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(x), y).item()
    model.train()
    return loss


def plain_loss(state: dict, x, y) -> float:
    """The loss of a model without deepopt holding ``state`` (what a deployment loads)."""
    plain = mlp()
    plain.load_state_dict(state)
    return evaluate(plain, x, y)


@pytest.mark.parametrize("optimizer_first", [False, True], ids=["model-then-optimizer", "optimizer-then-model"])
def test_saved_in_train_mode_after_evaluation_holds_what_was_evaluated_and_resumes_exactly(optimizer_first):
    x, y = data()
    model, opt, sched = build(AVERAGED, mlp, torch.optim.SGD)
    train(model, opt, x, y, steps=12, scheduler=sched)
    reference = training_state_dict(model), {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched = build(AVERAGED, mlp, torch.optim.SGD)
    train(model, opt, x, y, steps=5, scheduler=sched)
    val = evaluate(model, x, y)  # model.eval(); estimate_loss(); model.train()
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    assert plain_loss(ckpt["model"], x, y) == val  # the saved model is the evaluated one ...
    trained = training_state_dict(model)
    assert not torch.equal(ckpt["model"]["0.weight"], trained["0.weight"])  # ... not the training weights
    assert all(torch.equal(a, trained[k]) for a, k in zip(ckpt["opt"]["deepopt"]["train_values"], trained))

    model2, opt2, sched2 = build(AVERAGED, mlp, torch.optim.SGD)
    loads = [lambda: model2.load_state_dict(ckpt["model"]), lambda: opt2.load_state_dict(ckpt["opt"])]
    for load in loads[::-1] if optimizer_first else loads:
        load()
    sched2.load_state_dict(ckpt["sched"])
    train(model2, opt2, x, y, steps=7, scheduler=sched2, start=5)
    assert_equal(training_state_dict(model2), reference[0])
    assert_equal(model2.state_dict(), reference[1])


def test_model_only_checkpoint_continues_from_the_evaluated_weights_and_says_so_once(capfd):
    x, y = data()
    model, opt, _ = build(AVERAGED, mlp, torch.optim.SGD)
    train(model, opt, x, y, steps=5)
    saved = roundtrip(model.state_dict())
    capfd.readouterr()

    fresh, fresh_opt, _ = build(AVERAGED, mlp, torch.optim.SGD)
    fresh.load_state_dict(saved)
    assert_equal(training_state_dict(fresh), saved)  # training goes on from the evaluated weights
    train(fresh, fresh_opt, x, y, steps=2, start=5)
    said = [line for line in capfd.readouterr().err.splitlines() if line.startswith("deepopt:")]
    assert len(said) == 1 and "training continues from the weights model.load_state_dict() loaded" in said[0]
    fresh.load_state_dict(saved)
    train(fresh, fresh_opt, x, y, steps=1, start=7)
    assert "deepopt:" not in capfd.readouterr().err  # once

    resumed, resumed_opt, _ = build(AVERAGED, mlp, torch.optim.SGD)  # model and optimizer: nothing said
    resumed.load_state_dict(saved)
    resumed_opt.load_state_dict(roundtrip(opt.state_dict()))
    train(resumed, resumed_opt, x, y, steps=1, start=5)
    assert "deepopt:" not in capfd.readouterr().err


def test_best_snapshot_idiom_keeps_the_evaluated_weights_and_restores_them_at_the_end():
    x, y = data()
    model, opt, sched = build(AVERAGED, mlp, torch.optim.SGD)
    best = best_val = None
    for epoch in range(4):
        train(model, opt, x, y, steps=3, scheduler=sched, start=3 * epoch)
        val = evaluate(model, x, y)
        if best_val is None or val < best_val:
            best_val, best = val, copy.deepcopy(model.state_dict())
        if epoch == 1:
            cloned = {k: v.clone() for k, v in model.state_dict().items()}
            live = model.state_dict()  # not copied: follows the parameters, as in plain PyTorch
            assert plain_loss(cloned, x, y) == val
    assert plain_loss(best, x, y) == best_val
    assert not torch.equal(live["0.weight"], cloned["0.weight"])  # training went on in those tensors
    model.load_state_dict(best)
    assert evaluate(model, x, y) == best_val  # what the run ends with is what was evaluated
    assert_equal(model.state_dict(), best)


def test_state_dict_in_train_mode_measures_dropout_matching_in_eval_mode_and_restores_each_mode():
    x, y = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
    model, opt = deepopt.activate(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                  recipe="default", average=None)
    train(model, opt, x, y, steps=4)
    model[1].eval()  # a frozen BatchNorm inside a model in train mode
    stats = model[1].running_mean.clone()
    saved = {k: v.clone() for k, v in model.state_dict().items()}  # measures the factors: eval-mode forwards
    assert [m.training for m in model] == [True, False, True, True, True] and model.training
    assert torch.equal(model[1].running_mean, stats)
    assert opt.mechanism("dropout_match").step == opt.steps
    model.eval()
    assert_equal(model.state_dict(), saved)


def test_training_state_dict_leaves_the_model_as_it_is():
    x, y = data()
    model, opt, _ = build(AVERAGED, mlp, torch.optim.SGD)
    train(model, opt, x, y, steps=3)
    evaluate(model, x, y)  # the evaluation weights stay shown until the next training forward
    shown = [p.detach().clone() for p in model.parameters()]
    trained = training_state_dict(model)
    assert opt.views.current == "eval" and all(torch.equal(p, s) for p, s in zip(model.parameters(), shown))
    model.train()
    with torch.no_grad():
        model(x)  # a forward in train mode shows the training weights again
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())


def test_wrapped_model_inner_state_dict_follows_the_rule(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo unavailable")
    x, y = data()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ddp = nn.parallel.DistributedDataParallel(mlp())
        ddp, opt = deepopt.activate(ddp, torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9), **AVERAGED)
        train(ddp, opt, x, y, steps=4)
        whole = {k.removeprefix("module."): v.clone() for k, v in ddp.state_dict().items()}
        ddp(x).sum()  # a training forward: the training weights are shown again
        inner = {k: v.clone() for k, v in ddp.module.state_dict().items()}  # nanoGPT's raw_model.state_dict()
        assert_equal(inner, whole)
        assert not torch.equal(inner["0.weight"], training_state_dict(ddp.module)["0.weight"])
        buf = io.BytesIO()
        torch.save(ddp.module, buf)
        assert b"deepopt" not in buf.getvalue()
        ddp.module.load_state_dict(inner)  # a load into the inner module is seen too
        assert_equal(training_state_dict(ddp), {f"module.{k}": v for k, v in inner.items()})
    finally:
        dist.destroy_process_group()
