"""A pretrain artifact's backbone as a state_dict with metadata, and `load_backbone` of the files
`relicv2 export` writes (stages/export.py) or of an artifact directory.

`online` is the trained encoder (`backbone.safetensors`); `target` is the EMA target's encoder,
read from the artifact's `checkpoint.pt` (key `target`, encoder parameters and BN statistics under
the `encoder.` prefix). Supervised runs have no target. The metadata of a safetensors file is in
its header (strings; JSON_FIELDS hold JSON); a torch file carries it on the state_dict as the
attribute METADATA_ATTR (kept by torch.save/torch.load and ignored by load_state_dict).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from relicv2_cli import __version__, options
from relicv2_cli.artifacts import CHECKPOINT, load_torch_file
from relicv2_cli.augment import IMAGENET_MEAN, IMAGENET_STD
from relicv2_cli.encoders import _load_backbone, load_encoder
from relicv2_cli.errors import RelicError
from relicv2_cli.models import build_resnet

NETWORKS = ("online", "target")
METADATA_ATTR = "relicv2_metadata"
JSON_FIELDS = ("width", "image_size", "mean", "std", "feature_dim")  # non-strings in the header


def backbone_state(art_path: str | Path, network: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The encoder state_dict of the online or EMA target network, and the export metadata."""
    options.check_choice("--network", network, NETWORKS)
    encoder = load_encoder(art_path)  # checks the artifact kind and its backbone against its config
    art = encoder.parent
    method = art.config.get("method", "?")
    if network == "online":
        state = encoder.model.state_dict()
    else:
        checkpoint = art.file(CHECKPOINT)
        saved = load_torch_file(checkpoint)
        target = saved.get("target") if isinstance(saved, dict) else None
        if not target:
            raise RelicError(f"{art.path} ({method}) has no EMA target network in {CHECKPOINT}; "
                             "use --network online")
        state = {k.removeprefix("encoder."): v for k, v in target.items() if k.startswith("encoder.")}
        model = build_resnet(encoder.arch, encoder.width, encoder.stem)
        _load_backbone(model, state, f"{checkpoint} (target)", f"its config ({encoder.arch}, width "
                       f"{encoder.width:g}, {encoder.stem})")
        state = model.state_dict()
    metadata = {"network": network, "arch": encoder.arch, "width": encoder.width, "stem": encoder.stem,
                "image_size": encoder.image_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "feature_dim": encoder.feature_dim, "method": method,
                "artifact": str(art.path.resolve()), "digest": art.digest, "relicv2": __version__}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata


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
        metadata = {k: json.loads(v) if k in JSON_FIELDS else v for k, v in header.items()}
    else:
        state = load_torch_file(path)
        metadata = getattr(state, METADATA_ATTR, None) or {}
    missing = [k for k in ("arch", "width", "stem") if k not in metadata]
    if missing:
        raise RelicError(f"{path} has no relicv2 metadata ({', '.join(missing)}): "
                         "not written by `relicv2 export`")
    model = build_resnet(metadata["arch"], float(metadata["width"]), metadata["stem"])
    _load_backbone(model, dict(state), str(path), f"its metadata ({metadata['arch']}, width "
                   f"{float(metadata['width']):g}, {metadata['stem']})")
    model.eval()
    model.metadata = metadata
    return model
