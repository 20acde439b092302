"""A small fake MIDOG++ on disk, in exactly the published formats: COCO JSON with [x1, y1, x2, y2] boxes of 50 px
(category 1 mitotic figure, 2 hard negative, per-expert `labels`), a `;`-separated datasets_xvalidation.csv
(with the published scanner typo), images `NNN.tiff` that are not listed in the CSV and carry no annotation, and
RGB TIFFs — some uncompressed (memory-mapped), some deflate-compressed (streamed through SimpleITK).

Mitotic figures are drawn as dark discs (radius `DISC_RADIUS`) at their box centres on pink tissue, so a test can
check that labels land on figures; hard negatives are pale discs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

DISC_RADIUS = 10
DARK = (50, 20, 80)
PALE = (190, 150, 205)
TISSUE = (235, 180, 215)
TUMOURS = {"human breast cancer": ("human breast cancer", "Hamammatsu XR", "Human"),
           "canine lymphoma": ("canine lymphosarcoma", "3D Histech", "Canine")}
"""CSV tumour name → (the JSON's tumor_type, scanner, species); lymphoma is named differently in the two files."""


@dataclass
class FakeMidogpp:
    annotations: Path
    xvalidation: Path
    images: Path
    coco: dict


def write_fake_midogpp(root: Path, slides_per_tumour: int = 10, seed: int = 0) -> FakeMidogpp:
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    coco: dict = {"info": {"description": "fake MIDOG++"}, "licenses": [{"id": 1, "name": "CC0"}],
                  "images": [], "categories": [{"id": 1, "name": "mitotic figure"},
                                               {"id": 2, "name": "not mitotic figure"}], "annotations": []}
    rows = ["Slide;Dataset;Tumor;Scanner;Origin;Species"]
    sizes = [(1100, 900), (700, 520), (400, 300), (1300, 600)]
    slide_id = 0
    for tumour, (json_name, scanner, species) in TUMOURS.items():
        for k in range(slides_per_tumour):
            slide_id += 1
            width, height = sizes[k % len(sizes)]
            coco["images"].append({"license": 1, "file_name": f"{slide_id:03d}.tiff", "id": slide_id,
                                   "width": width, "height": height, "tumor_type": json_name})
            rows.append(f"{slide_id};{'test' if k % 5 == 4 else 'train'};{tumour};{scanner};Somewhere;{species}")
            centres = _centres(rng, width, height, n=int(rng.integers(4, 9)))
            image = np.empty((height, width, 3), np.uint8)
            image[:] = TISSUE
            image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
            for j, (cx, cy) in enumerate(centres):
                category = 1 if j % 2 == 0 else 2
                _disc(image, cx, cy, DARK if category == 1 else PALE)
                coco["annotations"].append({"bbox": [cx - 25, cy - 25, cx + 25, cy + 25], "category_id": category,
                                            "image_id": slide_id, "labels": [category, category],
                                            "id": len(coco["annotations"]) + 1})
            path = images_dir / f"{slide_id:03d}.tiff"
            if slide_id % 2:
                tifffile.imwrite(path, image, photometric="rgb")
            else:
                tifffile.imwrite(path, image, photometric="rgb", compression="zlib", rowsperstrip=32)
    for extra in range(2):  # listed in the JSON, absent from the CSV, never annotated (like MIDOG++ 151-200)
        slide_id += 1
        coco["images"].append({"license": 1, "file_name": f"{slide_id:03d}.tiff", "id": slide_id,
                               "width": 600, "height": 600, "tumor_type": "human breast cancer"})
    annotations = root / "MIDOG++.json"
    annotations.write_text(json.dumps(coco))
    xvalidation = root / "datasets_xvalidation.csv"
    xvalidation.write_text("\n".join(rows) + "\n")
    return FakeMidogpp(annotations, xvalidation, images_dir, coco)


def _centres(rng: np.random.Generator, width: int, height: int, n: int) -> list[tuple[int, int]]:
    """Cell centres at least 60 px apart; the first one sits on the left image border (its box reaches outside)
    and the second one straddles x = 512 - 10, a tile border for any image wider than a tile."""
    centres = [(5, int(rng.integers(40, height - 40)))]
    if width > 600:
        centres.append((502, int(rng.integers(40, height - 40))))
    while len(centres) < n:
        c = (int(rng.integers(30, width - 30)), int(rng.integers(30, height - 30)))
        if all((c[0] - x) ** 2 + (c[1] - y) ** 2 > 60 ** 2 for x, y in centres):
            centres.append(c)
    return centres


def _disc(image: np.ndarray, cx: int, cy: int, colour: tuple[int, int, int]) -> None:
    yy, xx = np.ogrid[:image.shape[0], :image.shape[1]]
    image[(yy - cy) ** 2 + (xx - cx) ** 2 <= DISC_RADIUS ** 2] = colour
