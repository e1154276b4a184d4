"""`relicv2 export`: a pretrain artifact's backbone as one file other code loads.

Formats (docs/export.md has the loading one-liners):
- `safetensors` (default): this toolkit's layout, any arch/width/stem; metadata in the safetensors
  header; `relicv2_cli.load_backbone(FILE)` rebuilds the network.
- `torchvision` / `timm`: a torch state_dict (`torch.save`) with torchvision's key names, which
  timm's ResNet shares (conv1, bn1, layer1..4 with downsample.0/1; no `fc.*`: the backbone ends at
  the pooled features). Only an ImageNet-stem, width-1 network has those libraries' shapes; anything
  else is refused with the reason. The metadata rides on the state_dict (backbone.METADATA_ATTR).

`--network online|target` and the metadata: relicv2_cli/backbone.py, which also loads the files.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from pathlib import Path
from typing import Annotated

import torch
import typer

from relicv2_cli import options
from relicv2_cli.artifacts import atomic_write_bytes
from relicv2_cli.backbone import METADATA_ATTR, backbone_state
from relicv2_cli.errors import RelicError

FORMATS = ("safetensors", "torchvision", "timm")
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # no resnet200 there


def foreign_layout_problem(arch: str, width: float, stem: str, fmt: str) -> str | None:
    """Why the network does not fit torchvision's/timm's ResNet of the same name (None when it does)."""
    reasons = []
    if stem != "imagenet":
        reasons.append(f"its {stem} stem is a 3x3 stride-1 conv1 without max-pool "
                       "(theirs: 7x7 stride 2 + max-pool)")
    if float(width) != 1.0:
        reasons.append(f"its width {float(width):g} gives {int(64 * width)} stem channels (theirs: 64)")
    if fmt == "torchvision" and arch not in TORCHVISION_ARCHS:
        reasons.append(f"torchvision has no {arch}")
    if not reasons:
        return None
    return (f"cannot export as --format {fmt}: {fmt}'s {arch} has another shape ({'; '.join(reasons)}); "
            "use --format safetensors (this toolkit's layout) and load it with "
            "relicv2_cli.load_backbone(FILE)")


def export_backbone(art_path: str | Path, out: str | Path, *, network: str = "online",
                    fmt: str = "safetensors", force: bool = False) -> tuple[Path, dict]:
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
                f"m.load_state_dict(torch.load('{path}', weights_only=True))")
    if metadata["format"] == "timm":
        return (f"m = timm.create_model('{arch}', num_classes=0); "
                f"m.load_state_dict(torch.load('{path}', weights_only=True))")
    return f"m = relicv2_cli.load_backbone('{path}')"


# ------------------------------------------------------------------------------------------------
# `relicv2 export`


def command(
    art: Annotated[Path, typer.Argument(help="A pretrain artifact directory.", show_default=False)],
    out: Annotated[Path, typer.Option(help="File to write: .safetensors, or .pth/.pt for torchvision/timm.",
                                      show_default=False)],
    network: Annotated[str, typer.Option(
        help="online (the trained encoder) or target (the EMA target's encoder).")] = "online",
    fmt: Annotated[str, typer.Option("--format", help="safetensors (any network; relicv2_cli.load_backbone), "
                                     "torchvision or timm (ImageNet stem, width 1 only).")] = "safetensors",
    force: options.ForceOut = False,
    quiet: options.Quiet = False,
) -> None:
    """Export a pretrain artifact's backbone (online or EMA target) for torchvision, timm or safetensors."""
    path, metadata = export_backbone(art, out, network=network, fmt=fmt, force=force)
    if not quiet:
        options.console.print(f"{metadata['network']} {metadata['arch']} (width {metadata['width']:g}, "
                              f"{metadata['stem']} stem) of {art} -> {path}\n"
                              f"load: {one_liner(metadata, path)}", markup=False, highlight=False,
                              soft_wrap=True)
    options.finish(path)
