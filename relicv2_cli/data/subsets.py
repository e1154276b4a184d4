"""Class-balanced label subsets for semi-supervised evaluation (method.md section 6).

A subset is a sorted array of indices into a dataset's training split. It is either drawn from a
seed (`balanced_subset`: the same fraction of every class, as the SimCLR ImageNet 1% / 10% lists)
or read from a file (`load_subset_file`: one index per line, or a .npy array), so that every encoder
is fine-tuned on exactly the same images. The semi stage saves the indices it used in its artifact.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from relicv2_cli.errors import RelicError


def balanced_subset(
    labels: np.ndarray,
    fraction: float,
    seed: int,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
) -> np.ndarray:
    """Sorted indices of a class-balanced subset: from every class c, round(fraction * count_c)
    images (at least 1), drawn without replacement by a generator seeded by `seed`.

    Deterministic: the same (labels, fraction, seed) always gives the same indices, whatever else
    changes. Errors when the fraction is outside (0, 1] or a class has no image to draw from (with
    `num_classes` given, every class 0..num_classes-1 must be present).
    """
    labels = np.asarray(labels).reshape(-1)
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise RelicError(f"--fraction must be in (0, 1], got {fraction!r}")
    if len(labels) == 0:
        raise RelicError("cannot draw a label subset from an empty training split")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    counts = np.bincount(labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        names = [class_names[c] if class_names else str(c) for c in empty[:5]]
        raise RelicError(
            f"a class-balanced subset would leave {len(empty)} class(es) empty ({', '.join(names)}): "
            "they have no training images (raise --limit-train or use another split)"
        )
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        take = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def load_subset_file(path: str | Path, n: int) -> np.ndarray:
    """Indices from a text file (one integer per line; blank lines and `#` comments ignored) or a
    .npy array, checked against a split of `n` images. Returned sorted, int64.

    Errors on unreadable files, non-integers, an empty list, out-of-range or duplicate indices.
    """
    path = Path(path)
    if not path.is_file():
        raise RelicError(f"subset file not found: {path}")
    if path.suffix == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise RelicError(f"unreadable subset file {path}: {e}") from None
        if values.dtype.kind not in "iu":
            raise RelicError(f"{path}: expected an integer array, found dtype {values.dtype}")
        indices = values.reshape(-1).astype(np.int64)
    else:
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise RelicError(f"unreadable subset file {path}: {e}") from None
        parsed = []
        for number, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                parsed.append(int(text))
            except ValueError:
                raise RelicError(f"{path}:{number}: not an integer index: {text!r}") from None
        indices = np.asarray(parsed, np.int64)
    if len(indices) == 0:
        raise RelicError(f"subset file {path} lists no index")
    bad = indices[(indices < 0) | (indices >= n)]
    if len(bad):
        raise RelicError(
            f"subset file {path}: {len(bad)} index(es) out of range for a training split of {n} images "
            f"(valid 0..{n - 1}), e.g. {int(bad[0])}"
        )
    unique, counts = np.unique(indices, return_counts=True)
    if len(unique) != len(indices):
        dup = unique[counts > 1]
        raise RelicError(f"subset file {path}: {len(dup)} duplicate index(es), e.g. {int(dup[0])}")
    return unique  # np.unique sorts


def subset_digest(indices: np.ndarray) -> str:
    """sha256 of the sorted int64 indices: equal digests mean the same images."""
    return hashlib.sha256(np.ascontiguousarray(np.sort(indices).astype(np.int64)).data).hexdigest()


def write_subset_file(path: str | Path, indices: np.ndarray) -> None:
    """One index per line, the format `load_subset_file` reads back."""
    Path(path).write_text("".join(f"{int(i)}\n" for i in indices))


def per_class_counts(labels: np.ndarray, indices: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(np.asarray(labels)[indices], minlength=num_classes).tolist()
