"""Time-sequence prediction: an LSTM cell unrolled by hand, trained with LBFGS (a closure).

SAM: off for LBFGS (its step evaluates the closure itself)
"""

import torch
from common import maybe_activate, save_training_weights, setup
from torch import nn

out = setup()


class Sequence(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(1, 8)
        self.linear = nn.Linear(8, 1)

    def forward(self, x):
        h = c = torch.zeros(x.size(0), 8, dtype=x.dtype)
        outputs = []
        for t in range(x.size(1)):
            h, c = self.cell(x[:, t:t + 1], (h, c))
            outputs.append(self.linear(h))
        return torch.cat(outputs, dim=1)


t = torch.arange(21, dtype=torch.float64) / 3
wave = torch.sin(t + torch.rand(6, 1, dtype=torch.float64) * 6)
model = Sequence().double()
criterion = nn.MSELoss()
optimizer = torch.optim.LBFGS(model.parameters(), lr=0.8, max_iter=5)
model, optimizer = maybe_activate(model, optimizer)
for _ in range(3):
    def closure():
        optimizer.zero_grad()
        loss = criterion(model(wave[:, :-1]), wave[:, 1:])
        loss.backward()
        return loss
    print("loss", optimizer.step(closure).item())
save_training_weights(out, model=model)
