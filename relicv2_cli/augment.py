"""Batched multi-crop views on tensors, with mask-aware background removal (method.md sections 1, 4).

Everything runs on whole batches on the images' device: one `roi_align` call crops and resizes all
boxes of a crop size, and every random choice is a per-sample tensor (probabilities become
per-sample factors that are the identity when the op is not drawn), so there is no Python loop
over images. All randomness comes from the caller's torch.Generator.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
JITTERS = ("byol", "torchvision")


@functools.cache
def _const(values: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A constant on `device`, copied there once: a blocking host-to-GPU copy waits for the GPU, so
    building constants every step would stall the step (never modified in place)."""
    return torch.tensor(values, dtype=dtype).to(device)


@dataclass
class AugmentPreset:
    """One column of method.md section 4's table (probabilities and jitter strengths)."""

    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 1.0
    solarize_p: float = 0.0


PRESET_A = AugmentPreset(blur_p=1.0, solarize_p=0.0)
PRESET_B = AugmentPreset(blur_p=0.1, solarize_p=0.2)


@dataclass
class ViewConfig:
    large_crops: int = 2
    small_crops: int = 2
    large_size: int = 32
    small_size: int = 16
    large_scale: tuple[float, float] = (0.08, 1.0)
    small_scale: tuple[float, float] = (0.05, 0.14)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    mask_prob: float = 0.1
    mask_min_area: float = 0.05  # a mask with less foreground than this (area fraction) is not applied
    blur: bool = True  # False disables blur entirely (usual at 32 px)
    jitter: str = "byol"  # colour jitter semantics: "byol" (BYOL's released code) or "torchvision"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Large crop i uses presets[i % 2] (A, B, A, B, ...); small crops use small_preset.
    presets: tuple[AugmentPreset, ...] = field(default_factory=lambda: (PRESET_A, PRESET_B))
    small_preset: AugmentPreset = field(default_factory=lambda: PRESET_B)


@dataclass
class Views:
    large: list[torch.Tensor]  # L x (B, 3, large_size, large_size), float, normalised
    small: list[torch.Tensor]  # S x (B, 3, small_size, small_size), float, normalised
    masked: torch.Tensor  # (L, B) bool: which large views had their background removed

    def rows(self, keep: slice) -> Views:
        """The views of images `keep` only (one process's share of a global batch)."""
        return Views(large=[v[keep] for v in self.large], small=[v[keep] for v in self.small],
                     masked=self.masked[:, keep])


def _rand(shape, generator: torch.Generator, device) -> torch.Tensor:
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def sample_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    device,
    attempts: int = 10,
) -> torch.Tensor:
    """(n, 4) boxes x1, y1, x2, y2 in pixel units, drawn like torchvision's RandomResizedCrop.

    Area fraction U(scale), aspect ratio log-uniform in `ratio`, position uniform; the first of
    `attempts` draws that fits is used, else torchvision's fallback (a centre crop, the whole image
    with its aspect ratio clamped to `ratio`). Unlike torchvision, sizes and positions are not
    rounded to whole pixels: roi_align samples at sub-pixel positions anyway.
    """
    area = height * width
    u = _rand((3, n, attempts), generator, device)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]
    aspect = torch.exp(log_r)
    w = torch.sqrt(target_area * aspect)
    h = torch.sqrt(target_area / aspect)
    ok = (w <= width) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting attempt (0 if none)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    any_ok = ok.any(dim=1)

    # Fallback, as torchvision: whole image, aspect ratio clamped into `ratio`, centred.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = float(width), width / min(ratio)
    elif in_ratio > max(ratio):
        fw, fh = height * max(ratio), float(height)
    else:
        fw, fh = float(width), float(height)
    w = torch.where(any_ok, w, torch.full_like(w, fw))
    h = torch.where(any_ok, h, torch.full_like(h, fh))
    pos = _rand((2, n), generator, device)
    x1 = torch.where(any_ok, pos[0] * (width - w), (width - w) / 2)
    y1 = torch.where(any_ok, pos[1] * (height - h), (height - h) / 2)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def crop_resize(
    images: torch.Tensor, boxes: torch.Tensor, batch_index: torch.Tensor, size: int
) -> torch.Tensor:
    """Crop every box from images[batch_index] and resize it to size x size, in one roi_align call.

    aligned=True puts pixel centres at i + 0.5, so the box (0, 0, W, H) at size W is the identity.
    sampling_ratio=0 is adaptive: ceil(box side / size) bilinear samples per output pixel and axis,
    averaged, so downscaling is antialiased (a box filter) and upscaling is plain bilinear.
    """
    rois = torch.cat([batch_index.to(boxes.dtype)[:, None], boxes], dim=1)
    return roi_align(
        images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True
    )


def _grey(x: torch.Tensor) -> torch.Tensor:
    w = _const(_GREY, x.device, x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


# RGB <-> YIQ: hue is an angle in the (I, Q) chroma plane, Y (luma) stays fixed.
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.595716, -0.274453, -0.321263), (0.211456, -0.522591, 0.311135))
_YIQ_TO_RGB = tuple(map(tuple, torch.linalg.inv(torch.tensor(_RGB_TO_YIQ)).tolist()))


def _hue_matrices(hue: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) RGB matrices rotating chroma by hue * 2 pi about the grey axis (hue 0: identity).

    A fast linear stand-in for torchvision's HSV hue shift (same range: hue in [-0.5, 0.5] is a full
    turn); it is exact on the grey axis and close elsewhere, without an RGB->HSV round trip.
    """
    to_yiq, to_rgb = _const(_RGB_TO_YIQ, hue.device), _const(_YIQ_TO_RGB, hue.device)
    theta = hue * 2 * math.pi
    cos, sin = torch.cos(theta), torch.sin(theta)
    # Built as I + to_rgb (R - I) to_yiq so that hue 0 gives exactly the identity (R - I = 0).
    rot = torch.zeros(hue.shape[0], 3, 3, device=hue.device)
    rot[:, 1, 1], rot[:, 1, 2] = cos - 1, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos - 1
    return torch.eye(3, device=hue.device) + to_rgb @ rot @ to_yiq


def _per_sample(presets: list[AugmentPreset], batch: int, name: str, device) -> torch.Tensor:
    """One preset per group of `batch` consecutive samples -> a per-sample tensor of attribute `name`."""
    return _const(tuple(getattr(p, name) for p in presets), torch.device(device)).repeat_interleave(batch)


def _coin(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return _rand(p.shape, generator, p.device) < p


def _uniform_factor(strength: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """U(max(0, 1 - s), 1 + s), as torchvision's ColorJitter for brightness/contrast/saturation."""
    low = (1 - strength).clamp(min=0)
    return low + (1 + strength - low) * _rand(strength.shape, generator, strength.device)


def rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) RGB in [0, 1] -> hue in [0, 1), saturation, value, each (N, H, W)."""
    r, g, b = x.unbind(1)
    value = x.amax(1)
    chroma = value - x.amin(1)
    saturation = chroma / torch.where(value > 0, value, 1.0)
    c = torch.where(chroma > 0, chroma, 1.0)  # grey pixels: any finite value, hue set to 0 below
    hue = torch.where(r == value, (g - b) / c, torch.where(g == value, (b - r) / c + 2, (r - g) / c + 4))
    hue = torch.where(chroma > 0, hue / 6, 0.0)
    return hue % 1.0, saturation, value


def hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Inverse of rgb_to_hsv: channel n in (R, G, B) = v - v s clamp(min(k, 4 - k), 0, 1),
    k = (n' + 6 h) mod 6 with n' = 5, 3, 1."""
    offsets = _const((5.0, 3.0, 1.0), hue.device, hue.dtype).view(1, 3, 1, 1)
    k = (offsets + 6 * hue.unsqueeze(1)) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value.unsqueeze(1) - (value * saturation).unsqueeze(1) * ramp


def _byol_jitter(x: torch.Tensor, jitter: torch.Tensor, ps, generator: torch.Generator) -> torch.Tensor:
    """Draw BYOL's per-sample jitter parameters and apply them (byol_jitter)."""
    n = x.shape[0]

    def signed(strength: torch.Tensor) -> torch.Tensor:  # U(-strength, strength)
        return (2 * _rand(n, generator, x.device) - 1) * strength

    brightness, contrast = signed(ps("brightness")), 1 + signed(ps("contrast"))
    saturation, hue = 1 + signed(ps("saturation")), signed(ps("hue"))
    order = _rand((n, 4), generator, x.device).argsort(dim=1)  # a uniform random permutation per sample
    return byol_jitter(x, jitter, brightness, contrast, saturation, hue, order)


def byol_jitter(
    x: torch.Tensor,
    apply: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor,
    order: torch.Tensor,
) -> torch.Tensor:
    """BYOL's colour jitter (its released augmentations, which follow TF's image ops) on x (N, 3, H, W)
    in [0, 1], with per-sample parameters (N,): brightness adds a shift; contrast scales each channel
    about its own mean; saturation scales S in HSV (S clipped to [0, 1]); hue adds a shift to H in HSV
    (mod 1); the image is clipped to [0, 1] after each op; op order[i, k] (0 brightness, 1 contrast,
    2 saturation, 3 hue) runs k-th on sample i; samples with apply False are unchanged.
    Batched without data-dependent control flow (no host synchronisation on a GPU): at each of the 4
    positions every sample goes through all four ops, each a no-op except the one its order puts there.
    """
    n = x.shape[0]
    for position in range(4):
        op = torch.where(apply, order[:, position], -1)
        x = (x + torch.where(op == 0, brightness, 0.0).view(n, 1, 1, 1)).clamp(0, 1)
        mean = x.mean(dim=(2, 3), keepdim=True)
        scaled = ((x - mean) * contrast.view(n, 1, 1, 1) + mean).clamp(0, 1)
        x = torch.where((op == 1).view(n, 1, 1, 1), scaled, x)
        h, s, v = rgb_to_hsv(x)
        s = torch.where((op == 2).view(n, 1, 1), (s * saturation.view(n, 1, 1)).clamp(0, 1), s)
        h = torch.where((op == 3).view(n, 1, 1), (h + hue.view(n, 1, 1)) % 1.0, h)
        shifted = hsv_to_rgb(h, s, v).clamp(0, 1)
        # others skip the round trip's rounding
        x = torch.where(((op == 2) | (op == 3)).view(n, 1, 1, 1), shifted, x)
    return x


def _torchvision_jitter(x: torch.Tensor, jitter: torch.Tensor, ps,
                        generator: torch.Generator) -> torch.Tensor:
    """torchvision's ColorJitter semantics: brightness, contrast (towards the mean grey level) and
    saturation (towards the grey image) as factors U(max(0, 1 - s), 1 + s), hue as a chroma rotation
    in YIQ (a linear stand-in for the HSV shift); one random order of the four ops per call."""
    n = x.shape[0]
    dev = x.device

    def bcast(v: torch.Tensor) -> torch.Tensor:
        return v.view(n, 1, 1, 1)

    # Identity factors (1, 1, 1, 0) for samples that do not draw the jitter.
    brightness = torch.where(jitter, _uniform_factor(ps("brightness"), generator), 1.0)
    contrast = torch.where(jitter, _uniform_factor(ps("contrast"), generator), 1.0)
    saturation = torch.where(jitter, _uniform_factor(ps("saturation"), generator), 1.0)
    hue = torch.where(jitter, (2 * _rand(n, generator, dev) - 1) * ps("hue"), 0.0)
    for op in torch.randperm(4, generator=generator, device=generator.device).tolist():
        if op == 0:
            x = (x * bcast(brightness)).clamp(0, 1)
        elif op == 1:  # blend with the per-image mean grey level
            mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
            x = (bcast(contrast) * x + (1 - bcast(contrast)) * mean).clamp(0, 1)
        elif op == 2:  # blend with the greyscale image
            x = (bcast(saturation) * x + (1 - bcast(saturation)) * _grey(x)).clamp(0, 1)
        else:
            x = torch.einsum("nij,njhw->nihw", _hue_matrices(hue).to(x.dtype), x).clamp(0, 1)
    return x


def blur_kernel_size(size: int) -> int:
    """About 10% of the side, odd, at least 3 (23 at 224 px as in BYOL, 3 at 32 px)."""
    k = max(3, int(0.1 * size))
    return k if k % 2 == 1 else k + 1


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable per-sample gaussian blur with reflect padding, as one grouped conv per axis.

    sigma (N,); samples with sigma 0 get a delta kernel (no blur) so the whole batch is one call.
    """
    n, c, h, w = x.shape
    k = blur_kernel_size(h)
    t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    s = sigma.to(x.dtype).clamp(min=1e-6)[:, None]
    kernel = torch.exp(-0.5 * (t[None] / s) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # sigma ~0 -> exactly the delta kernel
    kernel = kernel.repeat_interleave(c, dim=0)  # (N*C, k): one filter per channel of each sample
    y = x.reshape(1, n * c, h, w)
    pad = k // 2
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def augment(
    x: torch.Tensor,
    presets: list[AugmentPreset],
    generator: torch.Generator,
    blur: bool = True,
    jitter_form: str = "byol",
) -> torch.Tensor:
    """Flip, colour jitter, greyscale, blur, solarise on x (len(presets) * B, 3, S, S) in [0, 1].

    Consecutive groups of B samples use one preset each; every random choice is per sample.
    jitter_form: "byol" (_byol_jitter) or "torchvision" (_torchvision_jitter).
    """
    n = x.shape[0]
    batch = n // len(presets)
    dev = x.device

    def ps(name: str) -> torch.Tensor:
        return _per_sample(presets, batch, name, dev)

    def bcast(v: torch.Tensor) -> torch.Tensor:
        return v.view(n, 1, 1, 1)

    flip = _coin(ps("flip_p"), generator)
    x = torch.where(bcast(flip), x.flip(-1), x)

    jitter = _coin(ps("jitter_p"), generator)
    if jitter_form == "byol":
        x = _byol_jitter(x, jitter, ps, generator)
    else:
        x = _torchvision_jitter(x, jitter, ps, generator)

    gray = _coin(ps("gray_p"), generator)
    x = torch.where(bcast(gray), _grey(x).expand_as(x), x)

    if blur:
        do_blur = _coin(ps("blur_p"), generator)
        sigma = 0.1 + 1.9 * _rand(n, generator, dev)
        x = _gaussian_blur(x, torch.where(do_blur, sigma, 0.0))

    solarize = _coin(ps("solarize_p"), generator)
    x = torch.where(bcast(solarize) & (x >= 0.5), 1 - x, x)
    return x


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = _const(tuple(mean), x.device, x.dtype).view(1, 3, 1, 1)
    s = _const(tuple(std), x.device, x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def make_views(
    images: torch.Tensor,
    cfg: ViewConfig,
    generator: torch.Generator,
    masks: torch.Tensor | None = None,
) -> Views:
    """The multi-crop views of docs/method.md for a uint8 batch (B, 3, H, W).

    Large crop i: with probability cfg.mask_prob (per sample and per crop) the source is the full
    image times its saliency mask (background black) BEFORE cropping; masks (B, H, W), nonzero =
    foreground; images whose mask covers less than cfg.mask_min_area are never masked. Small crops
    are never masked. Large crop i uses cfg.presets[i % 2], small crops
    cfg.small_preset. Returns normalised float views on the images' device.
    """
    b, _, h, w = images.shape
    dev = images.device
    x = images.float() / 255
    L, S = cfg.large_crops, cfg.small_crops

    masked = torch.zeros(L, b, dtype=torch.bool, device=dev)
    source, offset = x, 0
    if masks is not None and cfg.mask_prob > 0 and L > 0:
        if masks.shape != (b, h, w):
            raise ValueError(f"masks shape {tuple(masks.shape)} does not match images {(b, h, w)}")
        # An (almost) empty mask would black out the whole crop: such images keep their background.
        enough = (masks != 0).flatten(1).float().mean(1) >= cfg.mask_min_area
        masked = (_rand((L, b), generator, dev) < cfg.mask_prob) & enough
        # Crop from [images; masked images]: a masked sample just points its box at the second half.
        source = torch.cat([x, x * (masks != 0).unsqueeze(1).to(x.dtype)])
        offset = b

    large: list[torch.Tensor] = []
    if L > 0:
        boxes = sample_boxes(L * b, h, w, cfg.large_scale, cfg.ratio, generator, dev)
        index = torch.arange(b, device=dev).repeat(L) + offset * masked.reshape(-1).long()
        large = _photometric(crop_resize(source, boxes, index, cfg.large_size), L, cfg, generator, large=True)

    small: list[torch.Tensor] = []
    if S > 0:
        boxes = sample_boxes(S * b, h, w, cfg.small_scale, cfg.ratio, generator, dev)
        index = torch.arange(b, device=dev).repeat(S)
        small = _photometric(crop_resize(x, boxes, index, cfg.small_size), S, cfg, generator, large=False)
    return Views(large=large, small=small, masked=masked)


def views_from_crops(
    large: torch.Tensor,
    small: torch.Tensor | None,
    cfg: ViewConfig,
    generator: torch.Generator,
    masked: torch.Tensor | None = None,
) -> Views:
    """The views of crops already cut and resized elsewhere (the streamed loader's workers): uint8
    large (L * B, 3, large_size, large_size) and small (S * B, ...), view-major, `masked` (L, B) the
    large crops cut from background-removed images; the photometric part of make_views, batched on
    the crops' device."""
    L, S = cfg.large_crops, cfg.small_crops
    b = len(large) // L
    if masked is None:
        masked = torch.zeros(L, b, dtype=torch.bool, device=large.device)
    views = _photometric(large.float() / 255, L, cfg, generator, large=True)
    small_views = _photometric(small.float() / 255, S, cfg, generator, large=False) if S > 0 else []
    return Views(large=views, small=small_views, masked=masked)


def _photometric(crops: torch.Tensor, n: int, cfg: ViewConfig, generator: torch.Generator,
                 large: bool) -> list[torch.Tensor]:
    """n views (view-major crops in [0, 1]) flipped, jittered, ..., normalised: large crop i uses
    cfg.presets[i % 2], small crops cfg.small_preset."""
    presets = [cfg.presets[i % len(cfg.presets)] for i in range(n)] if large else [cfg.small_preset] * n
    views = normalize(augment(crops, presets, generator, cfg.blur, cfg.jitter), cfg.mean, cfg.std)
    return list(views.chunk(n))


def center_view(
    images: torch.Tensor,
    size: int,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    crop_fraction: float = 1.0,
) -> torch.Tensor:
    """Evaluation view of a uint8 batch (B, 3, H, W): normalised float (B, 3, size, size), the one
    implementation of the view (in-memory batches, and each streamed image in a loader worker).

    The shorter side is resized to round(size / crop_fraction) (torch's antialiased bilinear, as
    torchvision's Resize on tensors) and the centre size x size is kept: crop_fraction 0.875 is the
    release's 256 -> 224 protocol; 1.0 only crops non-square images. Images whose both sides already
    have the resized length are not resampled (32 px CIFAR at 1.0 passes through as it is).
    """
    x = images.float() / 255
    short = round(size / crop_fraction)
    h, w = x.shape[-2:]
    if (h, w) != (short, short):
        h, w = (short, max(short, round(w * short / h))) if h <= w else \
            (max(short, round(h * short / w)), short)
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (h - size) // 2, (w - size) // 2
    return normalize(x[..., top : top + size, left : left + size], mean, std)


def epoch_batches(n: int, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of a fresh random permutation cut into ceil(n / batch) near-equal batches, so
    every image is seen once per epoch and no batch is tiny (500 images at batch 256: 250 + 250)."""
    perm = torch.randperm(n, generator=generator)
    return list(torch.tensor_split(perm, math.ceil(n / batch)))


def crop_flip(
    images: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    generator: torch.Generator,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> torch.Tensor:
    """Training view of fine-tuning and of the augmented linear protocol: random resized crop
    (area fraction U(scale), aspect 3/4-4/3; augment.py's sampler and roi_align resize) and a
    horizontal flip with probability 0.5, of a uint8 batch (B, 3, H, W); normalised float output."""
    b, _, h, w = images.shape
    x = images.float() / 255
    boxes = sample_boxes(b, h, w, scale, (3 / 4, 4 / 3), generator, x.device)
    x = crop_resize(x, boxes, torch.arange(b, device=x.device), size)
    return flip_views(x, generator, mean, std)


def flip_views(x: torch.Tensor, generator: torch.Generator, mean=IMAGENET_MEAN,
               std=IMAGENET_STD) -> torch.Tensor:
    """crop_flip's last part, also for crops cut elsewhere (streamed fine-tuning): a horizontal flip with
    probability 0.5 per image of a float batch in [0, 1] (drawn on the generator's device), normalised."""
    b = len(x)
    flip = torch.rand(b, generator=generator, device=generator.device).to(x.device) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    return normalize(x, mean, std)
