"""Generated Track 1 inputs for the tests, test/make_track1_case.py and benchmarks/bench_track1.py: H&E-like regions of
interest, written as plain/BigTIFF/tiled/pyramidal TIFF or MetaImage with their spacing, Track 1 input folders, and
tiny random detector and verifier checkpoints. Nothing here reads ../shared."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import tifffile
import torch

from midog.classifier import build_classifier

TRACK1_SLUG = "histopathology-region-of-interest-cropout"
TRACK1_FOLDER = "histopathology-roi-cropout"

_EOSIN = np.array([236, 178, 208], dtype=np.float32)       # pink stroma/cytoplasm
_HEMATOXYLIN = np.array([118, 72, 152], dtype=np.float32)  # purple nuclei
_CHROMATIN = np.array([52, 24, 86], dtype=np.float32)      # dark condensed chromatin of a mitotic figure


def he_roi(width: int, height: int, seed: int = 0, figures: Sequence[tuple[int, int]] = (),
           nuclei_per_mpx: int = 2500, background: float = 0.0) -> np.ndarray:
    """An H&E-like RGB uint8 ROI (height, width, 3): textured pink stroma, purple nuclei, dark figures at `figures`.

    `background`: share of the image (a band on the right) left as white glass.
    """
    rng = np.random.default_rng(seed)
    coarse = cv2.GaussianBlur(rng.normal(0, 1, (max(2, height // 16), max(2, width // 16))).astype(np.float32),
                              (0, 0), 2)
    texture = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)[..., None]
    fine = rng.normal(0, 6, (height, width, 1)).astype(np.float32)
    image = _EOSIN + texture * 14 + fine
    mask = np.zeros((height, width), np.uint8)
    count = int(nuclei_per_mpx * width * height / 1e6)
    for x, y, r in zip(rng.integers(0, width, count), rng.integers(0, height, count), rng.integers(5, 11, count)):
        cv2.ellipse(mask, (int(x), int(y)), (int(r), int(r * rng.uniform(0.6, 1.0))), float(rng.uniform(0, 180)),
                    0, 360, 1, -1)
    nuclei = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.5)[..., None]
    image = image * (1 - nuclei) + (_HEMATOXYLIN + fine) * nuclei
    figure_mask = np.zeros((height, width), np.uint8)
    for x, y in figures:
        cv2.ellipse(figure_mask, (int(x), int(y)), (14, 7), 30.0, 0, 360, 1, -1)
    dark = cv2.GaussianBlur(figure_mask.astype(np.float32), (0, 0), 1.5)[..., None]
    image = image * (1 - dark) + _CHROMATIN * dark
    if background > 0:
        image[:, int(width * (1 - background)):] = 245 + rng.normal(0, 2, (1, 1, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def write_tiff(path: Path, pixels: np.ndarray, spacing_um: tuple[float, float] | None = (0.25, 0.25),
               bigtiff: bool = False, tile: int | None = None, pyramid_levels: int = 0,
               compression: str | None = None) -> Path:
    """A TIFF with resolution tags in pixels per centimetre (as grand-challenge writes them); None: no tags.

    `pyramid_levels` > 0 writes halved copies as SubIFDs (the OME/pyvips layout of pyramidal TIFFs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    photometric = "rgb" if pixels.ndim == 3 and pixels.shape[-1] in (3, 4) else "minisblack"
    extra = {} if pixels.ndim == 2 or pixels.shape[-1] != 4 else {"extrasamples": ["unassalpha"]}
    resolution = {}
    if spacing_um is not None:
        resolution = {"resolution": (1e4 / spacing_um[0], 1e4 / spacing_um[1]), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        tif.write(pixels, photometric=photometric, tile=(tile, tile) if tile else None, compression=compression,
                  subifds=pyramid_levels or None, **resolution, **extra)
        level = pixels
        for _ in range(pyramid_levels):
            level = level[::2, ::2]
            tif.write(level, photometric=photometric, tile=(tile, tile) if tile else None, compression=compression,
                      subfiletype=1, **extra)
    return path


def write_mha(path: Path, pixels: np.ndarray, spacing_mm: tuple[float, float] | None = (0.00025, 0.00025),
              origin_mm: tuple[float, float] = (0.0, 0.0), compress: bool = False) -> Path:
    import SimpleITK as sitk  # here only: the benchmarks import this module on machines that may lack SimpleITK

    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(pixels, isVector=pixels.ndim == 3)
    if spacing_mm is not None:
        image.SetSpacing(spacing_mm)
    image.SetOrigin(origin_mm)
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def track1_input(root: Path, pixels: np.ndarray | None = None, name: str = "roi.tif", **tiff_kwargs) -> Path:
    """A grand-challenge Track 1 input folder: inputs.json and images/histopathology-roi-cropout/<name>.

    `tiff_kwargs` go to `write_tiff`; for a .mha only `spacing_um` is used (None: no spacing)."""
    image = root / "images" / TRACK1_FOLDER / name
    if pixels is not None:
        if name.endswith(".mha"):
            spacing_um = tiff_kwargs.get("spacing_um", (0.25, 0.25))
            write_mha(image, pixels, None if spacing_um is None else (spacing_um[0] / 1e3, spacing_um[1] / 1e3))
        else:
            write_tiff(image, pixels, **tiff_kwargs)
    (root / "inputs.json").write_text(json.dumps([{
        "file": None, "image": {"name": name}, "value": None,
        "interface": {"slug": TRACK1_SLUG, "kind": "Image", "super_kind": "Image",
                      "relative_path": f"images/{TRACK1_FOLDER}", "example_value": None},
    }], indent=4))
    return image


def tiny_detector(path: Path, seed: int = 0, class_bias: float = 0.0, width: float = 0.0625,
                  base: str = "yolo11n.yaml", classes: int = 1) -> Path:
    """A random YOLO11 (ultralytics' YAML at a tiny width, `classes` classes: mitotic figure, then hard negative)
    saved as an ultralytics checkpoint.

    Random initialisation gives near-zero class scores (ultralytics' prior bias); `class_bias` is added to the class
    logits so that a random model proposes something at confidence 0.2.
    """
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    torch.manual_seed(seed)
    cfg = yaml_model_load(base)
    cfg["scales"] = {"n": [0.25, width, 1024]}
    cfg["scale"] = "n"
    model = DetectionModel(cfg, nc=classes, verbose=False)
    model.names = {0: "mitotic figure", 1: "hard negative"} if classes == 2 else {0: "mitotic figure"}
    shift_class_bias(model, class_bias)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.half(), "train_args": {}, "date": None, "version": None}, path)
    return path


def shift_class_bias(model: torch.nn.Module, class_bias: float) -> None:
    """Add `class_bias` to the class logits of ultralytics' Detect head(s)."""
    from ultralytics.nn.modules import Detect

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Detect):
                for branch in list(module.cv3) + list(getattr(module, "one2one_cv3", [])):
                    branch[-1].bias += class_bias


def tiny_verifier(path: Path, seed: int = 0, input_size: int = 64, threshold: float = 0.5) -> Path:
    torch.manual_seed(seed)
    classifier = build_classifier("test_resnet", input_size=input_size, positive="mitotic figure",
                                  threshold=threshold)
    return classifier.save(path, meta={"note": "random tiny model for tests"})


def tiny_atypical(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    classifier = build_classifier("test_resnet", input_size=32, positive="atypical", threshold=0.5)
    return classifier.save(path, meta={"note": "random tiny model for tests"})


def tiny_track1_weights(folder: Path) -> Path:
    """A weights folder with a tiny random detector (biased to propose), verifier and atypical classifier."""
    tiny_detector(folder / "detector.pt", class_bias=4.0)
    tiny_verifier(folder / "verifier.pt")
    tiny_atypical(folder / "atypical.pt")
    return folder
