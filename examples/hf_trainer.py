"""Hugging Face Trainer with deepopt: one callback; a tiny BERT built from a config (no download).

Run with::

    pip install "deepopt[huggingface]"
    python examples/hf_trainer.py

``evaluate()`` uses deepopt's evaluation weights, ``save_model()`` writes them, and
``train(resume_from_checkpoint=True)`` restores deepopt's full state from ``optimizer.pt``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local

import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from deepopt.integrations.huggingface import DeepOpt  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; the label says whether token 1 occurs."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, 100, (n, 16), generator=g)
        self.ids[::2, 5] = 1
        self.labels = (self.ids == 1).any(1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


def main(output_dir: str, steps: int = 60) -> None:
    """Train for ``steps`` with a checkpoint halfway, evaluate, resume, save."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)

    def trainer(max_steps: int) -> Trainer:
        args = TrainingArguments(output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=16,
                                 learning_rate=3e-3, save_strategy="steps", save_steps=max(1, steps // 2),
                                 logging_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
        return Trainer(model=BertForSequenceClassification(config), args=args,
                       train_dataset=Tokens(512, seed=0), eval_dataset=Tokens(128, seed=1),
                       callbacks=[DeepOpt(rho=0.05, average="ema", ema_decay=0.95)])

    t = trainer(steps)
    t.train()
    print("evaluation weights:", {k: round(v, 4) for k, v in t.evaluate().items() if k == "eval_loss"})
    t.save_model(os.path.join(output_dir, "final"))  # the evaluation weights

    more = trainer(steps + max(1, steps // 2))
    more.train(resume_from_checkpoint=True)  # from the last checkpoint, deepopt state included
    print("after resuming:", {k: round(v, 4) for k, v in more.evaluate().items() if k == "eval_loss"})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output-dir", default=None, help="default: a temporary directory")
    a = parser.parse_args()
    if a.output_dir:
        main(a.output_dir, a.steps)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(tmp, a.steps)
