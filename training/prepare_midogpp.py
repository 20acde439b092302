"""MIDOG++ images + annotations → a YOLO dataset of 512 × 512 tiles (see training/midogpp.py for the rules).

    python -m training.prepare_midogpp --annotations MIDOG++.json --images DIR \\
        --xvalidation datasets_xvalidation.csv --out DIR [--classes 1|2] [--seed 0] [--workers 8]

Without `--images` (or with `--dry-run`) it only reads the annotations, splits the slides and prints the counts
per class, tumour type and split: a check that needs none of the 65 GB of images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from midog.cli import OneLineArgumentParser, add_debug_option, add_quiet_option, entry_point
from midog.config import TilingConfig
from training.midogpp import (SPLIT_RATIOS, ConvertConfig, TileConfig, annotation_counts, convert, load_midogpp,
                              split_slides)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    tiling = TilingConfig()
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", required=True, type=Path, help="MIDOG++.json")
    parser.add_argument("--xvalidation", required=True, type=Path, help="datasets_xvalidation.csv (tumour types)")
    parser.add_argument("--images", type=Path, help="folder with the MIDOG++ .tiff images")
    parser.add_argument("--out", type=Path, help="output folder of the YOLO dataset")
    parser.add_argument("--classes", type=int, choices=(1, 2), default=2,
                        help="2: mitotic figure + hard negative; 1: mitotic figure only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the slide split and of empty-tile sampling")
    parser.add_argument("--ratios", type=float, nargs=3, default=SPLIT_RATIOS, metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--tile-size", type=int, default=tiling.tile_size)
    parser.add_argument("--overlap", type=float, default=tiling.overlap)
    parser.add_argument("--min-visible", type=float, default=TileConfig.min_visible,
                        help="keep a box cut by a tile border when this fraction of it is inside")
    parser.add_argument("--empty-fraction", type=float, default=TileConfig.empty_fraction,
                        help="fraction of annotation-free tiles to keep")
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png")
    parser.add_argument("--workers", type=int, default=1, help="slides converted in parallel")
    parser.add_argument("--dry-run", action="store_true", help="only print the split and the counts")
    add_debug_option(parser)
    add_quiet_option(parser)
    args = parser.parse_args(argv)
    if not args.dry_run and args.out is not None and args.images is None:
        parser.error("--out needs --images (the folder of MIDOG++ .tiff images) to write the dataset; without --out "
                     "or with --dry-run only the counts are printed")
    if not args.dry_run and args.images is not None and args.out is None:
        parser.error("--images needs --out (the folder the YOLO dataset is written to)")
    return args


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    index = load_midogpp(args.annotations, args.xvalidation)
    if args.dry_run or args.images is None:
        split = split_slides(index.slides, args.ratios, args.seed)
        print(json.dumps({"slides": len(index.slides), "unlabelled_slides_left_out": len(index.unlabelled),
                          **annotation_counts(index, split)}, indent=2))
        return 0
    cfg = ConvertConfig(
        tiles=TileConfig(tile_size=args.tile_size, overlap=args.overlap, min_visible=args.min_visible,
                         classes=args.classes, empty_fraction=args.empty_fraction),
        ratios=tuple(args.ratios), seed=args.seed, image_format=args.image_format, workers=args.workers)
    summary = convert(index, args.images, args.out, cfg)
    print(json.dumps({k: summary[k] for k in ("slides", "tiles", "annotations")}, indent=2))
    print(f"wrote {args.out / 'data.yaml'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
