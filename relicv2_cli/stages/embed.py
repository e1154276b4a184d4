"""`relicv2 embed ENCODER SPEC --out FILE`: embeddings of one split in a file for other tools.

Unlike `eval features` (a cached artifact under WORKDIR that the evaluations share), embed writes
one file where asked, in the format asked, and needs no labels: labels and class names are written
when the data has them. The view is the same (features.py: centre view at the encoder's training
size and crop fraction, ImageNet mean/std, BN in eval mode; image folders and prepared sets are
decoded a chunk at a time in loader workers). Formats:
- `h5` (default): datasets `embeddings` float32 (N, D), `indices` int64 (N,) and, when known,
  `labels` int64 (N,); attributes as features.h5 (`encoder`, `encoder_spec`, `digest`, `dataset`,
  `split`, `class_names`) plus `image_size`, `crop_fraction` and `precision`;
- `npy`: the (N, D) float32 array alone;
- `csv`: a header `index,label,f0,...` (no `label` column without labels), one row per image;
- `torch`: `torch.save` of {"embeddings", "indices", "labels" (when known), "metadata"},
  loadable with `torch.load(FILE, weights_only=True)`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Annotated

import h5py
import numpy as np
import torch
import typer

from relicv2_cli import options, stream
from relicv2_cli.artifacts import atomic_write_bytes
from relicv2_cli.data import load_dataset
from relicv2_cli.encoders import load_encoder
from relicv2_cli.errors import RelicError
from relicv2_cli.features import SPLITS, crop_fraction_for, data_attributes, embed, view_size

FORMATS = ("h5", "npy", "csv", "torch")
SUFFIXES = {"h5": (".h5", ".hdf5"), "npy": (".npy",), "csv": (".csv",), "torch": (".pt", ".pth")}


def write_embeddings(path: Path, fmt: str, embeddings: np.ndarray, labels: np.ndarray | None,
                     attributes: dict) -> None:
    """Write `embeddings` (N, D) and, when given, `labels` (N,) in `fmt`; atomically (temp + rename)."""
    indices = np.arange(len(embeddings), dtype=np.int64)
    buffer = io.BytesIO()
    if fmt == "h5":
        with h5py.File(buffer, "w") as f:
            f.create_dataset("embeddings", data=embeddings)
            f.create_dataset("indices", data=indices)
            if labels is not None:
                f.create_dataset("labels", data=labels.astype(np.int64))
            f.attrs.update(attributes)
    elif fmt == "npy":
        np.save(buffer, embeddings)
    elif fmt == "csv":
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["index", *(["label"] if labels is not None else []),
                         *(f"f{j}" for j in range(embeddings.shape[1]))])
        for i, row in enumerate(embeddings):
            label = [int(labels[i])] if labels is not None else []
            writer.writerow([i, *label, *(f"{v:.7g}" for v in row)])
        buffer.write(text.getvalue().encode())
    else:
        payload = {"embeddings": torch.from_numpy(embeddings), "indices": torch.from_numpy(indices),
                   "metadata": attributes}
        if labels is not None:
            payload["labels"] = torch.from_numpy(labels.astype(np.int64))
        torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def command(
    encoder: options.Encoder,
    spec: options.Spec,
    out: Annotated[Path, typer.Option(help="File to write (.h5, .npy, .csv or .pt, matching --format).",
                                      show_default=False)],
    fmt: Annotated[str, typer.Option(
        "--format", help="h5 (with labels and attributes), npy (array only), csv or torch.")] = "h5",
    split: options.Split = "train",
    arch: options.Arch = "resnet18",
    width: options.Width = 1.0,
    stem: options.Stem = "cifar",
    batch_size: options.EmbedBatch = 256,
    precision: options.Precision = "bf16",
    limit_train: options.LimitTrain = None,
    limit_test: options.LimitTest = None,
    image_size: options.ImageSize = None,
    skip_bad: options.SkipBad = False,
    crop_fraction: options.CropFraction = "auto",
    workers: options.Workers = None,
    seed: options.Seed = 0,
    device: options.Device = "auto",
    force: options.ForceOut = False,
    quiet: options.Quiet = False,
) -> None:
    """Embed one split with a frozen encoder (centre view) into an HDF5, npy, csv or torch file."""
    options.check_choice("--format", fmt, FORMATS)
    options.check_choice("--split", split, SPLITS)
    options.check_choice("--precision", precision, options.PRECISIONS)
    if out.suffix not in SUFFIXES[fmt]:
        raise RelicError(f"--out for --format {fmt} must end in {' or '.join(SUFFIXES[fmt])}, got {out}")
    if out.exists() and not force:
        raise RelicError(f"{out} exists (use --force to replace it)")
    if not out.parent.is_dir():
        raise RelicError(f"--out folder {out.parent} does not exist")
    if batch_size <= 0:
        raise RelicError(f"--batch-size must be positive, got {batch_size}")
    enc = load_encoder(encoder, arch=arch, width=width, stem=stem, seed=seed)
    dataset = load_dataset(spec, limit_train=limit_train, limit_test=limit_test, image_size=image_size,
                           skip_bad=skip_bad, seed=seed)
    fraction = crop_fraction_for(crop_fraction, dataset)
    data = dataset.split(split)
    streamed = stream.streamed(dataset, data)
    size = view_size(enc, dataset, split, quiet)
    images = stream.StreamedImages(data, workers) if streamed else data.images
    dev = options.resolve_device(device)
    embeddings = embed(enc.model.to(dev), images, size=size, device=dev, precision=precision,
                       batch_size=batch_size, quiet=quiet, description=f"embed {enc.label} {split}",
                       crop_fraction=fraction).numpy()
    if not np.isfinite(embeddings).all():
        raise RelicError(f"{enc.label} produced NaN/Inf embeddings on {spec} {split}; try --precision fp32")
    labels = getattr(data, "labels", None)  # unlabelled data: embeddings only
    attributes = {**data_attributes(enc, dataset, split), "image_size": size, "crop_fraction": fraction,
                  "precision": precision}
    write_embeddings(out, fmt, embeddings, labels, attributes)
    if not quiet:
        options.console.print(f"{enc.label} on {spec} {split}: {embeddings.shape[0]} x {embeddings.shape[1]} "
                              f"embeddings at {size} px -> {out}", markup=False, highlight=False,
                              soft_wrap=True)
    options.finish(out)
