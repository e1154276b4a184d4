"""Command-line options shared by every stage, spelled the same everywhere, plus console helpers.

Each stage module declares its Typer command with these aliases, so `--workdir`, `--limit-train`,
`--arch` and friends mean one thing across the toolkit.
"""

from __future__ import annotations

import math
import os
import signal
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

Spec = Annotated[str, typer.Argument(
    help="Dataset: synthetic, cifar10:DIR, cifar100:DIR, fashion-mnist:DIR, imagefolder:DIR, images:DIR "
         "(unlabelled), npz:FILE or prepared:DIR (relicv2 data prepare).")]
Workdir = Annotated[Path, typer.Option(envvar="RELICV2_HOME",
                                       help="Root folder of artifacts (env RELICV2_HOME).")]
Name = Annotated[str | None, typer.Option(help="Artifact name; default derived from the inputs.")]
Seed = Annotated[int, typer.Option(help="Random seed (also the synthetic dataset's generator seed).")]
Device = Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing artifact of the same name.")]
ForceOut = Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")]
Quiet = Annotated[bool, typer.Option("--quiet",
                                     help="No progress bars or tables; print only the artifact path.")]
LimitTrain = Annotated[int | None, typer.Option(
    help="Use only N training images (folders, prepared sets: a class-balanced subset drawn by --seed).")]
LimitTest = Annotated[int | None, typer.Option(
    help="Use only N test images (folders, prepared sets: a class-balanced subset drawn by --seed).")]
ImageSize = Annotated[int | None, typer.Option(help="Resize images to S x S (synthetic: generate at S).")]
SkipBad = Annotated[bool, typer.Option("--skip-bad",
                                       help="Image folders: skip unreadable or truncated images (listed).")]
# The network: pretrain builds it; eval/analyze use it for random:/torchvision: encoders only.
Arch = Annotated[str, typer.Option(help="resnet18|resnet34|resnet50|resnet101|resnet152|resnet200.")]
Width = Annotated[float, typer.Option(help="Width multiplier of every stage: 0.25, 0.5, 1, 2 or 4.")]
Stem = Annotated[str, typer.Option(help="cifar (3x3/1, no maxpool) or imagenet (7x7/2 + maxpool).")]
Precision = Annotated[str, typer.Option(help="bf16 (autocast) or fp32 for the encoder.")]
BatchSize = Annotated[int, typer.Option(help="Images per optimizer step.")]
Epochs = Annotated[float, typer.Option(help="Passes over the training split.")]
MaxSteps = Annotated[int | None,
                     typer.Option(help="Stop after N optimizer steps; the schedule still spans --epochs.")]
# Evaluation and analysis stages.
Encoder = Annotated[str, typer.Argument(help="Pretrain artifact directory, random:ARCH or torchvision:FILE.")]
Items = Annotated[list[str], typer.Argument(
    help="ENCODER [ENCODER ...] SPEC: one or more encoders (pretrain artifact, random:ARCH, "
         "torchvision:FILE), "
         "then the dataset (synthetic, cifar10:DIR, ...).", metavar="ENCODER... SPEC", show_default=False)]
Split = Annotated[str, typer.Option(help="Split to embed: train, val (when the dataset has one) or test.")]
EmbedBatch = Annotated[int, typer.Option(help="Images per forward pass when features are computed.")]
L2Grid = Annotated[str, typer.Option(help="L2 strengths to try: START:STOP:N log-spaced, or a comma list.")]
ValFraction = Annotated[float,
                        typer.Option(help="Part of train held out to choose L2 (no validation split).")]
Metric = Annotated[str,
                   typer.Option(help="Score that chooses L2 (and the headline): top1 or mean-per-class.")]
MaxIter = Annotated[int, typer.Option(help="L-BFGS iterations per fit.")]
CropFraction = Annotated[str, typer.Option(
    help="Evaluation view: shorter side resized to size / F, centre size x size kept. auto: 0.875 (224/256) "
         "for image folders and prepared sets, 1 for array sets (CIFAR, synthetic, npz, Fashion-MNIST).")]
Workers = Annotated[int | None, typer.Option(
    help="Loader processes that decode image folders and prepared sets a chunk at a time (default: the "
         "usable CPU cores less one, at most 8; 0: in this process).")]
Normalize = Annotated[bool, typer.Option(
    "--normalize/--no-normalize",
    help="L2-normalise features before distances, so encoders of any width compare.")]

DEFAULT_WORKDIR = Path(os.environ.get("RELICV2_HOME", "runs"))
PRECISIONS = ("bf16", "fp32")  # knn.autocast applies them


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


def check_positive(flag: str, value: float | None) -> None:
    """`value` > 0 and finite (None: the option was not given). NaN fails every comparison, so it is
    refused too."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise RelicError(f"{flag} must be positive and finite, got {value}")


def check_range(flag: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    """`value` in [low, high], or (low, high] with `low_open`; NaN is refused."""
    if not ((low < value if low_open else low <= value) and value <= high):
        raise RelicError(f"{flag} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value}")


def check_at_least(flag: str, value: float | None, low: float) -> None:
    """`value` >= low and finite (None: not given); NaN is refused."""
    if value is not None and not (math.isfinite(value) and value >= low):
        raise RelicError(f"{flag} must be at least {low:g} and finite, got {value}")


PROGRESS_EVERY_ENV = "RELICV2_PROGRESS_EVERY"


def progress_every() -> float:
    """Seconds between plain progress lines off a terminal: $RELICV2_PROGRESS_EVERY, default 30."""
    raw = os.environ.get(PROGRESS_EVERY_ENV, "30")
    try:
        every = float(raw)
    except ValueError:
        every = -1.0
    if not every >= 0:  # also catches nan
        raise RelicError(f"{PROGRESS_EVERY_ENV} must be a number of seconds >= 0, got {raw!r}")
    return every


class PlainProgress(Progress):
    """Progress for logs (SLURM, nohup, pipes), where Rich's redrawn bar shows nothing until the end.

    Tasks are tracked as by Rich (speed and ETA over its 30 s window) but never drawn; instead each
    task prints a line when it advances and `every` seconds have passed since its last line, and
    one when it finishes (unless it is a nested task that took less than `every` seconds). A task may
    carry `unit` (what it counts, e.g. "images") and `images_per_item` (e.g. the batch size of a
    step) fields for the rate.
    """

    def __init__(self, every: float):
        super().__init__(console=console, disable=True)
        self.every = every
        self._printed: dict = {}  # task id -> (time, completed) of its last line

    def add_task(self, description: str, *args, **kwargs):
        task_id = super().add_task(description, *args, **kwargs)
        self._printed[task_id] = (self.get_time(), self._tasks[task_id].completed)
        return task_id

    def update(self, task_id, **kwargs) -> None:
        before = self._tasks[task_id].completed
        super().update(task_id, **kwargs)
        self._maybe_print(task_id, before)

    def advance(self, task_id, advance: float = 1) -> None:
        before = self._tasks[task_id].completed
        super().advance(task_id, advance)
        self._maybe_print(task_id, before)

    def _maybe_print(self, task_id, before: float) -> None:
        # Only on a call that advances the task: `update(info=...)` then `update(completed=...)`
        # prints the step with its own info.
        task = self._tasks[task_id]
        last_time, last_completed = self._printed[task_id]
        now = self.get_time()
        # The end of the bar's first task always shows; a quick nested task (a pretrain run's
        # evaluation) stays quiet.
        ending = task.finished and (task_id == self.task_ids[0] or (task.elapsed or 0) >= self.every)
        if task.completed in (before, last_completed) or (now - last_time < self.every and not ending):
            return
        self._printed[task_id] = (now, task.completed)
        console.print(self.line(task), markup=False, highlight=False, soft_wrap=True)

    @staticmethod
    def line(task) -> str:
        """e.g. `relicv2 demo: 120/1000 (12%) loss 1.234 | 3.1 it/s, 794 images/s | 0:00:39 elapsed,
        ETA 0:04:44` (one line)."""
        total = f"/{task.total:g} ({100 * task.completed / task.total:.0f}%)" if task.total else ""
        info = str(task.fields.get("info") or "")
        parts = [f"{task.description}: {task.completed:g}{total}" + (f" {info}" if info else "")]
        speed = task.finished_speed or task.speed
        if speed:
            rate = f"{speed:.3g} {task.fields.get('unit', 'it')}/s"
            if task.fields.get("images_per_item"):
                rate += f", {speed * task.fields['images_per_item']:.0f} images/s"
            parts.append(rate)
        clock = f"{_hms(task.elapsed or 0)} elapsed"
        if task.finished:
            clock += ", done"
        elif task.time_remaining is not None:
            clock += f", ETA {_hms(task.time_remaining)}"
        return " | ".join([*parts, clock])


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@contextmanager
def progress_bar(quiet: bool):
    """A Rich progress bar in a terminal, plain lines every $RELICV2_PROGRESS_EVERY seconds
    otherwise (PlainProgress), nothing with --quiet; yields the Progress to add tasks to."""
    if not quiet and not console.is_terminal:
        with PlainProgress(progress_every()) as progress:
            yield progress
        return
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


@contextmanager
def handle_signals(handler, signals=(signal.SIGTERM, signal.SIGINT)):
    """`handler(signum, frame)` handles `signals` inside the block; the previous handlers come back
    after it. Outside the main thread, where Python cannot set handlers, the block runs without."""
    try:
        previous = {sig: signal.signal(sig, handler) for sig in signals}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
