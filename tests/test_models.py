import pytest
import torch
import torchvision
from torch import nn

from relicv2_cli.errors import RelicError
from relicv2_cli.models import (
    ARCHS,
    MLPHead,
    SSLNetwork,
    build_network,
    build_resnet,
    ema_rate,
    ema_update,
    make_target,
)

DEPTHS = {
    "resnet18": [2, 2, 2, 2],
    "resnet34": [3, 4, 6, 3],
    "resnet50": [3, 4, 6, 3],
    "resnet101": [3, 4, 23, 3],
    "resnet152": [3, 8, 36, 3],
    "resnet200": [3, 24, 36, 3],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_all_archs_build(arch):
    net = build_resnet(arch, width=0.25, stem="cifar")
    expansion = 1 if arch in ("resnet18", "resnet34") else 4
    assert net.feature_dim == 128 * expansion
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == DEPTHS[arch]
    assert isinstance(net.fc, nn.Identity)
    if arch in ("resnet18", "resnet50"):  # one forward per block type; deeper nets only add blocks
        out = net.eval()(torch.randn(2, 3, 8, 8))
        assert out.shape == (2, net.feature_dim)


@pytest.mark.parametrize("width", [0.25, 0.5, 1, 2])
def test_width_scales_every_stage(width):
    net = build_resnet("resnet18", width=width)
    assert net.conv1.out_channels == int(64 * width)
    assert net.layer1[0].conv1.out_channels == int(64 * width)
    assert net.layer4[-1].conv2.out_channels == int(512 * width)
    assert net.feature_dim == int(512 * width)


def test_width_scales_bottleneck():
    net = build_resnet("resnet50", width=0.5)
    assert net.conv1.out_channels == 32
    assert net.layer1[0].conv1.out_channels == 32  # inner width scales too (not wide_resnet)
    assert net.feature_dim == 1024


def test_cifar_stem_keeps_resolution():
    net = build_resnet("resnet18", width=0.25, stem="cifar")
    assert isinstance(net.maxpool, nn.Identity) and net.conv1.kernel_size == (3, 3)
    imagenet = build_resnet("resnet18", width=0.25, stem="imagenet")
    seen = {}

    def record(name):
        def hook(module, inputs):
            seen[name] = inputs[0].shape[-2:]

        return hook

    net.layer1.register_forward_pre_hook(record("cifar"))
    imagenet.layer1.register_forward_pre_hook(record("imagenet"))
    net(torch.randn(2, 3, 32, 32))
    imagenet(torch.randn(2, 3, 32, 32))
    assert seen == {"cifar": (32, 32), "imagenet": (8, 8)}


@pytest.mark.parametrize(
    "arch,factory", [("resnet18", torchvision.models.resnet18), ("resnet50", torchvision.models.resnet50)]
)
def test_torchvision_load_compat(arch, factory):
    ours = build_resnet(arch).eval()
    tv = factory().eval()
    result = tv.load_state_dict(ours.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    tv.fc = nn.Identity()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x))


def test_default_init_is_torchvision():
    net = build_resnet("resnet18", width=0.25)
    assert torch.all(net.layer1[0].bn2.weight == 1)  # no zero-init of the last BN gamma


@pytest.mark.parametrize(
    "kwargs", [{"arch": "resnet19"}, {"arch": "resnet18", "width": 3}, {"arch": "resnet18", "stem": "tiny"}]
)
def test_invalid_options_raise(kwargs):
    flag = "--" + [k for k in kwargs if k != "arch"][-1] if len(kwargs) > 1 else "--arch"
    with pytest.raises(RelicError, match=f"{flag} must be one of"):
        build_resnet(**kwargs)


def test_mlp_head_and_network_outputs():
    head = MLPHead(8, 16, 4)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    net = build_network("resnet18", width=0.25, stem="cifar", hidden_dim=32, out_dim=16)
    f, z, p = net(torch.randn(4, 3, 16, 16))
    assert f.shape == (4, 128) and z.shape == (4, 16) and p.shape == (4, 16)
    no_pred = build_network("resnet18", width=0.25, stem="cifar", hidden_dim=32, out_dim=16, predictor=False)
    f, z, p = no_pred(torch.randn(4, 3, 16, 16))
    assert isinstance(no_pred.predictor, nn.Identity) and p is z


@pytest.mark.parametrize("arch, last_bn", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_byol_network_details_and_their_switches(arch, last_bn):
    # BYOL's defaults: every residual block starts as the identity (last BN scale 0), heads end
    # without a bias; baselines built with build_resnet keep torchvision's init.
    net = build_network(arch, width=0.25, stem="cifar", hidden_dim=32, out_dim=16)
    blocks = [m for layer in (net.encoder.layer1, net.encoder.layer2, net.encoder.layer3, net.encoder.layer4)
              for m in layer]
    assert all(torch.all(getattr(b, last_bn).weight == 0) for b in blocks)
    assert net.encoder.bn1.weight.abs().sum() > 0  # the stem is not a residual block
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():  # a zero-init block is the identity: layer1's first block passes its input
        stem = net.encoder.maxpool(net.encoder.relu(net.encoder.bn1(net.encoder.conv1(x))))
        if blocks[0].downsample is None:
            torch.testing.assert_close(blocks[0](stem), torch.relu(stem))
    assert net.projector[3].bias is None and net.predictor[3].bias is None
    plain = build_network(arch, width=0.25, stem="cifar", hidden_dim=32, out_dim=16, zero_init_residual=False,
                          head_out_bias=True)
    assert all(getattr(b, last_bn).weight.abs().sum() > 0 for b in (plain.encoder.layer1[0],
                                                                    plain.encoder.layer4[-1]))
    assert plain.projector[3].bias is not None and plain.predictor[3].bias is not None
    baseline = build_resnet(arch, 0.25, "cifar")
    assert getattr(baseline.layer1[0], last_bn).weight.abs().sum() > 0


def _tiny_online():
    enc = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5))
    enc.feature_dim = 5
    return SSLNetwork(enc, MLPHead(5, 7, 3), MLPHead(3, 7, 3))


def test_make_target():
    online = _tiny_online()
    target = make_target(online)
    assert isinstance(target.predictor, nn.Identity)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    for (n1, p1), (n2, p2) in zip(target.named_parameters(), online.named_parameters(), strict=False):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()


def test_ema_rate_schedule():
    assert ema_rate(0, 100, 0.996) == pytest.approx(0.996)
    assert ema_rate(100, 100, 0.996) == pytest.approx(1.0)
    assert ema_rate(50, 100, 0.99) == pytest.approx(0.995)
    rates = [ema_rate(k, 100) for k in range(101)]
    assert all(a <= b for a, b in zip(rates, rates[1:], strict=False))


def test_ema_update_moves_by_one_minus_rate():
    online = _tiny_online()
    target = make_target(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in target.named_parameters()}
    online_params = dict(online.named_parameters())
    target.encoder[2].running_mean.fill_(3.0)  # target BN statistics are its own
    ema_update(target, online, 0.9)
    for n, p in target.named_parameters():
        expected = 0.9 * before[n] + 0.1 * online_params[n]
        torch.testing.assert_close(p, expected)
        assert not p.requires_grad
    assert torch.all(target.encoder[2].running_mean == 3.0)
    ema_update(target, online, 0.0)  # rate 0 copies the online weights
    for n, p in target.named_parameters():
        torch.testing.assert_close(p, online_params[n])
