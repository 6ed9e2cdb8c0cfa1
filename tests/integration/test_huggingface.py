"""Hugging Face Trainer: callbacks=[DeepOpt()] trains with deepopt, evaluate() uses the
evaluation weights, checkpoints and save_model carry the state. Tiny BERT from a config,
no hub access."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import deepopt  # noqa: E402
from deepopt.checkpoint import training_state_dict  # noqa: E402
from deepopt.integrations.huggingface import DeepOpt  # noqa: E402

# A plain EMA folded in every step (the default recipe folds every 4th step and shrinks the
# window with the LR, which the Trainer's linear schedule takes to 0 in these 6 steps: the
# average would end as the iterate), so the folds can be counted and the evaluation weights
# differ from the training ones.
SETTINGS = {"rho": 0.05, "average": "ema", "ema_decay": 0.9, "average_every": 1, "average_follows_lr": False}
STEPS = 6


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


class Pairs(torch.utils.data.Dataset):
    """Random token sequences; the label says whether token 1 occurs."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, 64, (n, 12), generator=g)
        self.ids[::2, 3] = 1
        self.labels = (self.ids == 1).any(1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long),
                "labels": self.labels[i]}


def make_trainer(tmp_path, model=None, callbacks=(), **kwargs) -> transformers.Trainer:
    opts = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, per_device_eval_batch_size=16,
                max_steps=STEPS, learning_rate=5e-3, warmup_steps=0, logging_strategy="no",
                save_strategy="no", report_to="none", use_cpu=True, seed=0,
                dataloader_num_workers=0, disable_tqdm=True)
    opts.update(kwargs)
    return transformers.Trainer(model=model if model is not None else tiny_bert(),
                                args=transformers.TrainingArguments(**opts), train_dataset=Pairs(),
                                eval_dataset=Pairs(32, seed=1), callbacks=list(callbacks))


def weights(model: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    was = model.training
    model.train()
    train = list(training_state_dict(model).values())
    model.eval()
    evals = [t.clone() for t in model.state_dict().values()]
    model.train(was)
    return {"train": train, "eval": evals}


def assert_same(a: dict, b: dict) -> None:
    for key in a:
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y), key


def eval_loss(model: torch.nn.Module, values: list[torch.Tensor]) -> float:
    """Mean eval loss of a plain copy of ``model`` holding ``values`` (state_dict order)."""
    plain = tiny_bert()
    plain.load_state_dict(dict(zip(plain.state_dict(), values)))
    plain.eval()
    data = Pairs(32, seed=1)
    with torch.no_grad():
        batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in ("input_ids", "attention_mask")}
        logits = plain(**batch).logits
    return torch.nn.functional.cross_entropy(logits, data.labels).item()


def test_train_uses_deepopt_and_evaluate_uses_the_evaluation_weights(tmp_path):
    callback = DeepOpt(**SETTINGS)
    trainer = make_trainer(tmp_path, callbacks=[callback])
    trainer.train()
    opt = callback.optimizer
    assert isinstance(opt, deepopt.DeepOptimizer) and trainer.optimizer.optimizer is opt
    assert opt.steps == opt.mechanism("average").count == STEPS
    assert trainer.lr_scheduler.optimizer.param_groups is opt.param_groups
    assert opt.param_groups[0]["lr"] < 5e-3  # the Trainer's linear schedule drove the LR

    model = trainer.model
    w = weights(model)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(eval_loss(model, w["eval"]), rel=1e-5)
    assert metrics["eval_loss"] != pytest.approx(eval_loss(model, w["train"]), rel=1e-5)

    # save_model writes the evaluation weights, the model in either mode
    model.train()
    trainer.save_model(str(tmp_path / "final"))
    saved = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "final"))
    for value, evaluated in zip(saved.state_dict().values(), w["eval"]):
        assert torch.equal(value, evaluated)


def test_disabled_callback_changes_nothing(tmp_path):
    off = make_trainer(tmp_path / "off", callbacks=[DeepOpt(enabled=False, **SETTINGS)])
    off.train()
    plain = make_trainer(tmp_path / "plain")
    plain.train()
    assert_same(weights(off.model), weights(plain.model))


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    full_cb = DeepOpt(**SETTINGS)
    full = make_trainer(tmp_path / "full", callbacks=[full_cb])
    full.train()

    first = make_trainer(tmp_path / "run", callbacks=[DeepOpt(**SETTINGS)], save_strategy="steps", save_steps=3)
    first.train()
    ckpt = tmp_path / "run" / "checkpoint-3"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert saved["deepopt"]["steps"] == 3
    # the checkpoint's model file holds the evaluation weights at step 3
    on_disk = transformers.BertForSequenceClassification.from_pretrained(str(ckpt)).state_dict()
    params = [p for p in first.model.parameters()]
    n = len(saved["deepopt"]["mechanisms"]["average"]["tensors"])
    assert n == len(params) + len(list(first.model.buffers()))
    word_embeddings = saved["deepopt"]["mechanisms"]["average"]["tensors"][0]
    assert torch.equal(on_disk["bert.embeddings.word_embeddings.weight"], word_embeddings)

    resumed_cb = DeepOpt(**SETTINGS)
    resumed = make_trainer(tmp_path / "run", callbacks=[resumed_cb], save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed_cb.optimizer.steps == full_cb.optimizer.steps == STEPS
    assert_same(weights(resumed.model), weights(full.model))


def test_gradient_accumulation_and_bf16_step_once_per_optimizer_step(tmp_path):
    callback = DeepOpt(**SETTINGS)
    trainer = make_trainer(tmp_path, callbacks=[callback], gradient_accumulation_steps=2, bf16=True,
                           max_grad_norm=0.5)
    perturbations = []
    show = None

    def counted(view):
        was = callback.optimizer.views.current
        show(view)
        if view == "perturbed" != was:
            perturbations.append(callback.optimizer.views.current == "perturbed")

    original_begin = callback.on_train_begin

    def begin(*args, **kwargs):
        nonlocal show
        original_begin(*args, **kwargs)
        show = callback.optimizer.show
        callback.optimizer.show = counted

    callback.on_train_begin = begin
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    opt = callback.optimizer
    assert opt.steps == opt.mechanism("average").count == STEPS
    assert sum(perturbations) == STEPS - 1  # one per optimizer step once momentum exists


def test_example_script_runs(tmp_path):
    example = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer.py"
    runpy.run_path(str(example))["main"](str(tmp_path), steps=4)


SAM_EVERY_STEP = {"budget": 2.25}  # two passes on every step (the radius ramps over 1,000 steps)


def test_thorough_runs_sam_on_a_model_that_returns_its_loss_as_an_explicit_closure_would(tmp_path):
    """The Trainer passes no closure: deepopt replays the model's own loss (``out.loss``), with
    the Trainer's clipping, bit for bit as a hand-written ``step(closure)`` loop on the same batches."""
    callback = DeepOpt(**SAM_EVERY_STEP)
    begin = callback.on_train_begin

    def full_radius(*args, **kwargs):  # no ramp: SAM's radius (and any rounding in it) shows in 6 steps
        begin(*args, **kwargs)
        callback.optimizer.mechanism("sam").warmup = 0

    callback.on_train_begin = full_radius
    trainer = make_trainer(tmp_path, callbacks=[callback], max_grad_norm=1.0)
    batches: list[dict] = []
    trainer.model.register_forward_pre_hook(
        lambda m, args, kwargs: batches.append(dict(kwargs)) if m.training and torch.is_grad_enabled() else None,
        with_kwargs=True)
    trainer.train()
    assert callback.optimizer.mechanism("sam").two_pass_steps == STEPS
    assert callback.optimizer.total_steps == STEPS  # max_steps: where a budget puts its SAM steps
    trained = weights(trainer.model)["train"]

    model = tiny_bert()
    # The Trainer's own optimizer (fused AdamW) rebuilt alike, with its parameter groups in
    # their order (weights that decay, then biases and LayerNorm): SAM's radius is one norm
    # over deepopt's parameters in param_groups order, and a sum in another order rounds
    # differently (model.parameters() order left the weights up to 2e-6 apart after 6 steps).
    base = callback.optimizer.optimizer
    name_of = {p: n for n, p in trainer.model.named_parameters()}
    mine = dict(model.named_parameters())
    groups = [{"params": [mine[name_of[p]] for p in g["params"]], "weight_decay": g["weight_decay"]}
              for g in base.param_groups]
    assert [id(q) for g in groups for q in g["params"]] != [id(q) for q in model.parameters()]  # another order
    opt = type(base)(groups, lr=5e-3, fused=base.defaults["fused"])
    model, opt = deepopt.activate(model, opt, **SAM_EVERY_STEP)
    opt.mechanism("sam").warmup = 0
    schedule = transformers.get_linear_schedule_with_warmup(opt, 0, STEPS)
    model.train()
    for batch in batches[::2]:  # each step's first pass (the second is the replay's)
        def closure(batch=batch):
            opt.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            trainer.accelerator.clip_grad_norm_(model.parameters(), 1.0)  # the Trainer's clipping
            return loss
        opt.step(closure)
        schedule.step()
    for a, b in zip(trained, training_state_dict(model).values()):
        assert torch.equal(a, b)
    plain = make_trainer(tmp_path / "plain", callbacks=[DeepOpt()], max_grad_norm=1.0)
    plain.train()
    assert any(not torch.equal(a, b) for a, b in zip(trained, weights(plain.model)["train"]))  # SAM acted
