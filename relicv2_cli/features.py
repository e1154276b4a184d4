"""Frozen features, computed once per (encoder, split data, view) and cached as a `features` artifact.

`extract_features` runs the frozen encoder (BN in eval mode, no gradients, bf16 autocast by default)
on the centre view of every image of one split and writes `features.h5` with
- `features` float32 (N, D): pooled encoder outputs,
- `labels` int64 (N,) and `indices` int64 (N,): the image's index in the split,
- attributes `encoder`, `encoder_spec`, `digest`, `dataset`, `split` and `class_names`.

The centre view (`augment.center_view`): the shorter side resized to size / crop fraction
(antialiased bilinear), the centre size x size kept, [0, 1] and the ImageNet mean/std (as the
pre-training views). The size is the encoder's training size (a pretrain artifact records
`image_size`); `random:` and `torchvision:` encoders see the images' own side, or 224 on image files
of mixed sizes. The crop fraction is --crop-fraction: auto is 224/256 for image files, 1.0 for the
array sets. Image folders and prepared sets (without --image-size) stream: loader workers decode
and view a chunk of images at a time (`stream.encode_streamed`), the split is never decoded whole.

Caching. The artifact name is `{encoder}-{split}-{key[:12]}` where `key` hashes the encoder's
weights (sha256 of the pretrain backbone or torchvision file, or the random-init recipe), the
split's content fingerprint (images and labels, limits included), the split name, the view size,
the precision and the crop fraction (only when not 1.0: keys made before it existed stay valid).
Any evaluation that needs the same features finds them under the same name and reuses them. The
split fingerprint is used rather than the whole dataset's, so `--limit-test` does not invalidate
the training features. On reuse the recorded encoder (via `check_parent` for a pretrain artifact),
split fingerprint, size, precision and crop fraction are checked again; a mismatch (only possible
when a name was given by hand or an artifact was replaced under the same name) is an error that
names both sides, and `--force` recomputes and replaces the artifact. A match is always reused,
even with `--force`: the content is a pure function of the key.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from relicv2_cli import options, stream
from relicv2_cli.artifacts import Artifact, Staging, artifact_path, check_parent, load_artifact
from relicv2_cli.augment import IMAGENET_MEAN, IMAGENET_STD
from relicv2_cli.data import Dataset
from relicv2_cli.encoders import Encoder
from relicv2_cli.errors import RelicError
from relicv2_cli.knn import encode_images

FEATURES_FILE = "features.h5"


SPLITS = ("train", "val", "test")
FILE_KINDS = ("imagefolder", "images", "prepared")  # SPEC kinds of encoded image files
AUTO_CROP_FRACTION = 224 / 256  # the release's evaluation view: resize to 256, centre 224
DEFAULT_VIEW_SIZE = 224  # random: and torchvision: encoders on images of mixed sizes


@dataclass
class FeatureSet:
    """The arrays of a `features` artifact."""

    features: np.ndarray  # float32 (N, D)
    labels: np.ndarray  # int64 (N,)
    indices: np.ndarray  # int64 (N,), index into the split
    artifact: Artifact


def crop_fraction_for(value: str | float, dataset: Dataset) -> float:
    """--crop-fraction: a number in (0, 1], or auto: the release's 224/256 for image files (photos of
    mixed sizes: imagefolder, images, prepared), 1.0 for the array sets (CIFAR, synthetic, npz,
    Fashion-MNIST: small images seen whole, as every number measured on them so far)."""
    if value == "auto":
        return AUTO_CROP_FRACTION if dataset.spec.split(":", 1)[0] in FILE_KINDS else 1.0
    try:
        fraction = float(value)
    except ValueError:
        fraction = float("nan")
    if not 0 < fraction <= 1:
        raise RelicError(f"--crop-fraction must be auto or a number in (0, 1], got {value!r}")
    return fraction


def view_size(encoder: Encoder, dataset: Dataset, split: str, quiet: bool = True) -> int:
    """The side the encoder sees: its training size when known, else the images' own (shorter) side,
    else, for a streamed split of mixed sizes, DEFAULT_VIEW_SIZE (said on stderr unless `quiet`)."""
    if encoder.image_size:
        return int(encoder.image_size)
    data = dataset.split(split)
    if not stream.streamed(dataset, data):
        return int(min(data.images.shape[1], data.images.shape[2]))
    sizes = np.unique(stream.sample_sizes(data)[0], axis=0)
    if len(sizes) == 1:
        return int(sizes[0].min())
    if not quiet:
        options.console.print(f"{encoder.label} records no training size and {dataset.spec} has images of "
                              f"mixed sizes: centre views of {DEFAULT_VIEW_SIZE} px (--image-size S resizes "
                              "the images to S x S in memory instead)")
    return DEFAULT_VIEW_SIZE


def data_attributes(encoder: Encoder, dataset: Dataset, split: str) -> dict:
    """What an HDF5 file of features says about itself (features.h5, `relicv2 embed`): the encoder,
    its weights' digest (pretrain digest, file sha256 or random-init recipe), the data and split,
    and the class names when the data has them."""
    record = encoder.record
    attrs = {"encoder": encoder.label, "encoder_spec": str(record.get("spec", "")),
             "digest": record.get("digest") or record.get("sha256") or encoder.key,
             "dataset": dataset.spec, "split": split}
    if dataset.class_names:
        attrs["class_names"] = list(dataset.class_names)
    return attrs


def features_key(encoder: Encoder, split_fingerprint: str, split: str, size: int, precision: str,
                 crop_fraction: float = 1.0) -> str:
    fields = {"encoder": encoder.key, "split_fingerprint": split_fingerprint, "split": split, "size": size,
              "precision": precision, "view": "center"}
    if crop_fraction != 1.0:  # keys made before the option existed are 1.0's: those caches stay valid
        fields["crop_fraction"] = crop_fraction
    body = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def features_name(encoder: Encoder, split: str, key: str) -> str:
    return f"{encoder.slug}-{split}-{key[:12]}"


def _mismatch(art: Artifact, encoder: Encoder, split_fp: str, split: str, size: int,
              precision: str, crop_fraction: float) -> str | None:
    """Why the cached artifact does not hold these features (None when it does)."""
    config = art.config
    if encoder.parent is not None:
        recorded = [p for p in art.manifest.get("parents", []) if p.get("kind") == "pretrain"]
        same_path = [p for p in recorded if Path(p["path"]) == encoder.parent.path.resolve()]
        if same_path:
            check_parent(encoder.parent, same_path[0])  # "changed since it was recorded" error
    if config.get("encoder_key") != encoder.key:
        return (f"was made by encoder {config.get('encoder', {}).get('spec')!r} "
                f"(key {str(config.get('encoder_key'))[:40]}), "
                f"not {encoder.label!r} (key {encoder.key[:40]})")
    if config.get("split_fingerprint") != split_fp or config.get("split") != split:
        return (f"was made from other data (split {config.get('split')!r}, fingerprint "
                f"{str(config.get('split_fingerprint'))[:12]}), not split {split!r} with fingerprint "
                f"{split_fp[:12]}")
    made = (config.get("image_size"), config.get("precision"), config.get("crop_fraction", 1.0))
    if made != (size, precision, crop_fraction):
        return (f"was made at {made[0]} px / {made[1]} / crop fraction {made[2]:g}, "
                f"not {size} px / {precision} / crop fraction {crop_fraction:g}")
    return None


def extract_features(
    encoder: Encoder,
    dataset: Dataset,
    split: str,
    *,
    device: str | torch.device = "auto",
    batch_size: int = 256,
    precision: str = "bf16",
    workdir: Path = options.DEFAULT_WORKDIR,
    force: bool = False,
    quiet: bool = False,
    name: str | None = None,
    crop_fraction: str | float = "auto",
    workers: int | None = None,
) -> Artifact:
    """The cached `features` artifact of `encoder` on `dataset`'s `split`, computed if missing.
    Image files (without --image-size) stream: `workers` loader processes decode `batch_size` images
    at a time (stream.encode_streamed), the split is never decoded whole.

    See the module docstring for the view, the cache key and the reuse checks."""
    options.check_choice("--precision", precision, options.PRECISIONS)
    options.check_choice("--split", split, SPLITS)
    if batch_size <= 0:
        raise RelicError(f"--batch-size must be positive, got {batch_size}")
    fraction = crop_fraction_for(crop_fraction, dataset)
    data = dataset.split(split)
    streamed = stream.streamed(dataset, data)
    split_fp = data.fingerprint
    size = view_size(encoder, dataset, split, quiet)
    key = features_key(encoder, split_fp, split, size, precision, fraction)
    name = name or features_name(encoder, split, key)
    path = artifact_path(Path(workdir), "features", name)
    if path.exists():
        cached = load_artifact(path, kind="features")
        problem = _mismatch(cached, encoder, split_fp, split, size, precision, fraction)
        if problem is None:
            cached.file(FEATURES_FILE)
            return cached
        if not force:
            raise RelicError(f"features artifact {path} {problem}; pass --force to recompute it")

    dev = device if isinstance(device, torch.device) else options.resolve_device(device)
    model = encoder.model.to(dev)
    start = time.perf_counter()
    images = stream.StreamedImages(data, workers) if streamed else data.images
    features = embed(model, images, size=size, device=dev, precision=precision, batch_size=batch_size,
                     quiet=quiet, description=f"features {encoder.label} {split}",
                     crop_fraction=fraction).numpy()
    seconds = time.perf_counter() - start
    if not np.isfinite(features).all():
        raise RelicError(f"{encoder.label} produced NaN/Inf features on {dataset.spec} {split}; try "
                         "--precision fp32")
    staging = Staging(Path(workdir), "features", name, force=True)  # a stale or missing artifact: replace
    with staging:
        with h5py.File(staging.dir / FEATURES_FILE, "w") as f:
            f.create_dataset("features", data=features)
            f.create_dataset("labels", data=data.labels.astype(np.int64))
            f.create_dataset("indices", data=np.arange(len(features), dtype=np.int64))
            f.attrs.update(data_attributes(encoder, dataset, split))
        config = {"encoder": encoder.record, "encoder_key": encoder.key, "encoder_label": encoder.label,
                  "split": split, "split_fingerprint": split_fp, "image_size": size,
                  "crop_fraction": fraction,
                  "native_size": "per image (streamed)" if streamed else list(images.shape[1:3]),
                  "precision": precision, "view": "center",
                  "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "batch_size": batch_size, "key": key,
                  "count": len(features), "feature_dim": features.shape[1]}
        metrics = {"seconds": round(seconds, 2), "images_per_s": round(len(features) / max(seconds, 1e-9), 1)}
        return staging.commit(config=config, parents=[encoder.parent] if encoder.parent else [],
                              dataset=dataset.record(), metrics=metrics)


def embed(model, images: np.ndarray | stream.StreamedImages, *, size: int, device: torch.device,
          precision: str, batch_size: int, quiet: bool, description: str,
          crop_fraction: float = 1.0) -> torch.Tensor:
    """knn.encode_images (centre view, eval mode, autocast) of an array, or stream.encode_streamed of
    a streamed split, under a progress bar; float32 (N, out) on the CPU."""
    with options.progress_bar(quiet) as progress:
        if isinstance(images, stream.StreamedImages):  # decoded a chunk at a time in loader workers
            encode = stream.encode_streamed
        else:
            encode = encode_images
        return encode(model, images, image_size=size, device=device, precision=precision,
                      batch_size=batch_size, progress=progress, description=description,
                      crop_fraction=crop_fraction).float()


def read_features(art: Artifact | str | Path) -> FeatureSet:
    """Load the arrays of a features artifact (checks its kind and the file's shapes)."""
    art = art if isinstance(art, Artifact) else load_artifact(art, kind="features")
    if art.kind != "features":
        raise RelicError(f"{art.path}: expected an artifact of kind 'features', found {art.kind!r}")
    try:
        with h5py.File(art.file(FEATURES_FILE), "r") as f:
            features = f["features"][...].astype(np.float32, copy=False)
            labels = f["labels"][...].astype(np.int64)
            indices = f["indices"][...].astype(np.int64)
    except (OSError, KeyError) as e:
        raise RelicError(f"corrupt {FEATURES_FILE} in {art.path}: {e}") from None
    if not (features.ndim == 2 and len(features) == len(labels) == len(indices)):
        raise RelicError(f"{art.path}/{FEATURES_FILE}: inconsistent shapes {features.shape}, "
                         f"{labels.shape}, {indices.shape}")
    return FeatureSet(features, labels, indices, art)


def split_features(
    encoder: Encoder, dataset: Dataset, split: str, **kwargs
) -> FeatureSet:
    """extract_features + read_features, with a check that the labels still match the split."""
    fs = read_features(extract_features(encoder, dataset, split, **kwargs))
    if not np.array_equal(fs.labels, dataset.split(split).labels):
        raise RelicError(f"features {fs.artifact.path} hold other labels than {dataset.spec} {split}")
    return fs
