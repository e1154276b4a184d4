"""Fine-tuning a pretrained encoder with a new linear head (the semi and transfer stages), and the
network's evaluation on a labelled split."""

from __future__ import annotations

import contextlib
import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from relicv2_cli import options
from relicv2_cli.data import Split
from relicv2_cli.encoders import Encoder
from relicv2_cli.errors import RelicError
from relicv2_cli.features import embed
from relicv2_cli.knn import autocast
from relicv2_cli.optim import lr_at, scaled_lr
from relicv2_cli.probe import LogisticModel, score
from relicv2_cli.stream import crop_flip_steps

BN_MODES = ("train", "frozen")


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).float())


def finetune(
    encoder: Encoder, images: np.ndarray | Split, labels: np.ndarray, *, num_classes: int, size: int,
    epochs: float, max_steps: int | None, batch_size: int, lr: float, head_lr_scale: float, momentum: float,
    crop_min_scale: float, seed: int, device: torch.device, precision: str, quiet: bool,
    head_init: LogisticModel | None = None, bn: str = "train", description: str = "fine-tune",
    workers: int | None = None,
) -> tuple[Classifier, list[dict], dict]:
    """Fine-tune a copy of the encoder + a new head on (images, labels); returns the network in eval
    mode, the training curve and a summary (steps, batch, lr, seconds). `images`: an array in memory,
    or a split streamed through `workers` loader processes (stream.crop_flip_steps).

    `head_init`: a probe fitted on the frozen features of these images starts the head (zeros
    otherwise), so the first steps do not push random-head gradients into the pretrained body.
    `bn="frozen"` keeps BatchNorm in eval mode (pretrained statistics; its affine weights still
    train), `"train"` normalises with batch statistics as in pretraining."""
    n = len(images)
    if n < 2:
        raise RelicError(f"cannot fine-tune on {n} image(s): BatchNorm needs batches of 2 or more")
    batch = min(batch_size, n)
    steps_per_epoch = math.ceil(n / batch)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    last = min(total, max_steps) if max_steps else total
    base_lr = scaled_lr(lr, batch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Classifier(copy.deepcopy(encoder.model), encoder.feature_dim, num_classes)
    if head_init is not None:
        with torch.no_grad():
            net.head.weight.copy_(head_init.weight)
            net.head.bias.copy_(head_init.bias)
    net.requires_grad_(True)
    net = net.to(device).train()
    if bn == "frozen":
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    groups = [{"params": list(net.encoder.parameters()), "scale": 1.0},
              {"params": list(net.head.parameters()), "scale": head_lr_scale}]
    optimizer = torch.optim.SGD(groups, lr=base_lr, momentum=momentum, nesterov=True, weight_decay=0.0)
    labels_t = torch.from_numpy(np.asarray(labels, np.int64)).to(device)
    steps = crop_flip_steps(images, last, batch=batch, size=size, crop_min_scale=crop_min_scale, seed=seed,
                            device=device, workers=workers)
    history = []
    t0 = time.perf_counter()
    with options.progress_bar(quiet) as progress, contextlib.closing(steps):
        task = progress.add_task(description, total=last, info="")
        for step, (idx, views) in enumerate(steps):
            if device.type == "cuda":
                views = views.contiguous(memory_format=torch.channels_last)
            rate = lr_at(step, total, base_lr, 0)
            for group in optimizer.param_groups:
                group["lr"] = rate * group["scale"]
            with autocast(device, precision):
                logits = net(views)
            loss = F.cross_entropy(logits.float(), labels_t[idx])
            if not torch.isfinite(loss):
                raise RelicError(f"fine-tuning loss became {loss.item()} at step {step}; try a lower --lr "
                                 "or --precision fp32")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 10 == 0 or step == last - 1:
                history.append({"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 3),
                                "loss": loss.item(),
                                "lr": rate,
                                "train_top1": (logits.argmax(1) == labels_t[idx]).float().mean().item()})
                progress.update(task, info=f"loss {loss.item():.3f}")
            progress.update(task, completed=step + 1)
    net.eval()
    summary = {"steps": last, "total_steps": total, "steps_per_epoch": steps_per_epoch, "batch": batch,
               "backbone_lr": base_lr, "head_lr": base_lr * head_lr_scale,
               "train_seconds": round(time.perf_counter() - t0, 2)}
    return net, history, summary


def evaluate_network(net: nn.Module, images, labels: np.ndarray, *, num_classes: int, size: int,
                     device: torch.device, precision: str, batch_size: int, quiet: bool,
                     crop_fraction: float = 1.0) -> dict:
    """score() of a classifier network on the centre view of `images` (an array, or a streamed split:
    features.embed), BN in eval mode."""
    logits = embed(net, images, size=size, device=device, precision=precision, batch_size=batch_size,
                   quiet=quiet, description="test split", crop_fraction=crop_fraction)
    return score(logits, labels, num_classes)
