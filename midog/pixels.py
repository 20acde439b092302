"""Pixel conversion: any dtype and channel layout a reader decodes → RGB uint8 (H, W, 3), the one form models see."""

from __future__ import annotations

import numpy as np

from midog.errors import InputError


def to_rgb_uint8(pixels: np.ndarray, maximum: float | None = None) -> np.ndarray:
    """(H, W) or (H, W, C), C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA, any dtype → (H, W, 3) uint8; alpha dropped.

    Alpha is dropped rather than composited: cropouts are opaque, and writers that mislabel an extra sample as
    alpha would otherwise turn a page white. `maximum`: the data maximum that fixes the scale of wide data (see
    `_scale_to_uint8`); by default this array's own. A streamed image or a stack passes the one of the whole file,
    so its tiles and pages are scaled alike.
    """
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or not 1 <= pixels.shape[-1] <= 4:
        raise InputError(f"unsupported page layout {pixels.shape}: expected (H, W) or (H, W, 1..4 channels)")
    pixels = _scale_to_uint8(_colour_samples(pixels), maximum)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return np.ascontiguousarray(pixels)


def _colour_samples(pixels: np.ndarray) -> np.ndarray:
    """The samples `to_rgb_uint8` keeps of (H, W, C): gray or RGB, alpha left out."""
    return pixels[..., :1] if pixels.shape[-1] <= 2 else pixels[..., :3]


def data_maximum(pixels: np.ndarray) -> float:
    """The maximum over the kept samples of (H, W) or (H, W, C) data (NaN ignored; 0 for no data)."""
    kept = _colour_samples(pixels if pixels.ndim != 2 else pixels[..., None])
    return float(np.nanmax(kept, initial=0)) if kept.size else 0.0


def _scale_to_uint8(pixels: np.ndarray, maximum: float | None = None) -> np.ndarray:
    """8-bit as is. Wider integers: divided by the smallest bit depth ≥ 8 that holds the data's maximum
    (2**bits - 1 → 255), so 16-bit data (x257) and 12-bit camera data both come out full range, and 8-bit data
    stored in a 16-bit container comes out unchanged. Floats: [0, 1] → [0, 255], otherwise clipped; NaN → 0."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    if not (np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)):
        raise InputError(f"unsupported pixel type {pixels.dtype}")
    if maximum is None:
        maximum = data_maximum(pixels)
    floating = np.issubdtype(pixels.dtype, np.floating)
    if floating:
        scale = 255.0 if maximum <= 1.0 else 1.0
    else:
        bits = max(8, int(maximum).bit_length())
        scale = 1.0 if bits == 8 else 255.0 / ((1 << bits) - 1)
    data = pixels.astype(np.float32)  # the one float copy; everything below works in place
    if floating:
        np.nan_to_num(data, copy=False, nan=0.0)
    data *= scale
    np.rint(data, out=data)
    np.clip(data, 0, 255, out=data)
    return data.astype(np.uint8)
