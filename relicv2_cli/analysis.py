"""What the analysis and evaluation stages share: ENCODER... SPEC arguments, encoders and cached
features, default artifact names, an early check that the output name is free, and distances."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from relicv2_cli import options
from relicv2_cli.artifacts import Artifact, artifact_path
from relicv2_cli.data import SPEC_KINDS, Dataset, load_dataset, require_labels
from relicv2_cli.encoders import Encoder, load_encoder, slugify
from relicv2_cli.errors import RelicError
from relicv2_cli.features import FeatureSet, split_features


def l2_normalize(features) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), float64."""
    x = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def pairwise_l2(a, b, device: str | torch.device = "cpu") -> torch.Tensor:
    """Euclidean distances (len(a), len(b)) in float64: sqrt(max(|a|^2 + |b|^2 - 2 a.b, 0))."""
    a = torch.as_tensor(a, dtype=torch.float64, device=device)
    b = torch.as_tensor(b, dtype=torch.float64, device=device)
    sq = torch.addmm((a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :], a, b.T, alpha=-2.0)
    return sq.clamp_(min=0).sqrt_()


def parse_items(items: list[str]) -> tuple[list[str], str]:
    """ENCODER [ENCODER ...] SPEC: the last item is the dataset, every other one an encoder."""
    if len(items) < 2:
        raise RelicError("give one or more ENCODERs and then a dataset SPEC: ENCODER [ENCODER ...] SPEC")
    *encoders, spec = items
    if not is_dataset_spec(spec):
        raise RelicError(f"the last argument must be a dataset SPEC ({', '.join(SPEC_KINDS)}), got {spec!r}")
    extra = [e for e in encoders if is_dataset_spec(e)]
    if extra:
        raise RelicError(f"one dataset SPEC only, as the last argument; also got {', '.join(extra)}")
    return encoders, spec


def load_encoders(specs: list[str], *, arch: str, width: float, stem: str, seed: int) -> list[Encoder]:
    encoders = [load_encoder(e, arch=arch, width=width, stem=stem, seed=seed) for e in specs]
    labels = [e.label for e in encoders]
    if len(set(labels)) != len(labels):
        raise RelicError(f"an encoder is listed twice: {', '.join(labels)}")
    return encoders


def default_name(encoders: list[Encoder], spec: str, suffix: str = "") -> str:
    base = "+".join(e.slug for e in encoders) + "-" + spec_slug(spec) + suffix
    if len(base) > 80:
        base = base[:60] + "-" + hashlib.sha256(base.encode()).hexdigest()[:8]
    return slugify(base, 100)


def check_common(batch_size: int, precision: str) -> None:
    options.check_choice("--precision", precision, options.PRECISIONS)
    if batch_size <= 0:
        raise RelicError(f"--batch-size must be positive, got {batch_size}")


@dataclass
class Prepared:
    encoders: list[Encoder]
    dataset: Dataset
    spec: str
    name: str
    device: torch.device


def prepare_inputs(
    items: list[str], *, kind: str, name: str | None, workdir: Path, force: bool, arch: str, width: float,
    stem: str, seed: int, limit_train: int | None, limit_test: int | None, image_size: int | None,
    device: str, name_suffix: str = "", skip_bad: bool = False,
) -> Prepared:
    """Every check that needs no features: encoders, dataset, device, and a free output name."""
    encoder_specs, spec = parse_items(items)
    encoders = load_encoders(encoder_specs, arch=arch, width=width, stem=stem, seed=seed)
    dataset = load_dataset(spec, limit_train=limit_train, limit_test=limit_test, image_size=image_size,
                           skip_bad=skip_bad, seed=seed)
    require_labels(dataset, f"analyze {kind}")
    name = name or default_name(encoders, spec, name_suffix)
    check_fresh(Path(workdir), kind, name, force)
    return Prepared(encoders, dataset, spec, name, options.resolve_device(device))


def encoder_features(
    encoder: Encoder, dataset: Dataset, split: str, *, device, batch_size: int, precision: str, workdir: Path,
    quiet: bool, crop_fraction: str | float = "auto", workers: int | None = None,
) -> FeatureSet:
    """The encoder's cached features of one split (computed once, shared with the eval stages)."""
    return split_features(encoder, dataset, split, device=device, batch_size=batch_size, precision=precision,
                          workdir=Path(workdir), quiet=quiet, crop_fraction=crop_fraction, workers=workers)


def unique_parents(parents: list[Artifact]) -> list[Artifact]:
    return list({p.path.resolve(): p for p in parents}.values())


def is_dataset_spec(item: str) -> bool:
    kind = item.split(":", 1)[0]
    return kind in SPEC_KINDS and (kind == "synthetic" or ":" in item)


def spec_slug(spec: str) -> str:
    kind, _, arg = spec.partition(":")
    return kind if not arg else slugify(f"{kind}-{Path(arg).name}", 32)


def check_fresh(workdir: Path, kind: str, name: str, force: bool) -> None:
    """Refuse early (before any work, and before writing features) when the output exists."""
    if artifact_path(workdir, kind, name).exists() and not force:
        raise RelicError(f"artifact exists: {artifact_path(workdir, kind, name)} (use --force to replace it)")
