"""Figures of the analysis stages and `relicv2 report`, the one-page comparison of a workdir.

Figure helpers draw on a bare `matplotlib.figure.Figure` (Agg canvas, no pyplot global state) and
`save_figure` writes PNG and SVG side by side:
- `neighbors_figure`: one panel per encoder, side by side, each with its own colour bar.
- `ratios_figure`: per-class ratios (grouped bars, class names), their distribution per encoder
  (box + points) and the per-image distribution (histograms), all encoders on one figure.

`relicv2 report [WORKDIR]` reads every artifact's manifest and writes WORKDIR/report.md: one table
per stage (artifact kind), one row per encoder (per encoder and dataset for transfer), with the
encoder's lineage (which pretrain artifact, which method, trained on which data for how many
steps) and the data each result was computed on; the analysis figures are linked, and a summary
figure (report_summary.png/.svg) puts the headline numbers of every encoder side by side, and each
pretrain run's metrics.jsonl is drawn against step beside its table (report_curves_NAME.png, curves.py).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from relicv2_cli import __version__, curves, options
from relicv2_cli.artifacts import KINDS, METRICS, Artifact, atomic_write_bytes, list_artifacts, load_artifact
from relicv2_cli.errors import RelicError

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig, directory: Path, stem: str, dpi: int = 130) -> list[Path]:
    """Write `stem.png` and `stem.svg` into `directory`; returns both paths."""
    directory = Path(directory)
    paths = [directory / f"{stem}.png", directory / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=dpi, metadata={"Software": None})
    fig.savefig(paths[1], metadata={"Date": None})
    return paths


def _wrap(text: str, width: int = 36) -> str:
    return "\n".join(textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=True)) or text


def _distance_cmap():
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    # viridis without its palest yellow end, so every neighbour stays visible on white.
    cmap = ListedColormap(colormaps["viridis"](np.linspace(0.0, 0.88, 256)), name="distance")
    return cmap.with_extremes(bad="white")


def _blocks(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """(label, start, stop) runs of equal consecutive labels."""
    runs, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            runs.append((int(labels[start]), start, i))
            start = i
    return runs


def neighbors_figure(
    panels: list[dict], *, anchor_labels, class_names: list[str], pool: str, k: int, normalize: bool,
    title: str,
):
    """One panel per encoder, side by side, each with its own colour bar.

    pool=selected: `matrix` is anchors x chosen images (NaN where the column is not one of the row's
    k neighbours), rows and columns ordered by class: block-diagonal when classes separate.
    pool=test: `matrix` is anchors x k distances, and a second strip beside it colours each
    neighbour by its class (`neighbour_labels`; grey: a class outside the chosen ones), so that a
    good representation shows each block of rows in its own colour.
    Panel dicts: label, matrix, neighbour_labels, agreement, knn_top1, feature_dim."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    anchor_labels = np.asarray(anchor_labels)
    n = len(panels)
    selected = pool == "selected"
    cmap = _distance_cmap()
    blocks = _blocks(anchor_labels)
    centres = [(start + stop - 1) / 2 for _, start, stop in blocks]
    block_names = [class_names[c] for c, _, _ in blocks]
    unit = "L2 distance" + (" (L2-normalised features)" if normalize else " (raw features)")
    if selected:
        fig = _figure(5.3 * n + 0.4, 5.6)
        axes = fig.subplots(1, n, squeeze=False)[0]
    else:
        fig = _figure(5.0 * n + 0.4, 7.4)
        pairs = fig.subplots(1, 2 * n, squeeze=False, gridspec_kw={"width_ratios": [1.0, 0.7] * n})[0]
        axes = pairs[0::2]
        chosen = [c for c, _, _ in blocks]
        class_colours = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(chosen)}
        class_cmap = ListedColormap([class_colours[c] for c in chosen] + ["#d9d9d9"])
    for i, (ax, panel) in enumerate(zip(axes, panels, strict=True)):
        matrix = np.asarray(panel["matrix"], dtype=np.float64)
        finite = matrix[np.isfinite(matrix)]
        # Robust colour limits (1st-99th percentile; the bar's ends extend beyond): one outlier
        # does not wash out the rest of the panel.
        vmin, vmax = (0.0, 1.0)
        if len(finite):
            vmin, vmax = float(np.percentile(finite, 1)), float(np.percentile(finite, 99))
        if vmax <= vmin:
            vmax = vmin + 1e-6
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=vmin, vmax=vmax,
                          interpolation="nearest",
                          aspect="equal" if selected else "auto")
        for _, start, _ in blocks[1:]:
            ax.axhline(start - 0.5, color="0.55" if selected else "white", lw=0.8 if selected else 1.5)
            if selected:
                ax.axvline(start - 0.5, color="0.55", lw=0.8)
        ax.set_yticks(centres, block_names, fontsize=9)
        ax.set_ylabel("image (ordered by class)")
        knn = "" if panel.get("knn_top1") is None else f" | kNN top-1 {100 * panel['knn_top1']:.1f}%"
        heading = (f"{_wrap(panel['label'], 44)}\n"
                   f"{panel['feature_dim']}-d | agreement {panel['agreement']:.2f}{knn}")
        if selected:
            ax.set_xticks(centres, block_names, fontsize=9, rotation=30, ha="right")
            ax.set_xlabel("neighbour (the chosen images, ordered by class)")
            ax.set_title(heading, fontsize=10)
            fig.colorbar(image, ax=ax, shrink=0.75, label=unit, extend="both")
            continue
        ax.set_xticks(range(k), [str(j + 1) for j in range(k)])
        ax.set_xlabel("neighbour rank: distance")
        fig.colorbar(image, ax=ax, location="bottom", shrink=0.9, label=unit, extend="both")
        ax_class = pairs[2 * i + 1]
        codes = np.vectorize(lambda c: chosen.index(c) if c in chosen else len(chosen))(
            np.asarray(panel["neighbour_labels"]))
        ax_class.imshow(codes, cmap=class_cmap, vmin=-0.5, vmax=len(chosen) + 0.5, interpolation="nearest",
                        aspect="auto")
        for _, start, _ in blocks[1:]:
            ax_class.axhline(start - 0.5, color="black", lw=1.2)
        ax_class.set_xticks(range(k), [str(j + 1) for j in range(k)])
        ax_class.set_yticks([])
        ax_class.set_xlabel("neighbour rank: class")
        ax_class.set_title(heading, fontsize=10, loc="right")
    if not selected:
        handles = [Patch(color=class_colours[c], label=class_names[c]) for c in chosen]
        handles.append(Patch(color="#d9d9d9", label="other class"))
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=12)
    return fig


def ratios_figure(series: list[dict], *, class_names: list[str], normalize: bool, title: str):
    """All encoders on one figure: per-class ratios (grouped bars with class names, or ranked curves
    beyond 20 classes), their distribution per encoder (box + points) and the per-image ratios
    (histograms). Series dicts: label, per_class, per_sample, counts, feature_dim."""
    present = np.flatnonzero(np.asarray(series[0]["counts"]) > 0)
    n = len(series)
    many = len(present) > 20
    fig = _figure(max(11.0, 0.45 * len(present) * max(n, 2) / 2 + 3) if not many else 12.0, 9.0)
    grid = fig.add_gridspec(2, 2)
    ax_bar = fig.add_subplot(grid[0, :])
    ax_box = fig.add_subplot(grid[1, 0])
    ax_hist = fig.add_subplot(grid[1, 1])
    colours = [PALETTE[i % len(PALETTE)] for i in range(n)]
    norm_text = "L2-normalised" if normalize else "raw"

    def finite(values):
        values = np.asarray(values, np.float64)
        return values[np.isfinite(values)]

    width = 0.8 / n
    for i, s in enumerate(series):
        per_class = np.asarray(s["per_class"], np.float64)[present]
        fc = finite(per_class)
        stats = f"mean {fc.mean():.3f}, median {np.median(fc):.3f}" if len(fc) else "undefined"
        label = f"{_wrap(s['label'], 34)}\n{s['feature_dim']}-d: {stats}"
        if many:
            ax_bar.plot(np.arange(len(fc)), np.sort(fc)[::-1], color=colours[i], lw=1.6, label=label)
        else:
            heights = np.where(np.isfinite(per_class), per_class, 0.0)
            ax_bar.bar(np.arange(len(present)) + (i - (n - 1) / 2) * width, heights, width * 0.95,
                       color=colours[i], label=label)
    ax_bar.axhline(1.0, color="0.3", ls="--", lw=1)
    if many:
        ax_bar.set_xlabel("classes, ranked by ratio (highest first)")
    else:
        ax_bar.set_xticks(np.arange(len(present)), [class_names[c] for c in present],
                          rotation=30 if len(present) > 6 else 0,
                          ha="right" if len(present) > 6 else "center")
        values = finite(np.concatenate([np.asarray(s["per_class"], np.float64)[present] for s in series]))
        if len(values):
            low = min(1.0, float(values.min()))
            ax_bar.set_ylim(max(0.0, low - 0.1 * (values.max() - low + 1e-9)),
                            values.max() + 0.08 * (values.max() - low + 1e-9))
    ax_bar.set_ylabel("ratio = inter / intra")
    ax_bar.set_title(f"Per class: mean distance to other classes / within the class ({norm_text} features; "
                     "dashed: 1 = no separation)", fontsize=10)
    ax_bar.legend(fontsize=8.5, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)

    box_data = [finite(np.asarray(s["per_class"], np.float64)[present]) for s in series]
    positions = np.arange(1, n + 1)
    ax_box.boxplot([d if len(d) else [np.nan] for d in box_data], positions=positions, widths=0.55,
                   showmeans=True, showfliers=False,
                   meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black",
                              "markersize": 5})
    rng = np.random.default_rng(0)
    for i, d in enumerate(box_data):
        ax_box.scatter(positions[i] + rng.uniform(-0.15, 0.15, len(d)), d, s=14, color=colours[i], alpha=0.8,
                       zorder=3)
    ax_box.axhline(1.0, color="0.3", ls="--", lw=1)
    ax_box.set_xticks(positions, [_wrap(s["label"], 22) for s in series], fontsize=8)
    ax_box.set_ylabel("ratio per class")
    ax_box.set_title("Over classes (box: quartiles, median; diamond: mean)", fontsize=10)

    samples = [finite(s["per_sample"]) for s in series]
    nonempty = [v for v in samples if len(v)]
    pooled = np.concatenate(nonempty) if nonempty else np.array([1.0])
    lo, hi = np.percentile(pooled, [0.5, 99.5])
    if hi <= lo:
        lo, hi = lo - 0.05, hi + 0.05
    bins = np.linspace(lo, hi, 50)
    for i, (s, v) in enumerate(zip(series, samples, strict=True)):
        if not len(v):
            continue
        median = float(np.median(v))
        ax_hist.hist(np.clip(v, lo, hi), bins=bins, density=True, histtype="step", lw=1.6, color=colours[i],
                     label=f"{_wrap(s['label'], 30)}\nmedian {median:.3f}")
        ax_hist.axvline(median, color=colours[i], ls=":", lw=1.2)
    ax_hist.axvline(1.0, color="0.3", ls="--", lw=1)
    ax_hist.set_xlabel("per-image ratio (clipped to the 0.5-99.5th percentiles)")
    ax_hist.set_ylabel("density")
    ax_hist.set_title("Over images, per-image variant (dotted: medians)", fontsize=10)
    ax_hist.legend(fontsize=7.5, frameon=False)
    fig.suptitle(title, fontsize=12)
    return fig


def summary_figure(headlines: dict[str, dict[str, float]], title: str):
    """One horizontal bar chart per headline metric; rows are 'encoder @ data' keys."""
    metrics = [m for m in headlines if headlines[m]]
    rows = sorted({row for m in metrics for row in headlines[m]})
    fig = _figure(3.6 * len(metrics) + 3.0, 0.45 * len(rows) + 1.8)
    axes = fig.subplots(1, len(metrics), squeeze=False, sharey=True)[0]
    y = np.arange(len(rows))
    for j, (ax, metric) in enumerate(zip(axes, metrics, strict=True)):
        values = [headlines[metric].get(row, np.nan) for row in rows]
        ax.barh(y, np.nan_to_num(values), color=[PALETTE[i % len(PALETTE)] for i in range(len(rows))])
        for yi, v in zip(y, values, strict=True):
            if np.isfinite(v):
                ax.text(v, yi, f" {v:.3f}", va="center", fontsize=8)
        ax.set_title(metric, fontsize=10)
        ax.margins(x=0.25)
        if j == 0:
            ax.set_yticks(y, [_wrap(r, 40) for r in rows], fontsize=8)
        ax.invert_yaxis() if j == 0 else None
    fig.suptitle(title, fontsize=11)
    return fig


# ------------------------------------------------------------------------------------------------
# `relicv2 report`


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _f3(value) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.3f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _data(art: Artifact | dict | None) -> str:
    """The data a result was computed on: spec and the limits applied."""
    record = art.manifest.get("dataset") if isinstance(art, Artifact) else art
    if not record:
        return "-"
    limits = [f"{key.split('_')[-1]} {record[key]}" for key in ("limit_train", "limit_test")
              if record.get(key)]
    if record.get("image_size"):
        limits.append(f"{record['image_size']} px")
    return record.get("spec", "?") + (f" ({', '.join(limits)})" if limits else "")


class Lineage:
    """Describes encoder records (random, torchvision, pretrain artifact) with their pre-training."""

    def __init__(self) -> None:
        self.cache: dict[str, Artifact | None] = {}

    def pretrain(self, path: str) -> Artifact | None:
        if path not in self.cache:
            try:
                self.cache[path] = load_artifact(path, kind="pretrain")
            except RelicError:
                self.cache[path] = None
        return self.cache[path]

    def describe(self, record: dict | None) -> str:
        if not record:
            return "-"
        kind = record.get("type")
        if kind == "random":
            return (f"random init ({record.get('arch')}, width {_cell(record.get('width'))}, "
                    f"seed {record.get('seed')})")
        if kind == "torchvision":
            return (f"torchvision weights {Path(record.get('spec', '')).name} "
                    f"(sha256 {str(record.get('sha256'))[:10]})")
        art = self.pretrain(record.get("spec", ""))
        if art is None:
            return f"pretrain {record.get('spec')} ({record.get('method', '?')}) [missing]"
        c, m = art.config, art.metrics
        steps = f", {m['steps']} steps" if m.get("steps") is not None else ""
        epochs = f" / {m['epochs']:g} epochs" if isinstance(m.get("epochs"), (int, float)) else ""
        stale = record.get("digest") and record["digest"] != art.digest
        changed = " [changed since recorded]" if stale else ""
        data = f" on {_data(art)}" if art.manifest.get("dataset") else ""
        return (f"pretrain/{art.name}: {c.get('method', '?')}, {c.get('arch')} w{_cell(c.get('width'))}"
                f"{data}{steps}{epochs}{changed}")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _label_of(record: dict) -> str:
    """The label encoders.load_encoder gives the encoder a manifest record describes."""
    spec = str(record.get("spec", "?"))
    if record.get("type") == "pretrain":
        return f"pretrain/{Path(spec).name} ({record.get('method', '?')})"
    if record.get("type") == "torchvision":
        return f"torchvision:{Path(spec.split(':', 1)[-1]).name}"
    return spec


def _encoder_rows(art: Artifact) -> list[tuple[str, dict | None]]:
    """(label, record) of each encoder an artifact holds results for."""
    config = art.config
    if "encoders" in config and "encoder_labels" in config:
        return list(zip(config["encoder_labels"], config["encoders"], strict=False))
    if "encoders" in config:
        return [(_label_of(r), r) for r in config["encoders"]]
    if "encoder" in config:
        return [(config.get("encoder_label", config["encoder"].get("spec", "?")), config["encoder"])]
    return []


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _display_name(art: Artifact, workdir: Path) -> str:
    """NAME for WORKDIR/KIND/NAME; FOLDER/NAME for an artifact of a nested workdir
    (WORKDIR/FOLDER/KIND/NAME)."""
    try:
        parts = art.path.resolve().relative_to(Path(workdir).resolve()).parts
    except ValueError:
        return art.name
    return "/".join(parts[:-2] + (art.name,))


@dataclass
class _Section:
    """What every table of one report section needs: links, lineage, headline numbers, figures."""

    kind: str
    lineage: Lineage
    workdir: Path
    out_dir: Path
    headlines: dict
    figures: list[str] = field(default_factory=list)

    def link(self, a: Artifact) -> str:
        return f"[{_display_name(a, self.workdir)}]({os.path.relpath(a.path, self.out_dir)})"

    def head(self, metric: str, label: str, art: Artifact, value) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self.headlines.setdefault(metric, {})[f"{label} @ {_data(art)}"] = float(value)

    def figure(self, a: Artifact, file: str) -> None:
        self.figures.append(f"![{a.name}]({os.path.relpath(a.path / file, self.out_dir)})")


def _section(kind: str, arts: list[Artifact], lineage: Lineage, workdir: Path, out_dir: Path,
             headlines: dict) -> list[str]:
    sec = _Section(kind, lineage, workdir, out_dir, headlines)
    lines = [f"## {kind} ({len(arts)})", ""]
    if kind == "pretrain":
        lines += _pretrain_table(arts, sec)
    elif kind == "features":
        lines += _features_table(arts, sec)
    elif kind in ("linear", "semi"):
        lines += _probe_table(arts, sec)
    elif kind == "transfer":
        lines += _transfer_table(arts, sec)
    elif kind == "neighbors":
        lines += _neighbors_table(arts, sec)
    elif kind == "ratios":
        lines += _ratios_table(arts, sec)
    else:  # saliency and anything else: every scalar metric
        keys = list(dict.fromkeys(k for a in arts for k in _scalars(a.metrics)))[:8]
        rows = [[sec.link(a), a.config.get("method", "-"), _data(a), *(a.metrics.get(k) for k in keys)]
                for a in arts]
        lines += _table(["artifact", "method", "data", *keys], rows)
    if sec.figures:
        lines += [""] + [f + "\n" for f in sec.figures]
    return lines + [""]


def _pretrain_table(arts: list[Artifact], sec: _Section) -> list[str]:
    rows = []
    for a in arts:
        c, m = a.config, a.metrics
        extra = {k: v for k, v in _scalars(m).items() if k not in ("steps", "epochs", "loss", "wall_s")}
        network = f"{c.get('arch')} w{c.get('width')} {c.get('stem')}"
        rows.append([sec.link(a), c.get("method"), network, _data(a), m.get("steps"), m.get("epochs"),
                     m.get("loss"), m.get("wall_s"),
                     ", ".join(f"{k}={_cell(v)}" for k, v in list(extra.items())[:5])])
        records = curves.read_log(a.path / METRICS)
        if curves.curve_metrics(records):
            name = _display_name(a, sec.workdir)
            stem = "report_curves_" + re.sub(r"[^A-Za-z0-9._-]+", "-", name)
            fig, _ = curves.curves_figure(records, f"{name} ({c.get('method')})")
            fig.savefig(sec.out_dir / f"{stem}.png", dpi=110, metadata={"Software": None})
            sec.figures.append(f"![training curves of {a.name}]({stem}.png)")
    columns = ["artifact", "method", "network", "data", "steps", "epochs", "final loss", "wall s", "other"]
    return _table(columns, rows)


def _features_table(arts: list[Artifact], sec: _Section) -> list[str]:
    rows = []
    for a in arts:
        c, m = a.config, a.metrics
        rows.append([sec.link(a), c.get("encoder_label"), sec.lineage.describe(c.get("encoder")),
                     c.get("split"), _data(a), f"{c.get('count')} x {c.get('feature_dim')}",
                     c.get("image_size"), m.get("images_per_s")])
    return _table(["artifact", "encoder", "lineage", "split", "data", "features", "px", "images/s"], rows)


def _probe_table(arts: list[Artifact], sec: _Section) -> list[str]:
    """linear and semi: one row per artifact, top-1/top-5/mean-per-class."""
    rows = []
    for a in arts:
        c, m = a.config, a.metrics
        label, record = _encoder_rows(a)[0] if _encoder_rows(a) else ("?", None)
        detail = (f"{c.get('protocol')}, L2 {_cell(m.get('l2'))}" if sec.kind == "linear"
                  else f"{m.get('subset_size')} labels ({_pct(m.get('subset_fraction'))}%)")
        rows.append([sec.link(a), label, sec.lineage.describe(record), _data(a), detail, _pct(m.get("top1")),
                     _pct(m.get("top5")), _pct(m.get("mean_per_class"))])
        labels = "" if sec.kind == "linear" else f" ({m.get('subset_size')} labels)"
        sec.head(f"{sec.kind} top-1", label + labels, a, m.get("top1"))
    return _table(["artifact", "encoder", "lineage", "data", "protocol" if sec.kind == "linear" else "labels",
                   "top-1 %", "top-5 %", "mean/class %"], rows)


def _transfer_table(arts: list[Artifact], sec: _Section) -> list[str]:
    rows = []
    for a in arts:
        labels = dict(_encoder_rows(a))
        for row in a.metrics.get("rows", []):
            record = labels.get(row.get("encoder"))
            rows.append([sec.link(a), row.get("encoder"), sec.lineage.describe(record), row.get("dataset"),
                         row.get("mode", a.config.get("mode")), row.get("metric", a.metrics.get("metric")),
                         _pct(row.get("score")), _pct(row.get("top1")), _cell(row.get("l2"))])
    return _table(["artifact", "encoder", "lineage", "dataset", "mode", "metric", "score %", "top-1 %", "L2"],
                  rows)


def _neighbors_table(arts: list[Artifact], sec: _Section) -> list[str]:
    rows = []
    for a in arts:
        per = a.metrics.get("encoders", {})
        for label, record in _encoder_rows(a):
            m = per.get(label, {})
            classes = ", ".join(f"{c} {v:.2f}" for c, v in m.get("agreement_per_class", {}).items())
            rows.append([sec.link(a), label, sec.lineage.describe(record), _data(a),
                         f"k={a.metrics.get('k')}, {a.metrics.get('pool')}", m.get("feature_dim"),
                         _f3(m.get("agreement")), classes, _pct(m.get("knn_top1"))])
            # The headline's wording is the report's, unchanged since its first version.
            metric = f"neighbour agreement (k={a.metrics.get('k')}, {a.metrics.get('pool')})"
            sec.head(metric, label, a, m.get("agreement"))
            sec.head("kNN top-1", label, a, m.get("knn_top1"))
        sec.figure(a, "neighbors.png")
    return _table(["artifact", "encoder", "lineage", "data", "k, pool", "dim", "agreement", "per class",
                   "kNN top-1 %"], rows)


def _ratios_table(arts: list[Artifact], sec: _Section) -> list[str]:
    rows = []
    for a in arts:
        per = a.metrics.get("encoders", {})
        for label, record in _encoder_rows(a):
            m = per.get(label, {})
            rows.append([sec.link(a), label, sec.lineage.describe(record), _data(a), m.get("feature_dim"),
                         "yes" if a.config.get("normalize") else "no", _f3(m.get("ratio_mean")),
                         _f3(m.get("ratio_median")), _f3(m.get("sample_ratio_median")),
                         ", ".join(m.get("undefined_classes", [])) or "-"])
            sec.head("discriminant ratio (class median)", label, a, m.get("ratio_median"))
        sec.figure(a, "ratios.png")
    return _table(["artifact", "encoder", "lineage", "data", "dim", "normalised", "class mean",
                   "class median", "image median", "undefined classes"], rows)


def build_report(workdir: Path, output: Path) -> tuple[str, dict, int]:
    """The markdown text, the headline numbers (for the summary figure) and the artifact count."""
    entries = list_artifacts(workdir)
    arts = [e for e in entries if isinstance(e, Artifact)]
    broken = [e for e in entries if not isinstance(e, Artifact)]
    by_kind: dict[str, list[Artifact]] = {}
    for a in arts:
        by_kind.setdefault(a.kind, []).append(a)
    order = [k for k in KINDS if k in by_kind] + sorted(k for k in by_kind if k not in KINDS)
    out_dir = output.parent
    lineage, headlines = Lineage(), {}
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    lines = [f"# relicv2 report: {workdir}", "",
             f"Generated {now} by relicv2 {__version__} from {len(arts)} artifact(s): "
             + (", ".join(f"{len(by_kind[k])} {k}" for k in order) or "none") + ".",
             "One table per stage; rows are encoders. *lineage* names the pre-training behind an encoder "
             "(artifact, method, the data it was trained on and for how long); *data* is the dataset a "
             "result was computed on, with the limits applied. Artifacts in nested workdirs are named "
             "FOLDER/NAME.", ""]
    body = []
    for kind in order:
        body += _section(kind, sorted(by_kind[kind], key=lambda a: a.manifest.get("created", "")), lineage,
                         workdir, out_dir, headlines)
    if any(headlines.values()):
        lines += ["## Summary", "", "![summary](report_summary.png)", ""]
    lines += body
    if broken:
        lines += ["## Unreadable artifacts", ""] + _table(["path", "problem"],
                                                          [[str(p), why] for p, why in broken])
    return "\n".join(lines).rstrip() + "\n", headlines, len(arts)


def write_report(workdir: Path, output: Path | None = None) -> Path:
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise RelicError(f"no artifact folder {workdir}")
    output = Path(output) if output is not None else workdir / "report.md"
    if output.suffix != ".md":
        raise RelicError(f"--output must be a .md file, got {output}")
    if not output.parent.is_dir():
        raise RelicError(f"--output folder {output.parent} does not exist")
    text, headlines, _ = build_report(workdir, output)
    if any(headlines.values()):
        fig = summary_figure(headlines, f"Headline numbers in {workdir}")
        save_figure(fig, output.parent, "report_summary")
    atomic_write_bytes(output, text.encode())
    return output


def command(
    workdir: Annotated[Path | None, typer.Argument(
        help="Artifact root to summarise (default: runs/ or $RELICV2_HOME).", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        help="Markdown file to write (default: WORKDIR/report.md); the summary figure beside it.")] = None,
    quiet: options.Quiet = False,
) -> None:
    """Gather every artifact's metrics into report.md: one table per stage, encoders as rows, with lineage."""
    workdir = workdir or options.DEFAULT_WORKDIR
    path = write_report(workdir, output)
    if not quiet:
        options.console.print(f"report of {workdir} written to {path}")
    options.finish(path)
