"""`relicv2 eval transfer`: linear (or fine-tuned) transfer to other datasets (method.md section 6).

The Kornblith et al. protocol used by BYOL and RELICv2: for every target dataset, fit a multinomial
logistic regression on frozen centre-view features of its training split for every L2 strength of
a log grid, choose the strength on a validation split (the dataset's own, or a class-stratified
`--val-fraction` carved from train with `--seed` when it has none), then refit on train +
validation with that strength and report the test split with `--metric` (top1, or mean-per-class
accuracy as Kornblith et al. use for Aircraft, Pets, Caltech101 and Flowers). The solver is
probe.py's `linear_probe`; features come from the shared cache (relicv2_cli/features.py).

`--finetune` fine-tunes the whole network instead (finetune.py's `finetune`, all hyper-parameters
fixed by the options rather than searched) on train + validation, and reports the test split.

Several encoders and several datasets go in one call; the artifact holds one row per (encoder,
dataset) and the table shows encoders side by side.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from relicv2_cli import options, stream
from relicv2_cli.analysis import check_fresh, is_dataset_spec, spec_slug
from relicv2_cli.artifacts import Staging
from relicv2_cli.data import SPEC_KINDS, Dataset, load_dataset, require_labels
from relicv2_cli.encoders import Encoder, load_encoder, slugify
from relicv2_cli.errors import RelicError
from relicv2_cli.features import crop_fraction_for, split_features, view_size
from relicv2_cli.finetune import evaluate_network, finetune
from relicv2_cli.probe import (
    DEFAULT_L2_GRID,
    METRICS,
    holdout_split,
    linear_probe,
    metric_value,
    parse_l2_grid,
)


def split_items(items: list[str]) -> tuple[list[str], list[str]]:
    """ENCODER... SPEC... in any order: dataset specs are recognised by their kind prefix."""
    specs = [i for i in items if is_dataset_spec(i)]
    encoders = [i for i in items if not is_dataset_spec(i)]
    if not encoders:
        raise RelicError("give at least one ENCODER (a pretrain artifact, random:ARCH or torchvision:FILE)")
    if not specs:
        raise RelicError(f"give at least one dataset SPEC ({', '.join(SPEC_KINDS)})")
    return encoders, specs


def transfer_one(
    encoder: Encoder, dataset: Dataset, *, grid: list[float], metric: str, val_fraction: float, seed: int,
    max_iter: int, finetune_opts: dict | None, streamed: bool, feature_kwargs: dict, quiet: bool,
) -> tuple[dict, list]:
    """One (encoder, dataset) row and the features artifacts it used; `streamed`: fine-tune on the train
    (+ validation) split streamed rather than decoded in memory."""
    train_labels = dataset.train.labels
    if dataset.val is not None:
        val_source = "split"
        n_val = len(dataset.val)
    else:
        fit_idx, val_idx = holdout_split(train_labels, val_fraction, seed)
        val_source = f"carved {val_fraction:g} of train"
        n_val = len(val_idx)
    fraction = crop_fraction_for(feature_kwargs["crop_fraction"], dataset)
    row = {"encoder": encoder.label, "dataset": dataset.spec, "fingerprint": dataset.fingerprint,
           "crop_fraction": fraction,
           "n_train": len(dataset.train) - (0 if dataset.val is not None else n_val), "n_val": n_val,
           "n_test": len(dataset.test), "val_source": val_source, "refit": "train+val"}
    t0 = time.perf_counter()
    if finetune_opts is None:
        train = split_features(encoder, dataset, "train", **feature_kwargs)
        test = split_features(encoder, dataset, "test", **feature_kwargs)
        used = [train.artifact, test.artifact]
        if dataset.val is not None:
            val = split_features(encoder, dataset, "val", **feature_kwargs)
            used.append(val.artifact)
            fit_x, fit_y, val_x, val_y = train.features, train.labels, val.features, val.labels
        else:
            fit_x, fit_y = train.features[fit_idx], train.labels[fit_idx]
            val_x, val_y = train.features[val_idx], train.labels[val_idx]
        result = linear_probe(fit_x, fit_y, test.features, test.labels, num_classes=dataset.num_classes,
                              grid=grid,
                              val_x=val_x, val_y=val_y, metric=metric, max_iter=max_iter,
                              device=feature_kwargs["device"])
        best = next(r for r in result.grid if r["l2"] == result.l2)
        row.update({"mode": "linear", "l2": result.l2, "val_score": best["val"], "l2_grid": result.grid,
                    "refit_count": len(fit_y) + len(val_y), **_scores(result.test, metric)})
    else:
        if streamed:
            images = dataset.train if dataset.val is None else stream.joined(dataset.train, dataset.val)
            labels = images.labels
        else:
            images, labels = dataset.train.images, train_labels
            if dataset.val is not None:
                images = np.concatenate([images, dataset.val.images])
                labels = np.concatenate([labels, dataset.val.labels])
        size = view_size(encoder, dataset, "train")
        dev = feature_kwargs["device"]
        net, _history, summary = finetune(encoder, images, labels, num_classes=dataset.num_classes, size=size,
                                          device=dev, precision=feature_kwargs["precision"], quiet=quiet,
                                          description=f"fine-tune {encoder.label} on {dataset.spec}",
                                          workers=feature_kwargs["workers"], **finetune_opts)
        test_images = stream.StreamedImages(dataset.test, feature_kwargs["workers"]) \
            if stream.streamed(dataset, dataset.test) else dataset.test.images
        scores = evaluate_network(net, test_images, dataset.test.labels, num_classes=dataset.num_classes,
                                  size=size, device=dev, precision=feature_kwargs["precision"],
                                  batch_size=feature_kwargs["batch_size"], quiet=quiet,
                                  crop_fraction=fraction)
        row.update({"mode": "finetune", "refit_count": len(labels), "streamed": streamed, **summary,
                    **_scores(scores, metric)})
        used = []
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row, used


def _scores(result: dict, metric: str) -> dict:
    return {"top1": result["top1"], "top5": result["top5"], "mean_per_class": result["mean_per_class"],
            "metric": metric, "score": metric_value(result, metric)}


def run_transfer(
    encoders: list[Encoder], specs: list[str], *, workdir: Path, name: str | None = None,
    l2_grid: str = DEFAULT_L2_GRID, metric: str = "top1", val_fraction: float = 0.2, max_iter: int = 1000,
    finetune_mode: bool = False, finetune_opts: dict | None = None, batch_size: int = 256,
    precision: str = "bf16", limit_train: int | None = None, limit_test: int | None = None,
    image_size: int | None = None, skip_bad: bool = False, seed: int = 0, device: str = "auto",
    force: bool = False, quiet: bool = False, command_config: dict | None = None,
    crop_fraction: str = "auto", workers: int | None = None,
):
    options.check_choice("--metric", metric, METRICS)
    options.check_choice("--precision", precision, options.PRECISIONS)
    grid = parse_l2_grid(l2_grid)
    if not 0 < val_fraction < 1:
        raise RelicError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if batch_size <= 0 or max_iter <= 0:
        raise RelicError("--batch-size and --max-iter must be positive")
    labels = [e.label for e in encoders]
    if len(set(labels)) != len(labels):
        raise RelicError(f"an encoder is listed twice: {', '.join(labels)}")
    # Load every dataset first: a bad SPEC fails before any work.
    data_options = dict(limit_train=limit_train, limit_test=limit_test, image_size=image_size,
                        skip_bad=skip_bad, seed=seed)
    datasets = [load_dataset(s, **data_options) for s in specs]
    for dataset in datasets:
        require_labels(dataset, "eval transfer")
        crop_fraction_for(crop_fraction, dataset)
    workdir = Path(workdir)
    name = name or _default_name(encoders, specs, finetune_mode)
    check_fresh(workdir, "transfer", name, force)
    # --finetune: whether each dataset's train (+ validation) split streams, decided before any work
    streamed = {}
    for dataset in datasets if finetune_mode else []:
        splits = [split for split in (dataset.train, dataset.val) if split is not None]
        choice = stream.training_choice(dataset, splits)
        streamed[dataset.spec] = stream.announce(f"{dataset.spec}: training data", choice, quiet)
    dev = options.resolve_device(device)
    feature_kwargs = dict(device=dev, batch_size=batch_size, precision=precision, workdir=workdir,
                          quiet=quiet, force=force, crop_fraction=crop_fraction, workers=workers)
    rows, parents = [], []
    for encoder in encoders:
        if encoder.parent is not None:
            parents.append(encoder.parent)
        for dataset in datasets:
            row, used = transfer_one(encoder, dataset, grid=grid, metric=metric, val_fraction=val_fraction,
                                     seed=seed, max_iter=max_iter,
                                     finetune_opts=finetune_opts if finetune_mode else None,
                                     streamed=streamed.get(dataset.spec, False),
                                     feature_kwargs=feature_kwargs, quiet=quiet)
            rows.append(row)
            parents.extend(used)
    mean_score = {e.label: float(np.mean([r["score"] for r in rows if r["encoder"] == e.label]))
                  for e in encoders}
    best = max(mean_score, key=mean_score.get)
    metrics = {"metric": metric, "best_encoder": best, "best_mean_score": mean_score[best],
               "datasets": len(datasets), "mean_score": mean_score, "rows": rows}
    config = {"encoders": [e.record for e in encoders], "specs": specs,
              "mode": "finetune" if finetune_mode else "linear",
              "metric": metric, "l2_grid": grid, "val_fraction": val_fraction, "max_iter": max_iter,
              "refit": "train+val", "finetune": finetune_opts if finetune_mode else None,
              "streamed": streamed if finetune_mode else None,
              "batch_size": batch_size,
              "precision": precision, "limit_train": limit_train, "limit_test": limit_test,
              "image_size": image_size, "crop_fraction": crop_fraction,
              "seed": seed, "device": dev.type, **(command_config or {})}
    unique_parents = list({p.path.resolve(): p for p in parents}.values())
    with Staging(workdir, "transfer", name, force=force) as staging:
        art = staging.commit(config=config, parents=unique_parents,
                             dataset={"spec": " + ".join(specs),
                                      "fingerprint": hashlib.sha256(
                                          "".join(d.fingerprint for d in datasets).encode()).hexdigest(),
                                      "datasets": [d.record() for d in datasets]}, metrics=metrics)
    if not quiet:
        options.console.print(transfer_table(rows, encoders, specs, metric, name))
    return art


def _default_name(encoders: list[Encoder], specs: list[str], finetune_mode: bool) -> str:
    base = "+".join(e.slug for e in encoders) + "-" + "+".join(spec_slug(s) for s in specs)
    if finetune_mode:
        base += "-finetune"
    if len(base) > 80:
        base = base[:60] + "-" + hashlib.sha256(base.encode()).hexdigest()[:8]
    return slugify(base, 100)


def transfer_table(rows: list[dict], encoders: list[Encoder], specs: list[str], metric: str,
                   title: str) -> Table:
    table = Table(title=f"transfer ({metric}, test split): {title}")
    table.add_column("dataset")
    table.add_column("train+val / test")
    for encoder in encoders:
        table.add_column(encoder.label, justify="right")
    for spec in specs:
        cells = []
        sizes = ""
        for encoder in encoders:
            row = next(r for r in rows if r["encoder"] == encoder.label and r["dataset"] == spec)
            sizes = f"{row['refit_count']:,} / {row['n_test']:,}"
            extra = f" (L2 {row['l2']:.0e})" if row.get("mode") == "linear" else ""
            cells.append(f"{100 * row['score']:.2f}{extra}")
        table.add_row(spec, sizes, *cells)
    return table


def command(
    items: Annotated[list[str],
                     typer.Argument(help="ENCODER... SPEC...: one or more encoders (pretrain artifacts, "
                                         "random:ARCH, torchvision:FILE) and one or more target datasets "
                                         "(recognised by their kind: synthetic, cifar10:DIR, ...).")],
    metric: options.Metric = "top1",
    l2_grid: options.L2Grid = DEFAULT_L2_GRID,
    val_fraction: options.ValFraction = 0.2,
    max_iter: options.MaxIter = 1000,
    finetune_mode: Annotated[bool, typer.Option(
        "--finetune",
        help="Fine-tune the whole network on train+val instead of a linear probe (options below) (default: "
             "linear).")] = False,
    epochs: Annotated[float, typer.Option(help="--finetune: passes over train+val (choice: 30).")] = 30.0,
    max_steps: options.MaxSteps = None,
    lr: Annotated[float, typer.Option(help="--finetune: lr per 256 images, cosine to 0.")] = 0.1,
    head_lr_scale: Annotated[float, typer.Option(
        help="--finetune: head lr as a multiple of the backbone's.")] = 1.0,
    crop_min_scale: Annotated[float, typer.Option(help="--finetune: smallest crop area fraction.")] = 0.08,
    arch: options.Arch = "resnet18",
    width: options.Width = 1.0,
    stem: options.Stem = "cifar",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass / per fine-tuning step.")] = 256,
    precision: options.Precision = "bf16",
    limit_train: options.LimitTrain = None,
    limit_test: options.LimitTest = None,
    image_size: options.ImageSize = None,
    skip_bad: options.SkipBad = False,
    crop_fraction: options.CropFraction = "auto",
    workers: options.Workers = None,
    workdir: options.Workdir = options.DEFAULT_WORKDIR,
    name: Annotated[str | None, typer.Option(
        help="Artifact name (default: ENCODERS-DATASETS joined by +).")] = None,
    seed: Annotated[int, typer.Option(
        help="Seed of the carved validation split, fine-tuning, random: init and synthetic data.")] = 0,
    device: options.Device = "auto",
    force: options.Force = False,
    quiet: options.Quiet = False,
) -> None:
    """Transfer: per target dataset, L2 chosen on validation, refit on train+val, test score; encoders
    side by side."""
    options.check_choice("--metric", metric, METRICS)
    options.check_choice("--precision", precision, options.PRECISIONS)
    parse_l2_grid(l2_grid)
    encoder_specs, specs = split_items(items)
    encoders = [load_encoder(e, arch=arch, width=width, stem=stem, seed=seed) for e in encoder_specs]
    if finetune_mode:
        for flag, value in (("--epochs", epochs), ("--lr", lr), ("--head-lr-scale", head_lr_scale)):
            options.check_positive(flag, value)
        if not 0 < crop_min_scale <= 1:
            raise RelicError(f"--crop-min-scale must be in (0, 1], got {crop_min_scale}")
        if max_steps is not None and max_steps <= 0:
            raise RelicError(f"--max-steps must be positive, got {max_steps}")
    finetune_opts = {"epochs": epochs, "max_steps": max_steps, "batch_size": batch_size, "lr": lr,
                     "head_lr_scale": head_lr_scale, "momentum": 0.9, "crop_min_scale": crop_min_scale,
                     "seed": seed}
    art = run_transfer(encoders, specs, workdir=workdir, name=name, l2_grid=l2_grid, metric=metric,
                       val_fraction=val_fraction, max_iter=max_iter, finetune_mode=finetune_mode,
                       finetune_opts=finetune_opts, batch_size=batch_size, precision=precision,
                       limit_train=limit_train, limit_test=limit_test, image_size=image_size,
                       skip_bad=skip_bad, seed=seed, device=device, force=force, quiet=quiet,
                       crop_fraction=crop_fraction, workers=workers)
    options.finish(art.path)
