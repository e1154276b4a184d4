"""The embedded default dataset: ten classes of patterned shapes, made from a seed.

Why it exists: the toolkit must run end to end with no download, and saliency methods need a
ground-truth foreground mask to be scored against. The class is carried by the object's SHAPE and
its surface PATTERN (each class has its own of both), i.e. by what random crops and colour jitter
teach a self-supervised encoder. Colour, area, rotation, mirroring and position are drawn
independently of the class. Every object is painted in the same two colours (random order and
brightness): with free colours, instance discrimination is solved by colour alone and short
self-supervised runs stay at chance (docs/data.md).

How: backgrounds and object patterns are computed for a chunk of images at once with numpy; each
object's footprint (and a couple of distractor strokes) is drawn with OpenCV at 2-4x resolution and
reduced with INTER_AREA, which gives anti-aliased edges and the object's coverage at final resolution.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

CLASS_NAMES: list[str] = [
    "circle",
    "square",
    "triangle",
    "cross",
    "star",
    "ring",
    "crescent",
    "heart",
    "l_shape",
    "bars",
]

# Each class also has its own surface pattern (the pattern of class k is PATTERN_NAMES[k]), drawn in
# the object's frame so it turns, mirrors and scales with the object.
PATTERN_NAMES: list[str] = ["dots", "checks", "stripes", "solid", "sectors", "rim", "halves", "zigzag",
                            "grid", "rings"]

# The two colours of every object (see the module docstring); colour jitter covers the brightness.
_PALETTE = np.array([(220.0, 70.0, 50.0), (40.0, 110.0, 230.0)])
_GAIN_RANGE = (0.6, 1.2)
_PERIOD = 0.6  # pattern period in units of the object's circumscribed radius
# Object area as a fraction of the image area, drawn the same way for every class, so the area
# of the object says nothing about its class. The size of the shape's circumscribed circle then
# follows from the shape (a star is wider than a disc of the same area); _SPAN_RANGE only guards
# the extremes (diameter as a fraction of the image side).
_AREA_RANGE = (0.20, 0.35)
_SPAN_RANGE = (0.40, 1.20)
_MAX_DISTRACTORS = 2
_BG_TINT = 0.1  # backgrounds are grey levels with this much of a random colour mixed in
_BG_NOISE = 20.0  # largest amplitude of the coarse background blotches (0-255 scale)
_CHUNK = 256  # images per vectorised chunk at 32 px (scaled by area for other sizes)
_SHIFT = 3  # OpenCV fixed-point bits for sub-pixel polygon vertices
_SPLIT_IDS = {"train": 0, "test": 1}


# ----------------------------------------------------------------------------------------------
# Shapes: each is a list of filled polygons and a list of holes, inside the unit circle (y up).


def _circle_pts(radius: float = 1.0, cx: float = 0.0, cy: float = 0.0, n: int = 72) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def _regular_pts(k: int, radius: float = 1.0) -> np.ndarray:
    t = math.pi / 2 + np.arange(k) * 2.0 * math.pi / k
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _fit_unit(polys: list[np.ndarray]) -> list[np.ndarray]:
    """Centre on the bounding box and scale so the farthest vertex lies on the unit circle."""
    allp = np.concatenate(polys)
    centre = (allp.min(axis=0) + allp.max(axis=0)) / 2
    scale = np.linalg.norm(allp - centre, axis=1).max()
    return [(p - centre) / scale for p in polys]


def _build_shapes() -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    star = np.empty((10, 2))
    star[0::2] = _regular_pts(5, 1.0)
    star[1::2] = _regular_pts(5, 0.45) @ np.array([[math.cos(math.pi / 5), math.sin(math.pi / 5)],
                                                   [-math.sin(math.pi / 5), math.cos(math.pi / 5)]])
    w = 0.3  # half-width of the cross arms
    cross = np.array([(-w, 1), (w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1),
                      (-w, -w), (-1, -w), (-1, w), (-w, w)], dtype=float)
    t = np.linspace(0.0, 2.0 * math.pi, 96, endpoint=False)
    heart = np.stack([16 * np.sin(t) ** 3,
                      13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)], axis=1)
    a = 0.8  # arm thickness of the L, out of a side of 2
    l_shape = np.array([(-1, 1), (-1 + a, 1), (-1 + a, -1 + a), (1, -1 + a), (1, -1), (-1, -1)],
                       dtype=float)
    bar_top = np.array([(-1, 0.15), (1, 0.15), (1, 0.75), (-1, 0.75)], dtype=float)
    bars = [bar_top, bar_top * [1, -1]]
    shapes = {
        "circle": ([_circle_pts()], []),
        "square": ([_regular_pts(4)], []),
        "triangle": (_fit_unit([_regular_pts(3)]), []),
        "cross": (_fit_unit([cross]), []),
        "star": ([star], []),
        "ring": ([_circle_pts()], [_circle_pts(0.55)]),
        # The hole reaches past the disc; the remaining crescent is ~0.6 of the radius thick.
        "crescent": ([_circle_pts()], [_circle_pts(0.85, cx=0.45)]),
        "heart": (_fit_unit([heart]), []),
        "l_shape": (_fit_unit([l_shape]), []),
        "bars": (_fit_unit(bars), []),
    }
    return [shapes[name] for name in CLASS_NAMES]


_SHAPES = _build_shapes()


def _draw_shape(canvas: np.ndarray, label: int, cx: float, cy: float, radius: float,
                angle: float, mirror: bool) -> None:
    """Fill shape `label` into `canvas` (uint8, 255 = object), pixel units, y pointing down."""
    c, s = math.cos(angle), math.sin(angle)
    sign = -1.0 if mirror else 1.0
    fills, holes = _SHAPES[label]

    def to_px(p: np.ndarray) -> np.ndarray:
        x, y = sign * p[:, 0], p[:, 1]
        px = cx + radius * (x * c - y * s)
        py = cy - radius * (x * s + y * c)
        return np.round(np.stack([px, py], axis=1) * (1 << _SHIFT)).astype(np.int32)

    # One fillPoly call per polygon: a single call with several would XOR overlapping parts.
    for poly in fills:
        cv2.fillPoly(canvas, [to_px(poly)], 255, cv2.LINE_8, _SHIFT)
    for poly in holes:
        cv2.fillPoly(canvas, [to_px(poly)], 0, cv2.LINE_8, _SHIFT)


def _fill_fractions() -> np.ndarray:
    """Area of each shape relative to the square around its circumscribed circle, measured once."""
    r = 200.0
    out = []
    for label in range(len(CLASS_NAMES)):
        canvas = np.zeros((int(2 * r) + 2, int(2 * r) + 2), np.uint8)
        _draw_shape(canvas, label, r + 1, r + 1, r, 0.0, False)
        out.append(np.count_nonzero(canvas) / (2 * r) ** 2)
    return np.array(out)


_FILL = _fill_fractions()


# ----------------------------------------------------------------------------------------------
# Vectorised fields for a chunk of images.


def _smooth_upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """(B, g, g, C) random grid -> (B, size, size, C) smooth field (Gaussian interpolation).

    A Gaussian kernel instead of bilinear avoids the diamond artefacts of bilinear noise.
    """
    g = grid.shape[1]
    pos = (np.arange(size) + 0.5) * g / size - 0.5
    w = np.exp(-0.5 * ((pos[:, None] - np.arange(g)[None, :]) / 0.7) ** 2)
    w = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
    chan_first = np.ascontiguousarray(grid.transpose(0, 3, 1, 2), dtype=np.float32)
    return (w @ chan_first @ w.T).transpose(0, 2, 3, 1)  # (B, size, size, C)


def _ramp(b: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(B, size, size) linear ramp in [0, 1] along a random direction per image."""
    theta = rng.uniform(0.0, 2.0 * math.pi, b).astype(np.float32)
    coord = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    proj = (np.cos(theta)[:, None, None] * coord[None, None, :]
            + np.sin(theta)[:, None, None] * coord[None, :, None])
    return np.clip(proj / math.sqrt(0.5) + 0.5, 0.0, 1.0)


def _backgrounds(b: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A muted colour gradient with faint coarse blotches: plain, so the object's pattern stands out."""
    grey = rng.uniform(40, 215, (b, 1))
    c0 = (_BG_TINT * rng.uniform(0, 255, (b, 3)) + (1 - _BG_TINT) * grey).astype(np.float32)
    c1 = (_BG_TINT * rng.uniform(0, 255, (b, 3)) + (1 - _BG_TINT) * grey).astype(np.float32)
    t = _ramp(b, size, rng)[..., None]
    bg = c0[:, None, None] * (1 - t) + c1[:, None, None] * t  # (B, H, W, 3)
    amp = rng.uniform(0.0, _BG_NOISE, (b, 1, 1, 1)).astype(np.float32)
    bg = bg + amp * _smooth_upsample(rng.standard_normal((b, 3, 3, 3)), size)
    return bg.astype(np.float32)


def _square_wave(s: np.ndarray) -> np.ndarray:
    """Sharpened sine in [0, 1]: crisp two-tone bands whose edges stay anti-aliased at 32 px."""
    return np.clip(2.5 * s, -1.0, 1.0) * 0.5 + 0.5


def _patterns(labels: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(B, H, W) weight of the second colour in each image's class pattern, in object coordinates
    (u, v) in units of the circumscribed radius, so the pattern turns and scales with the object."""
    two_pi = 2.0 * math.pi
    p = _PERIOD
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    out = np.zeros_like(u)
    for k, name in enumerate(PATTERN_NAMES):
        sel = labels == k
        if not sel.any():
            continue
        uu, vv, rr, th = u[sel], v[sel], r[sel], theta[sel]
        if name == "solid":
            w = np.zeros_like(uu)
        elif name == "stripes":
            w = _square_wave(np.sin(two_pi * uu / p))
        elif name == "checks":
            w = _square_wave(np.sin(two_pi * uu / p) * np.sin(two_pi * vv / p) * 2.0)
        elif name == "dots":
            du = uu / p - np.round(uu / p)
            dv = vv / p - np.round(vv / p)
            w = np.clip((0.3 - np.hypot(du, dv)) * 8.0 + 0.5, 0.0, 1.0)
        elif name == "rings":
            w = _square_wave(np.sin(two_pi * rr / p))
        elif name == "sectors":
            w = _square_wave(np.sin(4.0 * th))
        elif name == "halves":
            w = np.clip(vv * 8.0 + 0.5, 0.0, 1.0)
        elif name == "zigzag":
            w = _square_wave(np.sin(two_pi * (vv + np.abs((uu / p) % 1.0 - 0.5) * p) / p))
        elif name == "grid":
            gu = np.abs(uu / p - np.round(uu / p))
            gv = np.abs(vv / p - np.round(vv / p))
            w = np.clip((0.15 - np.minimum(gu, gv)) * 8.0 + 0.5, 0.0, 1.0)
        elif name == "rim":
            w = np.clip((rr - 0.7) * 8.0 + 0.5, 0.0, 1.0)
        else:
            raise AssertionError(name)
        out[sel] = w
    return out


def _supersample(size: int) -> int:
    return 4 if size <= 64 else (3 if size <= 128 else 2)


# ----------------------------------------------------------------------------------------------
# Rendering.


def _render_chunk(labels: np.ndarray, size: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    b = len(labels)
    bg = _backgrounds(b, size, rng)

    # The object's two colours: the palette in a random order, at a random brightness.
    order = rng.random(b) < 0.5
    gain = rng.uniform(*_GAIN_RANGE, (b, 1))
    c1 = np.where(order[:, None], _PALETTE[0], _PALETTE[1]) * gain
    c2 = np.where(order[:, None], _PALETTE[1], _PALETTE[0]) * gain

    # Object geometry: area fraction is class-independent, circumscribed radius follows.
    area = rng.uniform(*_AREA_RANGE, b)
    span = np.clip(np.sqrt(area / _FILL[labels]), *_SPAN_RANGE)
    radius = span * size / 2
    lo = np.minimum(0.85 * radius, size / 2)  # up to 15% of the radius may leave the frame
    cx = rng.uniform(lo, size - lo)
    cy = rng.uniform(lo, size - lo)
    angle = rng.uniform(0.0, 2.0 * math.pi, b)
    mirror = rng.random(b) < 0.5

    # Object coordinates of every pixel centre (inverse of _draw_shape's mapping).
    pix = np.arange(size, dtype=np.float64) + 0.5
    a = (pix[None, None, :] - cx[:, None, None]) / radius[:, None, None]
    bb = -(pix[None, :, None] - cy[:, None, None]) / radius[:, None, None]
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = np.where(mirror[:, None, None], -1.0, 1.0) * (a * c + bb * s)
    v = -a * s + bb * c
    w = _patterns(labels, u, v)[..., None].astype(np.float32)
    tex = c1[:, None, None].astype(np.float32) * (1 - w) + c2[:, None, None].astype(np.float32) * w

    # Distractors: at most a couple of thin lines and open arcs, none of them a class shape.
    d = _MAX_DISTRACTORS
    n_dist = rng.integers(0, d + 1, b)
    d_kind = rng.integers(0, 2, (b, d))  # 0 line, 1 arc
    d_pts = rng.uniform(-0.1, 1.1, (b, d, 2, 2)) * size
    d_thick = rng.uniform(0.015, 0.04, (b, d)) * size
    d_axes = rng.uniform(0.1, 0.4, (b, d, 2)) * size
    d_angle = rng.uniform(0.0, 360.0, (b, d))
    d_sweep = rng.uniform(40.0, 150.0, (b, d))
    d_alpha = rng.uniform(0.4, 0.9, (b, d))
    d_color = rng.uniform(0, 255, (b, d, 3)).astype(np.float32)
    grain = rng.normal(0.0, 3.0, (b, size, size, 3)).astype(np.float32)  # sensor-like noise

    ss = _supersample(size)
    hi = size * ss
    pts = np.rint(d_pts * ss).astype(np.int64)
    thick = np.maximum(1, np.rint(d_thick * ss)).astype(np.int64)
    arc_axes = np.rint(d_axes * ss).astype(np.int64)
    # Per-image drawing only produces coverage maps; compositing is vectorised afterwards.
    d_cover = np.zeros((b, d, size, size), np.float32)
    obj_cover = np.empty((b, size, size), np.float32)
    layer = np.zeros((hi, hi), np.uint8)
    for i in range(b):
        for j in range(n_dist[i]):
            layer[:] = 0
            (x0, y0), (x1, y1) = pts[i, j].tolist()
            if d_kind[i, j] == 0:
                cv2.line(layer, (x0, y0), (x1, y1), 255, int(thick[i, j]))
            else:
                cv2.ellipse(layer, (x0, y0), tuple(arc_axes[i, j].tolist()), float(d_angle[i, j]),
                            0.0, float(d_sweep[i, j]), 255, int(thick[i, j]))
            d_cover[i, j] = cv2.resize(layer, (size, size), interpolation=cv2.INTER_AREA)
        layer[:] = 0
        _draw_shape(layer, int(labels[i]), cx[i] * ss, cy[i] * ss, radius[i] * ss, angle[i],
                    bool(mirror[i]))
        obj_cover[i] = cv2.resize(layer, (size, size), interpolation=cv2.INTER_AREA)
    d_cover *= (d_alpha / 255.0).astype(np.float32)[:, :, None, None]
    obj_cover /= 255.0

    img = bg  # distractors behind the object, then the object on top (alpha blending in place)
    for j in range(d):
        img += d_cover[:, j, :, :, None] * (d_color[:, j, None, None, :] - img)
    img += obj_cover[..., None] * (tex - img)
    img += grain
    images = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    masks = (obj_cover >= 0.5).astype(np.uint8)
    return images, masks


def _generate_split(n: int, size: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = len(CLASS_NAMES)
    labels = rng.permutation(np.arange(n) % k).astype(np.int64)  # balanced, then shuffled
    x = np.empty((n, size, size, 3), np.uint8)
    m = np.empty((n, size, size), np.uint8)
    chunk = max(8, _CHUNK * 32 * 32 // (size * size))  # about the same memory at any size
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        x[start:stop], m[start:stop] = _render_chunk(labels[start:stop], size, rng)
    return x, labels, m


def generate_synthetic(n_train: int = 5000, n_test: int = 1000, image_size: int = 32,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """Generate the synthetic shapes dataset deterministically from `seed`.

    Returns keys x_train (N,H,W,3) uint8, y_train (N,) int64, m_train (N,H,W) uint8 in {0,1}
    (ground-truth foreground mask), and x_test, y_test, m_test. Each split is class-balanced
    (counts differ by at most 1) and shuffled. Train and test use separate RNG streams, so
    changing n_test leaves the train set unchanged (and vice versa).
    """
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if int(image_size) != image_size or not 16 <= image_size <= 256:
        raise ValueError(f"image_size must be an integer in [16, 256], got {image_size!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out: dict[str, np.ndarray] = {}
    for split, n in (("train", int(n_train)), ("test", int(n_test))):
        rng = np.random.default_rng([int(seed), _SPLIT_IDS[split]])
        x, y, m = _generate_split(n, int(image_size), rng)
        out[f"x_{split}"], out[f"y_{split}"], out[f"m_{split}"] = x, y, m
    return out
