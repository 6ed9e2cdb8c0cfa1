"""A plain optimizer stepped through a closure: ``optimizer.step(closure)``.

SAM: under deepopt run, not on step(closure); with deepopt.activate, through the closure
"""

import torch
from common import maybe_activate, save_training_weights, setup
from torch import nn

out = setup()
model = nn.Sequential(nn.Linear(5, 20), nn.ReLU(), nn.Linear(20, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
model, optimizer = maybe_activate(model, optimizer)
x, y = torch.randn(96, 5), torch.randn(96, 1)
for step in range(12):
    xb, yb = x[step % 6 * 16:][:16], y[step % 6 * 16:][:16]

    def closure(xb=xb, yb=yb):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        return loss

    optimizer.step(closure)
save_training_weights(out, model=model)
