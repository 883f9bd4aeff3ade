"""Image grids as PNG (what `zoo sample` writes for image models), and 2-D point sets drawn as a
density image (for models of `toy2d` points)."""

from __future__ import annotations

import math
import os

import numpy as np


def image_grid(x_NxHxWxC: np.ndarray, *, cols: int | None = None, pad: int = 1,
               min_cell: int = 32) -> np.ndarray:
    """[N, H, W, C] in [0, 1] -> one uint8 [rows*H', cols*W', C] grid, upscaled (nearest) so a cell
    is at least `min_cell` pixels wide: 8x8 digits are unreadable at 1x."""
    x = np.clip(np.asarray(x_NxHxWxC, np.float32), 0.0, 1.0)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"image_grid wants [N, H, W, C] images, got shape {x.shape}")
    n, h, w, c = x.shape
    scale = max(1, math.ceil(min_cell / max(h, w)))
    x = x.repeat(scale, 1).repeat(scale, 2)
    h, w = h * scale, w * scale
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones(((h + pad) * rows + pad, (w + pad) * cols + pad, c), np.float32) * 0.5
    for i in range(n):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    return (grid * 255 + 0.5).astype(np.uint8)


def save_png(path: str, x_NxHxWxC: np.ndarray, **kw) -> str:
    from PIL import Image

    grid = image_grid(x_NxHxWxC, **kw)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def points_image(x_Nx2: np.ndarray, *, size: int = 256, lim: float | None = None) -> np.ndarray:
    """2-D points -> one [1, size, size, 1] image in [0, 1]: a histogram over the square
    [-lim, lim]^2 (default: the points' largest |coordinate|), square-root scaled so that sparse
    regions show, y up."""
    x = np.asarray(x_Nx2, np.float64)
    if x.ndim != 2 or x.shape[1] != 2 or not np.isfinite(x).all():
        raise ValueError(f"points_image wants finite points [N, 2], got shape {x.shape}")
    lim = float(lim or max(np.abs(x).max(), 1e-6) * 1.05)
    h, _, _ = np.histogram2d(x[:, 1], x[:, 0], bins=size, range=[[-lim, lim], [-lim, lim]])
    img = np.sqrt(h[::-1] / max(h.max(), 1.0))
    return img[None, :, :, None]
