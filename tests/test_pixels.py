"""Pixel conversion: any dtype and channel layout → RGB uint8."""

from __future__ import annotations

import numpy as np

from midog.pixels import to_rgb_uint8


def test_float_pages():
    page = np.array([[0.0, 0.5, 1.0]], np.float32)
    assert to_rgb_uint8(page)[0, :, 0].tolist() == [0, 128, 255]
