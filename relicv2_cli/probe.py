"""The linear probe: multinomial logistic regression on frozen features (docs/eval.md).

Pure functions on arrays (`fit_logistic`, `select_l2`, `linear_probe`, `score`), used by the linear
and transfer stages, plus the paper's augmented protocol (`train_linear_augmented`: SGD through the
frozen encoder on crop + flip views).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn

from relicv2_cli import options
from relicv2_cli.data import Split
from relicv2_cli.encoders import Encoder
from relicv2_cli.errors import RelicError
from relicv2_cli.knn import autocast
from relicv2_cli.optim import lr_at, scaled_lr
from relicv2_cli.stream import crop_flip_steps

DEFAULT_L2_GRID = "1e-6:1e1:15"


METRICS = ("top1", "mean-per-class")


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
        return {"weight": self.weight.detach().cpu().contiguous(),
                "bias": self.bias.detach().cpu().contiguous(),
                "feature_mean": self.mean.detach().cpu().contiguous(),
                "feature_std": self.std.detach().cpu().contiguous()}


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
        raise RelicError("--l2-grid must be START:STOP:N (positive, N >= 1) or a comma list of values >= "
                         f"0; got {text!r}") from None
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
        raise RelicError("the training split is too small to hold out a validation part (need 2 images of a "
                         "class)")
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


def train_linear_augmented(
    encoder: Encoder, images: np.ndarray | Split, labels: np.ndarray, *, num_classes: int, size: int,
    epochs: float, max_steps: int | None, batch_size: int, lr: float, momentum: float, crop_min_scale: float,
    seed: int, device: torch.device, precision: str, quiet: bool, workers: int | None = None,
) -> tuple[nn.Linear, list[dict]]:
    """A linear layer trained by SGD (Nesterov) on crop+flip views through the frozen encoder; `images`
    an array in memory or a split streamed through `workers` loader processes (stream.crop_flip_steps)."""
    n = len(images)
    batch_size = min(batch_size, n)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    last = min(total, max_steps) if max_steps else total
    model = encoder.model.to(device).eval()
    head = nn.Linear(encoder.feature_dim, num_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    lr = scaled_lr(lr, batch_size)  # a base rate per 256 images, as the release's 0.3 (1.2 at batch 1024)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=0.0)
    labels_t = torch.from_numpy(labels).to(device)
    steps = crop_flip_steps(images, last, batch=batch_size, size=size, crop_min_scale=crop_min_scale,
                            seed=seed, device=device, workers=workers)
    history = []
    with options.progress_bar(quiet) as progress, contextlib.closing(steps):
        task = progress.add_task("linear (augment)", total=last, info="")
        for step, (idx, views) in enumerate(steps):
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


def print_probe_table(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    options.console.print(table)
