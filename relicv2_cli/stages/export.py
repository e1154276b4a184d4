"""`relicv2 export`: a pretrain artifact's backbone as one file other code loads, and `load_backbone`.

Formats (docs/export.md has the loading one-liners):
- `safetensors` (default): this toolkit's layout, any arch/width/stem; metadata in the safetensors
  header; `relicv2_cli.load_backbone(FILE)` rebuilds the network.
- `torchvision` / `timm`: a torch state_dict (`torch.save`) with torchvision's key names, which
  timm's ResNet shares (conv1, bn1, layer1..4 with downsample.0/1; no `fc.*`: the backbone ends at
  the pooled features). Only an ImageNet-stem, width-1 network has those libraries' shapes; anything
  else is refused with the reason. The metadata rides on the state_dict as the attribute
  `relicv2_metadata` (kept by torch.save/torch.load and ignored by load_state_dict).

`--network online` is the trained encoder (`backbone.safetensors`); `--network target` is the EMA
target's encoder, read from the artifact's `checkpoint.pt` (key `target`, encoder parameters and
BN statistics under the `encoder.` prefix). Supervised runs have no target.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from pathlib import Path
from typing import Annotated

import torch
import typer
from torch import nn

from relicv2_cli import __version__, options
from relicv2_cli.artifacts import atomic_write_bytes
from relicv2_cli.augment import IMAGENET_MEAN, IMAGENET_STD
from relicv2_cli.encoders import _load_backbone, load_encoder
from relicv2_cli.errors import RelicError
from relicv2_cli.models import build_resnet

FORMATS = ("safetensors", "torchvision", "timm")
NETWORKS = ("online", "target")
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # no resnet200 there
METADATA_ATTR = "relicv2_metadata"
_JSON_FIELDS = ("width", "image_size", "mean", "std", "feature_dim")  # non-strings in the safetensors header


def foreign_layout_problem(arch: str, width: float, stem: str, fmt: str) -> str | None:
    """Why the network does not fit torchvision's/timm's ResNet of the same name (None when it does)."""
    reasons = []
    if stem != "imagenet":
        reasons.append(f"its {stem} stem is a 3x3 stride-1 conv1 without max-pool (theirs: 7x7 stride 2 + max-pool)")
    if float(width) != 1.0:
        reasons.append(f"its width {float(width):g} gives {int(64 * width)} stem channels (theirs: 64)")
    if fmt == "torchvision" and arch not in TORCHVISION_ARCHS:
        reasons.append(f"torchvision has no {arch}")
    if not reasons:
        return None
    return (f"cannot export as --format {fmt}: {fmt}'s {arch} has another shape ({'; '.join(reasons)}); "
            "use --format safetensors (this toolkit's layout) and load it with relicv2_cli.load_backbone(FILE)")


def backbone_state(art_path: str | Path, network: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The encoder state_dict of the online or EMA target network, and the export metadata."""
    options.check_choice("--network", network, NETWORKS)
    encoder = load_encoder(art_path)  # checks the artifact kind and its backbone against its config
    art = encoder.parent
    if network == "online":
        state = encoder.model.state_dict()
    else:
        method = art.config.get("method", "?")
        checkpoint = art.file("checkpoint.pt")
        try:
            saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (truncated or foreign files)
            raise RelicError(f"cannot read {checkpoint}: {e}") from None
        target = saved.get("target") if isinstance(saved, dict) else None
        if not target:
            raise RelicError(f"{art.path} ({method}) has no EMA target network in checkpoint.pt; use --network online")
        state = {k.removeprefix("encoder."): v for k, v in target.items() if k.startswith("encoder.")}
        model = build_resnet(encoder.arch, encoder.width, encoder.stem)
        _load_backbone(model, state, f"{checkpoint} (target)", f"its config ({encoder.arch}, width "
                       f"{encoder.width:g}, {encoder.stem})")
        state = model.state_dict()
    metadata = {"network": network, "arch": encoder.arch, "width": encoder.width, "stem": encoder.stem,
                "image_size": encoder.image_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "feature_dim": encoder.feature_dim, "method": art.config.get("method", "?"),
                "artifact": str(art.path.resolve()), "digest": art.digest, "relicv2": __version__}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata


def export_backbone(art_path: str | Path, out: str | Path, *, network: str = "online", fmt: str = "safetensors",
                    force: bool = False) -> tuple[Path, dict]:
    """Write the backbone file; returns its path and metadata. Refuses to overwrite without force."""
    options.check_choice("--format", fmt, FORMATS)
    out = Path(out)
    suffixes = (".safetensors",) if fmt == "safetensors" else (".pth", ".pt")
    if out.suffix not in suffixes:
        raise RelicError(f"--out for --format {fmt} must end in {' or '.join(suffixes)}, got {out}")
    if out.exists() and not force:
        raise RelicError(f"{out} exists (use --force to replace it)")
    if not out.parent.is_dir():
        raise RelicError(f"--out folder {out.parent} does not exist")
    state, metadata = backbone_state(art_path, network)
    metadata["format"] = fmt
    if fmt != "safetensors":
        problem = foreign_layout_problem(metadata["arch"], metadata["width"], metadata["stem"], fmt)
        if problem:
            raise RelicError(problem)
    if fmt == "safetensors":
        from safetensors.torch import save

        header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
        data = save(state, metadata=header)
    else:
        ordered = OrderedDict(state)
        setattr(ordered, METADATA_ATTR, metadata)
        buffer = io.BytesIO()
        torch.save(ordered, buffer)
        data = buffer.getvalue()
    atomic_write_bytes(out, data)
    return out, metadata


def one_liner(metadata: dict, path: Path) -> str:
    """How to load the exported file, for the console and docs/export.md."""
    arch = metadata["arch"]
    if metadata["format"] == "torchvision":
        return (f"m = torchvision.models.{arch}(); m.fc = torch.nn.Identity(); "
                f"m.load_state_dict(torch.load('{path}'))")
    if metadata["format"] == "timm":
        return f"m = timm.create_model('{arch}', num_classes=0); m.load_state_dict(torch.load('{path}'))"
    return f"m = relicv2_cli.load_backbone('{path}')"


def load_backbone(path: str | Path) -> nn.Module:
    """See relicv2_cli.load_backbone."""
    path = Path(path)
    if path.is_dir():
        state, metadata = backbone_state(path, "online")
    elif not path.is_file():
        raise RelicError(f"no backbone file or pretrain artifact at {path}")
    elif path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise RelicError(f"cannot read {path} as safetensors: {e}") from None
        metadata = {k: json.loads(v) if k in _JSON_FIELDS else v for k, v in header.items()}
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (pickle refusals, truncated zips, ...)
            raise RelicError(f"cannot load {path} with torch.load(weights_only=True): {e}") from None
        metadata = getattr(state, METADATA_ATTR, None) or {}
    missing = [k for k in ("arch", "width", "stem") if k not in metadata]
    if missing:
        raise RelicError(f"{path} has no relicv2 metadata ({', '.join(missing)}): not written by `relicv2 export`")
    model = build_resnet(metadata["arch"], float(metadata["width"]), metadata["stem"])
    _load_backbone(model, dict(state), str(path), f"its metadata ({metadata['arch']}, width "
                   f"{float(metadata['width']):g}, {metadata['stem']})")
    model.eval()
    model.metadata = metadata
    return model


# ------------------------------------------------------------------------------------------------
# `relicv2 export`


def command(
    art: Annotated[Path, typer.Argument(help="A pretrain artifact directory.", show_default=False)],
    out: Annotated[Path, typer.Option(help="File to write: .safetensors, or .pth/.pt for torchvision/timm.",
                                      show_default=False)],
    network: Annotated[str, typer.Option(help="online (the trained encoder) or target (the EMA target's encoder).")] = "online",
    fmt: Annotated[str, typer.Option("--format", help="safetensors (any network; relicv2_cli.load_backbone), torchvision or timm (ImageNet stem, width 1 only).")] = "safetensors",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    quiet: options.Quiet = False,
) -> None:
    """Export a pretrain artifact's backbone (online or EMA target) for torchvision, timm or safetensors."""
    path, metadata = export_backbone(art, out, network=network, fmt=fmt, force=force)
    if not quiet:
        options.console.print(f"{metadata['network']} {metadata['arch']} (width {metadata['width']:g}, "
                              f"{metadata['stem']} stem) of {art} -> {path}\nload: {one_liner(metadata, path)}",
                              markup=False, highlight=False, soft_wrap=True)
    options.finish(path)
