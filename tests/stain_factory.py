"""Generated H&E tissue in a chosen lab's stains (Beer-Lambert), for the stain normalisation's tests."""

from __future__ import annotations

import cv2
import numpy as np

PINK = np.array([[0.62, 0.20], [0.72, 0.80], [0.31, 0.56]])
"""Stain matrices (columns H, E; normalised below) of two labs, as far apart as H&E stains go; each absorbs in all
three channels, as Macenko's estimate assumes (pixels clear in any channel are taken for glass)."""
BLUE = np.array([[0.45, 0.30], [0.80, 0.85], [0.40, 0.43]])


def unit_columns(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=0)


def stained(concentrations: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(h, w, 2) H and E concentrations through Beer-Lambert with `matrix` (3, 2) → (h, w, 3) uint8 RGB."""
    density = concentrations @ unit_columns(matrix).T
    return np.clip(np.rint(240.0 * np.exp(-density) - 1.0), 0, 255).astype(np.uint8)


def tissue_concentrations(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Stroma (eosin, textured), nuclei (haematoxylin), a band of glass: (h, w, 2)."""
    rng = np.random.default_rng(seed)
    eosin = 1.0 + 0.5 * cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 6)
    hematoxylin = np.zeros((height, width), np.float32)
    for x, y, r in zip(rng.integers(0, width, 60), rng.integers(0, height, 60), rng.integers(6, 12, 60)):
        cv2.circle(hematoxylin, (int(x), int(y)), int(r), float(rng.uniform(0.8, 1.6)), -1)
    hematoxylin = cv2.GaussianBlur(hematoxylin, (0, 0), 1.5)
    eosin = np.clip(eosin + 0.2 * rng.normal(0, 1, (height, width)), 0.1, None) * (hematoxylin < 0.3)
    concentrations = np.stack([hematoxylin, eosin + 0.1 * hematoxylin], axis=-1)
    concentrations[:, int(width * 0.85):] = 0.0                                  # glass
    return concentrations
