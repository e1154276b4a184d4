"""`relicv2 analyze neighbors`: nearest-neighbour structure of frozen representations (method.md 6).

For a few chosen classes (default: two pairs of look-alike classes, e.g. CIFAR-10 cat/dog and
automobile/truck), the first `--per-class` test images of each class are the *anchors*. Every
anchor's `--k` nearest neighbours are found by L2 distance on the encoder's cached centre-view
features (stages/features.py). The features are L2-normalised first (default; `--no-normalize`
uses raw features), so the distance is the chord distance sqrt(2 - 2 cos), a monotone function of
the cosine similarity that lies in [0, 2] for every encoder, whatever its width or scale:

- `--pool selected` (default, the paper's figure): neighbours are searched among the anchors
  themselves (the anchor excluded). The figure is an anchor x pool matrix, rows and columns
  ordered by class, a cell coloured by the distance when the column image is one of the row
  image's k nearest neighbours and blank otherwise: a representation that keeps the chosen
  classes apart shows a block-diagonal structure.
- `--pool test`: neighbours are searched in the whole test split (the anchor excluded). The figure
  is an anchor x neighbour-rank matrix coloured by distance; a cross marks a neighbour of another
  class.

Ties in distance go to the lower index (stable sort), so results are deterministic.

Numbers: neighbour class agreement = the share of an anchor's k neighbours that have the anchor's
class, averaged over the anchors of a class (per class) and over all anchors (overall); and the
weighted kNN top-1 accuracy of the usual SSL protocol on the whole test split with the training
split as memory (knn.py: cosine similarity, k=20, temperature 0.07, votes exp(sim / T)).

The pure functions (`resolve_classes`, `select_anchors`, `pairwise_l2`, `nearest_neighbours`,
`neighbour_agreement`) are unit-tested on hand-made clusters; `prepare_inputs` and `encoder_features`
are shared with the ratios stage.
"""

from __future__ import annotations

import hashlib
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
from relicv2_cli.artifacts import Artifact, Staging
from relicv2_cli.data import SPEC_KINDS, Dataset, load_dataset
from relicv2_cli.encoders import Encoder, load_encoder, slugify
from relicv2_cli.errors import RelicError
from relicv2_cli.knn import knn_accuracy
from relicv2_cli.stages.features import PRECISIONS, FeatureSet, split_features
from relicv2_cli.stages.linear import ArchOpt, PrecisionOpt, StemOpt, WidthOpt, check_fresh, spec_slug
from relicv2_cli.stages.transfer import is_dataset_spec

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


def l2_normalize(features) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), float64."""
    x = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def pairwise_l2(a, b, device: str | torch.device = "cpu") -> torch.Tensor:
    """Euclidean distances (len(a), len(b)) in float64: sqrt(max(|a|^2 + |b|^2 - 2 a.b, 0))."""
    a = torch.as_tensor(a, dtype=torch.float64, device=device)
    b = torch.as_tensor(b, dtype=torch.float64, device=device)
    sq = torch.addmm((a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :], a, b.T, alpha=-2.0)
    return sq.clamp_(min=0).sqrt_()


def nearest_neighbours(
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
        raise RelicError(f"k={k} nearest neighbours asked for, but the pool has {available} candidate(s)")
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
    overall: float  # mean over anchors of the share of their neighbours in their class
    per_class: dict[int, float]  # the same, over the anchors of each class
    per_anchor: np.ndarray  # (Q,) share per anchor


def neighbour_agreement(anchor_labels, neighbour_labels) -> Agreement:
    """Share of each anchor's neighbours that carry the anchor's label: per anchor, averaged per
    class (classes in order of first appearance) and over all anchors."""
    anchor_labels = np.asarray(anchor_labels)
    neighbour_labels = np.asarray(neighbour_labels)
    if neighbour_labels.ndim != 2 or len(neighbour_labels) != len(anchor_labels) or len(anchor_labels) == 0:
        raise RelicError(f"neighbour labels {neighbour_labels.shape} do not match {len(anchor_labels)} anchors")
    share = (neighbour_labels == anchor_labels[:, None]).mean(1)
    classes = list(dict.fromkeys(anchor_labels.tolist()))
    per_class = {int(c): float(share[anchor_labels == c].mean()) for c in classes}
    return Agreement(float(share.mean()), per_class, share)


def neighbour_matrix(neighbours: np.ndarray, distances: np.ndarray, size: int) -> np.ndarray:
    """(Q, size) float matrix: the distance at each (anchor, neighbour) cell, NaN elsewhere."""
    out = np.full((len(neighbours), size), np.nan)
    rows = np.repeat(np.arange(len(neighbours)), neighbours.shape[1])
    out[rows, neighbours.ravel()] = distances.ravel()
    return out


# ------------------------------------------------------------------------------------------------
# Shared by the analysis stages: parse ENCODER... SPEC, load them, get cached features.


def parse_items(items: list[str]) -> tuple[list[str], str]:
    """ENCODER [ENCODER ...] SPEC: the last item is the dataset, every other one an encoder."""
    if len(items) < 2:
        raise RelicError("give one or more ENCODERs and then a dataset SPEC: ENCODER [ENCODER ...] SPEC")
    *encoders, spec = items
    if not is_dataset_spec(spec):
        raise RelicError(f"the last argument must be a dataset SPEC ({', '.join(SPEC_KINDS)}), got {spec!r}")
    extra = [e for e in encoders if is_dataset_spec(e)]
    if extra:
        raise RelicError(f"one dataset SPEC only, as the last argument; also got {', '.join(extra)}")
    return encoders, spec


def load_encoders(specs: list[str], *, arch: str, width: float, stem: str, seed: int) -> list[Encoder]:
    encoders = [load_encoder(e, arch=arch, width=width, stem=stem, seed=seed) for e in specs]
    labels = [e.label for e in encoders]
    if len(set(labels)) != len(labels):
        raise RelicError(f"an encoder is listed twice: {', '.join(labels)}")
    return encoders


def default_name(encoders: list[Encoder], spec: str, suffix: str = "") -> str:
    base = "+".join(e.slug for e in encoders) + "-" + spec_slug(spec) + suffix
    if len(base) > 80:
        base = base[:60] + "-" + hashlib.sha256(base.encode()).hexdigest()[:8]
    return slugify(base, 100)


def check_common(batch_size: int, precision: str) -> None:
    options.check_choice("--precision", precision, PRECISIONS)
    if batch_size <= 0:
        raise RelicError(f"--batch-size must be positive, got {batch_size}")


@dataclass
class Prepared:
    encoders: list[Encoder]
    dataset: Dataset
    spec: str
    name: str
    device: torch.device


def prepare_inputs(
    items: list[str], *, kind: str, name: str | None, workdir: Path, force: bool, arch: str, width: float,
    stem: str, seed: int, limit_train: int | None, limit_test: int | None, image_size: int | None,
    device: str, name_suffix: str = "",
) -> Prepared:
    """Every check that needs no features: encoders, dataset, device, and a free output name."""
    encoder_specs, spec = parse_items(items)
    encoders = load_encoders(encoder_specs, arch=arch, width=width, stem=stem, seed=seed)
    dataset = load_dataset(spec, limit_train=limit_train, limit_test=limit_test, image_size=image_size, seed=seed)
    name = name or default_name(encoders, spec, name_suffix)
    check_fresh(Path(workdir), kind, name, force)
    return Prepared(encoders, dataset, spec, name, options.resolve_device(device))


def encoder_features(
    encoder: Encoder, dataset: Dataset, split: str, *, device, batch_size: int, precision: str, workdir: Path,
    quiet: bool,
) -> FeatureSet:
    """The encoder's cached features of one split (computed once, shared with the eval stages)."""
    return split_features(encoder, dataset, split, device=device, batch_size=batch_size, precision=precision,
                          workdir=Path(workdir), quiet=quiet)


def unique_parents(parents: list[Artifact]) -> list[Artifact]:
    return list({p.path.resolve(): p for p in parents}.values())


# ------------------------------------------------------------------------------------------------
# The stage.


def run_neighbors(
    items: list[str], *, classes: str | None = None, per_class: int = 50, k: int = 5, pool: str = "selected",
    normalize: bool = True, knn: bool = True, knn_k: int = KNN_K, knn_temperature: float = KNN_TEMPERATURE,
    arch: str = "resnet18", width: float = 1.0, stem: str = "cifar", batch_size: int = 256,
    precision: str = "bf16", limit_train: int | None = None, limit_test: int | None = None,
    image_size: int | None = None, workdir: Path = options.DEFAULT_WORKDIR, name: str | None = None, seed: int = 0,
    device: str = "auto", force: bool = False, quiet: bool = False,
) -> Artifact:
    """Nearest-neighbour analysis of one or more encoders on one dataset -> a `neighbors` artifact."""
    options.check_choice("--pool", pool, POOLS)
    check_common(batch_size, precision)
    for flag, value in (("--per-class", per_class), ("--k", k), ("--knn-k", knn_k)):
        if value < 1:
            raise RelicError(f"{flag} must be at least 1, got {value}")
    if not knn_temperature > 0:
        raise RelicError(f"--knn-temperature must be positive, got {knn_temperature}")
    workdir = Path(workdir)
    prep = prepare_inputs(items, kind="neighbors", name=name, workdir=workdir, force=force, arch=arch, width=width,
                          stem=stem, seed=seed, limit_train=limit_train, limit_test=limit_test,
                          image_size=image_size, device=device)
    dataset, names = prep.dataset, prep.dataset.class_names
    class_ids = resolve_classes(names, classes)
    test_labels = dataset.test.labels
    anchors, available = select_anchors(test_labels, class_ids, per_class, names)
    notes = [f"--per-class {per_class} capped to {n} for class {names[c]!r} (all its test images)"
             for c, n in available.items() if n < per_class]
    anchor_labels = test_labels[anchors]
    pool_size = len(anchors) if pool == "selected" else len(test_labels)
    if k > pool_size - 1:
        if pool_size < 2:
            raise RelicError(f"the pool holds {pool_size} image(s); nearest neighbours need at least 2")
        notes.append(f"--k {k} capped to {pool_size - 1} (the pool holds {pool_size} images)")
        k = pool_size - 1
    for note in notes:
        options.console.print(f"[yellow]note:[/] {note}")

    t0 = time.perf_counter()
    fkw = dict(device=prep.device, batch_size=batch_size, precision=precision, workdir=workdir, quiet=quiet)
    results, parents = [], []
    for encoder in prep.encoders:
        test = encoder_features(encoder, dataset, "test", **fkw)
        parents.append(test.artifact)
        feats = l2_normalize(test.features) if normalize else test.features.astype(np.float64)
        if pool == "selected":
            nbr_local, dist = nearest_neighbours(feats[anchors], feats[anchors], k,
                                                 exclude=np.arange(len(anchors)), device=prep.device)
            nbr_index = anchors[nbr_local]
            matrix = neighbour_matrix(nbr_local, dist, len(anchors))
        else:
            nbr_index, dist = nearest_neighbours(feats[anchors], feats, k, exclude=anchors, device=prep.device)
            matrix = dist
        nbr_labels = test_labels[nbr_index]
        agreement = neighbour_agreement(anchor_labels, nbr_labels)
        knn_top1 = None
        if knn:
            train = encoder_features(encoder, dataset, "train", **fkw)
            parents.append(train.artifact)
            knn_top1 = knn_accuracy(torch.from_numpy(train.features), train.labels, torch.from_numpy(test.features),
                                    test.labels, dataset.num_classes, k=knn_k, temperature=knn_temperature)
        results.append({"encoder": encoder, "neighbours": nbr_index, "distances": dist, "matrix": matrix,
                        "neighbour_labels": nbr_labels, "agreement": agreement, "knn_top1": knn_top1,
                        "feature_dim": int(test.features.shape[1])})
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
    config = {"encoders": [e.record for e in prep.encoders], "encoder_labels": [e.label for e in prep.encoders],
              "spec": prep.spec, "classes": [names[c] for c in class_ids], "class_ids": class_ids,
              "per_class": per_class, "k": k, "pool": pool, "normalize": normalize,
              "distance": "L2 on L2-normalised features" if normalize else "L2 on raw features",
              "anchor_selection": "first N test images of each class, dataset order",
              "knn": {"enabled": knn, "k": knn_k, "temperature": knn_temperature, "similarity": "cosine",
                      "memory": "train split", "queries": "whole test split"},
              "batch_size": batch_size, "precision": precision, "limit_train": limit_train,
              "limit_test": limit_test, "image_size": image_size, "seed": seed, "device": prep.device.type,
              "class_names": names}
    numbers = {
        "class_names": names, "classes": [names[c] for c in class_ids], "pool": pool, "k": k,
        "normalize": normalize, "anchors": anchors.tolist(), "anchor_labels": anchor_labels.tolist(),
        "encoders": [
            {"label": r["encoder"].label, "feature_dim": r["feature_dim"], "neighbours": r["neighbours"].tolist(),
             "distances": np.round(r["distances"], 6).tolist(), "neighbour_labels": r["neighbour_labels"].tolist(),
             "agreement": r["agreement"].overall, "agreement_per_anchor": r["agreement"].per_anchor.tolist(),
             "knn_top1": r["knn_top1"]}
            for r in results
        ],
    }
    from relicv2_cli.report import neighbours_figure, save_figure

    with Staging(workdir, "neighbors", prep.name, force=force) as staging:
        (staging.dir / NUMBERS_FILE).write_text(json.dumps(numbers) + "\n")
        panels = [{"label": r["encoder"].label, "matrix": r["matrix"], "neighbour_labels": r["neighbour_labels"],
                   "agreement": r["agreement"].overall, "knn_top1": r["knn_top1"], "feature_dim": r["feature_dim"]}
                  for r in results]
        figure = neighbours_figure(panels, anchor_labels=anchor_labels, class_names=names, pool=pool, k=k,
                                   normalize=normalize, title=f"{k} nearest neighbours on {prep.spec} (test split)")
        # A pool of more than ~100 images needs more pixels per cell to stay legible.
        save_figure(figure, staging.dir, FIGURE_STEM, dpi=190 if pool == "selected" and len(anchors) > 100 else 130)
        art = staging.commit(config=config, parents=unique_parents(parents), dataset=dataset.record(),
                             metrics=metrics)
    if not quiet:
        options.console.print(neighbours_table(per_encoder, [names[c] for c in class_ids], k, pool, prep.name))
    return art


def neighbours_table(per_encoder: dict, classes: list[str], k: int, pool: str, title: str) -> Table:
    table = Table(title=f"neighbour class agreement (k={k}, pool={pool}) and weighted kNN: {title}")
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


# ------------------------------------------------------------------------------------------------
# Typer declarations, shared with the ratios stage.

ItemsArg = Annotated[list[str], typer.Argument(
    help="ENCODER [ENCODER ...] SPEC: one or more encoders (pretrain artifact, random:ARCH, torchvision:FILE), "
         "then the dataset (synthetic, cifar10:DIR, ...).", metavar="ENCODER... SPEC", show_default=False)]
NormalizeOpt = Annotated[bool, typer.Option(
    "--normalize/--no-normalize",
    help="L2-normalise features before distances, so encoders of any width/scale compare.")]
BatchSizeOpt = Annotated[int, typer.Option(help="Images per forward pass when features are computed.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing artifact of the same name.")]
NameOpt = Annotated[str | None, typer.Option(help="Artifact name (default: ENCODERS-DATASET, encoders joined by +).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of random: encoders and of the synthetic data.")]


def command(
    items: ItemsArg,
    classes: Annotated[str | None, typer.Option(help="Comma list of class names (or ids) to show; default: two look-alike pairs when the dataset has them (CIFAR-10: cat,dog,automobile,truck), else the first four.")] = None,
    per_class: Annotated[int, typer.Option(help="Test images per chosen class, the first N in dataset order; capped, with a note, at what a class has (the paper: 50).")] = 50,
    k: Annotated[int, typer.Option("--k", help="Nearest neighbours per image (the paper: 5).")] = 5,
    pool: Annotated[str, typer.Option(help="Where neighbours are searched: selected (the chosen images; image x image figure, block-diagonal when classes separate) or test (the whole test split; image x rank figure).")] = "selected",
    normalize: NormalizeOpt = True,
    knn: Annotated[bool, typer.Option("--knn/--no-knn", help="Also report weighted kNN top-1 on the whole test split, train split as memory (needs train features).")] = True,
    knn_k: Annotated[int, typer.Option(help="kNN: neighbours that vote (the usual SSL protocol: 20).")] = KNN_K,
    knn_temperature: Annotated[float, typer.Option(help="kNN: temperature of the exp(cosine / T) votes (the usual SSL protocol: 0.07).")] = KNN_TEMPERATURE,
    arch: ArchOpt = "resnet18",
    width: WidthOpt = 1.0,
    stem: StemOpt = "cifar",
    batch_size: BatchSizeOpt = 256,
    precision: PrecisionOpt = "bf16",
    limit_train: options.LimitTrain = None,
    limit_test: options.LimitTest = None,
    image_size: options.ImageSize = None,
    workdir: options.Workdir = options.DEFAULT_WORKDIR,
    name: NameOpt = None,
    seed: SeedOpt = 0,
    device: options.Device = "auto",
    force: ForceOpt = False,
    quiet: options.Quiet = False,
) -> None:
    """Nearest neighbours of a few classes' test images, side by side per encoder, + agreement and kNN."""
    art = run_neighbors(items, classes=classes, per_class=per_class, k=k, pool=pool, normalize=normalize, knn=knn,
                        knn_k=knn_k, knn_temperature=knn_temperature, arch=arch, width=width, stem=stem,
                        batch_size=batch_size, precision=precision, limit_train=limit_train, limit_test=limit_test,
                        image_size=image_size, workdir=workdir, name=name, seed=seed, device=device, force=force,
                        quiet=quiet)
    options.finish(art.path)
