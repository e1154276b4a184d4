"""Command-line options shared by every stage, spelled the same everywhere, plus console helpers.

Each stage module declares its Typer command with these aliases, so `--workdir`, `--limit-train`,
`--arch` and friends mean one thing across the toolkit.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from relicv2_cli.errors import RelicError

console = Console(stderr=True)  # progress and tables on stderr; stdout's last line is the artifact path

Spec = Annotated[str, typer.Argument(help="Dataset: synthetic, cifar10:DIR, cifar100:DIR, fashion-mnist:DIR, imagefolder:DIR or npz:FILE.")]
Workdir = Annotated[Path, typer.Option(envvar="RELICV2_HOME", help="Root folder of artifacts (env RELICV2_HOME).")]
Name = Annotated[str | None, typer.Option(help="Artifact name; default derived from the inputs.")]
Seed = Annotated[int, typer.Option(help="Random seed (also the synthetic dataset's generator seed).")]
Device = Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing artifact of the same name.")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars or tables; print only the artifact path.")]
LimitTrain = Annotated[int | None, typer.Option(help="Use only the first N training images (recorded in the fingerprint).")]
LimitTest = Annotated[int | None, typer.Option(help="Use only the first N test images (recorded in the fingerprint).")]
ImageSize = Annotated[int | None, typer.Option(help="Resize images to S x S (synthetic: generate at S; default: native size).")]
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="imagefolder: skip unreadable images (counted) instead of failing.")]
Arch = Annotated[str, typer.Option(help="resnet18|resnet34|resnet50|resnet101|resnet152|resnet200.")]
Width = Annotated[float, typer.Option(help="Width multiplier of every stage: 0.25, 0.5, 1, 2 or 4.")]
Stem = Annotated[str, typer.Option(help="cifar (3x3/1, no maxpool; small images) or imagenet (7x7/2 + maxpool).")]
BatchSize = Annotated[int, typer.Option(help="Images per optimizer step.")]
Epochs = Annotated[float, typer.Option(help="Passes over the training split.")]
MaxSteps = Annotated[int | None, typer.Option(help="Stop after N optimizer steps (smoke runs); the schedule still spans --epochs.")]
Precision = Annotated[str, typer.Option(help="bf16 (autocast; default where supported) or fp32.")]

DEFAULT_WORKDIR = Path(os.environ.get("RELICV2_HOME", "runs"))


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RelicError("--device cuda asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise RelicError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def check_choice(flag: str, value, valid) -> None:
    if value not in valid:
        raise RelicError(f"{flag} must be one of {', '.join(map(str, valid))}; got {value!r}")


@contextmanager
def progress_bar(quiet: bool):
    """A Rich progress bar (hidden with --quiet); yields the Progress to add tasks to."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
        yield progress


def finish(path: Path) -> None:
    """Every command that writes an artifact prints its path as the last line of stdout."""
    print(path)
