"""Where a pretrain run's metrics go: metrics.jsonl, and with `--logger` the same scalars to
TensorBoard or MLflow.

Both are optional extras (`pip install 'relicv2-cli[tensorboard]'` or `[mlflow]`), imported only
when asked for; a missing package is a one-line error naming the extra. Every numeric field of a
metrics.jsonl line except `step` becomes one scalar series, at that line's step:
- tensorboard: `SummaryWriter(RUN/tensorboard)` inside the artifact (`tensorboard --logdir RUN`);
  a resumed run purges the events after the step it resumes from, as metrics.jsonl drops its lines;
- mlflow: one MLflow run named after the artifact, the run's config as parameters; where it goes
  is MLflow's own setting (MLFLOW_TRACKING_URI, default ./mlruns).
"""

from __future__ import annotations

import json
from pathlib import Path

from relicv2_cli.errors import RelicError

LOGGERS = ("tensorboard", "mlflow")


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a metrics record, `step` excepted (bools are not scalars)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


def _missing(logger: str) -> RelicError:
    return RelicError(f"--logger {logger} needs the {logger} package: pip install 'relicv2-cli[{logger}]'")


class _TensorBoard:
    def __init__(self, run_dir: Path, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step or None)

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, name: str, params: dict):
        try:
            import mlflow
        except ImportError:
            raise _missing("mlflow") from None
        self.mlflow = mlflow
        mlflow.start_run(run_name=name)
        mlflow.log_params({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in params.items()})

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class RunLog:
    """metrics.jsonl (appended to) plus the `logger`'s scalars. `path=None` (processes other than
    rank 0) writes nothing. `params`: the run's config, for MLflow; `start_step`: where a resumed
    run continues."""

    def __init__(self, path: Path | None, logger: str | None = None, *, name: str = "",
                 params: dict | None = None, start_step: int = 0):
        if logger is not None and logger not in LOGGERS:
            raise RelicError(f"--logger must be one of {', '.join(LOGGERS)}; got {logger!r}")
        self.file = open(path, "a") if path is not None else None  # noqa: SIM115  closed by close()
        self.external = None
        if path is not None and logger is not None:
            try:
                self.external = (_TensorBoard(Path(path).parent, start_step) if logger == "tensorboard"
                                 else _MLflow(name, params or {}))
            except BaseException:
                self.file.close()
                raise

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.external is not None:
            self.external.log(scalars(record), record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.external is not None:
            self.external.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
