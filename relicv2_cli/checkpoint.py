"""The resumable training state of a run: one plain dict in checkpoint.pt, written atomically and
loaded only when the run's config matches the one that wrote it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from relicv2_cli.artifacts import CHECKPOINT, jsonable
from relicv2_cli.errors import RelicError


class Checkpoint:
    """checkpoint.pt in `directory` for a run with `config` (a JSON-able dict, stored in the file).

    `may_change`: config keys a resumed run may set differently (when to stop, bookkeeping)."""

    def __init__(self, directory: Path, config: dict, may_change: tuple[str, ...] = ()):
        self.path = Path(directory) / CHECKPOINT
        self.config = jsonable(config)
        self.may_change = may_change

    def save(self, state: dict) -> None:
        """Write `state` plus the config; the previous file stays whole until the final rename."""
        tmp = self.path.with_name(CHECKPOINT + ".tmp")
        torch.save({**state, "config": self.config}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def load(self, device: torch.device) -> dict:
        """The saved state; a RelicError when there is none or the run's settings differ."""
        if not self.path.exists():
            raise RelicError(f"nothing to resume: no {CHECKPOINT} in {self.path.parent}")
        state = torch.load(self.path, map_location=device, weights_only=True)
        saved = {k: v for k, v in state["config"].items() if k not in self.may_change}
        # Compared as torch.load returns the saved copy: plain JSON values.
        now = {k: v for k, v in json.loads(json.dumps(self.config)).items() if k not in self.may_change}
        changed = sorted(k for k in now if saved.get(k) != now[k])
        if changed:
            raise RelicError("--resume with different settings than the interrupted run: "
                             f"{', '.join(changed)}")
        return state
