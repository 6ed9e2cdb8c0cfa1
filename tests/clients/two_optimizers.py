"""One model, two optimizers over disjoint parameter groups, each over a submodule.

SAM: cannot run (a functional loss: nn.functional.mse_loss)
"""

import torch
from common import maybe_activate, save_training_weights, setup
from torch import nn

out = setup()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh())
        self.head = nn.Linear(24, 2)

    def forward(self, x):
        return self.head(self.body(x))


model = Net()
opt_body = torch.optim.SGD(model.body.parameters(), lr=0.05, momentum=0.9)
opt_head = torch.optim.Adam(model.head.parameters(), lr=1e-3)
model, opt_body = maybe_activate(model, opt_body)
model, opt_head = maybe_activate(model, opt_head)
x, y = torch.randn(128, 6), torch.randn(128, 2)
for step in range(20):
    loss = nn.functional.mse_loss(model(x[step % 8 * 16:][:16]), y[step % 8 * 16:][:16])
    opt_body.zero_grad()
    opt_head.zero_grad()
    loss.backward()
    opt_body.step()
    opt_head.step()
save_training_weights(out, model=model)
