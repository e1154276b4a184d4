"""Unsupervised saliency and mask quality metrics, on numpy and OpenCV only (no learned weights).

RELICv2 removes the background of some large crops using foreground masks from an unsupervised
saliency model. No pretrained saliency weights can be downloaded here, so the masks come from
classical methods, each a pure function of one image:

- `sr`  spectral residual (Hou & Zhang, CVPR 2007): the part of the log amplitude spectrum that a
  local average does not explain, transformed back with the original phase.
- `ft`  frequency-tuned (Achanta et al., CVPR 2009): the Lab distance of each slightly blurred
  pixel from the image's mean colour.
- `bc`  boundary contrast (a background prior in the spirit of Wei et al., ECCV 2012, and of
  the minimum-barrier family): the Lab distance of each pixel from the nearest of a few colours
  sampled on the image border, which is assumed to be mostly background.
- `centre`  the centre prior, a baseline: a centred ellipse, whatever the image shows.

Every saliency map is normalised to [0, 1] and binarised with Otsu's threshold on its 256-bin
histogram (`binarize`). `+grabcut` variants refine that mask with OpenCV's GrabCut, seeded from
the map: confident pixels become definite foreground / background, the rest probable ones.

Quality against ground-truth masks: per-image IoU and F-measure with beta^2 = 0.3 (the saliency
literature's convention, weighting precision over recall), averaged over images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import h5py
import numpy as np

from relicv2_cli import artifacts
from relicv2_cli.data import stored_fingerprint
from relicv2_cli.errors import RelicError

if TYPE_CHECKING:
    from relicv2_cli.data import Dataset

BASE_METHODS = ("sr", "ft", "bc", "centre")
METHODS = ("sr", "ft", "bc", "sr+grabcut", "ft+grabcut", "bc+grabcut", "centre")
BETA2 = 0.3
# The saliency artifact: masks.h5 with one group per split (mask, done, count, fingerprint).
H5_NAME = "masks.h5"
H5_FORMAT = "relicv2-saliency"
# Array sets store (N, H, W) arrays; streamed sets (image folders, prepared) one PNG per image.
LAYOUT_ARRAY, LAYOUT_PER_IMAGE = "array", "per-image"

# Parameters of every method, recorded in the artifact. Sizes are in pixels of the working image.
DEFAULT_PARAMS: dict = {
    "sr": {"work_size": 64, "avg_kernel": 3, "blur_sigma": 0.06},  # sigma as a fraction of the side
    "ft": {"blur_sigma": 0.01},
    "bc": {"border": 0.1, "prototypes": 8, "blur_sigma": 0.02, "work_size": 128},
    "centre": {"half_axes": 0.3},  # ellipse half-axes as a fraction of width and height
    "grabcut": {"iterations": 2, "work_size": 96, "fg_quantile": 0.2, "bg_fraction": 0.5},
}


def split_method(method: str) -> tuple[str, bool]:
    """'sr+grabcut' -> ('sr', True)."""
    base, _, refine = method.partition("+")
    if base not in BASE_METHODS or refine not in ("", "grabcut") or (base == "centre" and refine):
        raise ValueError(f"unknown saliency method {method!r}; valid: {', '.join(METHODS)}")
    return base, bool(refine)


def _normalise(sal: np.ndarray) -> np.ndarray:
    sal = sal.astype(np.float32)
    lo, hi = float(sal.min()), float(sal.max())
    if hi - lo < 1e-12:
        return np.zeros_like(sal)
    return (sal - lo) / (hi - lo)


def _blur(sal: np.ndarray, sigma_frac: float) -> np.ndarray:
    sigma = sigma_frac * max(sal.shape[:2])
    if sigma < 0.3:
        return sal
    return cv2.GaussianBlur(sal, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


def _lab(image: np.ndarray) -> np.ndarray:
    """CIE Lab as float32 (L in 0..100, a and b around 0), through OpenCV's 8-bit conversion: for
    small images its float path costs several times more per call."""
    lab = cv2.cvtColor(np.ascontiguousarray(image, dtype=np.uint8), cv2.COLOR_RGB2Lab).astype(np.float32)
    return lab * np.float32([100.0 / 255.0, 1.0, 1.0]) - np.float32([0.0, 128.0, 128.0])


def spectral_residual(image: np.ndarray, work_size: int = 64, avg_kernel: int = 3,
                      blur_sigma: float = 0.06) -> np.ndarray:
    """Spectral residual saliency of an (H, W, 3) uint8 RGB image -> (H, W) float32 in [0, 1].

    The grey image is resized to work_size x work_size and mirrored into a 2x2 tile before the
    FFT, so the image borders are not seen as strong edges (the FFT treats the image as
    periodic); the map is cropped back, blurred and resized to the image size."""
    h, w = image.shape[:2]
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    work_size = min(work_size, h, w)  # never upsample: that leaves near-zero high frequencies
    small = cv2.resize(grey, (work_size, work_size), interpolation=cv2.INTER_AREA)
    tile = np.concatenate([small, small[:, ::-1]], axis=1)
    tile = np.concatenate([tile, tile[::-1]], axis=0)
    spectrum = np.fft.fft2(tile)
    amp = np.abs(spectrum)
    log_amp = np.log(amp + 1e-6 * amp.mean() + 1e-12).astype(np.float32)
    # A mirrored tile's spectrum is exactly zero on the row and column k = work_size (the
    # original image's Nyquist frequency); fill them from their neighbors, or the local
    # average would make every frequency next to them look novel.
    n = work_size
    log_amp[n] = 0.5 * (log_amp[n - 1] + log_amp[n + 1])
    log_amp[:, n] = 0.5 * (log_amp[:, n - 1] + log_amp[:, n + 1])
    residual = log_amp - cv2.blur(log_amp, (avg_kernel, avg_kernel), borderType=cv2.BORDER_REPLICATE)
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum))))[:work_size, :work_size] ** 2
    sal = _blur(sal.astype(np.float32), blur_sigma)
    return _normalise(cv2.resize(sal, (w, h), interpolation=cv2.INTER_LINEAR))


def frequency_tuned(image: np.ndarray, blur_sigma: float = 0.03) -> np.ndarray:
    """Frequency-tuned saliency: |mean Lab colour - blurred Lab pixel| -> (H, W) float32 in [0, 1]."""
    lab = _lab(image)
    blurred = _blur(lab, blur_sigma)
    mean = lab.reshape(-1, 3).mean(axis=0)
    return _normalise(np.linalg.norm(blurred - mean, axis=2))


def boundary_contrast(image: np.ndarray, border: float = 0.1, prototypes: int = 8,
                      blur_sigma: float = 0.02, work_size: int = 128) -> np.ndarray:
    """Lab distance from the nearest border colour prototype -> (H, W) float32 in [0, 1].

    The border ring (`border` of the shorter side wide) is walked in order and cut into
    `prototypes` equal stretches (a remainder of fewer pixels than `prototypes` is left out);
    each stretch's median colour is one prototype (no clustering, so the result is deterministic
    and cheap). Images larger than `work_size` are processed at that size and the map resized
    back."""
    h, w = image.shape[:2]
    if max(h, w) > work_size:
        scale = work_size / max(h, w)
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA)
    lab = _blur(_lab(image), blur_sigma)
    sh, sw = lab.shape[:2]
    b = max(1, min(int(round(border * min(sh, sw))), min(sh, sw) // 2 - 1))
    ring = np.concatenate([lab[:b].reshape(-1, 3), lab[b:sh - b, sw - b:].reshape(-1, 3),
                           lab[sh - b:][::-1, ::-1].reshape(-1, 3), lab[b:sh - b, :b][::-1].reshape(-1, 3)])
    per = max(1, len(ring) // prototypes)
    protos = np.median(ring[: per * prototypes].reshape(-1, per, 3), axis=1)
    # Squared distances to every prototype at once: |x|^2 - 2 x.p + |p|^2.
    pixels = lab.reshape(-1, 3)
    protos = protos.astype(np.float32)
    d2 = (pixels * pixels).sum(axis=1, keepdims=True) - 2 * pixels @ protos.T + (protos * protos).sum(axis=1)
    dist = np.sqrt(np.maximum(d2.min(axis=1), 0.0)).reshape(sh, sw)
    if (sh, sw) != (h, w):
        dist = cv2.resize(dist, (w, h), interpolation=cv2.INTER_LINEAR)
    return _normalise(dist)


def centre_prior(h: int, w: int, half_axes: float = 0.3) -> np.ndarray:
    """The centre-prior baseline: 1 inside a centred ellipse, falling off smoothly outside."""
    yy = ((np.arange(h, dtype=np.float32) + 0.5) / h - 0.5) / half_axes
    xx = ((np.arange(w, dtype=np.float32) + 0.5) / w - 0.5) / half_axes
    r2 = yy[:, None] ** 2 + xx[None, :] ** 2
    return np.clip(1.5 - 0.5 * r2, 0.0, 1.0).astype(np.float32)  # 1 inside (r <= 1), 0 at r >= sqrt(3)


def otsu_threshold(sal: np.ndarray) -> float:
    """Otsu's threshold of a [0, 1] map, on a 256-bin histogram."""
    levels = np.clip(np.rint(sal * 255), 0, 255).astype(np.uint8)
    t, _ = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t) / 255.0


def binarize(sal: np.ndarray) -> np.ndarray:
    """The binarisation rule: foreground where the map exceeds Otsu's threshold (uint8 {0, 1})."""
    return (sal > otsu_threshold(sal)).astype(np.uint8)


def grabcut_refine(image: np.ndarray, sal: np.ndarray, iterations: int = 3, work_size: int = 96,
                   fg_quantile: float = 0.5, bg_fraction: float = 0.5) -> np.ndarray:
    """GrabCut seeded from a saliency map -> uint8 {0, 1} mask.

    Seeds: Otsu threshold t. Pixels above t are probable foreground, and the brightest
    `fg_quantile` of them definite foreground; pixels below `bg_fraction * t` are definite
    background, the rest probable background. Images larger than `work_size` are cut at that
    size and the mask resized back (GrabCut's cost grows with the pixel count)."""
    h, w = image.shape[:2]
    t = otsu_threshold(sal)
    if max(h, w) > work_size:
        scale = work_size / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        sal = cv2.resize(sal, size, interpolation=cv2.INTER_AREA)
    fg = sal > t
    if fg.all() or not fg.any():
        return binarize_resized(fg, h, w)
    seeds = np.full(sal.shape, cv2.GC_PR_BGD, np.uint8)
    seeds[fg] = cv2.GC_PR_FGD
    seeds[fg & (sal >= np.quantile(sal[fg], 1.0 - fg_quantile))] = cv2.GC_FGD
    seeds[sal < bg_fraction * t] = cv2.GC_BGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(np.ascontiguousarray(image[..., ::-1]), seeds, None, bgd, fgd, iterations,
                    cv2.GC_INIT_WITH_MASK)
    except cv2.error:  # degenerate seeds (e.g. too few pixels of a class for its colour model)
        return binarize_resized(fg, h, w)
    return binarize_resized((seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD), h, w)


def binarize_resized(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    mask = mask.astype(np.uint8)
    if mask.shape != (h, w):
        mask = (cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5)
    return mask.astype(np.uint8)


def saliency_map(image: np.ndarray, base: str, params: dict | None = None) -> np.ndarray:
    params = {**DEFAULT_PARAMS, **(params or {})}
    if base == "sr":
        return spectral_residual(image, **params["sr"])
    if base == "ft":
        return frequency_tuned(image, **params["ft"])
    if base == "bc":
        return boundary_contrast(image, **params["bc"])
    if base == "centre":
        return centre_prior(*image.shape[:2], **params["centre"])
    raise ValueError(f"unknown saliency method {base!r}")


def compute(images: np.ndarray, method: str, params: dict | None = None,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Saliency maps (N, H, W) uint8 0..255 and masks (N, H, W) uint8 {0, 1} of (N, H, W, 3) images.

    Each image's result depends only on the image, the parameters and `seed` (GrabCut's colour
    models start from k-means on OpenCV's RNG, reseeded per image), not on how images are
    chunked or which process computes them."""
    base, refine = split_method(method)
    params = {**DEFAULT_PARAMS, **(params or {})}
    n, h, w = images.shape[:3]
    sal_out = np.empty((n, h, w), np.uint8)
    mask_out = np.empty((n, h, w), np.uint8)
    for i in range(n):
        sal = saliency_map(images[i], base, params)
        if base == "centre":
            mask = (sal >= 1.0).astype(np.uint8)
        elif refine:
            cv2.setRNGSeed(seed)
            mask = grabcut_refine(images[i], sal, **params["grabcut"])
        else:
            mask = binarize(sal)
        sal_out[i] = np.clip(np.rint(sal * 255), 0, 255).astype(np.uint8)
        mask_out[i] = mask
    return sal_out, mask_out


# ----------------------------------------------------------------------------------------------
# Quality against ground truth.


def mask_scores(pred: np.ndarray, gt: np.ndarray, beta2: float = BETA2) -> tuple[np.ndarray, np.ndarray]:
    """Per-image IoU and F-measure of binary masks (N, H, W). Two empty masks score 1."""
    pred = pred.reshape(len(pred), -1).astype(bool)
    gt = gt.reshape(len(gt), -1).astype(bool)
    tp = (pred & gt).sum(axis=1).astype(np.float64)
    n_pred, n_gt = pred.sum(axis=1), gt.sum(axis=1)
    union = n_pred + n_gt - tp
    both_empty = union == 0
    iou = np.where(both_empty, 1.0, tp / np.maximum(union, 1))
    precision = np.where(n_pred > 0, tp / np.maximum(n_pred, 1), 0.0)
    recall = np.where(n_gt > 0, tp / np.maximum(n_gt, 1), 0.0)
    denom = beta2 * precision + recall
    f = np.where(denom > 0, (1 + beta2) * precision * recall / np.maximum(denom, 1e-12), 0.0)
    f = np.where(both_empty, 1.0, f)
    return iou, f


def evaluate(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Mean IoU and F-measure (beta^2 = 0.3) of predicted masks against ground truth."""
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    iou, f = mask_scores(pred, gt)
    return {"iou": float(iou.mean()), "f_beta": float(f.mean()), "n": int(len(pred))}


# ----------------------------------------------------------------------------------------------
# Reading a saliency artifact (pretrain --saliency, the saliency stage's preview).


def encode_mask(mask: np.ndarray) -> bytes:
    """A binary mask (H, W) uint8 {0, 1} as an 8-bit grey PNG of its 0/1 values (deflate level 9:
    long runs of equal bytes make a few hundred bytes)."""
    ok, data = cv2.imencode(".png", np.ascontiguousarray(mask, np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise RelicError(f"cannot encode a {mask.shape} mask as PNG")
    return data.tobytes()


def decode_mask(data: np.ndarray | bytes) -> np.ndarray:
    """encode_mask's PNG -> (H, W) uint8 {0, 1}."""
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE) if len(data) else None
    if mask is None:
        raise RelicError("unreadable mask PNG in a saliency artifact")
    return mask


class MaskReader:
    """Mask i (H, W) uint8 {0, 1} of one split of a saliency artifact, read on demand: a PNG of the
    per-image layout, or a row of the array layout. h5py handles do not survive a fork, so each
    process (a DataLoader worker) opens the file itself."""

    def __init__(self, path: Path, split: str):
        self.path, self.split = path, split
        self._open: tuple | None = None  # (pid, h5py.File, the mask dataset)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": None}

    def __call__(self, i: int) -> np.ndarray:
        if self._open is None or self._open[0] != os.getpid():
            try:
                f = h5py.File(self.path, "r")
                self._open = (os.getpid(), f, f[self.split]["mask"])
            except (OSError, KeyError) as e:
                raise RelicError(f"unreadable saliency file {self.path}: {e}") from None
        row = self._open[2][i]
        return decode_mask(row) if self._open[2].dtype.kind == "O" else row


def open_masks(path: str | Path, dataset: Dataset, split: str = "train",
               streamed: bool = False) -> tuple[artifacts.Artifact, np.ndarray | MaskReader]:
    """The binary masks of `split` from a saliency artifact, checked against `dataset`.

    Returns the artifact (for the caller's parents list) and the masks aligned with the split: as
    one array (N, H, W) uint8 {0, 1} matching `dataset.split(split).images`, or, `streamed`, as a
    MaskReader giving mask i on demand. Raises RelicError when the artifact holds no such split or its
    count, fingerprint or image size differ from the dataset's."""
    art = artifacts.load_artifact(path, kind="saliency")
    target = dataset.split(split)
    h5_path = art.file(H5_NAME)
    try:
        with h5py.File(h5_path, "r") as f:
            if split not in f:
                have = ", ".join(k for k in f if isinstance(f[k], h5py.Group)) or "none"
                raise RelicError(f"saliency artifact {art.path} has no masks for the {split} split "
                                 f"(it has: {have}); rerun `relicv2 saliency` with --split {split} or all")
            group = f[split]
            per_image = f.attrs.get("layout", LAYOUT_ARRAY) == LAYOUT_PER_IMAGE
            count, fingerprint = int(group.attrs["count"]), str(group.attrs["fingerprint"])
            made_for = _describe(art.manifest.get("dataset") or {})
            here = _describe({"spec": dataset.spec, **dataset.options})
            if count != len(target):
                raise RelicError(f"saliency masks were made for a different dataset: {split} count "
                                 f"{count:,} != "
                                 f"{len(target):,} (masks: {made_for}; data: {here})")
            # Per-image masks are made from the stored (encoded) images, so they carry that fingerprint.
            expected = stored_fingerprint(target) if per_image else target.fingerprint
            if fingerprint != expected:
                raise RelicError(f"saliency masks were made for a different dataset: {split} fingerprint "
                                 f"{fingerprint[:12]}… != {expected[:12]}… (masks: {made_for}; "
                                 f"data: {here})")
            if not bool(np.all(group["done"][()])):
                raise RelicError(f"{h5_path}: the {split} masks are incomplete")
            if streamed:
                return art, MaskReader(h5_path, split)
            if per_image:
                return art, _stacked(group, target.images.shape[:3], split)
            masks = group["mask"][()]
    except OSError as e:
        raise RelicError(f"unreadable saliency file {h5_path}: {e}") from None
    if masks.shape != target.images.shape[:3]:
        raise RelicError(f"saliency masks are {masks.shape[1]}x{masks.shape[2]} but the {split} images are "
                         f"{target.images.shape[1]}x{target.images.shape[2]}")
    return art, masks


def _stacked(group: h5py.Group, shape: tuple, split: str) -> np.ndarray:
    """Per-image masks as one (N, H, W) array, for a split held in memory (all images one size)."""
    n, h, w = shape
    sizes = np.stack([group["height"][()], group["width"][()]], axis=1)
    odd = np.flatnonzero((sizes != (h, w)).any(axis=1))
    if len(odd):
        i = int(odd[0])
        raise RelicError(f"saliency mask {i} is {sizes[i, 1]}x{sizes[i, 0]} but the {split} images are "
                         f"{w}x{h} in memory; stream the run (--in-memory no) for masks at each image's size")
    return np.stack([decode_mask(row) for row in group["mask"]]) if n else np.zeros(shape, np.uint8)


def load_masks(path: str | Path, dataset: Dataset, split: str = "train") -> np.ndarray:
    """Masks (N, H, W) uint8 {0, 1} of `split`, refused when made for a different dataset."""
    return open_masks(path, dataset, split)[1]


def _describe(record: dict) -> str:
    extras = [f"{k}={record[k]}" for k in ("limit_train", "limit_test", "image_size",
                                           "seed") if record.get(k) is not None]
    return " ".join([str(record.get("spec", "?")), *extras])
