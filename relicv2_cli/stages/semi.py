"""`relicv2 eval semi`: fine-tune the whole network on a class-balanced label subset (method.md 6).

The subset is `--fraction F` of every class of the training split, drawn with `--seed`
(data/subsets.py), or `--subset FILE` (one training index per line, or .npy), or `--subset ART`
(the subset of an earlier semi artifact, checked against this dataset's training split). The
indices used are saved in the artifact (`subset.txt`, readable by `--subset`), so every encoder is
compared on exactly the same images; with the same fraction and seed the draw is identical anyway.

First the frozen-feature probe of eval linear (probe.py: L-BFGS, L2 chosen on 20% of the labelled
images held out, refit on all of them) is fitted on the labelled images only and scored on the test
split: `frozen_linear_top1`, the number fine-tuning has to beat. Fine-tuning [byol, SimCLR, and
LP-FT]: encoder + a linear head started from that probe (`--head-init auto`: `probe`, or `zero`,
the old recipe, for a `random:` encoder), BN in train mode (`--bn frozen` keeps the running
statistics), cross-entropy, SGD with Nesterov momentum 0.9, no weight decay, cosine schedule
without warm-up, random-resized-crop + flip views (`--crop-min-scale auto`: 0.08 from 96 px up, 0.3
below), bf16 autocast. Learning rate: `--lr` * batch / 256 for the backbone and `--head-lr-scale`
times that for the head. `--epochs`, `--lr` and `--crop-min-scale` take comma lists: every
combination is fine-tuned on part of the labelled images and scored on the rest (`--val-fraction`),
and the best is fine-tuned on all of them; the test split is never used to choose.
Reported: top-1/top-5 on the full test split, centre view, BN in eval mode.
`random:ARCH` on the same subset is the supervised-from-scratch baseline.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from safetensors.torch import save_file

from relicv2_cli import options, stream
from relicv2_cli.analysis import check_fresh, spec_slug
from relicv2_cli.artifacts import Staging, load_artifact
from relicv2_cli.data import Dataset, Split, load_dataset, require_labels
from relicv2_cli.data.subsets import (
    balanced_subset,
    load_subset_file,
    per_class_counts,
    subset_digest,
    write_subset_file,
)
from relicv2_cli.encoders import Encoder, load_encoder
from relicv2_cli.errors import RelicError
from relicv2_cli.features import crop_fraction_for, embed, split_features, view_size
from relicv2_cli.finetune import BN_MODES, evaluate_network, finetune
from relicv2_cli.probe import (
    DEFAULT_L2_GRID,
    ProbeResult,
    holdout_split,
    linear_probe,
    parse_l2_grid,
    print_probe_table,
)

SUBSET_FILE = "subset.txt"
HEAD_INITS = ("auto", "probe", "zero")
EPOCHS = 30.0
LR = 0.1
# Random-resized-crop area: the published 0.08 for photo-sized views; at 32 px an 8% crop is a 9 px
# patch, so small views keep at least 30% (CIFAR-10 1%: +1.4 points pretrained, +2.3 from scratch).
CROP_MIN_SCALE = 0.08
SMALL_VIEW_CROP_MIN_SCALE = 0.3
SMALL_VIEW = 96


def auto_crop_min_scale(size: int) -> float:
    """--crop-min-scale auto: 0.08 for views of 96 px and more, 0.3 below."""
    return CROP_MIN_SCALE if size >= SMALL_VIEW else SMALL_VIEW_CROP_MIN_SCALE


def auto_head_init(encoder: Encoder) -> str:
    """--head-init auto: the frozen probe for an encoder with learned weights; a zero head for random
    init, where a probe of random features is a worse start (CIFAR-10 1%: 29.4% against 36.1%)."""
    return "zero" if encoder.record.get("type") == "random" else "probe"


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


@dataclass
class Recipe:
    """One fine-tuning configuration; comma lists of --epochs, --lr and --crop-min-scale give one per
    combination, chosen on held-out labelled images."""

    epochs: float
    lr: float
    crop_min_scale: float


def frozen_probe(train_x: np.ndarray, train_y: np.ndarray, test_x, test_y, *,
                 num_classes: int, seed: int) -> ProbeResult:
    """The cached-feature linear probe (eval linear's solver) fitted on labelled images only: L2 chosen
    on a held-out 20% of them, refit on all of them."""
    return linear_probe(train_x, train_y, test_x, test_y, num_classes=num_classes,
                        grid=parse_l2_grid(DEFAULT_L2_GRID), val_fraction=0.2, seed=seed)


def run_semi(
    encoder: Encoder, dataset: Dataset, *, workdir: Path, name: str | None = None,
    fraction: float | None = None, subset: str | None = None, epochs: float | list[float] = EPOCHS,
    max_steps: int | None = None, lr: float | list[float] = LR, head_lr_scale: float = 1.0,
    head_init: str = "auto", bn: str = "train", momentum: float = 0.9,
    crop_min_scale: float | list[float] | str = "auto", val_fraction: float = 0.2, batch_size: int = 64,
    precision: str = "bf16", seed: int = 0, device: str = "auto", force: bool = False, quiet: bool = False,
    save_weights: bool = False, config_extra: dict | None = None, crop_fraction: str = "auto",
    workers: int | None = None,
):
    epochs, lr = _as_list(epochs), _as_list(lr)
    crop_min_scale = None if crop_min_scale == "auto" else _as_list(crop_min_scale)
    _check_options(precision, batch_size, epochs, lr, head_lr_scale, max_steps, crop_min_scale or [],
                   head_init, bn, val_fraction)
    head_init = auto_head_init(encoder) if head_init == "auto" else head_init
    fraction_view = crop_fraction_for(crop_fraction, dataset)
    indices, source = resolve_subset(dataset, fraction, subset, seed)
    digest = subset_digest(indices)
    workdir = Path(workdir)
    if name is None:
        tag = f"{fraction * 100:g}pct-s{seed}" if fraction is not None else f"subset-{digest[:8]}"
        name = f"{encoder.slug}-{spec_slug(dataset.spec)}-{tag}"
    check_fresh(workdir, "semi", name, force)
    dev = options.resolve_device(device)
    start = time.perf_counter()
    size = view_size(encoder, dataset, "train", quiet)
    # Only the labelled images are read. In memory (the fastest) when they are of one size and fit (1%
    # of ImageNet at 256 px is ~2.5 GB); else their crops stream, as in eval linear --protocol augment.
    labelled, streamed = None, False
    if stream.streamed(dataset, dataset.train):
        labelled = stream.rows_of(dataset.train, indices)
        streamed = stream.announce("labelled images", stream.training_choice(dataset, [labelled]), quiet)
    if streamed:
        images = labelled
    elif labelled is not None:  # mixed sizes the size sample missed become squares of the view's side
        images = stream.decode_rows(dataset.train, indices, round(size / fraction_view))
    else:
        images = dataset.train.images[indices]
    labels = dataset.train.labels[indices]
    crop_min_scale = crop_min_scale or [auto_crop_min_scale(size)]
    candidates = [Recipe(e, r, c) for e, r, c in itertools.product(epochs, lr, crop_min_scale)]
    counts = per_class_counts(dataset.train.labels, indices, dataset.num_classes)
    tune = dict(num_classes=dataset.num_classes, size=size, max_steps=max_steps, batch_size=batch_size,
                head_lr_scale=head_lr_scale, momentum=momentum, bn=bn, seed=seed, device=dev,
                precision=precision, quiet=quiet, workers=workers)
    evaluate = dict(num_classes=dataset.num_classes, size=size, device=dev, precision=precision,
                    batch_size=max(batch_size, 256), quiet=quiet, crop_fraction=fraction_view)

    # The frozen-feature probe on the labelled images: the number fine-tuning has to beat, and the head
    # it starts from (--head-init probe).
    test = split_features(encoder, dataset, "test", device=dev, precision=precision, workdir=workdir,
                          quiet=quiet, crop_fraction=fraction_view, workers=workers)
    feats = embed(encoder.model.to(dev), _viewed(images, workers), size=size, device=dev, precision=precision,
                  batch_size=256, quiet=quiet, description="labelled images",
                  crop_fraction=fraction_view).numpy()
    probe = frozen_probe(feats, labels, test.features, test.labels, num_classes=dataset.num_classes,
                         seed=seed)

    selection = []
    if len(candidates) > 1:  # fine-tune on part of the labelled images, score the rest; never the test split
        fit, held = holdout_split(labels, val_fraction, seed)
        fit_probe = frozen_probe(feats[fit], labels[fit], feats[held], labels[held],
                                 num_classes=dataset.num_classes, seed=seed)
        for recipe in candidates:
            net, _, _ = finetune(encoder, _rows(images, fit), labels[fit], epochs=recipe.epochs,
                                 lr=recipe.lr, crop_min_scale=recipe.crop_min_scale,
                                 head_init=fit_probe.model if head_init == "probe" else None, **tune,
                                 description=f"select {_row_text(asdict(recipe))}")
            val = evaluate_network(net, _viewed(_rows(images, held), workers), labels[held], **evaluate)
            selection.append({**asdict(recipe), "val_top1": val["top1"]})
        best = max(range(len(candidates)), key=lambda i: selection[i]["val_top1"])  # ties: first listed
        chosen = candidates[best]
    else:
        chosen = candidates[0]
    net, history, summary = finetune(
        encoder, images, labels, epochs=chosen.epochs, lr=chosen.lr, crop_min_scale=chosen.crop_min_scale,
        head_init=probe.model if head_init == "probe" else None, **tune,
        description=f"fine-tune {encoder.label} on {len(indices)} labels")
    test_images = stream.StreamedImages(dataset.test, workers) \
        if stream.streamed(dataset, dataset.test) else dataset.test.images
    result = evaluate_network(net, test_images, dataset.test.labels, **evaluate)
    metrics = {"top1": result["top1"], "top5": result["top5"], "mean_per_class": result["mean_per_class"],
               "per_class": dict(zip(dataset.class_names, result["per_class"], strict=True)),
               "frozen_linear_top1": probe.test["top1"], "frozen_linear_top5": probe.test["top5"],
               "frozen_linear_l2": probe.l2,
               "subset_size": len(indices), "subset_fraction": len(indices) / len(dataset.train),
               "subset_sha256": digest,
               "subset_per_class": dict(zip(dataset.class_names, counts, strict=True)),
               "chosen": asdict(chosen), "selection": selection,
               **summary, "final_loss": history[-1]["loss"] if history else None,
               "seconds": round(time.perf_counter() - start, 2)}
    config = {"encoder": encoder.record, "encoder_label": encoder.label, "subset": source, "epochs": epochs,
              "max_steps": max_steps, "lr": lr,
              "lr_rule": "lr * batch / 256 (backbone), x head_lr_scale (head)",
              "head_lr_scale": head_lr_scale, "head_init": head_init, "bn": bn, "momentum": momentum,
              "nesterov": True, "weight_decay": 0.0, "schedule": "cosine, no warm-up",
              "crop_min_scale": crop_min_scale, "val_fraction": val_fraction if selection else None,
              "batch_size": batch_size, "image_size": size, "crop_fraction": fraction_view,
              "streamed": streamed, "precision": precision, "seed": seed,
              "device": dev.type, "frozen_probe": {"l2_grid": DEFAULT_L2_GRID, "val_fraction": 0.2},
              "train_fingerprint": dataset.train.fingerprint, "num_classes": dataset.num_classes,
              "class_names": dataset.class_names, **(config_extra or {})}
    parents = ([encoder.parent] if encoder.parent else []) + [test.artifact]
    with Staging(workdir, "semi", name, force=force) as staging:
        write_subset_file(staging.dir / SUBSET_FILE, indices)
        (staging.dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        if save_weights:
            state = {f"{k}": v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
            save_file(state, str(staging.dir / "finetuned.safetensors"))
        art = staging.commit(config=config, parents=parents, dataset=dataset.record(), metrics=metrics)
    if not quiet:
        rows = [("encoder", encoder.label), ("dataset", dataset.spec),
                ("labelled images", f"{len(indices):,} ({100 * metrics['subset_fraction']:.2f}% of train; "
                                    f"per class {min(counts)}-{max(counts)})"),
                ("subset sha256", digest[:16])]
        rows += [(f"select {_row_text(r)}", f"held-out top-1 {100 * r['val_top1']:.2f}%") for r in selection]
        rows += [("fine-tuned", f"{_row_text(asdict(chosen))}, head {head_init}, BN {bn}"),
                 ("steps", f"{summary['steps']} x batch {summary['batch']} "
                           f"({summary['train_seconds']:.0f} s)"),
                 ("frozen linear top-1 (same labels)", f"{100 * probe.test['top1']:.2f}%"),
                 ("fine-tuned top-1", f"{100 * metrics['top1']:.2f}%"),
                 ("fine-tuned top-5", f"{100 * metrics['top5']:.2f}%")]
        print_probe_table(f"semi-supervised fine-tuning: {name}", rows)
    return art


def _rows(images: np.ndarray | Split, rows: np.ndarray) -> np.ndarray | Split:
    """Rows of the labelled images: of the array, or of the streamed split (decoding nothing)."""
    return stream.rows_of(images, rows) if isinstance(images, Split) else images[rows]


def _viewed(images: np.ndarray | Split, workers: int | None):
    """What embed() reads centre views from: the array, or the split streamed in chunks."""
    return stream.StreamedImages(images, workers) if isinstance(images, Split) else images


def _row_text(row: dict) -> str:
    return f"epochs {row['epochs']:g}, lr {row['lr']:g}, crop {row['crop_min_scale']:g}"


def _as_list(value) -> list[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]


def parse_values(flag: str, text: str) -> list[float]:
    """One number or a comma list (`0.01,0.03`); more than one value makes `--select` candidates."""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise RelicError(f"{flag} must be a number or a comma list of numbers, got {text!r}") from None
    if not values:
        raise RelicError(f"{flag} must be a number or a comma list of numbers, got {text!r}")
    return values


def _check_options(precision, batch_size, epochs, lr, head_lr_scale, max_steps, crop_min_scale, head_init, bn,
                   val_fraction) -> None:
    options.check_choice("--precision", precision, options.PRECISIONS)
    options.check_choice("--head-init", head_init, HEAD_INITS)
    options.check_choice("--bn", bn, BN_MODES)
    for flag, value in (("--batch-size", batch_size), ("--head-lr-scale", head_lr_scale),
                        *(("--epochs", v) for v in epochs), *(("--lr", v) for v in lr)):
        options.check_positive(flag, value)
    if max_steps is not None and max_steps <= 0:
        raise RelicError(f"--max-steps must be positive, got {max_steps}")
    for value in crop_min_scale:
        if not 0 < value <= 1:
            raise RelicError(f"--crop-min-scale must be in (0, 1], got {value}")
    if not 0 < val_fraction < 1:
        raise RelicError(f"--val-fraction must be in (0, 1), got {val_fraction}")


def command(
    encoder: options.Encoder,
    spec: options.Spec,
    fraction: Annotated[float | None, typer.Option(
        help="Labelled fraction of every class of train, e.g. 0.01 or 0.1; drawn with --seed. Exclusive "
             "with --subset.")] = None,
    subset: Annotated[str | None, typer.Option(
        help="Training indices to use: a file (one index per line, or.npy) or an earlier semi artifact (its "
             "subset.txt).")] = None,
    epochs: Annotated[str, typer.Option(
        help="Passes over the labelled subset; a comma list is searched on held-out labelled images.")
    ] = f"{EPOCHS:g}",
    max_steps: options.MaxSteps = None,
    lr: Annotated[str, typer.Option(
        help="Backbone learning rate per 256 images: lr * batch / 256, cosine to 0, no warm-up; a comma "
             "list is searched on held-out labelled images.")] = f"{LR:g}",
    head_lr_scale: Annotated[float, typer.Option(
        help="The head's learning rate as a multiple of the backbone's.")] = 1.0,
    head_init: Annotated[str, typer.Option(
        help="probe: start the head from the frozen-feature linear probe of the labelled images; zero: "
             "a zero head (the old recipe); auto: probe, or zero for a random: encoder.")] = "auto",
    bn: Annotated[str, typer.Option(
        help="BatchNorm while fine-tuning: train (batch statistics) or frozen (running statistics kept).")
    ] = "train",
    momentum: Annotated[float, typer.Option(help="Nesterov momentum (byol: 0.9).")] = 0.9,
    crop_min_scale: Annotated[str, typer.Option(
        help=f"Smallest random-resized-crop area fraction; a comma list is searched on held-out labelled "
             f"images; auto: {CROP_MIN_SCALE:g} for views of {SMALL_VIEW} px and more, "
             f"{SMALL_VIEW_CROP_MIN_SCALE:g} below.")] = "auto",
    val_fraction: Annotated[float, typer.Option(
        help="Share of every class of the labelled images held out when a list is searched.")] = 0.2,
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
    crop_fraction: options.CropFraction = "auto",
    workers: options.Workers = None,
    workdir: options.Workdir = options.DEFAULT_WORKDIR,
    name: Annotated[str | None, typer.Option(
        help="Artifact name (default: ENCODER-DATASET-{F*100}pct-s{SEED}, or -subset-{sha(:8)}).")] = None,
    seed: Annotated[int, typer.Option(
        help="Seed of the subset draw, batch order, crops, held-out part and random: init.")] = 0,
    device: options.Device = "auto",
    force: options.Force = False,
    quiet: options.Quiet = False,
) -> None:
    """Fine-tune the whole network on a class-balanced label subset; top-1/top-5 on the full test split,
    beside the frozen-feature linear probe fitted on the same labelled images."""
    epoch_list, lr_list = parse_values("--epochs", epochs), parse_values("--lr", lr)
    crop_list = "auto" if crop_min_scale == "auto" else parse_values("--crop-min-scale", crop_min_scale)
    _check_options(precision, batch_size, epoch_list, lr_list, head_lr_scale, max_steps,
                   [] if crop_list == "auto" else crop_list, head_init, bn, val_fraction)
    enc = load_encoder(encoder, arch=arch, width=width, stem=stem, seed=seed)
    dataset = load_dataset(spec, limit_train=limit_train, limit_test=limit_test, image_size=image_size,
                           skip_bad=skip_bad, seed=seed)
    require_labels(dataset, "eval semi")
    art = run_semi(enc, dataset, workdir=workdir, name=name, fraction=fraction, subset=subset,
                   epochs=epoch_list,
                   max_steps=max_steps, lr=lr_list, head_lr_scale=head_lr_scale, head_init=head_init, bn=bn,
                   momentum=momentum, crop_min_scale=crop_list, val_fraction=val_fraction,
                   batch_size=batch_size, precision=precision, seed=seed, device=device, force=force,
                   quiet=quiet, save_weights=save_weights, crop_fraction=crop_fraction, workers=workers,
                   config_extra={"spec": spec, "limit_train": limit_train, "limit_test": limit_test,
                                 "image_size": image_size})
    options.finish(art.path)
