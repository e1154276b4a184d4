"""`relicv2 analyze neighbors`: nearest-neighbor structure of frozen representations (method.md 6).

For a few chosen classes (default: two pairs of look-alike classes, e.g. CIFAR-10 cat/dog and
automobile/truck), the first `--per-class` test images of each class are the *anchors*. Every
anchor's `--k` nearest neighbors are found by L2 distance on the encoder's cached centre-view
features (relicv2_cli/features.py). The features are L2-normalised first (default; `--no-normalize`
uses raw features), so the distance is the chord distance sqrt(2 - 2 cos), a monotone function of
the cosine similarity that lies in [0, 2] for every encoder, whatever its width or scale:

- `--pool selected` (default, the paper's figure): neighbors are searched among the anchors
  themselves (the anchor excluded). The figure is an anchor x pool matrix, rows and columns
  ordered by class, a cell coloured by the distance when the column image is one of the row
  image's k nearest neighbors and blank otherwise: a representation that keeps the chosen
  classes apart shows a block-diagonal structure.
- `--pool test`: neighbors are searched in the whole test split (the anchor excluded). The figure
  is an anchor x neighbor-rank matrix coloured by distance; a cross marks a neighbor of another
  class.

Ties in distance go to the lower index (stable sort), so results are deterministic.

Numbers: neighbor class agreement = the share of an anchor's k neighbors that have the anchor's
class, averaged over the anchors of a class (per class) and over all anchors (overall); and the
weighted kNN top-1 accuracy of the usual SSL protocol on the whole test split with the training
split as memory (knn.py: cosine similarity, k=20, temperature 0.07, votes exp(sim / T)).

The pure functions (`resolve_classes`, `select_anchors`, `nearest_neighbors`, `neighbor_agreement`)
are unit-tested on hand-made clusters; what the ratios stage shares with this one is in analysis.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

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
from relicv2_cli.knn import knn_accuracy

POOLS = ("selected", "test")
NUMBERS_FILE = "neighbors.json"
FIGURE_STEM = "neighbors"
KNN_K = 20
KNN_TEMPERATURE = 0.07

# Pairs of classes that look alike, per known dataset; the default choice takes the first two pairs
# whose classes all exist in the dataset (CIFAR-10: cat/dog and automobile/truck).
LOOKALIKE_PAIRS = (
    ("cat", "dog"), ("automobile", "truck"),  # CIFAR-10
    ("leopard", "tiger"), ("maple_tree", "oak_tree"),  # CIFAR-100
    ("t-shirt/top", "shirt"), ("sneaker", "ankle boot"),  # Fashion-MNIST
    ("circle", "ring"), ("star", "cross"),  # synthetic
)


# ------------------------------------------------------------------------------------------------
# Pure functions.


def resolve_classes(class_names: list[str], text: str | None) -> list[int]:
    """Class ids from a comma list of names (or ids); None picks the default four.

    Default: the first two LOOKALIKE_PAIRS whose classes all exist, else the first four classes
    (all of them when the dataset has fewer). Unknown names, duplicates and fewer than 2 classes
    are errors."""
    lower = {name.lower(): i for i, name in enumerate(class_names)}
    if text is None:
        chosen: list[int] = []
        for a, b in LOOKALIKE_PAIRS:
            if a in lower and b in lower and lower[a] not in chosen and lower[b] not in chosen:
                chosen += [lower[a], lower[b]]
            if len(chosen) == 4:
                break
        if len(chosen) < 4:
            chosen = list(range(min(4, len(class_names))))
        if len(chosen) < 2:
            raise RelicError(f"the dataset has {len(class_names)} class(es); the analysis needs at least 2")
        return chosen
    ids = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item.lower() in lower:
            ids.append(lower[item.lower()])
        elif item.isdigit() and int(item) < len(class_names):
            ids.append(int(item))
        else:
            raise RelicError(f"unknown class {item!r} in --classes; valid classes: {', '.join(class_names)}")
    if len(set(ids)) != len(ids):
        raise RelicError(f"--classes lists a class twice: {text!r}")
    if len(ids) < 2:
        raise RelicError(f"--classes needs at least 2 classes, got {len(ids)} ({text!r})")
    return ids


def select_anchors(
    labels: np.ndarray, class_ids: list[int], per_class: int, class_names: list[str] | None = None,
) -> tuple[np.ndarray, dict[int, int]]:
    """The first `per_class` images of each class, in dataset order, grouped by class in the order of
    `class_ids`. Returns (indices, {class: available}) so a caller can report capped classes; a class
    without any image is an error."""
    labels = np.asarray(labels)
    chosen, available = [], {}
    for c in class_ids:
        members = np.flatnonzero(labels == c)
        available[c] = len(members)
        if len(members) == 0:
            name = repr(class_names[c]) if class_names else str(c)
            raise RelicError(f"class {name} has no image in the test split (raise --limit-test?)")
        chosen.append(members[:per_class])
    return np.concatenate(chosen).astype(np.int64), available


def nearest_neighbors(
    queries, pool, k: int, *, exclude=None, chunk: int = 1024, device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Indices into `pool` and distances (Q, k) of each query's k nearest pool points (L2).

    `exclude[q]` is a pool index that query q may not pick (itself, when the queries are part of the
    pool; -1 for none). Ties go to the lower pool index. k larger than the pool (less the excluded
    point) is an error."""
    queries = np.asarray(queries, dtype=np.float64)
    pool = np.asarray(pool, dtype=np.float64)
    available = len(pool) - (1 if exclude is not None else 0)
    if k < 1 or k > available:
        raise RelicError(f"k={k} nearest neighbors asked for, but the pool has {available} candidate(s)")
    pool_t = torch.as_tensor(pool, device=device)
    idx_out, dist_out = [], []
    for start in range(0, len(queries), chunk):
        d = pairwise_l2(queries[start : start + chunk], pool_t, device)
        if exclude is not None:
            ex = torch.as_tensor(np.asarray(exclude)[start : start + chunk], device=device)
            rows = torch.nonzero(ex >= 0).flatten()
            d[rows, ex[rows]] = float("inf")
        order = torch.sort(d, dim=1, stable=True).indices[:, :k]
        idx_out.append(order.cpu())
        dist_out.append(torch.gather(d, 1, order).cpu())
    return torch.cat(idx_out).numpy(), torch.cat(dist_out).numpy()


@dataclass
class Agreement:
    overall: float  # mean over anchors of the share of their neighbors in their class
    per_class: dict[int, float]  # the same, over the anchors of each class
    per_anchor: np.ndarray  # (Q,) share per anchor


def neighbor_agreement(anchor_labels, neighbor_labels) -> Agreement:
    """Share of each anchor's neighbors that carry the anchor's label: per anchor, averaged per
    class (classes in order of first appearance) and over all anchors."""
    anchor_labels = np.asarray(anchor_labels)
    neighbor_labels = np.asarray(neighbor_labels)
    if neighbor_labels.ndim != 2 or len(neighbor_labels) != len(anchor_labels) or len(anchor_labels) == 0:
        raise RelicError(f"neighbor labels {neighbor_labels.shape} do not match {len(anchor_labels)} anchors")
    share = (neighbor_labels == anchor_labels[:, None]).mean(1)
    classes = list(dict.fromkeys(anchor_labels.tolist()))
    per_class = {int(c): float(share[anchor_labels == c].mean()) for c in classes}
    return Agreement(float(share.mean()), per_class, share)


def neighbor_matrix(neighbors: np.ndarray, distances: np.ndarray, size: int) -> np.ndarray:
    """(Q, size) float matrix: the distance at each (anchor, neighbor) cell, NaN elsewhere."""
    out = np.full((len(neighbors), size), np.nan)
    rows = np.repeat(np.arange(len(neighbors)), neighbors.shape[1])
    out[rows, neighbors.ravel()] = distances.ravel()
    return out


# ------------------------------------------------------------------------------------------------
# The stage.


def run_neighbors(
    items: list[str], *, classes: str | None = None, per_class: int = 50, k: int = 5, pool: str = "selected",
    normalize: bool = True, knn: bool = True, knn_k: int = KNN_K, knn_temperature: float = KNN_TEMPERATURE,
    arch: str = "resnet18", width: float = 1.0, stem: str = "cifar", batch_size: int = 256,
    precision: str = "bf16", limit_train: int | None = None, limit_test: int | None = None,
    image_size: int | None = None, workdir: Path = options.DEFAULT_WORKDIR, name: str | None = None,
    seed: int = 0, skip_bad: bool = False, crop_fraction: str = "auto", workers: int | None = None,
    device: str = "auto", force: bool = False, quiet: bool = False,
) -> Artifact:
    """Nearest-neighbor analysis of one or more encoders on one dataset -> a `neighbors` artifact."""
    options.check_choice("--pool", pool, POOLS)
    check_common(batch_size, precision)
    for flag, value in (("--per-class", per_class), ("--k", k), ("--knn-k", knn_k)):
        if value < 1:
            raise RelicError(f"{flag} must be at least 1, got {value}")
    if not knn_temperature > 0:
        raise RelicError(f"--knn-temperature must be positive, got {knn_temperature}")
    workdir = Path(workdir)
    prep = prepare_inputs(items, kind="neighbors", name=name, workdir=workdir, force=force, arch=arch,
                          width=width,
                          stem=stem, seed=seed, limit_train=limit_train, limit_test=limit_test,
                          image_size=image_size, device=device, skip_bad=skip_bad)
    dataset, names = prep.dataset, prep.dataset.class_names
    class_ids = resolve_classes(names, classes)
    anchors, available, k, notes = _anchors(dataset.test.labels, class_ids, per_class, names, pool, k)
    anchor_labels = dataset.test.labels[anchors]

    t0 = time.perf_counter()
    fraction = crop_fraction_for(crop_fraction, dataset)
    fkw = dict(device=prep.device, batch_size=batch_size, precision=precision, workdir=workdir, quiet=quiet,
               crop_fraction=fraction, workers=workers)
    results, parents = [], []
    for encoder in prep.encoders:
        result, used = _analyse_encoder(encoder, dataset, anchors, pool=pool, k=k, normalize=normalize,
                                        knn=knn, knn_k=knn_k, knn_temperature=knn_temperature, fkw=fkw)
        results.append(result)
        parents.extend(used)
    seconds = time.perf_counter() - t0

    per_encoder = {
        r["encoder"].label: {
            "agreement": r["agreement"].overall,
            "agreement_per_class": {names[c]: v for c, v in r["agreement"].per_class.items()},
            "knn_top1": r["knn_top1"],
            "feature_dim": r["feature_dim"],
        }
        for r in results
    }
    best = max(per_encoder, key=lambda label: per_encoder[label]["agreement"])
    counts = {names[c]: int(min(per_class, n)) for c, n in available.items()}
    metrics = {"k": k, "pool": pool, "best_encoder": best, "best_agreement": per_encoder[best]["agreement"],
               "classes": [names[c] for c in class_ids], "anchors_per_class": counts, "encoders": per_encoder,
               "notes": notes, "seconds": round(seconds, 2)}
    config = _config(prep, names, class_ids, per_class, k, pool, normalize, knn, knn_k, knn_temperature,
                     batch_size, precision, limit_train, limit_test, image_size, seed)
    config["crop_fraction"] = fraction
    numbers = _numbers(results, names, class_ids, pool, k, normalize, anchors, anchor_labels)
    from relicv2_cli.report import neighbors_figure, save_figure

    with Staging(workdir, "neighbors", prep.name, force=force) as staging:
        (staging.dir / NUMBERS_FILE).write_text(json.dumps(numbers) + "\n")
        panels = [{"label": r["encoder"].label, "matrix": r["matrix"],
                   "neighbour_labels": r["neighbour_labels"],
                   "agreement": r["agreement"].overall, "knn_top1": r["knn_top1"],
                   "feature_dim": r["feature_dim"]}
                  for r in results]
        figure = neighbors_figure(panels, anchor_labels=anchor_labels, class_names=names, pool=pool, k=k,
                                   normalize=normalize,
                                   title=f"{k} nearest neighbors on {prep.spec} (test split)")
        # A pool of more than ~100 images needs more pixels per cell to stay legible.
        save_figure(figure, staging.dir, FIGURE_STEM,
                    dpi=190 if pool == "selected" and len(anchors) > 100 else 130)
        art = staging.commit(config=config, parents=unique_parents(parents), dataset=dataset.record(),
                             metrics=metrics)
    if not quiet:
        options.console.print(neighbors_table(per_encoder, [names[c] for c in class_ids], k, pool, prep.name))
    return art


def _anchors(test_labels, class_ids, per_class, names, pool, k):
    """(anchors, images available per class, k capped to the pool, notes printed about the caps)."""
    anchors, available = select_anchors(test_labels, class_ids, per_class, names)
    notes = [f"--per-class {per_class} capped to {n} for class {names[c]!r} (all its test images)"
             for c, n in available.items() if n < per_class]
    pool_size = len(anchors) if pool == "selected" else len(test_labels)
    if k > pool_size - 1:
        if pool_size < 2:
            raise RelicError(f"the pool holds {pool_size} image(s); nearest neighbors need at least 2")
        notes.append(f"--k {k} capped to {pool_size - 1} (the pool holds {pool_size} images)")
        k = pool_size - 1
    for note in notes:
        options.console.print(f"[yellow]note:[/] {note}")
    return anchors, available, k, notes


def _analyse_encoder(encoder, dataset, anchors, *, pool, k, normalize, knn, knn_k, knn_temperature, fkw):
    """One encoder's neighbors of the anchors, their agreement and (with `knn`) the kNN accuracy;
    returns the result and the features artifacts it used."""
    test_labels = dataset.test.labels
    test = encoder_features(encoder, dataset, "test", **fkw)
    parents = [test.artifact]
    feats = l2_normalize(test.features) if normalize else test.features.astype(np.float64)
    if pool == "selected":
        nbr_local, dist = nearest_neighbors(feats[anchors], feats[anchors], k,
                                            exclude=np.arange(len(anchors)), device=fkw["device"])
        nbr_index = anchors[nbr_local]
        matrix = neighbor_matrix(nbr_local, dist, len(anchors))
    else:
        nbr_index, dist = nearest_neighbors(feats[anchors], feats, k, exclude=anchors, device=fkw["device"])
        matrix = dist
    nbr_labels = test_labels[nbr_index]
    agreement = neighbor_agreement(test_labels[anchors], nbr_labels)
    knn_top1 = None
    if knn:
        train = encoder_features(encoder, dataset, "train", **fkw)
        parents.append(train.artifact)
        knn_top1 = knn_accuracy(torch.from_numpy(train.features), train.labels,
                                torch.from_numpy(test.features), test.labels, dataset.num_classes, k=knn_k,
                                temperature=knn_temperature)
    result = {"encoder": encoder, "neighbours": nbr_index, "distances": dist, "matrix": matrix,
              "neighbour_labels": nbr_labels, "agreement": agreement, "knn_top1": knn_top1,
              "feature_dim": int(test.features.shape[1])}
    return result, parents


def _config(prep, names, class_ids, per_class, k, pool, normalize, knn, knn_k, knn_temperature, batch_size,
            precision, limit_train, limit_test, image_size, seed) -> dict:
    config = {"encoders": [e.record for e in prep.encoders],
              "encoder_labels": [e.label for e in prep.encoders],
              "spec": prep.spec, "classes": [names[c] for c in class_ids], "class_ids": class_ids,
              "per_class": per_class, "k": k, "pool": pool, "normalize": normalize,
              "distance": "L2 on L2-normalised features" if normalize else "L2 on raw features",
              "anchor_selection": "first N test images of each class, dataset order",
              "knn": {"enabled": knn, "k": knn_k, "temperature": knn_temperature, "similarity": "cosine",
                      "memory": "train split", "queries": "whole test split"},
              "batch_size": batch_size, "precision": precision, "limit_train": limit_train,
              "limit_test": limit_test, "image_size": image_size, "seed": seed, "device": prep.device.type,
              "class_names": names}
    return config


def _numbers(results, names, class_ids, pool, k, normalize, anchors, anchor_labels) -> dict:
    """neighbors.json: anchors, and per encoder its neighbors, distances and agreement."""
    numbers = {
        "class_names": names, "classes": [names[c] for c in class_ids], "pool": pool, "k": k,
        "normalize": normalize, "anchors": anchors.tolist(), "anchor_labels": anchor_labels.tolist(),
        "encoders": [  # "neighbours", "neighbour_labels": the artifact's keys, spelled as when first written
            {"label": r["encoder"].label, "feature_dim": r["feature_dim"],
             "neighbours": r["neighbours"].tolist(),
             "distances": np.round(r["distances"], 6).tolist(),
             "neighbour_labels": r["neighbour_labels"].tolist(),
             "agreement": r["agreement"].overall, "agreement_per_anchor": r["agreement"].per_anchor.tolist(),
             "knn_top1": r["knn_top1"]}
            for r in results
        ],
    }
    return numbers


def neighbors_table(per_encoder: dict, classes: list[str], k: int, pool: str, title: str) -> Table:
    table = Table(title=f"neighbor class agreement (k={k}, pool={pool}) and weighted kNN: {title}")
    table.add_column("encoder")
    table.add_column("dim", justify="right")
    for c in classes:
        table.add_column(c, justify="right")
    table.add_column("overall", justify="right")
    table.add_column("kNN top-1", justify="right")
    for label, m in per_encoder.items():
        knn = "-" if m["knn_top1"] is None else f"{100 * m['knn_top1']:.2f}%"
        table.add_row(label, str(m["feature_dim"]), *(f"{m['agreement_per_class'][c]:.3f}" for c in classes),
                      f"{m['agreement']:.3f}", knn)
    return table


def command(
    items: options.Items,
    classes: Annotated[str | None, typer.Option(
        help="Comma list of class names (or ids) to show; default: two look-alike pairs when the dataset "
             "has them (CIFAR-10: cat,dog,automobile,truck), else the first four.")] = None,
    per_class: Annotated[int, typer.Option(
        help="Test images per chosen class, the first N in dataset order; capped, with a note, at what a "
             "class has.")] = 50,
    k: Annotated[int, typer.Option("--k", help="Nearest neighbors per image (the paper: 5).")] = 5,
    pool: Annotated[str, typer.Option(
        help="Where neighbors are searched: selected (the chosen images) or test (the whole test "
             "split).")] = "selected",
    normalize: options.Normalize = True,
    knn: Annotated[bool, typer.Option(
        "--knn/--no-knn",
        help="Also report weighted kNN top-1 on the whole test split, train split as memory (needs train "
             "features).")] = True,
    knn_k: Annotated[int, typer.Option(help="kNN: neighbors that vote.")] = KNN_K,
    knn_temperature: Annotated[float, typer.Option(
        help="kNN: temperature of the exp(cosine / T) votes.")] = KNN_TEMPERATURE,
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
    """Nearest neighbors of a few classes' test images, side by side per encoder, + agreement and kNN."""
    art = run_neighbors(items, classes=classes, per_class=per_class, k=k, pool=pool, normalize=normalize,
                        knn=knn,
                        knn_k=knn_k, knn_temperature=knn_temperature, arch=arch, width=width, stem=stem,
                        batch_size=batch_size, precision=precision, limit_train=limit_train,
                        limit_test=limit_test,
                        image_size=image_size, workdir=workdir, name=name, seed=seed, device=device,
                        force=force, skip_bad=skip_bad, crop_fraction=crop_fraction, workers=workers,
                        quiet=quiet)
    options.finish(art.path)
