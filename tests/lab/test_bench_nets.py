"""The six seed networks: shapes, parameter counts, init, dropout, TF 'same' semantics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.nets import NETS, SeedConv2d, TFSamePad2d, build_net


def conv(cin: int, cout: int) -> int:
    return 3 * 3 * cin * cout + cout


def fc(cin: int, cout: int) -> int:
    return cin * cout + cout


EXPECTED_PARAMS = {
    1: conv(3, 16) + conv(16, 32) + conv(32, 64) + conv(64, 128) + conv(128, 256) + fc(256, 64) + fc(64, 10),
    2: (
        conv(3, 16) + conv(16, 16)
        + conv(16, 32) + conv(32, 32)
        + conv(32, 64) + 2 * conv(64, 64)
        + conv(64, 128) + 2 * conv(128, 128)
        + 3 * conv(128, 128)
        + fc(128, 128) + fc(128, 10)
    ),
    3: conv(3, 64) + conv(64, 128) + conv(128, 256) + conv(256, 512) + conv(512, 1024) + fc(1024, 256) + fc(256, 10),
    4: (
        conv(3, 16) + 3 * conv(16, 16)
        + conv(16, 32) + 3 * conv(32, 32)
        + conv(32, 64) + 3 * conv(64, 64)
        + conv(64, 128) + 3 * conv(128, 128)
        + conv(128, 256) + 3 * conv(256, 256)
        + fc(256, 256) + fc(256, 10)
    ),
    5: fc(3072, 512) + fc(512, 128) + fc(128, 64) + fc(64, 32) + fc(32, 10),
    6: fc(3072, 128) + 11 * fc(128, 128) + fc(128, 10),
}  # fmt: skip

EXPECTED_SHAPES = {
    1: [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2), (256, 1, 1), (64,), (10,)],
    2: [
        (16, 32, 32), (16, 16, 16), (32, 16, 16), (32, 8, 8),
        (64, 8, 8), (64, 8, 8), (64, 4, 4),
        (128, 4, 4), (128, 4, 4), (128, 2, 2),
        (128, 2, 2), (128, 2, 2), (128, 1, 1),
        (128,), (10,),
    ],
    3: [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2), (1024, 1, 1), (256,), (10,)],
    4: (
        [(16, 32, 32)] * 3 + [(16, 16, 16)]
        + [(32, 16, 16)] * 3 + [(32, 8, 8)]
        + [(64, 8, 8)] * 3 + [(64, 4, 4)]
        + [(128, 4, 4)] * 3 + [(128, 2, 2)]
        + [(256, 2, 2)] * 3 + [(256, 1, 1)]
        + [(256,), (10,)]
    ),
    5: [(512,), (128,), (64,), (32,), (10,)],
    6: [(128,)] * 12 + [(10,)],
}  # fmt: skip

ALL = sorted(NETS)


def ops(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@pytest.mark.parametrize("n", ALL)
def test_layer_output_shapes(n: int) -> None:
    torch.manual_seed(0)
    net = build_net(n).eval()
    x = torch.randn(1, 3, 32, 32)
    shapes = []
    for layer in net:
        x = layer(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == EXPECTED_SHAPES[n]
    assert len(net) == len(NETS[n])


@pytest.mark.parametrize("n", ALL)
def test_parameter_count(n: int) -> None:
    assert sum(p.numel() for p in build_net(n).parameters()) == EXPECTED_PARAMS[n]


@pytest.mark.parametrize("n", ALL)
def test_init_xavier_uniform_zero_bias(n: int) -> None:
    torch.manual_seed(1)
    layers = ops(build_net(n))
    assert len(layers) == len(NETS[n])
    for m in layers:
        assert torch.count_nonzero(m.bias) == 0
        w = m.weight
        rf = w[0, 0].numel() if w.ndim == 4 else 1
        bound = math.sqrt(6.0 / (w.shape[1] * rf + w.shape[0] * rf))
        assert w.abs().max() <= bound
        if w.numel() >= 10_000:  # uniform on [-b, b]: std b / sqrt(3), fills the range
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
            assert w.abs().max() > 0.99 * bound


def test_init_reproducible_from_global_seed() -> None:
    torch.manual_seed(3)
    a = build_net(1).state_dict()
    torch.manual_seed(3)
    b = build_net(1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def dropout_ps(net: nn.Module) -> list[float | None]:
    out = []
    for layer in net:
        ds = [m.p for m in layer if isinstance(m, nn.Dropout)]
        assert len(ds) <= 1
        out.append(ds[0] if ds else None)
    return out


def test_net2_dropout_p_is_one_minus_keep() -> None:
    expected = [0.7, None, 0.6, None, 0.6, 0.6, None, 0.6, 0.6, None, 0.6, 0.6, 0.5, 0.5, None]
    got = dropout_ps(build_net(2))
    assert [p is None for p in got] == [p is None for p in expected]
    assert [p for p in got if p is not None] == pytest.approx(
        [p for p in expected if p is not None]
    )


@pytest.mark.parametrize("n", [1, 3, 4, 5, 6])
def test_other_nets_have_no_dropout(n: int) -> None:
    assert dropout_ps(build_net(n)) == [None] * len(NETS[n])


@pytest.mark.parametrize("n", ALL)
def test_layer_order_and_last_layer_is_plain(n: int) -> None:
    net = build_net(n)
    for i, layer in enumerate(net):
        kinds = [type(m).__name__ for m in layer if not isinstance(m, TFSamePad2d | nn.Flatten)]
        last = i == len(net) - 1
        expect = ["SeedConv2d" if NETS[n][i].kind == "conv" else "Linear"]
        expect += ["MaxPool2d"] if NETS[n][i].pool else []
        expect += [] if last else (["Dropout"] if NETS[n][i].keep < 1 else []) + ["ReLU"]
        assert kinds == expect


@pytest.mark.parametrize(
    ("size", "stride", "pad"),
    [
        (32, 2, (0, 1)),
        (2, 2, (0, 1)),
        (33, 2, (1, 1)),
        (1, 2, (1, 1)),
        (5, 1, (1, 1)),
        (4, 1, (1, 1)),
    ],
)
def test_tf_same_padding(size: int, stride: int, pad: tuple[int, int]) -> None:
    assert TFSamePad2d(3, stride)._pad(size) == pad


def test_stride2_conv_samples_tf_grid() -> None:
    """Output (i, j) of a TF k3 s2 'same' conv on an even input covers rows/cols 2i..2i+2."""
    torch.manual_seed(0)
    layer = build_net(1)[0]
    conv2d = layer[1]
    x = torch.randn(1, 3, 8, 8)
    y = layer[:2](x)
    xp = F.pad(x, (0, 1, 0, 1))
    for i, j in [(0, 0), (1, 2), (3, 3)]:
        patch = xp[0, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]
        ref = (conv2d.weight * patch).sum(dim=(1, 2, 3)) + conv2d.bias
        torch.testing.assert_close(y[0, :, i, j], ref)


def test_bias_before_pool_equals_bias_after_pool() -> None:
    """Why Conv2d(bias=True) then pool is the spec's conv -> pool -> bias, exactly."""
    torch.manual_seed(0)
    c = nn.Conv2d(4, 5, 3, padding=1)
    nn.init.normal_(c.bias)
    x = torch.randn(2, 4, 8, 8)
    bias = c.bias.view(1, -1, 1, 1)
    conv = F.conv2d(x, c.weight, padding=1)
    # Rounding is monotonic, so adding a per-channel constant commutes with max exactly...
    assert torch.equal(F.max_pool2d(conv + bias, 2), F.max_pool2d(conv, 2) + bias)
    # ...while Conv2d(bias=True) may add the bias inside its accumulation (oneDNN on
    # AVX2 does), which changes the last bit only.
    torch.testing.assert_close(F.max_pool2d(c(x), 2), F.max_pool2d(conv, 2) + bias)


@pytest.mark.parametrize(
    ("cin", "size", "stride", "padding"),
    [
        (6, 3, 2, 0),  # 1 x 1 output of an exactly kernel-sized input: the Linear path
        (6, 4, 2, 0),  # 1 x 1 output, one row/col unused: unfold
        (5, 2, 1, 1),  # 2 x 2: unfold
        (4, 5, 2, 0),  # 2 x 2
        (3, 8, 1, 1),  # 8 x 8: oneDNN
    ],
)
def test_seed_conv_equals_conv2d(cin: int, size: int, stride: int, padding: int) -> None:
    """Output and every gradient equal ``F.conv2d``'s up to float rounding."""
    torch.manual_seed(0)
    conv = SeedConv2d(cin, 7, 3, stride=stride, padding=padding)
    nn.init.normal_(conv.bias)
    x = torch.randn(2, cin, size, size, requires_grad=True)
    y = conv(x)
    ref = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=padding)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, conv.weight, conv.bias), g)
    ref_grads = torch.autograd.grad(ref, (x, conv.weight, conv.bias), g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad", [0, 7, -1, True, "1"])
def test_bad_net_number(bad: object) -> None:
    with pytest.raises(ValueError, match="networks 1..6"):
        build_net(bad)  # type: ignore[arg-type]
