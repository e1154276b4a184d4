"""ENCODER specs shared by every evaluation and analysis stage.

An ENCODER is one of
- a `pretrain` artifact directory (RELICv2, BYOL or supervised): `backbone.safetensors` plus the
  manifest's `arch`, `width`, `stem` and `image_size` (the side it was trained at);
- `random:ARCH`: a randomly initialised network of that architecture, with --width/--stem, seeded
  by --seed (the "random init" baseline, and the from-scratch baseline of the semi stage);
- `torchvision:FILE`: a torchvision ResNet state_dict (e.g. `resnet50-*.pth`), loaded with
  `torch.load(weights_only=True)`; `fc.*` is dropped and every other key must match the network
  built from --arch/--width/--stem (MoCo v3's check).

`load_encoder` returns an `Encoder`: the network in eval mode on the CPU, a label for tables, a
`key` that identifies its weights (used to name cached features) and a `record` for manifests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from relicv2_cli.artifacts import Artifact, load_artifact, load_torch_file, sha256_file
from relicv2_cli.errors import RelicError
from relicv2_cli.models import build_resnet, check_network

BACKBONE = "backbone.safetensors"


@dataclass
class Encoder:
    model: nn.Module  # pooled features (B, feature_dim); eval mode, CPU
    label: str  # for tables: "pretrain/NAME (relicv2)", "random:resnet18", "torchvision:FILE"
    key: str  # identifies the weights: backbone or file sha256, or the random-init recipe
    record: dict  # for manifests: spec, digest/sha256, arch, width, stem, image_size
    parent: Artifact | None  # the pretrain artifact, if any
    arch: str
    width: float
    stem: str
    image_size: int | None  # side the encoder was trained at; None when unknown (random, torchvision)

    @property
    def feature_dim(self) -> int:
        return int(self.model.feature_dim)

    @property
    def slug(self) -> str:
        """A short file-name-safe name, for default artifact names."""
        return slugify(self.label)


def slugify(text: str, limit: int = 48) -> str:
    text = re.sub(r"[^A-Za-z0-9._+-]+", "-", text.replace("pretrain/", "")).strip("-.")
    return text[:limit].rstrip("-.") or "encoder"


def load_encoder(
    spec: str | Path,
    *,
    arch: str = "resnet18",
    width: float = 1.0,
    stem: str = "cifar",
    seed: int = 0,
) -> Encoder:
    """Build the encoder named by `spec` (see the module docstring). arch/width/stem apply to
    `random:` (only width/stem; ARCH comes from the spec) and `torchvision:` encoders; a pretrain
    artifact brings its own. Bad specs, wrong artifact kinds and mismatched weights raise RelicError."""
    spec = str(spec)
    if spec.startswith("random:"):
        arch = spec.split(":", 1)[1]
        check_network(arch, width, stem)
        # A private generator state: the init is a function of the seed only, and the caller's
        # global RNG is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_resnet(arch, width, stem)
        key = f"random:{arch}:w{float(width):g}:{stem}:seed{seed}"
        record = {"spec": spec, "type": "random", "arch": arch, "width": float(width), "stem": stem,
                  "seed": seed, "image_size": None}
        return _finish(model, spec, key, record, None, arch, width, stem, None)

    if spec.startswith("torchvision:"):
        path = Path(spec.split(":", 1)[1]).expanduser()
        check_network(arch, width, stem)
        if not path.is_file():
            raise RelicError(f"torchvision weights not found: {path}")
        state = load_torch_file(path)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise RelicError(f"{path} is not a state_dict (a dict of tensor names to tensors)")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        model = build_resnet(arch, width, stem)
        _load_backbone(model, {k: v for k, v in state.items() if not k.startswith("fc.")}, f"{path}",
                       f"--arch {arch} --width {float(width):g} --stem {stem}")
        digest = sha256_file(path)
        record = {"spec": spec, "type": "torchvision", "sha256": digest, "arch": arch, "width": float(width),
                  "stem": stem, "image_size": None}
        return _finish(model, f"torchvision:{path.name}", f"torchvision:{digest}", record, None,
                       arch, width, stem, None)

    path = Path(spec)
    if not path.exists():
        raise RelicError(
            f"unknown encoder {spec!r}: expected a pretrain artifact directory, random:ARCH or torchvision:FILE"
        )
    art = load_artifact(path, kind="pretrain")
    config = art.config
    try:
        arch, width, stem = config["arch"], float(config["width"]), config["stem"]
    except KeyError as e:
        raise RelicError(f"pretrain artifact {path} has no {e.args[0]!r} in its config") from None
    image_size = config.get("image_size")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(art.file(BACKBONE)))
    except (SafetensorError, OSError) as e:
        raise RelicError(f"corrupt backbone.safetensors in {path}: {e}") from None
    model = build_resnet(arch, width, stem)
    _load_backbone(model, state, f"{path}/backbone.safetensors", f"its config ({arch}, width {width:g}, {stem})")
    method = config.get("method", "?")
    record = {"spec": str(path), "type": "pretrain", "digest": art.digest, "method": method, "arch": arch,
              "width": width, "stem": stem, "image_size": image_size}
    # Keyed by the weights' own hash (checked by art.file above), so cached features follow the bytes.
    return _finish(model, f"pretrain/{art.name} ({method})", f"pretrain:{art.sha256(BACKBONE)}", record, art,
                   arch, width, stem, image_size)


def _load_backbone(model: nn.Module, state: dict, source: str, expected: str) -> None:
    """Strict load with a readable error: every key of the network must come from `state`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} with another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise RelicError(f"{source} does not match the network built from {expected}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _finish(model, label, key, record, parent, arch, width, stem, image_size) -> Encoder:
    model.eval()
    model.requires_grad_(False)
    return Encoder(model=model, label=label, key=key, record=record, parent=parent, arch=arch,
                   width=float(width), stem=stem, image_size=image_size)
