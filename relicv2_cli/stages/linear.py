"""`relicv2 eval linear`: linear evaluation of a frozen encoder (method.md section 6).

Two protocols:
- `cached` (default, fast): multinomial logistic regression on cached centre-view features
  (relicv2_cli/features.py). Features are standardised with the mean/std of the data the classifier is
  fitted on. The L2 strength is chosen from a log-spaced grid on a class-stratified held-out part of
  the training split (or on the dataset's own validation split), then the classifier is refitted on
  the whole training split (train + held-out part) with that strength and scored on the test split.
  Full-batch L-BFGS (strong-Wolfe line search) in torch, fp32.
- `augment` (the paper's): SGD with Nesterov momentum on a linear layer over the frozen encoder
  (BN in eval mode), random-resized-crop + flip views, cosine schedule, no weight decay [byol];
  scored on the centre-view test features.

The solver and the augmented protocol live in relicv2_cli/probe.py; this file holds the command.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from safetensors.torch import save_file

from relicv2_cli import options, stream
from relicv2_cli.analysis import check_fresh, spec_slug
from relicv2_cli.artifacts import Staging
from relicv2_cli.data import Dataset, load_dataset, require_labels
from relicv2_cli.encoders import Encoder, load_encoder
from relicv2_cli.errors import RelicError
from relicv2_cli.features import crop_fraction_for, split_features, view_size
from relicv2_cli.probe import (
    DEFAULT_L2_GRID,
    METRICS,
    linear_probe,
    parse_l2_grid,
    print_probe_table,
    score,
    train_linear_augmented,
)

PROTOCOLS = ("cached", "augment")


def run_linear(
    encoder: Encoder, dataset: Dataset, *, workdir: Path, name: str | None = None, protocol: str = "cached",
    l2_grid: str = DEFAULT_L2_GRID, val_fraction: float = 0.2, metric: str = "top1", max_iter: int = 1000,
    epochs: float = 100.0, max_steps: int | None = None, lr: float = 0.3, momentum: float = 0.9,
    crop_min_scale: float = 0.08, batch_size: int = 256, precision: str = "bf16", seed: int = 0,
    device: str = "auto", force: bool = False, quiet: bool = False, config_extra: dict | None = None,
    crop_fraction: str = "auto", workers: int | None = None,
):
    """Linear evaluation of `encoder` on `dataset`; writes and returns a `linear` artifact."""
    _check_options(protocol, metric, precision, batch_size, max_iter, epochs, lr, max_steps, crop_min_scale,
                   val_fraction)
    grid = parse_l2_grid(l2_grid)
    workdir = Path(workdir)
    name = name or f"{encoder.slug}-{spec_slug(dataset.spec)}" + ("-augment" if protocol == "augment" else "")
    check_fresh(workdir, "linear", name, force)
    fraction = crop_fraction_for(crop_fraction, dataset)
    streamed = False
    if protocol == "augment":
        streamed = stream.announce("training data", stream.training_choice(dataset, [dataset.train]), quiet)
    dev = options.resolve_device(device)
    feature_kwargs = dict(device=dev, batch_size=batch_size, precision=precision, workdir=workdir,
                          quiet=quiet, force=force, crop_fraction=fraction, workers=workers)
    t0 = time.perf_counter()
    test = split_features(encoder, dataset, "test", **feature_kwargs)
    history: list[dict] = []
    if protocol == "cached":
        train = split_features(encoder, dataset, "train", **feature_kwargs)
        val = split_features(encoder, dataset, "val", **feature_kwargs) if dataset.val is not None else None
        t1 = time.perf_counter()
        result = linear_probe(train.features, train.labels, test.features, test.labels,
                              num_classes=dataset.num_classes, grid=grid,
                              val_x=None if val is None else val.features,
                              val_y=None if val is None else val.labels,
                              val_fraction=val_fraction, seed=seed, metric=metric, max_iter=max_iter,
                              device=dev)
        tensors = result.model.tensors()
        test_scores, l2 = result.test, result.l2
        feature_parents = [train.artifact, test.artifact] + ([val.artifact] if val is not None else [])
        extra_metrics = {"l2": l2, "l2_grid": result.grid, "train_top1": result.train["top1"],
                         "val_source": "split" if val is not None else f"held-out {val_fraction:g} of train",
                         "solver_seconds": result.seconds, "features_seconds": round(t1 - t0, 2)}
    else:
        size = view_size(encoder, dataset, "train")
        head, history = train_linear_augmented(
            encoder, dataset.train if streamed else dataset.train.images, dataset.train.labels,
            num_classes=dataset.num_classes, size=size, epochs=epochs, max_steps=max_steps,
            batch_size=batch_size, lr=lr, momentum=momentum, crop_min_scale=crop_min_scale, seed=seed,
            device=dev, precision=precision, quiet=quiet, workers=workers)
        with torch.no_grad():
            logits = head(torch.from_numpy(test.features))
        test_scores = score(logits, test.labels, dataset.num_classes)
        tensors = {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}
        l2 = None
        feature_parents = [test.artifact]
        extra_metrics = {"steps": history[-1]["step"] if history else 0}
    seconds = time.perf_counter() - t0
    per_class = dict(zip(dataset.class_names, test_scores["per_class"], strict=True))
    metrics = {"top1": test_scores["top1"], "top5": test_scores["top5"],
               "mean_per_class": test_scores["mean_per_class"], "per_class": per_class, **extra_metrics,
               "seconds": round(seconds, 2)}
    config = {"encoder": encoder.record, "encoder_label": encoder.label, "protocol": protocol,
              "metric": metric, "l2_grid": grid if protocol == "cached" else None,
              "val_fraction": val_fraction, "max_iter": max_iter,
              "standardize": "mean/std of the fitting data", "seed": seed, "batch_size": batch_size,
              "precision": precision, "crop_fraction": fraction, "device": dev.type,
              "num_classes": dataset.num_classes,
              "class_names": dataset.class_names, **(config_extra or {})}
    if protocol == "augment":
        config.update({"epochs": epochs, "max_steps": max_steps, "lr": lr, "momentum": momentum,
                       "nesterov": True, "weight_decay": 0.0, "crop_min_scale": crop_min_scale,
                       "schedule": "cosine", "streamed": streamed})
    parents = ([encoder.parent] if encoder.parent else []) + feature_parents
    with Staging(workdir, "linear", name, force=force) as staging:
        save_file(tensors, str(staging.dir / "classifier.safetensors"))
        if history:
            (staging.dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        art = staging.commit(config=config, parents=parents, dataset=dataset.record(), metrics=metrics)
    if not quiet:
        _print_summary(name, encoder, dataset, protocol, metrics, l2, grid, per_class)
    return art


def _check_options(protocol, metric, precision, batch_size, max_iter, epochs, lr, max_steps, crop_min_scale,
                   val_fraction) -> None:
    options.check_choice("--protocol", protocol, PROTOCOLS)
    options.check_choice("--metric", metric, METRICS)
    options.check_choice("--precision", precision, options.PRECISIONS)
    for flag, value in (("--batch-size", batch_size), ("--max-iter", max_iter), ("--epochs", epochs),
                        ("--lr", lr)):
        options.check_positive(flag, value)
    if max_steps is not None and max_steps <= 0:
        raise RelicError(f"--max-steps must be positive, got {max_steps}")
    if not 0 < crop_min_scale <= 1:
        raise RelicError(f"--crop-min-scale must be in (0, 1], got {crop_min_scale}")
    if not 0 < val_fraction < 1:
        raise RelicError(f"--val-fraction must be in (0, 1), got {val_fraction}")


def _print_summary(name, encoder, dataset, protocol, metrics, l2, grid, per_class) -> None:
    rows = [("encoder", encoder.label), ("dataset", dataset.spec), ("protocol", protocol),
            ("train / test images", f"{len(dataset.train):,} / {len(dataset.test):,}"),
            ("top-1", f"{100 * metrics['top1']:.2f}%"), ("top-5", f"{100 * metrics['top5']:.2f}%"),
            ("mean per class", f"{100 * metrics['mean_per_class']:.2f}%")]
    if l2 is not None:
        rows.append(("chosen L2", f"{l2:.3g} (grid {grid[0]:.0e}..{grid[-1]:.0e}, {len(grid)} values)"))
        rows.append(("solver time", f"{sum(metrics['solver_seconds'].values()):.1f} s"))
    rows.append(("worst class", min(per_class.items(), key=lambda kv: kv[1] if kv[1] is not None else 2)[0]))
    print_probe_table(f"linear evaluation: {name}", rows)


def command(
    encoder: options.Encoder,
    spec: options.Spec,
    protocol: Annotated[str, typer.Option(
        help="cached: L-BFGS logistic regression on cached centre-view features, L2 from a grid; augment: "
             "the paper's SGD + crop/flip through the frozen encoder.")] = "cached",
    l2_grid: options.L2Grid = DEFAULT_L2_GRID,
    val_fraction: options.ValFraction = 0.2,
    metric: options.Metric = "top1",
    max_iter: options.MaxIter = 1000,
    epochs: Annotated[float, typer.Option(help="augment protocol: passes over train.")] = 100.0,
    max_steps: options.MaxSteps = None,
    lr: Annotated[float, typer.Option(
        help="augment protocol: SGD base learning rate per 256 images (x batch/256), cosine-decayed to "
             "0.")] = 0.3,
    momentum: Annotated[float, typer.Option(help="augment protocol: Nesterov momentum.")] = 0.9,
    crop_min_scale: Annotated[float, typer.Option(
        help="augment protocol: smallest crop area fraction.")] = 0.08,
    arch: options.Arch = "resnet18",
    width: options.Width = 1.0,
    stem: options.Stem = "cifar",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass / per SGD step.")] = 256,
    precision: options.Precision = "bf16",
    limit_train: options.LimitTrain = None,
    limit_test: options.LimitTest = None,
    image_size: options.ImageSize = None,
    skip_bad: options.SkipBad = False,
    crop_fraction: options.CropFraction = "auto",
    workers: options.Workers = None,
    workdir: options.Workdir = options.DEFAULT_WORKDIR,
    name: Annotated[str | None, typer.Option(
        help="Artifact name (default: ENCODER-DATASET, -augment for that protocol).")] = None,
    seed: Annotated[int, typer.Option(
        help="Seed of the held-out split, SGD order and crops, random: init and synthetic data.")] = 0,
    device: options.Device = "auto",
    force: options.Force = False,
    quiet: options.Quiet = False,
) -> None:
    """Linear evaluation of a frozen encoder: top-1/top-5 on the test split -> a `linear` artifact."""
    options.check_choice("--protocol", protocol, PROTOCOLS)
    options.check_choice("--metric", metric, METRICS)
    options.check_choice("--precision", precision, options.PRECISIONS)
    parse_l2_grid(l2_grid)
    enc = load_encoder(encoder, arch=arch, width=width, stem=stem, seed=seed)
    dataset = load_dataset(spec, limit_train=limit_train, limit_test=limit_test, image_size=image_size,
                           skip_bad=skip_bad, seed=seed)
    require_labels(dataset, "eval linear")
    art = run_linear(enc, dataset, workdir=workdir, name=name, protocol=protocol, l2_grid=l2_grid,
                     val_fraction=val_fraction, metric=metric, max_iter=max_iter, epochs=epochs,
                     max_steps=max_steps,
                     lr=lr, momentum=momentum, crop_min_scale=crop_min_scale, batch_size=batch_size,
                     precision=precision, seed=seed, device=device, force=force, quiet=quiet,
                     crop_fraction=crop_fraction, workers=workers,
                     config_extra={"spec": spec, "limit_train": limit_train, "limit_test": limit_test,
                                   "image_size": image_size})
    options.finish(art.path)

