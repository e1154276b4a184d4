"""`relicv2 eval features`: compute (or find in the cache) one split's frozen features.

The cache, its key and its reuse checks: relicv2_cli/features.py.
"""

from __future__ import annotations

from typing import Annotated

import typer

from relicv2_cli import options
from relicv2_cli.data import load_dataset
from relicv2_cli.encoders import load_encoder
from relicv2_cli.features import SPLITS, extract_features

options.PRECISIONS = ("bf16", "fp32")


# ------------------------------------------------------------------------------------------------
# `relicv2 eval features`


def command(
    encoder: Annotated[str, typer.Argument(help="Pretrain artifact, random:ARCH or torchvision:FILE.")],
    spec: options.Spec,
    split: options.Split = "train",
    arch: options.Arch = "resnet18",
    width: options.Width = 1.0,
    stem: options.Stem = "cifar",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass (choice: 256).")] = 256,
    precision: Annotated[str, typer.Option(help="bf16 (autocast, ~3x faster on AMX CPUs) or fp32.")] = "bf16",
    limit_train: options.LimitTrain = None,
    limit_test: options.LimitTest = None,
    image_size: options.ImageSize = None,
    skip_bad: options.SkipBad = False,
    crop_fraction: options.CropFraction = "auto",
    workers: options.Workers = None,
    workdir: options.Workdir = options.DEFAULT_WORKDIR,
    name: options.Name = None,
    seed: options.Seed = 0,
    device: options.Device = "auto",
    force: Annotated[bool, typer.Option(
        "--force", help="Recompute when an artifact of that name holds other features.")] = False,
    quiet: options.Quiet = False,
) -> None:
    """Embed one split with a frozen encoder (centre view) into a cached `features` artifact."""
    options.check_choice("--split", split, SPLITS)
    options.check_choice("--precision", precision, options.PRECISIONS)
    enc = load_encoder(encoder, arch=arch, width=width, stem=stem, seed=seed)
    dataset = load_dataset(spec, limit_train=limit_train, limit_test=limit_test, image_size=image_size,
                           skip_bad=skip_bad, seed=seed)
    dataset.split(split)
    art = extract_features(enc, dataset, split, device=device, batch_size=batch_size, precision=precision,
                           workdir=workdir, force=force, quiet=quiet, name=name, crop_fraction=crop_fraction,
                           workers=workers)
    if not quiet:
        options.console.print(f"{enc.label} on {spec} {split}: {art.config['count']} x "
                              f"{art.config['feature_dim']} "
                              f"features at {art.config['image_size']} px, crop fraction "
                              f"{art.config.get('crop_fraction', 1.0):g}")
    options.finish(art.path)
