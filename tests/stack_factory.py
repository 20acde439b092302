"""Generated Track 2 inputs for the tests and for test/make_cases.py: H&E-like crops, stacks in every odd format,
Track 2 input folders, and tiny random atypical classifiers. Nothing here reads ../shared."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import tifffile
import torch
from scipy import ndimage

from midog.classifier import build_classifier

TRACK2_SLUG = "stacked-histopathology-roi-cropouts"

_EOSIN = np.array([214, 150, 206], dtype=np.float32)       # pink-purple cytoplasm and stroma
_LUMEN = np.array([238, 222, 240], dtype=np.float32)       # white gaps between cells
_HEMATOXYLIN = np.array([150, 96, 180], dtype=np.float32)  # open-chromatin nuclei
_CHROMATIN = np.array([52, 20, 84], dtype=np.float32)      # condensed chromatin: the figure in the centre


def he_pages(count: int, size: int = 128, seed: int = 0) -> np.ndarray:
    """`count` H&E-like RGB uint8 crops (count, size, size, 3): cytoplasm with white gaps, textured nuclei, and a
    dark clumped mitotic-figure-like shape near the centre (compact or scattered)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    pages = np.empty((count, size, size, 3), dtype=np.uint8)

    def noise(sigma: float) -> np.ndarray:
        field = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), sigma)
        return field / (field.std() + 1e-6)

    for index in range(count):
        lumen = np.clip((noise(size / 16) - 1.2) * 2, 0, 1)
        nuclei = np.zeros((size, size), np.float32)
        for _ in range(rng.integers(6, 14)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(size / 16, size / 8, 2)
            angle = rng.uniform(0, np.pi)
            dy, dx = yy - cy, xx - cx
            u, v = dy * np.cos(angle) + dx * np.sin(angle), -dy * np.sin(angle) + dx * np.cos(angle)
            nuclei = np.maximum(nuclei, ((u / ry) ** 2 + (v / rx) ** 2 <= 1).astype(np.float32))
        figure = np.zeros((size, size), np.float32)
        for _ in range(rng.integers(1, 4)):  # one compact clump, or several scattered ones
            cy, cx = size / 2 + rng.normal(0, size / 14, 2)
            for _ in range(rng.integers(4, 10)):  # each clump: overlapping chromosome-sized blobs
                by, bx = cy + rng.normal(0, size / 40, 2)
                r = rng.uniform(size / 60, size / 28)
                figure = np.maximum(figure, (((yy - by) ** 2 + (xx - bx) ** 2) <= r * r).astype(np.float32))
        nuclei = (ndimage.gaussian_filter(nuclei, 1.0) * (0.75 + 0.25 * np.clip(noise(1.5), -1, 1)))[..., None]
        figure = ndimage.gaussian_filter(figure, 0.7)[..., None]
        rgb = _EOSIN + 14 * noise(2.0)[..., None]
        rgb = rgb * (1 - lumen[..., None]) + _LUMEN * lumen[..., None]
        rgb = rgb * (1 - nuclei) + _HEMATOXYLIN * nuclei
        rgb = rgb * (1 - figure) + _CHROMATIN * figure
        pages[index] = np.clip(rgb + rng.normal(0, 5, rgb.shape), 0, 255).astype(np.uint8)
    return pages


def write_tiff(path: Path, pages: np.ndarray | list[np.ndarray], **kwargs) -> Path:
    """One TIFF page per crop. `pages` may hold different sizes (a list); extra kwargs go to tifffile.TiffWriter.write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as writer:
        for page in pages:
            photometric = "minisblack" if page.ndim == 2 else "rgb"
            options = {"photometric": photometric, **kwargs}
            if page.ndim == 3 and page.shape[-1] == 4:
                options.setdefault("extrasamples", ["unassalpha"])
            writer.write(page, contiguous=False, metadata=None, **options)
    return path


def write_mha(path: Path, pages: np.ndarray, vector: bool | None = None, compress: bool = False) -> Path:
    """(N, H, W) gray or (N, H, W, C) colour → a 3-D MetaImage; pass one (H, W, C) page with vector=True for 2-D."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(pages, isVector=pages.ndim == 4 if vector is None else vector)
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def track2_input(root: Path, image_name: str = "stack.tiff") -> Path:
    """An input folder like grand-challenge's: inputs.json + images/<slug>/; returns the image path to write."""
    (root / "images" / TRACK2_SLUG).mkdir(parents=True, exist_ok=True)
    (root / "inputs.json").write_text(json.dumps([{
        "file": None, "image": {"name": image_name}, "value": None,
        "interface": {"slug": TRACK2_SLUG, "kind": "Image", "super_kind": "Image",
                      "relative_path": f"images/{TRACK2_SLUG}", "example_value": None},
    }], indent=4))
    return root / "images" / TRACK2_SLUG / image_name


def tiny_atypical(path: Path, threshold: float = 0.5, seed: int = 0, arch: str = "test_resnet",
                  input_size: int = 32, positive: str = "atypical") -> Path:
    """A random tiny timm classifier saved like the shipped weights (no model card)."""
    torch.manual_seed(seed)
    classifier = build_classifier(arch, input_size=input_size, positive=positive, threshold=threshold)
    return classifier.save(path, meta={"note": "random tiny model for tests"})
