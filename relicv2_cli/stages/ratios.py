"""`relicv2 analyze ratios`: the linear discriminant ratio of frozen representations (method.md 6).

Definition (computed on the test split, `d(i, j)` the L2 distance between the features of images i
and j, L2-normalised first unless `--no-normalize`, so that encoders of different widths and scales
compare: every distance then lies in [0, 2]). For a class c with n_c of the N test images:

    intra(c) = 1 / (n_c (n_c - 1)) * sum_{i in c} sum_{j in c, j != i} d(i, j)
    inter(c) = 1 / (n_c (N - n_c)) * sum_{i in c} sum_{j not in c}     d(i, j)
    ratio(c) = inter(c) / intra(c)

and the per-sample variant, for image i of class c:

    ratio(i) = mean_{j not in c} d(i, j) / mean_{j in c, j != i} d(i, j)

(ratio(c) is a ratio of class means, not the mean of ratio(i) over the class). A ratio above 1 means
the class's images are closer to each other than to the rest; higher means tighter, easier to
separate classes. A class with a single image has no intra-class distance: its ratio is undefined
(NaN), as is the ratio of a dataset with a single class; an intra distance of exactly 0 with a
positive inter distance (a class collapsed onto one point) gives +inf. Means and medians are taken
over the finite values, and the undefined/infinite counts are recorded.

Distances are computed in blocks of `--distance-batch` rows (float64, on --device), accumulating
per-image sums of distances to each class, so a 10,000-image split needs a few 10,000-wide rows at
a time, never the N x N matrix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import h5py
import numpy as np
import torch
import typer
from rich.table import Table

from relicv2_cli import options
from relicv2_cli.analysis import (
    check_common,
    encoder_features,
    l2_normalize,
    pairwise_l2,
    prepare_inputs,
    unique_parents,
)
from relicv2_cli.artifacts import Artifact, Staging
from relicv2_cli.errors import RelicError
from relicv2_cli.features import crop_fraction_for

NUMBERS_FILE = "ratios.h5"
FIGURE_STEM = "ratios"


# ------------------------------------------------------------------------------------------------
# Pure functions.


def class_distance_sums(
    features, labels, num_classes: int, *, chunk: int = 1024, device: str | torch.device = "cpu",
    progress=None,
) -> np.ndarray:
    """S (N, C) float64: S[i, c] = sum of d(i, j) over the images j of class c (d(i, i) counted as 0).

    Rows are computed `chunk` at a time: memory is O(chunk * N), never O(N^2)."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64, device=device)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64, device=device)
    onehot = torch.nn.functional.one_hot(y, num_classes).to(torch.float64)
    out = torch.empty(len(x), num_classes, dtype=torch.float64)
    task = progress.add_task("distances", total=len(x), info="") if progress is not None else None
    for start in range(0, len(x), chunk):
        d = pairwise_l2(x[start : start + chunk], x, device)
        rows = torch.arange(len(d), device=device)
        d[rows, rows + start] = 0.0  # exactly 0, whatever the rounding of |a|^2 + |b|^2 - 2ab
        out[start : start + len(d)] = (d @ onehot).cpu()
        if task is not None:
            progress.advance(task, len(d))
    if task is not None:
        progress.remove_task(task)
    return out.numpy()


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with NaN where undefined (den NaN, or 0/0) and +inf for a positive num over 0."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    ok = np.isfinite(num) & np.isfinite(den)
    positive = ok & (den > 0)
    out[positive] = num[positive] / den[positive]
    out[ok & (den == 0) & (num > 0)] = np.inf
    return out


@dataclass
class RatioResult:
    per_class: np.ndarray  # (C,) inter(c) / intra(c); NaN for classes with < 2 images
    per_sample: np.ndarray  # (N,) per-image variant; NaN where undefined
    intra: np.ndarray  # (C,) mean intra-class distance
    inter: np.ndarray  # (C,) mean distance to other classes
    counts: np.ndarray  # (C,) images per class


def discriminant_details(
    features, labels, *, num_classes: int | None = None, normalize: bool = True, chunk: int = 1024,
    device: str | torch.device = "cpu", progress=None,
) -> RatioResult:
    """Linear discriminant ratios with the intra/inter means behind them (module docstring)."""
    labels = np.asarray(labels, dtype=np.int64)
    features = np.asarray(features)
    if features.ndim != 2 or len(features) != len(labels) or len(labels) == 0:
        raise RelicError(f"features {features.shape} and labels {labels.shape} do not match")
    if chunk < 1:
        raise RelicError(f"--distance-batch must be at least 1, got {chunk}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    x = l2_normalize(features) if normalize else features.astype(np.float64)
    sums = class_distance_sums(x, labels, num_classes, chunk=chunk, device=device, progress=progress)
    n = len(labels)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    own = sums[np.arange(n), labels]  # distances to the image's own class
    other = sums.sum(1) - own
    n_own = counts[labels]
    with np.errstate(divide="ignore", invalid="ignore"):
        same_mean = np.where(n_own > 1, own / np.maximum(n_own - 1, 1), np.nan)
        other_mean = np.where(n - n_own > 0, other / np.maximum(n - n_own, 1), np.nan)
    per_sample = _ratio(other_mean, same_mean)
    intra_sum = np.bincount(labels, weights=own, minlength=num_classes)
    inter_sum = np.bincount(labels, weights=other, minlength=num_classes)
    intra_pairs = counts * (counts - 1)
    inter_pairs = counts * (n - counts)
    intra = np.where(intra_pairs > 0, intra_sum / np.maximum(intra_pairs, 1), np.nan)
    inter = np.where(inter_pairs > 0, inter_sum / np.maximum(inter_pairs, 1), np.nan)
    return RatioResult(_ratio(inter, intra), per_sample, intra, inter, counts.astype(np.int64))


def discriminant_ratios(features, labels, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(per_class (C,), per_sample (N,)) linear discriminant ratios; see the module docstring for the
    formula. kwargs: num_classes, normalize (default True), chunk, device, progress."""
    result = discriminant_details(features, labels, **kwargs)
    return result.per_class, result.per_sample


def summarize(values) -> dict:
    """mean, median, min, max over the finite values; counts of finite, undefined (NaN) and +inf."""
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    stats = {"count": int(len(finite)), "undefined": int(np.isnan(values).sum()),
             "infinite": int(np.isinf(values).sum())}
    if len(finite):
        stats.update(mean=float(finite.mean()), median=float(np.median(finite)), min=float(finite.min()),
                     max=float(finite.max()))
    else:
        stats.update(mean=None, median=None, min=None, max=None)
    return stats


def _number(value: float) -> float | str | None:
    """JSON-safe: NaN -> None, inf -> 'inf'."""
    value = float(value)
    if np.isnan(value):
        return None
    return "inf" if np.isinf(value) else value


# ------------------------------------------------------------------------------------------------
# The stage.


def run_ratios(
    items: list[str], *, normalize: bool = True, distance_batch: int = 1024, arch: str = "resnet18",
    width: float = 1.0, stem: str = "cifar", batch_size: int = 256, precision: str = "bf16",
    limit_train: int | None = None, limit_test: int | None = None, image_size: int | None = None,
    workdir: Path = options.DEFAULT_WORKDIR, name: str | None = None, seed: int = 0, device: str = "auto",
    force: bool = False, quiet: bool = False, skip_bad: bool = False, crop_fraction: str = "auto",
    workers: int | None = None,
) -> Artifact:
    """Linear discriminant ratios of one or more encoders on one dataset's test split -> `ratios` artifact."""
    check_common(batch_size, precision)
    if distance_batch < 1:
        raise RelicError(f"--distance-batch must be at least 1, got {distance_batch}")
    workdir = Path(workdir)
    prep = prepare_inputs(items, kind="ratios", name=name, workdir=workdir, force=force, arch=arch,
                          width=width, stem=stem, seed=seed, limit_train=limit_train, limit_test=limit_test,
                          image_size=image_size, device=device, skip_bad=skip_bad)
    dataset, names = prep.dataset, prep.dataset.class_names
    labels = dataset.test.labels
    present = np.unique(labels)
    if len(present) < 2:
        raise RelicError(f"the test split holds {len(present)} class(es); the ratio needs at least 2 "
                         "(raise --limit-test?)")
    t0 = time.perf_counter()
    fraction = crop_fraction_for(crop_fraction, dataset)
    fkw = dict(device=prep.device, batch_size=batch_size, precision=precision, workdir=workdir, quiet=quiet,
               crop_fraction=fraction, workers=workers)
    results, parents = [], []
    for encoder in prep.encoders:
        test = encoder_features(encoder, dataset, "test", **fkw)
        parents.append(test.artifact)
        with options.progress_bar(quiet) as progress:
            result = discriminant_details(test.features, labels, num_classes=dataset.num_classes,
                                          normalize=normalize, chunk=distance_batch, device=prep.device,
                                          progress=progress)
        results.append((encoder, result, int(test.features.shape[1])))
    seconds = time.perf_counter() - t0

    per_encoder = {encoder.label: _encoder_metrics(r, dim, names, present) for encoder, r, dim in results}
    ranked = [label for label in per_encoder if per_encoder[label]["ratio_median"] is not None]
    best = max(ranked, key=lambda label: per_encoder[label]["ratio_median"]) if ranked else None
    metrics = {"best_encoder": best, "best_median": per_encoder[best]["ratio_median"] if best else None,
               "normalize": normalize, "classes": len(present), "images": int(len(labels)),
               "encoders": per_encoder, "seconds": round(seconds, 2)}
    config = {"encoders": [e.record for e in prep.encoders],
              "encoder_labels": [e.label for e in prep.encoders],
              "spec": prep.spec, "split": "test", "normalize": normalize,
              "distance": "L2 on L2-normalised features" if normalize else "L2 on raw features",
              "ratio": "mean inter-class distance / mean intra-class distance (self pairs excluded)",
              "distance_batch": distance_batch, "batch_size": batch_size, "precision": precision,
              "limit_train": limit_train, "limit_test": limit_test, "image_size": image_size, "seed": seed,
              "crop_fraction": fraction, "device": prep.device.type, "class_names": names}
    from relicv2_cli.report import ratios_figure, save_figure

    with Staging(workdir, "ratios", prep.name, force=force) as staging:
        _write_numbers(staging.dir / NUMBERS_FILE, results, names, normalize, config["ratio"], labels)
        series = [{"label": encoder.label, "per_class": r.per_class, "per_sample": r.per_sample,
                   "counts": r.counts, "feature_dim": dim} for encoder, r, dim in results]
        figure = ratios_figure(series, class_names=names, normalize=normalize,
                               title=f"Linear discriminant ratio on {prep.spec} (test split, "
                                     f"{len(labels):,} images)")
        save_figure(figure, staging.dir, FIGURE_STEM)
        art = staging.commit(config=config, parents=unique_parents(parents), dataset=dataset.record(),
                             metrics=metrics)
    if not quiet:
        options.console.print(ratios_table(per_encoder, prep.name, normalize))
    return art


def _encoder_metrics(r: RatioResult, dim: int, names: list[str], present: np.ndarray) -> dict:
    by_class, by_sample = summarize(r.per_class), summarize(r.per_sample)
    return {
        "ratio_mean": by_class["mean"], "ratio_median": by_class["median"],
        "sample_ratio_mean": by_sample["mean"], "sample_ratio_median": by_sample["median"],
        "per_class": {names[c]: _number(r.per_class[c]) for c in present},
        "intra": {names[c]: _number(r.intra[c]) for c in present},
        "inter": {names[c]: _number(r.inter[c]) for c in present},
        "undefined_classes": [names[c] for c in present if np.isnan(r.per_class[c])],
        "infinite_classes": [names[c] for c in present if np.isinf(r.per_class[c])],
        "undefined_samples": by_sample["undefined"], "feature_dim": dim,
    }


def _write_numbers(path: Path, results: list, names: list[str], normalize: bool, formula: str,
                   labels: np.ndarray) -> None:
    """ratios.h5: labels, and per encoder its per-class and per-image ratios and distances."""
    with h5py.File(path, "w") as f:
        f.attrs["class_names"] = list(names)
        f.attrs["normalize"] = normalize
        f.attrs["formula"] = formula
        f.create_dataset("labels", data=labels.astype(np.int64))
        for i, (encoder, r, dim) in enumerate(results):
            group = f.create_group(f"encoder_{i}")
            group.attrs["label"] = encoder.label
            group.attrs["feature_dim"] = dim
            for key in ("per_class", "per_sample", "intra", "inter", "counts"):
                group.create_dataset(key, data=getattr(r, key))


def ratios_table(per_encoder: dict, title: str, normalize: bool) -> Table:
    table = Table(title=f"linear discriminant ratio, inter / intra ({'normalised' if normalize else 'raw'} "
                        f"features): {title}")
    table.add_column("encoder")
    for column in ("dim", "class mean", "class median", "image median", "lowest / highest class"):
        table.add_column(column, justify="right")

    def fmt(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    for label, m in per_encoder.items():
        finite = {c: v for c, v in m["per_class"].items() if isinstance(v, float)}
        extremes = "-"
        if finite:
            low, high = min(finite, key=finite.get), max(finite, key=finite.get)
            extremes = f"{low} {finite[low]:.3f} / {high} {finite[high]:.3f}"
        table.add_row(label, str(m["feature_dim"]), fmt(m["ratio_mean"]), fmt(m["ratio_median"]),
                      fmt(m["sample_ratio_median"]), extremes)
    return table


def command(
    items: options.Items,
    normalize: options.Normalize = True,
    distance_batch: Annotated[int, typer.Option(
        help="Rows of the distance matrix computed at a time (memory: 24 bytes x rows x test).")] = 1024,
    arch: options.Arch = "resnet18",
    width: options.Width = 1.0,
    stem: options.Stem = "cifar",
    batch_size: options.EmbedBatch = 256,
    precision: options.Precision = "bf16",
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
    force: options.Force = False,
    quiet: options.Quiet = False,
) -> None:
    """Linear discriminant ratio per class and per image (inter / intra L2 distance), encoders on one
    figure."""
    art = run_ratios(items, normalize=normalize, distance_batch=distance_batch, arch=arch, width=width,
                     stem=stem,
                     batch_size=batch_size, precision=precision, limit_train=limit_train,
                     limit_test=limit_test,
                     image_size=image_size, workdir=workdir, name=name, seed=seed, device=device, force=force,
                     quiet=quiet, skip_bad=skip_bad, crop_fraction=crop_fraction, workers=workers)
    options.finish(art.path)
