"""`relicv2 eval linear`: linear evaluation of a frozen encoder (method.md section 6).

Two protocols:
- `cached` (default, fast): multinomial logistic regression on cached centre-view features
  (stages/features.py). Features are standardised with the mean/std of the data the classifier is
  fitted on. The L2 strength is chosen from a log-spaced grid on a class-stratified held-out part of
  the training split (or on the dataset's own validation split), then the classifier is refitted on
  the whole training split (train + held-out part) with that strength and scored on the test split.
  Full-batch L-BFGS (strong-Wolfe line search) in torch, fp32.
- `augment` (the paper's): SGD with Nesterov momentum on a linear layer over the frozen encoder
  (BN in eval mode), random-resized-crop + flip views, cosine schedule, no weight decay [byol];
  scored on the centre-view test features.

The solver is a set of pure functions (`fit_logistic`, `select_l2`, `linear_probe`, `score`), reused
by the transfer stage and by analysis stages.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import typer
from rich.table import Table
from safetensors.torch import save_file
from torch import nn

from relicv2_cli import options
from relicv2_cli.artifacts import Staging, artifact_path
from relicv2_cli.data import Dataset, load_dataset
from relicv2_cli.encoders import Encoder, load_encoder, slugify
from relicv2_cli.errors import RelicError
from relicv2_cli.knn import autocast
from relicv2_cli.optim import lr_at
from relicv2_cli.stages.features import PRECISIONS, crop_flip, epoch_batches, split_features, view_size

DEFAULT_L2_GRID = "1e-6:1e1:15"
METRICS = ("top1", "mean-per-class")
PROTOCOLS = ("cached", "augment")


# ------------------------------------------------------------------------------------------------
# The solver: pure functions on arrays.


@dataclass
class LogisticModel:
    """A multinomial logistic regression on raw features: logits = x @ weight.T + bias.

    `weight`/`bias` already include the standardisation (mean/std of the fitting data), which is
    kept in `mean`/`std` for reference."""

    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    l2: float
    iterations: int = 0
    loss: float = float("nan")

    def logits(self, features) -> torch.Tensor:
        x = torch.as_tensor(features, dtype=torch.float32, device=self.weight.device)
        return x @ self.weight.T + self.bias

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.detach().cpu().contiguous(), "bias": self.bias.detach().cpu().contiguous(),
                "feature_mean": self.mean.detach().cpu().contiguous(), "feature_std": self.std.detach().cpu().contiguous()}


HISTORY = 100  # L-BFGS memory: 100 pairs halve the iterations of 20 on ill-conditioned features (measured)
SMALL_PROBLEM = 2_000_000  # N * D below which a fit runs on one CPU thread


@contextlib.contextmanager
def _few_threads(active: bool):
    """One CPU thread for small fits: L-BFGS on a few thousand points is a chain of tiny ops whose
    cost is thread hand-off, not arithmetic (measured 25x faster on one thread on a busy 2-core box)."""
    before = torch.get_num_threads()
    if active and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _as_tensor(x, dtype, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=dtype).to(device)


def fit_logistic(
    features,
    labels,
    l2: float,
    *,
    num_classes: int | None = None,
    max_iter: int = 1000,
    tolerance: float = 1e-6,
    standardize: bool = True,
    device: str | torch.device = "cpu",
    init: LogisticModel | None = None,
) -> LogisticModel:
    """Minimise mean cross-entropy + l2 / 2 * ||W||^2 (bias not penalised) by full-batch L-BFGS.

    Features are standardised with their own mean/std (std floored at 1e-6) when `standardize`;
    the returned model applies that inside its weights. `init` warm-starts from another model
    fitted on the same data (select_l2 walks the grid from strong to weak penalties this way)."""
    if l2 < 0:
        raise RelicError(f"L2 strength must be >= 0, got {l2}")
    x = _as_tensor(features, torch.float32, device)
    y = _as_tensor(labels, torch.int64, device)
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise RelicError(f"fit_logistic: features {tuple(x.shape)} and labels {tuple(y.shape)} do not match")
    num_classes = int(y.max().item()) + 1 if num_classes is None else num_classes
    if standardize:
        mean = x.mean(0)
        std = x.std(0, unbiased=False).clamp(min=1e-6)
    else:
        mean, std = torch.zeros(x.shape[1], device=device), torch.ones(x.shape[1], device=device)
    z = (x - mean) / std
    w = torch.zeros(num_classes, x.shape[1], device=device, requires_grad=True)
    b = torch.zeros(num_classes, device=device, requires_grad=True)
    if init is not None:  # convert the raw-space init back to this standardisation
        with torch.no_grad():
            w.copy_(init.weight.to(device) * std)
            b.copy_(init.bias.to(device) + init.weight.to(device) @ mean)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=HISTORY,
                                  tolerance_grad=tolerance, tolerance_change=1e-10,
                                  line_search_fn="strong_wolfe")

    def objective():
        return F.cross_entropy(z @ w.T + b, y) + 0.5 * l2 * (w * w).sum()

    def closure():
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with _few_threads(x.numel() <= SMALL_PROBLEM):
        optimizer.step(closure)
    iterations = int(optimizer.state[w].get("n_iter", 0))
    with torch.no_grad():
        loss = float(objective().item())
        weight = (w / std).detach()
        bias = (b - weight @ mean).detach()
    return LogisticModel(weight, bias, mean.detach(), std.detach(), float(l2), iterations, loss)


def score(logits: torch.Tensor, labels, num_classes: int | None = None) -> dict:
    """top1, top5 (top-k with k = min(5, C)), mean-per-class accuracy and per-class accuracy."""
    y = _as_tensor(labels, torch.int64, logits.device)
    num_classes = logits.shape[1] if num_classes is None else num_classes
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    correct1 = (topk[:, 0] == y).float()
    correct5 = (topk == y[:, None]).any(1).float()
    per_class = []
    for c in range(num_classes):
        members = y == c
        per_class.append(float(correct1[members].mean().item()) if members.any() else None)
    present = [a for a in per_class if a is not None]
    return {"top1": float(correct1.mean().item()), "top5": float(correct5.mean().item()),
            "mean_per_class": float(np.mean(present)) if present else float("nan"), "per_class": per_class}


def metric_value(result: dict, metric: str) -> float:
    return result["top1"] if metric == "top1" else result["mean_per_class"]


def parse_l2_grid(text: str) -> list[float]:
    """`START:STOP:N` (N log-spaced values, both ends included) or a comma list `1e-4,1e-2`."""
    text = str(text).strip()
    try:
        if ":" in text:
            start, stop, n = text.split(":")
            start, stop, n = float(start), float(stop), int(n)
            if start <= 0 or stop <= 0 or n < 1:
                raise ValueError
            grid = np.logspace(math.log10(start), math.log10(stop), n).tolist() if n > 1 else [start]
        else:
            grid = [float(v) for v in text.split(",") if v.strip()]
            if not grid or any(v < 0 for v in grid):
                raise ValueError
    except ValueError:
        raise RelicError(f"--l2-grid must be START:STOP:N (positive, N >= 1) or a comma list of values >= 0; got {text!r}") from None
    return sorted(set(grid))


def holdout_split(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-stratified (fit, held-out) index arrays: round(fraction * count) images of every class
    with at least 2 images go to the held-out part (at least 1, and at least 1 stays to fit on)."""
    if not 0 < fraction < 1:
        raise RelicError(f"--val-fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) >= 2:
            held.append(members[: min(len(members) - 1, max(1, int(round(fraction * len(members)))))])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    if len(held_idx) == 0:
        raise RelicError("the training split is too small to hold out a validation part (need 2 images of a class)")
    mask = np.ones(len(labels), bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def select_l2(
    train_x, train_y, val_x, val_y, grid: list[float], *, num_classes: int, metric: str = "top1",
    max_iter: int = 1000, device: str | torch.device = "cpu",
) -> tuple[float, list[dict]]:
    """Fit on (train_x, train_y) for every L2 of the grid, score on (val_x, val_y) with `metric`;
    return the best L2 (ties go to the larger penalty) and one row per grid value."""
    rows = []
    previous = None
    for l2 in sorted(grid, reverse=True):  # strong -> weak, warm-started
        model = fit_logistic(train_x, train_y, l2, num_classes=num_classes, max_iter=max_iter, device=device,
                             init=previous)
        previous = model
        result = score(model.logits(val_x), val_y, num_classes)
        rows.append({"l2": l2, "val": metric_value(result, metric), "val_top1": result["top1"],
                     "iterations": model.iterations})
    best = max(rows, key=lambda r: (r["val"], r["l2"]))
    return best["l2"], sorted(rows, key=lambda r: r["l2"])


@dataclass
class ProbeResult:
    l2: float
    grid: list[dict]  # per L2: val score
    model: LogisticModel  # refitted on train + val
    test: dict  # score() on the test set
    train: dict  # score() on the refit data
    seconds: dict = field(default_factory=dict)


def linear_probe(
    train_x, train_y, test_x, test_y, *, num_classes: int, grid: list[float], val_x=None, val_y=None,
    val_fraction: float = 0.2, seed: int = 0, metric: str = "top1", max_iter: int = 1000,
    device: str | torch.device = "cpu",
) -> ProbeResult:
    """Choose L2 on a validation set, refit on train + validation, score on test.

    Without (val_x, val_y), the validation set is a class-stratified `val_fraction` of the training
    data (`holdout_split` with `seed`), and the refit uses the whole training data."""
    train_x, train_y = np.asarray(train_x), np.asarray(train_y)
    if val_x is None:
        fit_idx, val_idx = holdout_split(train_y, val_fraction, seed)
        fit_x, fit_y, val_x, val_y = train_x[fit_idx], train_y[fit_idx], train_x[val_idx], train_y[val_idx]
        all_x, all_y = train_x, train_y
    else:
        fit_x, fit_y = train_x, train_y
        val_x, val_y = np.asarray(val_x), np.asarray(val_y)
        all_x, all_y = np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])
    t0 = time.perf_counter()
    if len(grid) > 1:
        best, rows = select_l2(fit_x, fit_y, val_x, val_y, grid, num_classes=num_classes, metric=metric,
                               max_iter=max_iter, device=device)
    else:
        best, rows = grid[0], [{"l2": grid[0], "val": None, "val_top1": None, "iterations": 0}]
    t1 = time.perf_counter()
    model = fit_logistic(all_x, all_y, best, num_classes=num_classes, max_iter=max_iter, device=device)
    t2 = time.perf_counter()
    test = score(model.logits(test_x), test_y, num_classes)
    train = score(model.logits(all_x), all_y, num_classes)
    return ProbeResult(best, rows, model, test, train,
                       {"select_s": round(t1 - t0, 3), "refit_s": round(t2 - t1, 3)})


# ------------------------------------------------------------------------------------------------
# The paper's protocol: SGD through the frozen encoder on augmented views.


def train_linear_augmented(
    encoder: Encoder, images: np.ndarray, labels: np.ndarray, *, num_classes: int, size: int, epochs: float,
    max_steps: int | None, batch_size: int, lr: float, momentum: float, crop_min_scale: float, seed: int,
    device: torch.device, precision: str, quiet: bool,
) -> tuple[nn.Linear, list[dict]]:
    """A linear layer trained by SGD (Nesterov) on crop+flip views through the frozen encoder."""
    n = len(images)
    batch_size = min(batch_size, n)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    last = min(total, max_steps) if max_steps else total
    model = encoder.model.to(device).eval()
    head = nn.Linear(encoder.feature_dim, num_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=0.0)
    images_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    labels_t = torch.from_numpy(labels).to(device)
    generator = torch.Generator().manual_seed(seed)
    history = []
    with options.progress_bar(quiet) as progress:
        task = progress.add_task("linear (augment)", total=last, info="")
        batches: list[torch.Tensor] = []
        for step in range(last):
            if not batches:
                batches = epoch_batches(n, batch_size, generator)
            idx = batches.pop(0).to(device)
            views = crop_flip(images_t[idx], size, (crop_min_scale, 1.0), generator)
            with torch.no_grad(), autocast(device, precision):
                feats = model(views)
            logits = head(feats.float())
            loss = F.cross_entropy(logits, labels_t[idx])
            rate = lr_at(step, total, lr, 0)
            for group in optimizer.param_groups:
                group["lr"] = rate
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 10 == 0 or step == last - 1:
                history.append({"step": step + 1, "loss": loss.item(), "lr": rate,
                                "train_top1": (logits.argmax(1) == labels_t[idx]).float().mean().item()})
                progress.update(task, info=f"loss {loss.item():.3f}")
            progress.update(task, completed=step + 1)
    return head.cpu(), history


# ------------------------------------------------------------------------------------------------
# The stage.


def spec_slug(spec: str) -> str:
    kind, _, arg = spec.partition(":")
    return kind if not arg else slugify(f"{kind}-{Path(arg).name}", 32)


def check_fresh(workdir: Path, kind: str, name: str, force: bool) -> None:
    """Refuse early (before any work, and before writing features) when the output exists."""
    if artifact_path(workdir, kind, name).exists() and not force:
        raise RelicError(f"artifact exists: {artifact_path(workdir, kind, name)} (use --force to replace it)")


def print_probe_table(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    options.console.print(table)


def run_linear(
    encoder: Encoder, dataset: Dataset, *, workdir: Path, name: str | None = None, protocol: str = "cached",
    l2_grid: str = DEFAULT_L2_GRID, val_fraction: float = 0.2, metric: str = "top1", max_iter: int = 1000,
    epochs: float = 100.0, max_steps: int | None = None, lr: float = 0.3, momentum: float = 0.9,
    crop_min_scale: float = 0.08, batch_size: int = 256, precision: str = "bf16", seed: int = 0,
    device: str = "auto", force: bool = False, quiet: bool = False, config_extra: dict | None = None,
):
    """Linear evaluation of `encoder` on `dataset`; writes and returns a `linear` artifact."""
    options.check_choice("--protocol", protocol, PROTOCOLS)
    options.check_choice("--metric", metric, METRICS)
    options.check_choice("--precision", precision, PRECISIONS)
    grid = parse_l2_grid(l2_grid)
    for flag, value in (("--batch-size", batch_size), ("--max-iter", max_iter), ("--epochs", epochs), ("--lr", lr)):
        if value <= 0:
            raise RelicError(f"{flag} must be positive, got {value}")
    if max_steps is not None and max_steps <= 0:
        raise RelicError(f"--max-steps must be positive, got {max_steps}")
    if not 0 < crop_min_scale <= 1:
        raise RelicError(f"--crop-min-scale must be in (0, 1], got {crop_min_scale}")
    if not 0 < val_fraction < 1:
        raise RelicError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    workdir = Path(workdir)
    name = name or f"{encoder.slug}-{spec_slug(dataset.spec)}" + ("-augment" if protocol == "augment" else "")
    check_fresh(workdir, "linear", name, force)
    dev = options.resolve_device(device)
    feature_kwargs = dict(device=dev, batch_size=batch_size, precision=precision, workdir=workdir, quiet=quiet,
                          force=force)
    t0 = time.perf_counter()
    test = split_features(encoder, dataset, "test", **feature_kwargs)
    history: list[dict] = []
    if protocol == "cached":
        train = split_features(encoder, dataset, "train", **feature_kwargs)
        val = split_features(encoder, dataset, "val", **feature_kwargs) if dataset.val is not None else None
        t1 = time.perf_counter()
        result = linear_probe(train.features, train.labels, test.features, test.labels,
                              num_classes=dataset.num_classes, grid=grid,
                              val_x=None if val is None else val.features, val_y=None if val is None else val.labels,
                              val_fraction=val_fraction, seed=seed, metric=metric, max_iter=max_iter, device=dev)
        tensors = result.model.tensors()
        test_scores, l2 = result.test, result.l2
        feature_parents = [train.artifact, test.artifact] + ([val.artifact] if val is not None else [])
        extra_metrics = {"l2": l2, "l2_grid": result.grid, "train_top1": result.train["top1"],
                         "val_source": "split" if val is not None else f"held-out {val_fraction:g} of train",
                         "solver_seconds": result.seconds, "features_seconds": round(t1 - t0, 2)}
    else:
        size = view_size(encoder, dataset.train.images)
        head, history = train_linear_augmented(
            encoder, dataset.train.images, dataset.train.labels, num_classes=dataset.num_classes, size=size,
            epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, momentum=momentum,
            crop_min_scale=crop_min_scale, seed=seed, device=dev, precision=precision, quiet=quiet)
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
    config = {"encoder": encoder.record, "encoder_label": encoder.label, "protocol": protocol, "metric": metric,
              "l2_grid": grid if protocol == "cached" else None, "val_fraction": val_fraction, "max_iter": max_iter,
              "standardize": "mean/std of the fitting data", "seed": seed, "batch_size": batch_size,
              "precision": precision, "device": dev.type, "num_classes": dataset.num_classes,
              "class_names": dataset.class_names, **(config_extra or {})}
    if protocol == "augment":
        config.update({"epochs": epochs, "max_steps": max_steps, "lr": lr, "momentum": momentum, "nesterov": True,
                       "weight_decay": 0.0, "crop_min_scale": crop_min_scale, "schedule": "cosine"})
    parents = ([encoder.parent] if encoder.parent else []) + feature_parents
    with Staging(workdir, "linear", name, force=force) as staging:
        save_file(tensors, str(staging.dir / "classifier.safetensors"))
        if history:
            (staging.dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        art = staging.commit(config=config, parents=parents, dataset=dataset.record(), metrics=metrics)
    if not quiet:
        rows = [("encoder", encoder.label), ("dataset", dataset.spec), ("protocol", protocol),
                ("train / test images", f"{len(dataset.train):,} / {len(dataset.test):,}"),
                ("top-1", f"{100 * metrics['top1']:.2f}%"), ("top-5", f"{100 * metrics['top5']:.2f}%"),
                ("mean per class", f"{100 * metrics['mean_per_class']:.2f}%")]
        if l2 is not None:
            rows.append(("chosen L2", f"{l2:.3g} (grid {grid[0]:.0e}..{grid[-1]:.0e}, {len(grid)} values)"))
            rows.append(("solver time", f"{sum(metrics['solver_seconds'].values()):.1f} s"))
        rows.append(("worst class", min(per_class.items(), key=lambda kv: kv[1] if kv[1] is not None else 2)[0]))
        print_probe_table(f"linear evaluation: {name}", rows)
    return art


EncoderArg = Annotated[str, typer.Argument(help="Pretrain artifact directory, random:ARCH (random init) or torchvision:FILE.")]
ArchOpt = Annotated[str, typer.Option(help="Architecture of random:/torchvision: encoders (a pretrain artifact brings its own): resnet18|34|50|101|152|200 (choice: resnet18).")]
WidthOpt = Annotated[float, typer.Option(help="Width multiplier of random:/torchvision: encoders: 0.25, 0.5, 1, 2, 4 (choice: 1).")]
StemOpt = Annotated[str, typer.Option(help="Stem of random:/torchvision: encoders: cifar (3x3/1) or imagenet (7x7/2 + maxpool) (choice: cifar).")]
PrecisionOpt = Annotated[str, typer.Option(help="bf16 autocast for the encoder (about 3x faster on AMX CPUs) or fp32 (choice: bf16); classifiers are fitted in fp32.")]
L2GridOpt = Annotated[str, typer.Option(help="L2 strengths to try: START:STOP:N log-spaced, or a comma list (choice: 1e-6:1e1:15, half decades; Kornblith et al. search a log grid).")]
ValFractionOpt = Annotated[float, typer.Option(help="Class-stratified part of train held out to choose L2 when the dataset has no validation split (choice: 0.2).")]
MetricOpt = Annotated[str, typer.Option(help="Score that chooses L2 (and the headline): top1 or mean-per-class (Kornblith et al.: mean-per-class for some datasets; default top1).")]
MaxIterOpt = Annotated[int, typer.Option(help="L-BFGS iterations per fit (choice: 1000).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing artifact of the same name (stale cached features are recomputed).")]


def command(
    encoder: EncoderArg,
    spec: options.Spec,
    protocol: Annotated[str, typer.Option(help="cached: L-BFGS logistic regression on cached centre-view features, L2 from a grid (default, fast); augment: the paper's SGD + crop/flip through the frozen encoder (release).")] = "cached",
    l2_grid: L2GridOpt = DEFAULT_L2_GRID,
    val_fraction: ValFractionOpt = 0.2,
    metric: MetricOpt = "top1",
    max_iter: MaxIterOpt = 1000,
    epochs: Annotated[float, typer.Option(help="augment protocol: passes over train (release: 100).")] = 100.0,
    max_steps: options.MaxSteps = None,
    lr: Annotated[float, typer.Option(help="augment protocol: SGD learning rate, cosine-decayed to 0, used as is (release: 0.3 at batch 1024).")] = 0.3,
    momentum: Annotated[float, typer.Option(help="augment protocol: Nesterov momentum (release: 0.9).")] = 0.9,
    crop_min_scale: Annotated[float, typer.Option(help="augment protocol: smallest crop area fraction (byol: 0.08).")] = 0.08,
    arch: ArchOpt = "resnet18",
    width: WidthOpt = 1.0,
    stem: StemOpt = "cifar",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass / per SGD step (choice: 256; release: 1024).")] = 256,
    precision: PrecisionOpt = "bf16",
    limit_train: options.LimitTrain = None,
    limit_test: options.LimitTest = None,
    image_size: options.ImageSize = None,
    workdir: options.Workdir = options.DEFAULT_WORKDIR,
    name: Annotated[str | None, typer.Option(help="Artifact name (default: ENCODER-DATASET, -augment for that protocol).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the held-out split, SGD order and crops, random: init and synthetic data (default 0).")] = 0,
    device: options.Device = "auto",
    force: ForceOpt = False,
    quiet: options.Quiet = False,
) -> None:
    """Linear evaluation of a frozen encoder: top-1/top-5 on the test split -> a `linear` artifact."""
    options.check_choice("--protocol", protocol, PROTOCOLS)
    options.check_choice("--metric", metric, METRICS)
    options.check_choice("--precision", precision, PRECISIONS)
    parse_l2_grid(l2_grid)
    enc = load_encoder(encoder, arch=arch, width=width, stem=stem, seed=seed)
    dataset = load_dataset(spec, limit_train=limit_train, limit_test=limit_test, image_size=image_size, seed=seed)
    art = run_linear(enc, dataset, workdir=workdir, name=name, protocol=protocol, l2_grid=l2_grid,
                     val_fraction=val_fraction, metric=metric, max_iter=max_iter, epochs=epochs, max_steps=max_steps,
                     lr=lr, momentum=momentum, crop_min_scale=crop_min_scale, batch_size=batch_size,
                     precision=precision, seed=seed, device=device, force=force, quiet=quiet,
                     config_extra={"spec": spec, "limit_train": limit_train, "limit_test": limit_test,
                                   "image_size": image_size})
    options.finish(art.path)

