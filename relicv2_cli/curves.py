"""Training curves of a pretrain run, for `relicv2 report`: every metric of metrics.jsonl against step.

A pretrain run logs one JSON line every --log-every steps (loss terms, learning rate, EMA rate,
embedding std, online-probe and throughput figures) plus the kNN / probe accuracy whenever it
evaluates. `curves_figure` draws one subplot per metric, each from the lines that carry it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from relicv2_cli.errors import RelicError

NOT_CURVES = ("step", "epoch")
# Loss terms first, then schedules, representation health and accuracy; anything else after, by name.
ORDER = ("loss", "contrastive", "kl", "lr", "ema_rate", "embedding_std", "knn_top1", "probe_top1",
         "probe_train_top1", "probe_loss", "images_per_s", "data_fraction")


def read_log(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (a missing file has none)."""
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise RelicError(f"corrupt {path}: {e}") from None


def curve_metrics(records: list[dict]) -> list[str]:
    """The numeric metrics present in `records`, in ORDER then by name."""
    names = {k for r in records for k, v in r.items()
             if k not in NOT_CURVES and isinstance(v, int | float) and not isinstance(v, bool)}
    return [k for k in ORDER if k in names] + sorted(names - set(ORDER))


def curves_figure(records: list[dict], title: str):
    """A Figure with one subplot per metric against step, and the list of metrics drawn (in order)."""
    from matplotlib.figure import Figure

    metrics = curve_metrics(records)
    if not metrics:
        raise RelicError(f"{title}: no metrics to draw")
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, metrics, strict=False):
        points = [(r["step"], r[name]) for r in records
                  if isinstance(r.get(name), int | float) and "step" in r]
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o" if len(points) <= 20 else None, markersize=3, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes[len(metrics):]:
        ax.remove()
    fig.suptitle(title, fontsize=10)
    return fig, metrics
