"""REINFORCE: the policy is called once per environment step (many tiny forwards per update).

SAM: cannot run (the loss is built from many forwards' log-probabilities)
"""

import torch
from common import maybe_activate, save_training_weights, setup
from torch import nn

out = setup()
policy = nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.1), nn.ReLU(), nn.Linear(32, 2))
optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
policy, optimizer = maybe_activate(policy, optimizer)
for _ in range(8):
    state, log_probs, rewards = torch.randn(4), [], []
    for _ in range(20):  # a toy environment: reward for pushing the first coordinate up
        probs = torch.softmax(policy(state.unsqueeze(0)), dim=1)
        action = torch.multinomial(probs, 1).item()
        log_probs.append(torch.log(probs[0, action]))
        state = state + (0.1 if action else -0.1) + 0.05 * torch.randn(4)
        rewards.append(float(state[0]))
    returns = torch.tensor(rewards)
    returns = (returns - returns.mean()) / (returns.std() + 1e-6)
    loss = -(torch.stack(log_probs) * returns).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
save_training_weights(out, policy=policy)
