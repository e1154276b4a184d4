"""The resumable training state of a run: one plain dict in checkpoint.pt, written atomically and
loaded only when the run's config matches the one that wrote it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from relicv2_cli.artifacts import CHECKPOINT, atomic_write, jsonable, load_torch_file
from relicv2_cli.errors import RelicError


def nonfinite_tensors(state: dict) -> list[str]:
    """Dotted names of the floating-point tensors in `state` (nested dicts and lists) holding a NaN
    or an infinity, in order; one host sync per device."""
    named = []

    def walk(value, name):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            named.append((name, value))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(v, f"{name}.{i}" if name else str(i))

    walk(state, "")
    bad = set()
    for device in {t.device for _, t in named}:  # AdamW keeps its step counts on the CPU
        on_device = [(name, t) for name, t in named if t.device == device]
        finite = torch.stack([torch.isfinite(t).all() for _, t in on_device]).tolist()
        bad |= {name for (name, _), ok in zip(on_device, finite, strict=True) if not ok}
    return [name for name, _ in named if name in bad]


class Checkpoint:
    """checkpoint.pt in `directory` for a run with `config` (a JSON-able dict, stored in the file).

    `may_change`: config keys a resumed run may set differently (when to stop, bookkeeping).
    `added_later`: keys that checkpoints written before they existed lack, each with the value that
    reproduces what those runs did; a checkpoint without such a key is compared as if it had it."""

    def __init__(self, directory: Path, config: dict, may_change: tuple[str, ...] = (),
                 added_later: dict | None = None):
        self.path = Path(directory) / CHECKPOINT
        self.config = jsonable(config)
        self.may_change = may_change
        self.added_later = added_later or {}

    def save(self, state: dict) -> None:
        """Write `state` plus the config; the previous file stays whole until the final rename, and a
        full disk is a one-line error (torch.save to a file object reports the errno)."""
        atomic_write(self.path, lambda f: torch.save({**state, "config": self.config}, f))

    def load(self, device: torch.device) -> dict:
        """The saved state; a RelicError when there is none, it is unreadable or the run's settings differ."""
        if not self.path.exists():
            raise RelicError(f"nothing to resume: no {CHECKPOINT} in {self.path.parent}")
        for stale in self.path.parent.glob(f".{CHECKPOINT}.*.tmp"):  # a write killed midway (SIGKILL)
            stale.unlink(missing_ok=True)
        state = load_torch_file(self.path, map_location=device)
        saved = {k: v for k, v in {**self.added_later, **state["config"]}.items() if k not in self.may_change}
        # Compared as torch.load returns the saved copy: plain JSON values.
        now = {k: v for k, v in json.loads(json.dumps(self.config)).items() if k not in self.may_change}
        changed = sorted(k for k in now if saved.get(k) != now[k])
        if changed:
            raise RelicError("--resume with different settings than the interrupted run: "
                             f"{', '.join(changed)}")
        return state
