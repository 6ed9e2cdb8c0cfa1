"""Polynomial regression with the update written by hand (no torch.optim optimizer).

SAM: no optimizer, nothing activated
"""

import torch
from common import save_training_weights, setup
from torch import nn

out = setup()
w_target = torch.randn(4, 1)
model = nn.Linear(4, 1)
for _ in range(50):
    x = torch.randn(32, 1)
    features = torch.cat([x ** i for i in range(1, 5)], 1)
    loss = nn.functional.smooth_l1_loss(model(features), features @ w_target)
    model.zero_grad()
    loss.backward()
    for p in model.parameters():
        p.data.add_(p.grad, alpha=-0.05)
save_training_weights(out, model=model)
