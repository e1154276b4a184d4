"""Frozen features, computed once per (encoder, split data, view) and cached as a `features` artifact.

`extract_features` runs the frozen encoder (BN in eval mode, no gradients, bf16 autocast by default)
on the centre view of every image of one split and writes `features.h5` with
- `features` float32 (N, D): pooled encoder outputs,
- `labels` int64 (N,) and `indices` int64 (N,): the image's index in the split.

The centre view: images are scaled to [0, 1] and normalised with the ImageNet mean/std (as the
pre-training views). When the encoder knows the side it was trained at (a pretrain artifact records
`image_size`) and the images have another size, the shorter side is resized to that size
(antialiased bilinear) and the centre square is kept (`augment.center_view`); `random:` and
`torchvision:` encoders see the images at their own size (use --image-size to resize the data).

Caching. The artifact name is `{encoder}-{split}-{key[:12]}` where `key` hashes the encoder's
weights (sha256 of the pretrain backbone or torchvision file, or the random-init recipe), the split's content
fingerprint (images and labels, limits included), the split name, the view size and the precision.
Any evaluation that needs the same features finds them under the same name and reuses them. The
split fingerprint is used rather than the whole dataset's, so `--limit-test` does not invalidate
the training features. On reuse the recorded encoder (via `check_parent` for a pretrain artifact),
split fingerprint, size and precision are checked again; a mismatch (only possible when a name was
given by hand or an artifact was replaced under the same name) is an error that names both sides,
and `--force` recomputes and replaces the artifact. A match is always reused, even with `--force`:
the content is a pure function of the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import h5py
import numpy as np
import torch
import typer

from relicv2_cli import options
from relicv2_cli.artifacts import Artifact, Staging, artifact_path, check_parent, load_artifact
from relicv2_cli.augment import IMAGENET_MEAN, IMAGENET_STD, crop_resize, normalize, sample_boxes
from relicv2_cli.data import Dataset, load_dataset
from relicv2_cli.encoders import Encoder, load_encoder
from relicv2_cli.errors import RelicError
from relicv2_cli.knn import encode_images

FEATURES_FILE = "features.h5"
PRECISIONS = ("bf16", "fp32")
SPLITS = ("train", "val", "test")


@dataclass
class FeatureSet:
    """The arrays of a `features` artifact."""

    features: np.ndarray  # float32 (N, D)
    labels: np.ndarray  # int64 (N,)
    indices: np.ndarray  # int64 (N,), index into the split
    artifact: Artifact


def view_size(encoder: Encoder, images: np.ndarray) -> int:
    """The side the encoder sees: its training size when known, else the images' own side."""
    if encoder.image_size:
        return int(encoder.image_size)
    return int(min(images.shape[1], images.shape[2]))


def features_key(encoder: Encoder, split_fingerprint: str, split: str, size: int, precision: str) -> str:
    body = json.dumps({"encoder": encoder.key, "split_fingerprint": split_fingerprint, "split": split,
                       "size": size, "precision": precision, "view": "center"}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def features_name(encoder: Encoder, split: str, key: str) -> str:
    return f"{encoder.slug}-{split}-{key[:12]}"


def _mismatch(art: Artifact, encoder: Encoder, split_fp: str, split: str, size: int, precision: str) -> str | None:
    """Why the cached artifact does not hold these features (None when it does)."""
    config = art.config
    if encoder.parent is not None:
        recorded = [p for p in art.manifest.get("parents", []) if p.get("kind") == "pretrain"]
        same_path = [p for p in recorded if Path(p["path"]) == encoder.parent.path.resolve()]
        if same_path:
            check_parent(encoder.parent, same_path[0])  # "changed since it was recorded" error
    if config.get("encoder_key") != encoder.key:
        return (f"was made by encoder {config.get('encoder', {}).get('spec')!r} "
                f"(key {str(config.get('encoder_key'))[:40]}), not {encoder.label!r} (key {encoder.key[:40]})")
    if config.get("split_fingerprint") != split_fp or config.get("split") != split:
        return (f"was made from other data (split {config.get('split')!r}, fingerprint "
                f"{str(config.get('split_fingerprint'))[:12]}), not split {split!r} with fingerprint {split_fp[:12]}")
    if config.get("image_size") != size or config.get("precision") != precision:
        return (f"was made at {config.get('image_size')} px / {config.get('precision')}, "
                f"not {size} px / {precision}")
    return None


def extract_features(
    encoder: Encoder,
    dataset: Dataset,
    split: str,
    *,
    device: str | torch.device = "auto",
    batch_size: int = 256,
    precision: str = "bf16",
    workdir: Path = options.DEFAULT_WORKDIR,
    force: bool = False,
    quiet: bool = False,
    name: str | None = None,
) -> Artifact:
    """The cached `features` artifact of `encoder` on `dataset`'s `split`, computed if missing.

    See the module docstring for the view, the cache key and the reuse checks."""
    options.check_choice("--precision", precision, PRECISIONS)
    options.check_choice("--split", split, SPLITS)
    if batch_size <= 0:
        raise RelicError(f"--batch-size must be positive, got {batch_size}")
    data = dataset.split(split)
    images = data.images
    split_fp = data.fingerprint
    size = view_size(encoder, images)
    key = features_key(encoder, split_fp, split, size, precision)
    name = name or features_name(encoder, split, key)
    path = artifact_path(Path(workdir), "features", name)
    if path.exists():
        cached = load_artifact(path, kind="features")
        problem = _mismatch(cached, encoder, split_fp, split, size, precision)
        if problem is None:
            cached.file(FEATURES_FILE)
            return cached
        if not force:
            raise RelicError(f"features artifact {path} {problem}; pass --force to recompute it")

    dev = device if isinstance(device, torch.device) else options.resolve_device(device)
    model = encoder.model.to(dev)
    start = time.perf_counter()
    features = embed(model, images, size=size, device=dev, precision=precision, batch_size=batch_size,
                     quiet=quiet, description=f"features {encoder.label} {split}").numpy()
    seconds = time.perf_counter() - start
    if not np.isfinite(features).all():
        raise RelicError(f"{encoder.label} produced NaN/Inf features on {dataset.spec} {split}; try --precision fp32")
    staging = Staging(Path(workdir), "features", name, force=True)  # a stale or missing artifact: replace
    with staging:
        with h5py.File(staging.dir / FEATURES_FILE, "w") as f:
            f.create_dataset("features", data=features)
            f.create_dataset("labels", data=data.labels.astype(np.int64))
            f.create_dataset("indices", data=np.arange(len(features), dtype=np.int64))
        config = {"encoder": encoder.record, "encoder_key": encoder.key, "encoder_label": encoder.label,
                  "split": split, "split_fingerprint": split_fp, "image_size": size,
                  "native_size": list(images.shape[1:3]), "precision": precision, "view": "center",
                  "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "batch_size": batch_size, "key": key,
                  "count": len(features), "feature_dim": features.shape[1]}
        metrics = {"seconds": round(seconds, 2), "images_per_s": round(len(features) / max(seconds, 1e-9), 1)}
        return staging.commit(config=config, parents=[encoder.parent] if encoder.parent else [],
                              dataset=dataset.record(), metrics=metrics)


def embed(model, images: np.ndarray, *, size: int, device: torch.device, precision: str, batch_size: int,
          quiet: bool, description: str) -> torch.Tensor:
    """knn.encode_images (centre view, eval mode, autocast) under a progress bar; float32 (N, out) on the CPU."""
    with options.progress_bar(quiet) as progress:
        return encode_images(model, images, image_size=size, device=device, precision=precision,
                             batch_size=batch_size, progress=progress, description=description).float()


def read_features(art: Artifact | str | Path) -> FeatureSet:
    """Load the arrays of a features artifact (checks its kind and the file's shapes)."""
    art = art if isinstance(art, Artifact) else load_artifact(art, kind="features")
    if art.kind != "features":
        raise RelicError(f"{art.path}: expected an artifact of kind 'features', found {art.kind!r}")
    try:
        with h5py.File(art.file(FEATURES_FILE), "r") as f:
            features = f["features"][...].astype(np.float32, copy=False)
            labels = f["labels"][...].astype(np.int64)
            indices = f["indices"][...].astype(np.int64)
    except (OSError, KeyError) as e:
        raise RelicError(f"corrupt {FEATURES_FILE} in {art.path}: {e}") from None
    if not (features.ndim == 2 and len(features) == len(labels) == len(indices)):
        raise RelicError(f"{art.path}/{FEATURES_FILE}: inconsistent shapes {features.shape}, {labels.shape}, {indices.shape}")
    return FeatureSet(features, labels, indices, art)


def split_features(
    encoder: Encoder, dataset: Dataset, split: str, **kwargs
) -> FeatureSet:
    """extract_features + read_features, with a check that the labels still match the split."""
    fs = read_features(extract_features(encoder, dataset, split, **kwargs))
    if not np.array_equal(fs.labels, dataset.split(split).labels):
        raise RelicError(f"features {fs.artifact.path} hold other labels than {dataset.spec} {split}")
    return fs


def epoch_batches(n: int, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of a fresh random permutation cut into ceil(n / batch) near-equal batches, so
    every image is seen once per epoch and no batch is tiny (500 images at batch 256: 250 + 250)."""
    perm = torch.randperm(n, generator=generator)
    return list(torch.tensor_split(perm, math.ceil(n / batch)))


def crop_flip(
    images: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    generator: torch.Generator,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> torch.Tensor:
    """Training view of fine-tuning and of the augmented linear protocol: random resized crop
    (area fraction U(scale), aspect 3/4-4/3; augment.py's sampler and roi_align resize) and a
    horizontal flip with probability 0.5, of a uint8 batch (B, 3, H, W); normalised float output."""
    b, _, h, w = images.shape
    x = images.float() / 255
    boxes = sample_boxes(b, h, w, scale, (3 / 4, 4 / 3), generator, x.device)
    x = crop_resize(x, boxes, torch.arange(b, device=x.device), size)
    flip = torch.rand(b, generator=generator, device=generator.device).to(x.device) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    return normalize(x, mean, std)


# ------------------------------------------------------------------------------------------------
# `relicv2 eval features`


def command(
    encoder: Annotated[str, typer.Argument(help="Pretrain artifact, random:ARCH or torchvision:FILE.")],
    spec: options.Spec,
    split: Annotated[str, typer.Option(help="Split to embed: train, val (when the dataset has one) or test.")] = "train",
    arch: options.Arch = "resnet18",
    width: options.Width = 1.0,
    stem: options.Stem = "cifar",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass (choice: 256).")] = 256,
    precision: Annotated[str, typer.Option(help="bf16 (autocast, ~3x faster on AMX CPUs) or fp32 (choice: bf16).")] = "bf16",
    limit_train: options.LimitTrain = None,
    limit_test: options.LimitTest = None,
    image_size: options.ImageSize = None,
    workdir: options.Workdir = options.DEFAULT_WORKDIR,
    name: options.Name = None,
    seed: options.Seed = 0,
    device: options.Device = "auto",
    force: Annotated[bool, typer.Option("--force", help="Recompute when an artifact of that name holds other features.")] = False,
    quiet: options.Quiet = False,
) -> None:
    """Embed one split with a frozen encoder (centre view) into a cached `features` artifact."""
    options.check_choice("--split", split, SPLITS)
    options.check_choice("--precision", precision, PRECISIONS)
    enc = load_encoder(encoder, arch=arch, width=width, stem=stem, seed=seed)
    dataset = load_dataset(spec, limit_train=limit_train, limit_test=limit_test, image_size=image_size, seed=seed)
    dataset.split(split)
    art = extract_features(enc, dataset, split, device=device, batch_size=batch_size, precision=precision,
                           workdir=workdir, force=force, quiet=quiet, name=name)
    if not quiet:
        options.console.print(f"{enc.label} on {spec} {split}: {art.config['count']} x {art.config['feature_dim']} "
                              f"features at {art.config['image_size']} px")
    options.finish(art.path)
