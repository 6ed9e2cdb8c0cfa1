"""A GAN: two models, two optimizers, the discriminator on detached fakes and in no_grad.

SAM: cannot run (the discriminator's loss adds two criterion calls; the generator's goes through another model)
"""

import torch
from common import maybe_activate, save_training_weights, setup
from torch import nn

out = setup()
netG = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
netD = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
optD = torch.optim.Adam(netD.parameters(), lr=2e-3, betas=(0.5, 0.999))
optG = torch.optim.Adam(netG.parameters(), lr=2e-3, betas=(0.5, 0.999))
netD, optD = maybe_activate(netD, optD)
netG, optG = maybe_activate(netG, optG)
criterion = nn.BCEWithLogitsLoss()
for _ in range(30):
    real = torch.randn(16, 2) * 0.5 + 2
    fake = netG(torch.randn(16, 4))
    netD.zero_grad()
    lossD = criterion(netD(real), torch.ones(16, 1)) + criterion(netD(fake.detach()), torch.zeros(16, 1))
    lossD.backward()
    optD.step()
    netG.zero_grad()
    lossG = criterion(netD(fake), torch.ones(16, 1))
    lossG.backward()
    optG.step()
    with torch.no_grad():
        d_fake = torch.sigmoid(netD(fake)).mean().item()  # logged, as DCGAN's D(G(z))
save_training_weights(out, netG=netG, netD=netD)
