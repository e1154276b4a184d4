"""`relicv2 eval semi`: fine-tune the whole network on a class-balanced label subset (method.md 6).

The subset is `--fraction F` of every class of the training split, drawn with `--seed`
(data/subsets.py), or `--subset FILE` (one training index per line, or .npy), or `--subset ART`
(the subset of an earlier semi artifact, checked against this dataset's training split). The
indices used are saved in the artifact (`subset.txt`, readable by `--subset`), so every encoder is
compared on exactly the same images; with the same fraction and seed the draw is identical anyway.

Fine-tuning [byol, SimCLR]: encoder (BN in train mode) + a new zero-initialised linear head,
cross-entropy, SGD with Nesterov momentum 0.9, no weight decay, cosine schedule from the start
(no warm-up), random-resized-crop + flip views (augment.py's crop sampler and roi_align resize),
bf16 autocast. Learning rate: `--lr` * batch / 256 for the backbone and `--head-lr-scale` times
that for the head (1 by default: one learning rate, as BYOL). Batch: `--batch-size`, or the subset
size when smaller; every epoch is one permutation cut into ceil(n / batch) near-equal batches.
Reported: top-1/top-5 on the full test split, centre view, BN in eval mode.
`random:ARCH` on the same subset is the supervised-from-scratch baseline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from safetensors.torch import save_file

from relicv2_cli import options
from relicv2_cli.analysis import check_fresh, spec_slug
from relicv2_cli.artifacts import Staging, load_artifact
from relicv2_cli.data import Dataset, load_dataset, require_labels
from relicv2_cli.data.subsets import (
    balanced_subset,
    load_subset_file,
    per_class_counts,
    subset_digest,
    write_subset_file,
)
from relicv2_cli.encoders import Encoder, load_encoder
from relicv2_cli.errors import RelicError
from relicv2_cli.features import view_size
from relicv2_cli.finetune import evaluate_network, finetune
from relicv2_cli.probe import print_probe_table

SUBSET_FILE = "subset.txt"


def resolve_subset(dataset: Dataset, fraction: float | None, subset: str | None,
                   seed: int) -> tuple[np.ndarray, dict]:
    """The subset's indices and a record of where they came from. Validates before anything runs."""
    train = dataset.train
    if (fraction is None) == (subset is None):
        raise RelicError("give exactly one of --fraction F or --subset FILE|ARTIFACT")
    if fraction is not None:
        indices = balanced_subset(train.labels, fraction, seed, dataset.num_classes, dataset.class_names)
        return indices, {"source": "fraction", "fraction": fraction, "seed": seed}
    path = Path(subset)
    if path.is_dir():
        art = load_artifact(path, kind="semi")
        recorded = art.config.get("train_fingerprint")
        if recorded != train.fingerprint:
            raise RelicError(f"subset of {path} indexes another training split (fingerprint "
                             f"{str(recorded)[:12]}, "
                             f"this one {train.fingerprint[:12]}); use the same dataset and --limit-train")
        indices = load_subset_file(art.file(SUBSET_FILE), len(train))
        return indices, {"source": "artifact", "path": str(path.resolve()), "digest": art.digest}
    indices = load_subset_file(path, len(train))
    return indices, {"source": "file", "path": str(path.resolve())}


def run_semi(
    encoder: Encoder, dataset: Dataset, *, workdir: Path, name: str | None = None,
    fraction: float | None = None, subset: str | None = None, epochs: float = 30.0,
    max_steps: int | None = None, lr: float = 0.1,
    head_lr_scale: float = 1.0, momentum: float = 0.9, crop_min_scale: float = 0.08, batch_size: int = 64,
    precision: str = "bf16", seed: int = 0, device: str = "auto", force: bool = False, quiet: bool = False,
    save_weights: bool = False, config_extra: dict | None = None,
):
    _check_options(precision, batch_size, epochs, lr, head_lr_scale, max_steps, crop_min_scale)
    indices, source = resolve_subset(dataset, fraction, subset, seed)
    digest = subset_digest(indices)
    workdir = Path(workdir)
    if name is None:
        tag = f"{fraction * 100:g}pct-s{seed}" if fraction is not None else f"subset-{digest[:8]}"
        name = f"{encoder.slug}-{spec_slug(dataset.spec)}-{tag}"
    check_fresh(workdir, "semi", name, force)
    dev = options.resolve_device(device)
    start = time.perf_counter()
    train_images, train_labels = dataset.train.images, dataset.train.labels
    size = view_size(encoder, train_images)
    counts = per_class_counts(train_labels, indices, dataset.num_classes)
    net, history, summary = finetune(
        encoder, train_images[indices], train_labels[indices], num_classes=dataset.num_classes, size=size,
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, head_lr_scale=head_lr_scale,
        momentum=momentum, crop_min_scale=crop_min_scale, seed=seed, device=dev, precision=precision,
        quiet=quiet, description=f"fine-tune {encoder.label} on {len(indices)} labels")
    result = evaluate_network(net, dataset.test.images, dataset.test.labels, num_classes=dataset.num_classes,
                              size=size, device=dev, precision=precision, batch_size=max(batch_size, 256),
                              quiet=quiet)
    metrics = {"top1": result["top1"], "top5": result["top5"], "mean_per_class": result["mean_per_class"],
               "per_class": dict(zip(dataset.class_names, result["per_class"], strict=True)),
               "subset_size": len(indices), "subset_fraction": len(indices) / len(dataset.train),
               "subset_sha256": digest,
               "subset_per_class": dict(zip(dataset.class_names, counts, strict=True)),
               **summary, "final_loss": history[-1]["loss"] if history else None,
               "seconds": round(time.perf_counter() - start, 2)}
    config = {"encoder": encoder.record, "encoder_label": encoder.label, "subset": source, "epochs": epochs,
              "max_steps": max_steps, "lr": lr,
              "lr_rule": "lr * batch / 256 (backbone), x head_lr_scale (head)",
              "head_lr_scale": head_lr_scale, "momentum": momentum, "nesterov": True, "weight_decay": 0.0,
              "schedule": "cosine, no warm-up", "crop_min_scale": crop_min_scale, "batch_size": batch_size,
              "image_size": size, "precision": precision, "seed": seed, "device": dev.type,
              "train_fingerprint": dataset.train.fingerprint, "num_classes": dataset.num_classes,
              "class_names": dataset.class_names, **(config_extra or {})}
    with Staging(workdir, "semi", name, force=force) as staging:
        write_subset_file(staging.dir / SUBSET_FILE, indices)
        (staging.dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        if save_weights:
            state = {f"{k}": v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
            save_file(state, str(staging.dir / "finetuned.safetensors"))
        art = staging.commit(config=config, parents=[encoder.parent] if encoder.parent else [],
                             dataset=dataset.record(), metrics=metrics)
    if not quiet:
        print_probe_table(f"semi-supervised fine-tuning: {name}", [
            ("encoder", encoder.label), ("dataset", dataset.spec),
            ("labelled images", f"{len(indices):,} ({100 * metrics['subset_fraction']:.2f}% of train; "
                                f"per class {min(counts)}-{max(counts)})"),
            ("subset sha256", digest[:16]),
            ("steps", f"{summary['steps']} x batch {summary['batch']} ({summary['train_seconds']:.0f} s)"),
            ("test top-1", f"{100 * metrics['top1']:.2f}%"), ("test top-5", f"{100 * metrics['top5']:.2f}%"),
        ])
    return art


def _check_options(precision, batch_size, epochs, lr, head_lr_scale, max_steps, crop_min_scale) -> None:
    options.check_choice("--precision", precision, options.PRECISIONS)
    for flag, value in (("--batch-size", batch_size), ("--epochs", epochs), ("--lr", lr),
                        ("--head-lr-scale", head_lr_scale)):
        options.check_positive(flag, value)
    if max_steps is not None and max_steps <= 0:
        raise RelicError(f"--max-steps must be positive, got {max_steps}")
    if not 0 < crop_min_scale <= 1:
        raise RelicError(f"--crop-min-scale must be in (0, 1], got {crop_min_scale}")


def command(
    encoder: options.Encoder,
    spec: options.Spec,
    fraction: Annotated[float | None, typer.Option(
        help="Labelled fraction of every class of train, e.g. 0.01 or 0.1; drawn with --seed. Exclusive "
             "with --subset.")] = None,
    subset: Annotated[str | None, typer.Option(
        help="Training indices to use: a file (one index per line, or.npy) or an earlier semi artifact (its "
             "subset.txt).")] = None,
    epochs: Annotated[float, typer.Option(help="Passes over the labelled subset.")] = 30.0,
    max_steps: options.MaxSteps = None,
    lr: Annotated[float, typer.Option(
        help="Learning rate per 256 images: lr * batch / 256, cosine to 0, no warm-up.")] = 0.1,
    head_lr_scale: Annotated[float, typer.Option(
        help="The new head's learning rate as a multiple of the backbone's.")] = 1.0,
    momentum: Annotated[float, typer.Option(help="Nesterov momentum (byol: 0.9).")] = 0.9,
    crop_min_scale: Annotated[float, typer.Option(help="Smallest random-resized-crop area fraction.")] = 0.08,
    save_weights: Annotated[bool, typer.Option(
        "--save-weights",
        help="Also store the fine-tuned network (finetuned.safetensors) (default: off).")] = False,
    arch: options.Arch = "resnet18",
    width: options.Width = 1.0,
    stem: options.Stem = "cifar",
    batch_size: Annotated[int, typer.Option(
        help="Images per SGD step, or the subset size when smaller.")] = 64,
    precision: options.Precision = "bf16",
    limit_train: options.LimitTrain = None,
    limit_test: options.LimitTest = None,
    image_size: options.ImageSize = None,
    skip_bad: options.SkipBad = False,
    workdir: options.Workdir = options.DEFAULT_WORKDIR,
    name: Annotated[str | None, typer.Option(
        help="Artifact name (default: ENCODER-DATASET-{F*100}pct-s{SEED}, or -subset-{sha(:8)}).")] = None,
    seed: Annotated[int, typer.Option(
        help="Seed of the subset draw, batch order, crops, the head's init and random: init.")] = 0,
    device: options.Device = "auto",
    force: options.Force = False,
    quiet: options.Quiet = False,
) -> None:
    """Fine-tune the whole network on a class-balanced label subset; top-1/top-5 on the full test split."""
    options.check_choice("--precision", precision, options.PRECISIONS)
    enc = load_encoder(encoder, arch=arch, width=width, stem=stem, seed=seed)
    dataset = load_dataset(spec, limit_train=limit_train, limit_test=limit_test, image_size=image_size,
                           skip_bad=skip_bad, seed=seed)
    require_labels(dataset, "eval semi")
    art = run_semi(enc, dataset, workdir=workdir, name=name, fraction=fraction, subset=subset, epochs=epochs,
                   max_steps=max_steps, lr=lr, head_lr_scale=head_lr_scale, momentum=momentum,
                   crop_min_scale=crop_min_scale, batch_size=batch_size, precision=precision, seed=seed,
                   device=device, force=force, quiet=quiet, save_weights=save_weights,
                   config_extra={"spec": spec, "limit_train": limit_train, "limit_test": limit_test,
                                 "image_size": image_size})
    options.finish(art.path)
