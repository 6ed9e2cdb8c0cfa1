"""The six networks of the seed benchmark (protocol/seed6.md), reproduced exactly.

Every layer is: conv (3x3, TF "same") or matmul -> optional 2x2 max-pool (stride 2,
"same") -> bias -> on every layer but the last, dropout then ReLU. Weights are
Glorot/Xavier-uniform, biases zero. No BatchNorm, no residuals.

Each network is an ``nn.Sequential`` of layers, and each layer an ``nn.Sequential``
of standard modules (``Conv2d``/``Linear`` first among its parameters), so hooks,
``named_modules()`` and start-up calibration see ordinary ``Conv2d``/``Linear``
modules with ``weight`` and ``bias``.

Example::

    from benchmarks.nets import build_net
    net = build_net(1)
    logits = net(torch.randn(8, 3, 32, 32))   # 8 x 10
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NETS", "LayerSpec", "SeedConv2d", "SeedNet", "TFSamePad2d", "build_net"]


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a seed network.

    Attributes:
        kind: ``"conv"`` (3x3, TF "same") or ``"fc"`` (flattens its input).
        out: output channels (conv) or units (fc).
        stride: conv stride (1 or 2).
        pool: 2x2 max-pool (stride 2, "same") after the conv.
        keep: dropout KEEP probability (TF1 ``keep_prob``); 1.0 = no dropout.
    """

    kind: Literal["conv", "fc"]
    out: int
    stride: int = 1
    pool: bool = False
    keep: float = 1.0


def _c(out: int, stride: int = 1, pool: bool = False, keep: float = 1.0) -> LayerSpec:
    return LayerSpec("conv", out, stride, pool, keep)


def _f(out: int, keep: float = 1.0) -> LayerSpec:
    return LayerSpec("fc", out, keep=keep)


def _vgg20() -> tuple[LayerSpec, ...]:
    # Net 4: five blocks of four stride-1 convs, max-pool after the fourth.
    return tuple(_c(w, pool=(i == 3)) for w in (16, 32, 64, 128, 256) for i in range(4))


#: The six networks, as in the table of seed6.md (the last layer gives the 10 logits).
NETS: dict[int, tuple[LayerSpec, ...]] = {
    1: (*(_c(w, 2) for w in (16, 32, 64, 128, 256)), _f(64), _f(10)),
    2: (
        _c(16, keep=0.3),
        _c(16, pool=True),
        _c(32, keep=0.4),
        _c(32, pool=True),
        _c(64, keep=0.4),
        _c(64, keep=0.4),
        _c(64, pool=True),
        _c(128, keep=0.4),
        _c(128, keep=0.4),
        _c(128, pool=True),
        _c(128, keep=0.4),
        _c(128, keep=0.4),
        _c(128, pool=True, keep=0.5),
        _f(128, keep=0.5),
        _f(10),
    ),
    3: (*(_c(w, 2) for w in (64, 128, 256, 512, 1024)), _f(256), _f(10)),
    4: (*_vgg20(), _f(256), _f(10)),
    5: (_f(512), _f(128), _f(64), _f(32), _f(10)),
    6: (*(_f(128) for _ in range(12)), _f(10)),
}


class TFSamePad2d(nn.Module):
    """Zero padding of TensorFlow's ``padding="SAME"`` for a ``kernel`` x ``kernel`` conv.

    TF pads ``total = max((ceil(n / s) - 1) * s + k - n, 0)`` and puts the odd
    pixel at the bottom/right: ``before = total // 2``, ``after = total - before``.
    For k=3, s=2 on an even size that is 0 before and 1 after, which PyTorch's
    symmetric ``Conv2d(padding=1)`` cannot express: it would sample the grid one
    pixel up-left of TF's (same output size, different outputs). So the stride-2
    convs pad here and convolve with ``padding=0``.
    """

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.stride = stride

    def _pad(self, n: int) -> tuple[int, int]:
        total = max((math.ceil(n / self.stride) - 1) * self.stride + self.kernel - n, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._pad(x.shape[-2])
        left, right = self._pad(x.shape[-1])
        return F.pad(x, (left, right, top, bottom))

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}"


class SeedConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes an output of at most 2 x 2 pixels as one matrix product.

    The same convolution, only faster on CPU: oneDNN's backward pass for a wide
    convolution on a tiny map is slow (net 3's last conv, 512 -> 1024 channels on a
    2 x 2 map padded to 3 x 3: 332 ms per step forward + backward on one AVX2 core, 61 ms
    as a matrix product; net 4's 256-channel convs on 2 x 2: 36 vs 24 ms). From 4 x 4
    outputs up oneDNN is as fast or faster, so those stay on it. A 1 x 1 output of a
    padding-free conv whose input is exactly the kernel's size is a ``Linear`` on the
    flattened input; otherwise the patches are unfolded (im2col). Results equal
    ``F.conv2d``'s up to float rounding (summation order).

    Example::

        conv = SeedConv2d(512, 1024, 3)
        y = conv(torch.randn(8, 512, 3, 3))   # 8 x 1024 x 1 x 1, via F.linear
    """

    def _conv_forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        h, w = x.shape[-2:]
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        small = ho * wo <= 4 and self.groups == 1 and self.dilation == (1, 1)
        if not small or self.padding_mode != "zeros" or x.dim() != 4:
            return super()._conv_forward(x, weight, bias)
        n, out = x.shape[0], weight.shape[0]
        if (h, w) == (kh, kw) and (ph, pw) == (0, 0):
            return F.linear(x.reshape(n, -1), weight.reshape(out, -1), bias).view(n, out, 1, 1)
        cols = F.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw))  # n x (c k k) x L
        y = torch.matmul(weight.reshape(out, -1), cols)
        if bias is not None:
            y = y + bias.view(1, out, 1)
        return y.view(n, out, ho, wo)


class SeedNet(nn.Sequential):
    """A seed network: ``nn.Sequential`` of layers; ``spec`` holds its :class:`LayerSpec` s."""

    def __init__(self, n: int, layers: list[nn.Sequential], spec: tuple[LayerSpec, ...]) -> None:
        super().__init__(*layers)
        self.n = n
        self.spec = spec


def _layer(spec: LayerSpec, cin: int, last: bool) -> nn.Sequential:
    mods: list[nn.Module] = []
    if spec.kind == "conv":
        if spec.stride == 1:
            # k=3, s=1: TF "same" pads 1 on every side, as PyTorch's padding=1.
            op: nn.Module = SeedConv2d(cin, spec.out, 3, padding=1)
        else:
            mods.append(TFSamePad2d(3, spec.stride))
            op = SeedConv2d(cin, spec.out, 3, stride=spec.stride, padding=0)
        mods.append(op)
        if spec.pool:
            # The spec adds the bias after the pool; Conv2d adds it before. Same thing:
            # max_i(a_i + b) = max_i(a_i) + b for a per-channel b, exactly also in
            # floating point (rounding is monotonic, so the max is the same element),
            # hence one Conv2d with its bias instead of a separate bias module.
            # ceil_mode=True is TF "same" for odd sizes (the partial window is kept);
            # every pooled size in these nets is even (32, 16, 8, 4, 2), where it is moot.
            mods.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
    else:
        # Flatten NCHW; every conv net ends at 1 x 1 spatial, so this equals TF's NHWC flatten.
        mods.append(nn.Flatten())
        op = nn.Linear(cin, spec.out)
        mods.append(op)
    nn.init.xavier_uniform_(op.weight)
    nn.init.zeros_(op.bias)
    if not last:
        if spec.keep < 1.0:
            mods.append(nn.Dropout(p=1.0 - spec.keep))
        mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def build_net(n: int, *, in_shape: tuple[int, int, int] = (3, 32, 32)) -> SeedNet:
    """Build seed network ``n`` with its initialisation (Xavier-uniform weights, zero biases).

    The initialisation draws from torch's global RNG: call ``torch.manual_seed(seed)``
    first for a reproducible network.

    Args:
        n: network number, 1..6 (see :data:`NETS` and seed6.md).
        in_shape: input ``(C, H, W)``; default CIFAR-10's ``(3, 32, 32)``.

    Returns:
        The network, in training mode; it maps ``B x C x H x W`` to ``B x 10`` logits.

    Raises:
        ValueError: ``n`` is not one of 1..6.
    """
    if isinstance(n, bool) or n not in NETS:
        raise ValueError(
            f"n={n!r}: the seed benchmark has networks 1..6; pass one of {sorted(NETS)}"
        )
    spec = NETS[n]
    c, h, w = in_shape
    layers = []
    for i, s in enumerate(spec):
        last = i == len(spec) - 1
        if s.kind == "conv":
            layers.append(_layer(s, c, last))
            h, w = math.ceil(h / s.stride), math.ceil(w / s.stride)
            if s.pool:
                h, w = math.ceil(h / 2), math.ceil(w / 2)
            c = s.out
        else:
            layers.append(_layer(s, c * h * w, last))  # an fc layer sees the flattened input
            c, h, w = s.out, 1, 1
    return SeedNet(n, layers, spec)
