"""A lighter ultralytics detection dataset: every tile with a label, and a seeded sample of the empty ones.

    python -m training.balance_tiles DIR/detection/fold0.yaml [--empty-per-labelled 1.0] [--seed 0]
        → DIR/detection/fold0_balanced.yaml, fold0_balanced_train.txt, fold0_balanced_val.txt

Full fields are mostly mitosis-free: in the seven MITOS-ATYPIA-14 slides four tiles in five hold no mitosis. A
detector fine-tuned on a CPU cannot afford epochs over all of them, so this keeps every labelled tile of the train and
val lists and `--empty-per-labelled` times as many empty tiles (drawn without replacement, seeded; all of them when
there are fewer). The test list, `names` and every other key of the dataset YAML (`pixel_size_um`) are kept as they
are. A tile is empty when its label file is missing or blank, as ultralytics reads it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml

from midog.cli import OneLineArgumentParser, add_debug_option, entry_point
from midog.errors import InputError

BALANCED_SUFFIX = "_balanced"
SPLITS = ("train", "val")


def label_files(images: list[Path]) -> list[Path]:
    """The label file ultralytics reads for each image (`img2label_paths`: the last `images` folder becomes
    `labels`, the suffix .txt)."""
    from ultralytics.data.utils import img2label_paths  # after midog's import has set YOLO_OFFLINE

    return [Path(p) for p in img2label_paths(images)]


def balanced_images(images: list[Path], empty_per_labelled: float, rng: np.random.Generator) -> list[Path]:
    """Every labelled image and round(empty_per_labelled × their count) empty ones, in the list's order."""
    labelled = [label.is_file() and bool(label.read_text().strip()) for label in label_files(images)]
    empty = [i for i, has in enumerate(labelled) if not has]
    wanted = min(len(empty), round(empty_per_labelled * (len(images) - len(empty))))
    kept = set(rng.choice(empty, size=wanted, replace=False).tolist()) if wanted else set()
    return [p for i, p in enumerate(images) if labelled[i] or i in kept]


def read_list(data_dir: Path, entry: str) -> list[Path]:
    path = Path(entry) if Path(entry).is_absolute() else data_dir / entry
    if not path.is_file():
        raise InputError(f"image list not found: {path} (this tool reads datasets whose splits are .txt lists)")
    return [Path(line.strip()) for line in path.read_text().splitlines() if line.strip()]


def balance_dataset(data_yaml: Path, empty_per_labelled: float = 1.0, seed: int = 0) -> tuple[Path, dict[str, int]]:
    """Write DATA_balanced.yaml and its train/val lists beside `data_yaml`; return its path and the tiles per split."""
    if empty_per_labelled < 0:
        raise InputError(f"--empty-per-labelled must be >= 0, got {empty_per_labelled}")
    if not data_yaml.is_file():
        raise InputError(f"dataset YAML not found: {data_yaml}")
    data = yaml.safe_load(data_yaml.read_text()) or {}
    root = Path(data.get("path") or data_yaml.parent)
    name = data_yaml.stem + BALANCED_SUFFIX
    missing = [split for split in SPLITS if split not in data]
    if missing:
        raise InputError(f"{data_yaml} has no '{missing[0]}' list")
    rng = np.random.default_rng(seed)
    kept = {split: balanced_images(read_list(root, str(data[split])), empty_per_labelled, rng) for split in SPLITS}
    for split, images in kept.items():  # written once every list was read: a failure leaves nothing behind
        listing = data_yaml.parent / f"{name}_{split}.txt"
        listing.write_text("".join(f"{p}\n" for p in images))
        data[split] = str(listing.resolve())
    counts = {split: len(images) for split, images in kept.items()}
    out = data_yaml.with_name(f"{name}.yaml")
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out, counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="+", help="ultralytics dataset YAML(s) with .txt split lists")
    parser.add_argument("--empty-per-labelled", type=float, default=1.0,
                        help="empty tiles kept per labelled tile (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    add_debug_option(parser)
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for data in args.data:
        out, counts = balance_dataset(data, args.empty_per_labelled, args.seed)
        print(f"{out}: " + ", ".join(f"{split} {n} tiles" for split, n in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
