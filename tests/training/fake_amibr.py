"""A small generated dataset in the AMi-Br layout (<root>/Atypical, <root>/Normal, amibr_train_split.csv).

Atypical crops carry a dark centred blob, normal ones a faint one, on H&E-like noise: a tiny random network's
features separate them, so training code can be checked for learning, not only for running.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def make_crop(atypical: bool, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    image = rng.normal([215, 170, 205], 12, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    blob = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    image[blob] = [70, 40, 110] if atypical else [180, 140, 190]
    return np.clip(image, 0, 255).astype(np.uint8)


def write_amibr(root: Path, n_slides: int = 6, per_slide: int = 6, seed: int = 0, with_csv: bool = True,
                size: int = 48) -> Path:
    """`per_slide` crops per slide, a third atypical; returns `root`."""
    rng = np.random.default_rng(seed)
    rows = []
    for slide in range(n_slides):
        for i in range(per_slide):
            atypical = i % 3 == 0
            folder = "Atypical" if atypical else "Normal"
            name = f"S{slide}_{i}.png"
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(make_crop(atypical, rng, size)).save(root / folder / name)
            rows.append({"slide": f"{slide:03d}.tiff", "dataset": "FAKE", "uid": len(rows), "final_label": folder,
                         "dataset_uid": name, "x": 1000.0 * i, "y": 500.0, "expert1_atypical": atypical, "expert2_atypical": atypical,
                         "expert3_atypical": atypical})
    if with_csv:
        pd.DataFrame(rows).to_csv(root / "amibr_train_split.csv")
    return root
