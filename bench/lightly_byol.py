"""lightly's BYOL, set up as lightly's own PyTorch example runs it, for the benchmarks to compare with.

What follows lightly's example (examples/pytorch/byol.py; lightly 1.6.0, the `bench` extra):
- views: `BYOLTransform` of two `BYOLView1/2Transform(input_size=32, gaussian_blur=0.0)`, PIL-based,
  run by a torchvision `CIFAR10` dataset in a `DataLoader` (batch 256, shuffle, drop_last);
- heads: `BYOLProjectionHead(feature_dim, 1024, 256)` and `BYOLPredictionHead(256, 1024, 256)`;
- loss: `0.5 * (NegativeCosineSimilarity(p0, z1) + NegativeCosineSimilarity(p1, z0))`;
- optimiser: SGD lr 0.06 (no momentum, no weight decay), as in the example;
- target: `update_momentum` with `cosine_schedule(epoch, epochs, 0.996, 1)` before each step.

What the bench chooses, so that only the library differs:
- backbone: ours (`relicv2_cli.models.build_resnet`: ResNet-18 cifar stem by default, any arch/width), or
  `example`: torchvision's `resnet18()` with its ImageNet stem, exactly as the example builds it;
- DataLoader workers: this machine's core count (the example's 8 would oversubscribe 2 cores);
- precision: bf16 autocast on the forward passes when asked, as our pretrain does;
- device: the example's own choice (CUDA when there is one), passed in.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import time
from pathlib import Path

import torch
import torchvision
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
from lightly.utils.scheduler import cosine_schedule
from PIL import Image
from torch import nn

from relicv2_cli.models import build_resnet


class LightlyBYOL(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int):
        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(feature_dim, 1024, 256)
        self.prediction_head = BYOLPredictionHead(256, 1024, 256)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()


def build(backbone: str = "ours", width: float = 1.0, arch: str = "resnet18",
          stem: str = "cifar") -> tuple[LightlyBYOL, nn.Module]:
    """(model, resnet): `resnet` is the module whose state_dict (torchvision names) is the encoder."""
    if backbone == "example":
        resnet = torchvision.models.resnet18()
        trunk = nn.Sequential(*list(resnet.children())[:-1])  # the example's backbone: all but fc
        return LightlyBYOL(trunk, 512), resnet
    resnet = build_resnet(arch, width, stem)
    return LightlyBYOL(resnet, resnet.feature_dim), resnet


def make_loader(data_dir: str | Path, batch_size: int = 256, workers: int | None = None,
                limit: int | None = None) -> torch.utils.data.DataLoader:
    transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=32, gaussian_blur=0.0),
                              view_2_transform=BYOLView2Transform(input_size=32, gaussian_blur=0.0))
    dataset = torchvision.datasets.CIFAR10(str(data_dir), train=True, download=False, transform=transform)
    if limit is not None and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))  # the first N, as --limit-train takes
    workers = os.cpu_count() if workers is None else workers
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, persistent_workers=workers > 0)


class ArrayDataset(torch.utils.data.Dataset):
    """In-memory uint8 images (N, H, W, 3) as PIL images through `transform` (the GPU bench's synthetic
    data, so that both sides read the same pixels from memory)."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), 0


def make_array_loader(images, input_size: int, batch_size: int, workers: int | None = None,
                      blur: bool = False) -> torch.utils.data.DataLoader:
    """The example's views (BYOLTransform at `input_size`, its own blur when `blur`) of in-memory images."""
    kwargs = {} if blur else {"gaussian_blur": 0.0}
    transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=input_size, **kwargs),
                              view_2_transform=BYOLView2Transform(input_size=input_size, **kwargs))
    workers = os.cpu_count() if workers is None else workers
    return torch.utils.data.DataLoader(ArrayDataset(images, transform), batch_size=batch_size, shuffle=True,
                                       drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                                       pin_memory=torch.cuda.is_available())


def byol_loss(model: LightlyBYOL, criterion: nn.Module, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The example's symmetric loss: each view's prediction against the other view's target projection."""
    p0, z0 = model(x0), model.forward_momentum(x0)
    p1, z1 = model(x1), model.forward_momentum(x1)
    return 0.5 * (criterion(p0, z1) + criterion(p1, z0))


def step_flops(model: LightlyBYOL, batch: int, size: int, device) -> float:
    """FLOPs of one step's forward + backward (both views, online and momentum networks)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.to(device)
    x0, x1 = (torch.randn(batch, 3, size, size, device=device) for _ in range(2))
    with FlopCounterMode(display=False) as counter:
        byol_loss(model, NegativeCosineSimilarity(), x0, x1).backward()
    return counter.get_total_flops()


def lightly_version() -> str:
    return importlib.metadata.version("lightly")


def train(model: LightlyBYOL, loader, *, epochs: int, budget_s: float | None = None,
          max_steps: int | None = None,
          bf16: bool = True, on_step=None, device: str = "cpu") -> dict:
    """The example's loop, stopped by a time budget (seconds inside steps, data waits included) or a step
    count. `on_step(step, data_s, step_s)` sees each step's timing. Returns steps, images and seconds."""
    device = torch.device(device)
    model.to(device)
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06)
    model.train()
    steps, train_s, loss, stop = 0, 0.0, torch.tensor(float("nan")), False
    for epoch in range(epochs):
        momentum = cosine_schedule(epoch, epochs, 0.996, 1)
        batches = iter(loader)
        while not stop:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            (x0, x1), _ = batch
            x0, x1 = x0.to(device, non_blocking=True), x1.to(device, non_blocking=True)
            t_data = time.perf_counter()
            update_momentum(model.backbone, model.backbone_momentum, m=momentum)
            update_momentum(model.projection_head, model.projection_head_momentum, m=momentum)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = byol_loss(model, criterion, x0, x1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_end = time.perf_counter()
            steps += 1
            train_s += t_end - t0
            if on_step is not None:
                on_step(steps, t_data - t0, t_end - t0)
            stop = bool(max_steps and steps >= max_steps) or bool(budget_s and train_s >= budget_s)
        if stop:
            break
    return {"steps": steps, "images": steps * loader.batch_size, "train_s": train_s, "loss": loss.item()}


def save_encoder(resnet: nn.Module, path: Path) -> Path:
    """The encoder in torchvision names without fc, for `relicv2 eval ... torchvision:PATH`."""
    state = {k: v.detach().cpu() for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
