"""ResNet encoders (torchvision layout, SimCLR/BYOL width multiplier), MLP heads and the EMA target.

method.md section 3. The encoder's state_dict uses torchvision's module names, so a width-1 ImageNet-stem
encoder loads into `torchvision.models.resnetXX()` with only `fc.*` missing.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from relicv2_cli.errors import RelicError

# arch -> (block, blocks per stage); resnet200 is the Bottleneck [3, 24, 36, 3] of BYOL/RELICv2.
_SPECS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
    "resnet200": (Bottleneck, [3, 24, 36, 3]),
}
ARCHS: tuple[str, ...] = tuple(_SPECS)
WIDTHS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
STEMS: tuple[str, ...] = ("imagenet", "cifar")


class ResNet(nn.Module):
    """ResNet v1.5 with torchvision's module names; `width` scales every stage including the stem.

    torchvision's own ResNet hard-codes 64 stem channels and its `wide_resnet` only widens the
    bottleneck's inner conv, so neither gives the SimCLR/BYOL "2x/4x" networks.
    """

    def __init__(self, block: type[nn.Module], layers: list[int], width: float = 1.0, stem: str = "imagenet",
                 zero_init_residual: bool = False):
        super().__init__()
        planes = [int(64 * width * 2**i) for i in range(4)]
        self.inplanes = planes[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:  # cifar: keep full resolution into layer1 (32x32 images are too small to downsample 4x)
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, planes[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()  # forward returns pooled features; heads live outside the encoder
        self.feature_dim = planes[3] * block.expansion
        # torchvision's init; zero_init_residual (BYOL's ResNet, torchvision's option of that name)
        # zeroes the last BN scale of each residual block, so every block starts as the identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def check_network(arch: str, width: float, stem: str) -> None:
    """The one check of --arch/--width/--stem (stages call it early, before loading data)."""
    if arch not in ARCHS:
        raise RelicError(f"--arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    if not isinstance(width, int | float) or float(width) not in WIDTHS:
        raise RelicError(f"--width must be one of {', '.join(f'{w:g}' for w in WIDTHS)}; got {width!r}")
    if stem not in STEMS:
        raise RelicError(f"--stem must be one of {', '.join(STEMS)}; got {stem!r}")


def build_resnet(arch: str, width: float = 1.0, stem: str = "imagenet",
                 zero_init_residual: bool = False) -> ResNet:
    """A ResNet encoder returning pooled features (B, feature_dim). zero_init_residual is a
    pre-training choice; baselines (random init) keep torchvision's default init."""
    check_network(arch, width, stem)
    block, layers = _SPECS[arch]
    return ResNet(block, layers, float(width), stem, zero_init_residual)


class MLPHead(nn.Sequential):
    """BYOL projector/predictor: Linear -> BatchNorm1d -> ReLU -> Linear (without a bias in BYOL's
    released MLP: out_bias=False)."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, out_bias: bool = False):
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=out_bias),
        )
        self.out_dim = out_dim


class SSLNetwork(nn.Module):
    """encoder + projector (+ predictor). `predictor` is nn.Identity when disabled (and in the target)."""

    def __init__(self, encoder: nn.Module, projector: nn.Module, predictor: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.predictor = predictor if predictor is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (features, projection, prediction); prediction is the projection without predictor."""
        features = self.encoder(x)
        projection = self.projector(features)
        return features, projection, self.predictor(projection)


def build_network(
    arch: str,
    width: float = 1.0,
    stem: str = "imagenet",
    hidden_dim: int = 4096,
    out_dim: int = 256,
    predictor: bool = True,
    zero_init_residual: bool = True,
    head_out_bias: bool = False,
) -> SSLNetwork:
    """Online network: ResNet encoder + MLP projector (+ MLP predictor of the same hidden size).
    Defaults are BYOL's: last BN scale of each block zeroed, no bias in the heads' last Linear."""
    encoder = build_resnet(arch, width, stem, zero_init_residual)
    projector = MLPHead(encoder.feature_dim, hidden_dim, out_dim, head_out_bias)
    predictor_head = MLPHead(out_dim, hidden_dim, out_dim, head_out_bias) if predictor else None
    return SSLNetwork(encoder, projector, predictor_head)


def make_target(online: SSLNetwork) -> SSLNetwork:
    """EMA target: a copy of encoder + projector (no predictor), frozen for the optimiser."""
    target = SSLNetwork(copy.deepcopy(online.encoder), copy.deepcopy(online.projector), None)
    target.requires_grad_(False)
    return target


def ema_rate(step: int, total_steps: int, base: float = 0.996) -> float:
    """BYOL's cosine schedule: `base` at step 0, rising to 1 at the last step."""
    k = min(max(step, 0), total_steps) / max(total_steps, 1)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * k) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, rate: float) -> None:
    """target <- rate * target + (1 - rate) * online, for parameters only.

    BN buffers are deliberately not copied: the target runs its own forward passes in train mode,
    so its running statistics track its own activations (method.md: "the target keeps its own BN
    statistics"). Parameters are matched by name, so the online predictor is simply skipped.
    """
    online = getattr(online, "module", online)  # accept a DDP-wrapped online network
    online_params = dict(online.named_parameters())
    names = [name for name, _ in target.named_parameters()]
    missing = [n for n in names if n not in online_params]
    if missing:
        raise RelicError(f"target and online networks differ: {missing[:3]}")
    tgt = [p for _, p in target.named_parameters()]
    src = [online_params[n].detach() for n in names]
    # lerp(t, o, 1 - rate) = t + (1 - rate) (o - t) = rate t + (1 - rate) o, in one fused foreach op.
    torch._foreach_lerp_(tgt, src, 1.0 - rate)
