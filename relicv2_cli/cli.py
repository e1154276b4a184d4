"""Typer wiring: `relicv2 <stage> ...`. Each stage's options and logic live in its own module."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from relicv2_cli import __version__, artifacts
from relicv2_cli.errors import RelicError
from relicv2_cli.helpformat import lazy_group, plain_help
from relicv2_cli.options import (
    DEFAULT_WORKDIR,
    ImageSize,
    LimitTest,
    LimitTrain,
    Seed,
    SkipBad,
    Spec,
)
from relicv2_cli.stages import prepare

# The stage commands: (module, function, the one-line help --help lists). Their modules import torch
# (seconds), so a stage is imported only when it runs or shows its own --help (helpformat.LazyGroup);
# tests/test_console.py checks each one-line help against the function's docstring.
STAGES = {
    "pretrain": ("relicv2_cli.stages.pretrain", "command",
                 "Pre-train a ResNet with RELICv2 (or BYOL / supervised) and write a `pretrain` artifact."),
    "rerun": ("relicv2_cli.stages.pretrain", "rerun",
              "Run a pretrain artifact's recorded settings again into a new artifact."),
    "saliency": ("relicv2_cli.stages.saliency", "command",
                 "Precompute background-removal masks (unsupervised saliency) for SPEC, or import them "
                 "(--from-dir)."),
    "report": ("relicv2_cli.report", "command",
               "Gather every artifact's metrics into report.md: one table per stage, encoders as rows, with "
               "lineage."),
    "export": ("relicv2_cli.stages.export", "command",
               "Export a pretrain artifact's backbone (online or EMA target) for torchvision, timm or "
               "safetensors."),
    "embed": ("relicv2_cli.stages.embed", "command",
              "Embed one split with a frozen encoder (centre view) into an HDF5, npy, csv or torch file."),
}
EVAL_STAGES = {
    "features": ("relicv2_cli.stages.features", "command",
                 "Embed one split with a frozen encoder (centre view) into a cached `features` artifact."),
    "linear": ("relicv2_cli.stages.linear", "command",
               "Linear evaluation of a frozen encoder: top-1/top-5 on the test split -> a `linear` "
               "artifact."),
    "semi": ("relicv2_cli.stages.semi", "command",
             "Fine-tune the whole network on a class-balanced label subset; top-1/top-5 on the full test "
             "split, beside the frozen-feature linear probe fitted on the same labelled images."),
    "transfer": ("relicv2_cli.stages.transfer", "command",
                 "Transfer: per target dataset, L2 chosen on validation, refit on train+val, test score; "
                 "encoders side by side."),
}
ANALYZE_STAGES = {
    "neighbors": ("relicv2_cli.stages.neighbors", "command",
                  "Nearest neighbors of a few classes' test images, side by side per encoder, + agreement "
                  "and kNN."),
    "ratios": ("relicv2_cli.stages.ratios", "command",
               "Linear discriminant ratio per class and per image (inter / intra L2 distance), encoders on "
               "one figure."),
}

app = typer.Typer(
    cls=lazy_group(STAGES),
    help="RELICv2 self-supervised learning, end to end: saliency -> pretrain -> eval -> analyze.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect and prepare datasets.", no_args_is_help=True)
artifacts_app = typer.Typer(help="List, show, verify and trace artifacts.", no_args_is_help=True)
eval_app = typer.Typer(cls=lazy_group(EVAL_STAGES), no_args_is_help=True,
                       help="Evaluate encoders: linear probe, semi-supervised fine-tuning, transfer.")
analyze_app = typer.Typer(cls=lazy_group(ANALYZE_STAGES), no_args_is_help=True,
                          help="Analyse representations: nearest neighbours and linear discriminant ratios.")
app.add_typer(data_app, name="data")
app.add_typer(artifacts_app, name="artifacts")
app.add_typer(eval_app, name="eval")
app.add_typer(analyze_app, name="analyze")


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    # Eager: answered while the options are parsed, before click asks for a command.
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """--debug is declared here for parsing and --help; main() reads it from sys.argv, which also
    covers errors raised before Typer parses (importing the stages)."""


@data_app.command("info")
def data_info(
    spec: Spec,
    limit_train: LimitTrain = None,
    limit_test: LimitTest = None,
    image_size: ImageSize = None,
    skip_bad: SkipBad = False,
    seed: Seed = 0,
) -> None:
    """Counts, classes, image shape and fingerprint of a dataset."""
    from relicv2_cli.data import load_dataset

    dataset = load_dataset(spec, limit_train=limit_train, limit_test=limit_test, image_size=image_size,
                           skip_bad=skip_bad, seed=seed)
    table = Table(title=spec, show_header=False)
    for name in ("train", "val", "test"):
        split = dataset.val if name == "val" else dataset.split(name)
        if split is not None:
            # A prepared set knows its sizes without decoding; files decode first, so that --skip-bad
            # drops the labels of unreadable ones.
            count = len(split) if split.sizes is not None and image_size is None else len(split.images)
            per_class = ", ".join(str(int((split.labels == c).sum())) for c in range(dataset.num_classes))
            table.add_row(f"{name} images", f"{count:,}" + (f"  (per class: {per_class})" if dataset.labelled
                                                             else "  (unlabelled)"))
            if split.skipped:
                table.add_row(f"{name} skipped", f"{len(split.skipped)} unreadable or truncated, first {split.skipped[0]}")
    sizes = dataset.train.sizes
    if sizes is not None and image_size is None:
        (h0, w0), (h1, w1) = sizes.min(0), sizes.max(0)
        shape = f"{h0}x{w0}x3 uint8" if (h0, w0) == (h1, w1) else \
            f"height {h0}-{h1}, width {w0}-{w1} (JPEG; pass --image-size to use them at one size)"
    else:
        shape = "x".join(map(str, dataset.train.images.shape[1:])) + " uint8"
    table.add_row("image shape", shape)
    classes = f"{dataset.num_classes}: {', '.join(dataset.class_names)}" if dataset.labelled else \
        "none: a folder of unlabelled images (label 0 for all)"
    table.add_row("classes", classes)
    table.add_row("ground-truth masks", "yes" if dataset.train.masks is not None else "no")
    table.add_row("fingerprint", dataset.fingerprint)
    typer.echo(_table_text(table))


data_app.command("prepare")(prepare.command)


def _table_text(table: Table) -> str:
    """Render a table as plain text for stdout (data info is read by people and scripts alike)."""
    buffer = io.StringIO()
    Console(width=160, color_system=None, file=buffer).print(table)
    return buffer.getvalue().rstrip()


@artifacts_app.command("ls")
def artifacts_ls(workdir: Annotated[Path | None, typer.Argument(help="Artifact root (default: runs/ or $RELICV2_HOME).")] = None) -> None:
    """List every artifact under WORKDIR with kind, creation time, dataset and headline metrics."""
    workdir = workdir or DEFAULT_WORKDIR
    if not workdir.is_dir():
        raise RelicError(f"no artifact folder {workdir}")
    table = Table(title=str(workdir))
    for column in ("kind", "path", "created", "dataset", "metrics"):
        table.add_column(column)
    for entry in artifacts.list_artifacts(workdir):
        if isinstance(entry, tuple):
            path, problem = entry
            table.add_row("?", str(path.relative_to(workdir)), "", "", f"[red]{problem}")
            continue
        metrics = ", ".join(f"{k}={_short(v)}" for k, v in list(entry.metrics.items())[:4] if not isinstance(v, (dict, list)))
        dataset = (entry.manifest.get("dataset") or {}).get("spec", "")
        table.add_row(entry.kind, str(entry.path.relative_to(workdir)), entry.manifest["created"], dataset, metrics)
    typer.echo(_table_text(table))


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@artifacts_app.command("show")
def artifacts_show(art: Annotated[Path, typer.Argument(help="Artifact directory.")]) -> None:
    """Print an artifact's manifest."""
    typer.echo(json.dumps(artifacts.load_artifact(art).manifest, indent=2))


@artifacts_app.command("verify")
def artifacts_verify(art: Annotated[Path, typer.Argument(help="Artifact directory.")]) -> None:
    """Recheck every file's sha256 against the manifest; non-zero exit naming the file on a mismatch."""
    problems = artifacts.verify_artifact(art)
    if problems:
        raise RelicError(f"{art}: {len(problems)} problem(s): " + "; ".join(problems))
    typer.echo(f"ok: {art}")


@artifacts_app.command("lineage")
def artifacts_lineage(art: Annotated[Path, typer.Argument(help="Artifact directory.")]) -> None:
    """The chain of parent artifacts as a tree (and whether any changed since it was recorded)."""
    rows = artifacts.lineage(artifacts.load_artifact(art))
    root = None
    stack: list[Tree] = []
    for depth, entry, status in rows:
        if isinstance(entry, dict):
            label = f"{entry['kind']} {entry['path']} [red](missing)"
        else:
            data = (entry.manifest.get("dataset") or {}).get("spec")
            label = f"{entry.kind}/{entry.name}  {entry.digest[:12]}" + (f"  data={data}" if data else "")
            if status:
                label += f"  [red]({status})"
        if root is None:
            root = Tree(label)
            stack = [root]
        else:
            del stack[depth:]
            stack.append(stack[-1].add(label))
    typer.echo(_table_text(root))


plain_help(app)


def main() -> None:
    """Entry point: one-line errors and a non-zero exit on bad input; tracebacks only with --debug.

    Typer's standalone mode handles usage errors, --help and typer.Exit; our own errors surface here.
    """
    debug = "--debug" in sys.argv or os.environ.get("RELICV2_DEBUG") == "1"
    if sys.argv[1:] == ["--version"]:
        print(__version__)
        return
    try:
        app()
    except RelicError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001  a bug: still one line unless --debug
        if debug:
            raise
        print(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
