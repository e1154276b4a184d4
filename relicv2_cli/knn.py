"""Frozen-encoder embedding of uint8 images and the weighted kNN classifier used by SSL papers."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from relicv2_cli.augment import center_view


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU (AMX) and CUDA, fp16 autocast (pretrain on CUDA); a no-op for fp32."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def encode_images(
    encoder: nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    image_size: int,
    device: torch.device,
    precision: str = "bf16",
    batch_size: int = 512,
    progress=None,
    description: str = "embedding",
    crop_fraction: float = 1.0,
) -> torch.Tensor:
    """Pooled features (N, D) float32 on CPU of uint8 images (N, H, W, 3) or (N, 3, H, W), centre
    view (augment.center_view, made on `device`), BN in eval mode."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    views = (center_view(images[start : start + batch_size].to(device, non_blocking=True), image_size,
                         crop_fraction=crop_fraction) for start in range(0, len(images), batch_size))
    return encode_views(encoder, views, len(images), device=device, precision=precision, progress=progress,
                        description=description)


@torch.no_grad()
def encode_views(encoder: nn.Module, views, total: int, *, device: torch.device, precision: str = "bf16",
                 progress=None, description: str = "embedding") -> torch.Tensor:
    """Pooled features (N, D) float32 on CPU of batches of normalised views (B, 3, s, s) (an iterable:
    a loader's chunks or batches cut from an array), BN in eval mode under `precision`'s autocast. The
    encoder's train/eval mode is restored afterwards."""
    was_training = encoder.training
    encoder.eval()
    out = []
    task = None
    if progress is not None:
        task = progress.add_task(description, total=total, info="", unit="images")
    dtype = next(encoder.parameters()).dtype
    for view in views:
        view = view.to(device, non_blocking=True)
        with autocast(device, precision):
            features = encoder(view.to(dtype) if precision == "fp64" else view)
        out.append(features.float().cpu())
        if task is not None:
            progress.advance(task, len(view))
    if task is not None:
        progress.remove_task(task)
    encoder.train(was_training)
    return torch.cat(out)


SIM_BLOCK = 2**26  # similarities per test chunk (256 MiB of float32; 1,024 x 1.28M would be 5 GiB)


@torch.no_grad()
def weighted_knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (N_test, C) of the weighted kNN of InstDisc/DINO: cosine similarity, the k nearest
    training points vote for their class with weight exp(sim / temperature). At most `chunk` test
    rows at a time, fewer on a large training split: a chunk's similarities stay under SIM_BLOCK."""
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long()
    k = min(k, len(train))
    chunk = max(1, min(chunk, SIM_BLOCK // max(1, len(train))))
    scores = []
    for start in range(0, len(test_features), chunk):
        test = F.normalize(test_features[start : start + chunk].float(), dim=1)
        sim, idx = (test @ train.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(test), num_classes)
        votes.scatter_add_(1, labels[idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, k=20,
                 temperature=0.07) -> float:
    scores = weighted_knn_predict(train_features, torch.as_tensor(train_labels), test_features, num_classes,
                                  k, temperature)
    return (scores.argmax(1) == torch.as_tensor(test_labels)).float().mean().item()
