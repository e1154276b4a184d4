"""Images for the tests that write JPEG folders (imported by test modules; not a test file)."""

import cv2
import numpy as np


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A gradient with a disc (BGR): JPEG keeps such images close, unlike noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([x * 200 / w, y * 200 / h, np.full((h, w), rng.integers(0, 200))], -1).astype(np.uint8)
    cv2.circle(image, (w // 2, h // 2), min(h, w) // 4, tuple(int(v) for v in rng.integers(0, 255, 3)), -1)
    return image
