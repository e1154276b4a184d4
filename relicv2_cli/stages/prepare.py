"""`relicv2 data prepare SPEC`: re-encode a dataset once into HDF5 shards (a `dataset` artifact).

The logic lives in relicv2_cli/data/prepared.py; this file holds the options, the checks and the
artifact's staging, commit and resume. Imports stay light: cli.py imports this module on start.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from relicv2_cli import artifacts, options
from relicv2_cli.errors import RelicError

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of `4000`, `64M`, `64MiB`, `1G`, `1GiB` (binary units, case-insensitive)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not found or float(found.group(1)) <= 0:
        raise RelicError(f"--shard-size must be a positive size such as 1GiB, 256MiB or 4000, got {text!r}")
    return max(1, int(float(found.group(1)) * _UNITS[found.group(2).lower()]))


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _raise_interrupt(signum, frame):
    """SIGTERM stops the run like Ctrl-C: finished shards stay for --resume."""
    raise KeyboardInterrupt


def run(
    spec: str,
    *,
    workdir: Path = options.DEFAULT_WORKDIR,
    name: str | None = None,
    max_side: int = 256,
    quality: int = 95,
    shard_size: str = "1GiB",
    workers: int | None = None,
    skip_bad: bool = False,
    limit_train: int | None = None,
    limit_test: int | None = None,
    seed: int = 0,
    force: bool = False,
    resume: bool = False,
    quiet: bool = False,
) -> artifacts.Artifact:
    """Prepare SPEC and commit the `dataset` artifact WORKDIR/dataset/NAME."""
    from relicv2_cli.data import load_dataset
    from relicv2_cli.data.prepared import PrepareOptions, prepare

    if max_side < 0:
        raise RelicError(f"--max-side must be 0 (keep the size) or positive, got {max_side}")
    options.check_range("--quality", quality, 1, 100)
    workers = workers if workers is not None else _cpu_count()
    if workers < 1:
        raise RelicError(f"--workers must be at least 1, got {workers}")
    opts = PrepareOptions(max_side=max_side, quality=quality, shard_size=parse_size(shard_size),
                          workers=workers, skip_bad=skip_bad)
    # Not load_dataset's --skip-bad header check: prepare decodes every image and skips bad ones itself.
    dataset = load_dataset(spec, limit_train=limit_train, limit_test=limit_test, seed=seed)
    kind, _, arg = spec.partition(":")
    root = str(Path(arg).expanduser())
    default = f"{kind}-{Path(arg).name}-{max_side or 'full'}"
    name = name or re.sub(r"[^A-Za-z0-9._+-]+", "-", default).strip("-.")
    # What the artifact depends on; a resumed run must be asked the same (workers may change).
    request = {"spec": spec, "limit_train": limit_train, "limit_test": limit_test, "seed": seed,
               "max_side": max_side, "quality": quality, "shard_size": opts.shard_size, "skip_bad": skip_bad}
    staging = artifacts.Staging(Path(workdir), "dataset", name, force=force, resume=resume, resumable=True,
                                checkpoint="dataset.json")
    start = time.perf_counter()
    with staging, options.handle_signals(_raise_interrupt, (signal.SIGTERM,)):
        with options.progress_bar(quiet) as progress:
            index = prepare(dataset, root, staging.dir, opts, request, progress, resume)
        seconds = time.perf_counter() - start
        splits = index["splits"]
        stored = sum(p.stat().st_size for p in staging.dir.glob("*.h5"))
        metrics = {**{f"{s}_count": info["count"] for s, info in splits.items()},
                   **{f"{s}_skipped": len(info["skipped"]) for s, info in splits.items()},
                   "shards": sum(len(info["shards"]) for info in splits.values()), "bytes": stored,
                   "seconds": round(seconds, 2)}
        record = {"spec": spec, "train_count": len(dataset.train), "test_count": len(dataset.test),
                  "limit_train": limit_train, "limit_test": limit_test}
        if limit_train or limit_test:
            record["seed"] = seed
        art = staging.commit(config={**request, **asdict(opts)}, dataset=record, metrics=metrics)
    if not quiet:
        counts = ", ".join(f"{s} {info['count']:,}" + (f" ({len(info['skipped'])} skipped)" if info["skipped"]
                                                       else "") for s, info in splits.items())
        options.console.print(f"prepared {counts} images in {metrics['shards']} shard(s), "
                              f"{stored / 2**20:.1f} MiB, {seconds:.1f} s")
    return art


def command(
    spec: options.Spec,
    max_side: Annotated[int, typer.Option(help="Cap the shorter side at S px (aspect kept, area "
                                               "interpolation); 0 keeps every image's size.")] = 256,
    quality: Annotated[int, typer.Option(help="JPEG quality of the re-encoded images, 1-100.")] = 95,
    shard_size: Annotated[str, typer.Option(help="About this many bytes of images per HDF5 shard "
                                                 "(e.g. 1GiB, 256MiB).")] = "1GiB",
    workers: Annotated[int | None, typer.Option(
        help="Processes that decode, resize and encode (default: all cores).")] = None,
    skip_bad: options.SkipBad = False,
    limit_train: options.LimitTrain = None,
    limit_test: options.LimitTest = None,
    seed: options.Seed = 0,
    workdir: options.Workdir = options.DEFAULT_WORKDIR,
    name: options.Name = None,
    force: options.Force = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted prepare after its "
                                                          "last finished shard.")] = False,
    quiet: options.Quiet = False,
) -> None:
    """Re-encode SPEC once as JPEG in HDF5 shards (a `dataset` artifact); read it back as prepared:DIR."""
    art = run(spec, workdir=workdir, name=name, max_side=max_side, quality=quality, shard_size=shard_size,
              workers=workers, skip_bad=skip_bad, limit_train=limit_train, limit_test=limit_test, seed=seed,
              force=force, resume=resume, quiet=quiet)
    options.finish(art.path)
