"""nanoGPT's train.py loop, shrunk: AdamW with two weight-decay groups, warm-up then a cosine that
decays to a tenth of the peak LR over lr_decay_iters, gradient clipping, and at every eval_interval:
evaluate (``model.eval()``, back to ``model.train()``), then save ``{"model", "optimizer", ...}``
in train mode if the val loss improved. ``gpt_sample.py`` loads "model" from that file, as
nanoGPT's sample.py does. The run stops at max_iters, half-way down its cosine (nanoGPT allows
``max_iters < lr_decay_iters``): the LR is still high, so deepopt's average is not the iterate.

SAM: runs (the model returns its loss), once the LR has fallen to a tenth of its peak, which this run stops before
"""

import json
import math

import torch
from char_gpt import CHARS, GPT, estimate_loss, get_batch
from common import maybe_activate, save_training_weights, setup

out = setup()
max_iters, lr_decay_iters, eval_interval, warmup_iters = 120, 240, 30, 10
learning_rate, min_lr = 1e-2, 1e-3  # min_lr = learning_rate / 10, as nanoGPT
model_args = {"vocab_size": len(CHARS)}
model = GPT(**model_args)
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=learning_rate, betas=(0.9, 0.95))
model, optimizer = maybe_activate(model, optimizer)


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


iter_num, best_val_loss, log = 0, 1e9, []
X, Y = get_batch("train")
while True:
    lr = get_lr(iter_num)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    if iter_num % eval_interval == 0:
        val = estimate_loss(model)
        log.append({"iter": iter_num, "val": val})
        if val < best_val_loss:
            best_val_loss = val
            if iter_num > 0:
                checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "model_args": model_args, "iter_num": iter_num, "best_val_loss": best_val_loss}
                torch.save(checkpoint, out / "ckpt.pt")
    if iter_num == max_iters:
        break
    _, loss = model(X, Y)
    X, Y = get_batch("train")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1

(out / "log.json").write_text(json.dumps(log))
save_training_weights(out, model=model)
