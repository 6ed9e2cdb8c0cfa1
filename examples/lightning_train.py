"""Lightning with deepopt: an ordinary LightningModule, one callback.

Run with::

    pip install "deepopt[lightning]"
    python examples/lightning_train.py

Validation and test use deepopt's evaluation weights; the checkpoint's ``state_dict`` holds
them too, and ``fit(ckpt_path=...)`` resumes deepopt's full state (it travels in the
optimizer state).
"""

from __future__ import annotations

import tempfile
import warnings

import lightning.pytorch as pl
import torch
from torch import nn

from deepopt.integrations.lightning import DeepOpt


class LitClassifier(pl.LightningModule):
    """A plain LightningModule: nothing in it knows about deepopt."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)}


def loaders() -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 20, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4
    train = torch.utils.data.TensorDataset(x[:768], y[:768])
    val = torch.utils.data.TensorDataset(x[768:], y[768:])
    return (torch.utils.data.DataLoader(train, batch_size=32, shuffle=True),
            torch.utils.data.DataLoader(val, batch_size=128))


def main(epochs: int = 4) -> None:
    """Train, checkpoint, resume for one more epoch, validate."""
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    train, val = loaders()
    with tempfile.TemporaryDirectory() as root:
        common = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=root)
        trainer = pl.Trainer(max_epochs=epochs, callbacks=[DeepOpt(rho=0.05, average="ema", ema_decay=0.99)],
                             precision="bf16-mixed", gradient_clip_val=1.0, **common)
        model = LitClassifier()
        trainer.fit(model, train, val)
        path = f"{root}/last.ckpt"
        trainer.save_checkpoint(path)
        print("evaluation weights:", trainer.validate(model, val, verbose=False)[0])

        resumed = pl.Trainer(max_epochs=epochs + 1, callbacks=[DeepOpt(rho=0.05, average="ema", ema_decay=0.99)],
                             precision="bf16-mixed", gradient_clip_val=1.0, **common)
        resumed.fit(LitClassifier(), train, val, ckpt_path=path)
        print("after one more epoch:", resumed.callback_metrics["val_acc"].item())


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    main(parser.parse_args().epochs)
