"""Put a trained AMi-Br detector and verifier into a weights folder with model cards that say what they are.

    python -m training.ship_amibr_weights --set DIR --detector-run RUN_DIR --verifier VERIFIER.pt --out weights
        [--chain-report REPORT.json]

DIR is the set written by `training.amibr_detection`; RUN_DIR the ultralytics run folder of the detector (its
weights/best.pt, args.yaml and results.csv); VERIFIER.pt a checkpoint written by `training.train_verifier` (its
card beside it). Writes OUT/detector.pt + .json and OUT/verifier.pt + .json. With --chain-report (the JSON of
`training.evaluate_chain` run on these weights) the chain's measured numbers go into both cards; run it once
without, evaluate, then again with the report (the checkpoints are only copied, so their sha256 stays the same).
See docs/shipped-weights.md.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path
from typing import Any

import yaml

from midog.cli import OneLineArgumentParser, add_debug_option, entry_point, read_json_file
from midog.errors import InputError
from midog.weights import read_model_card, write_model_card
from training.runtime import REPO_ROOT, git_commit


DATA_CONSTRUCTION = (
    "Canvases of 512 x 512 px at 0.25 um/px tiled from rectangular windows (sides 32-64 px, brick layout, "
    "transposed for half the canvases) of the AMi-Br 128 px crops of one slide, each in one of the 8 dihedral "
    "orientations. A window either shows its crop's mitotic figure uniformly anywhere inside it (>= 12 px from its "
    "border) or is figure-free (every annotated figure >= 24 px outside it; such windows are strips <= 39 px wide). "
    "Other annotated figures that fall into a window are labelled too (AMi-Br coordinates). Labels: one class, "
    "50 px boxes centred on the figures. Hard seams, no blending (training.amibr_detection)."
)
LIMITS = [
    "Not MIDOG++: the MIDOG++ images are not available here; AMi-Br crops (MIDOG21 and TUPAC16, human breast "
    "cancer only) are the only real tissue used. Other tumour types, species and scanners were never seen.",
    "Canvases are patchworks: seams and stain breaks that real tissue never has, figures far denser than in real "
    "regions of interest (about 18 per 512 px canvas), negatives that are ordinary tissue around figures, never the "
    "look-alike 'imposter' cells that cause real false positives (except the detector's own false positives that "
    "the verifier was trained on, many of them at seams).",
    "AMi-Br crops can show mitotic figures missing from its train list (unannotated): they count as background.",
    "Small models trained for about an hour on 2 shared CPU cores: far from converged.",
    "Numbers below are measured on canvases of held-out slides, not on real regions of interest; expect lower "
    "numbers on real tissue.",
]


def _results(run: Path) -> list[dict[str, float]]:
    with (run / "results.csv").open(newline="") as handle:
        return [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _chain_numbers(report: dict[str, Any] | None) -> dict[str, Any]:
    if report is None:
        return {}
    keep = ("images", "f1", "precision", "recall", "AP", "froc_auc", "true_positives", "false_positives",
            "false_negatives")
    return {
        "chain_evaluation": {
            "what": "detector + verifier through midog.pipeline.Track1Detector on the 512 px canvases of held-out "
                    "slides, official Track 1 metrics (midog.evaluate.track1: 7.5 um matching, AP50 on 22.5 um "
                    "boxes, FROC AUC over 0-8 FP/image); verifier.threshold tuned on val (best F1), test scored at it",
            "tuned_verifier_threshold": report["tuned"]["threshold"],
            "val": {k: report["val_at_tuned"][k] for k in keep},
            "test": {k: report["test_at_tuned"][k] for k in keep},
            "figures": report["figures"],
        }
    }


def _architecture(checkpoint: Path) -> tuple[str, int]:
    """The model YAML's name and the parameter count of an ultralytics checkpoint."""
    from ultralytics.nn.tasks import load_checkpoint

    model, _ = load_checkpoint(str(checkpoint))
    return Path(str(model.yaml.get("yaml_file", "unknown"))).stem, sum(p.numel() for p in model.parameters())


def ship_detector(run: Path, out: Path, manifest: dict[str, Any], report: dict[str, Any] | None) -> Path:
    import ultralytics

    best = run / "weights" / "best.pt"
    target = out / "detector.pt"
    shutil.copyfile(best, target)
    args = yaml.safe_load((run / "args.yaml").read_text())
    architecture, parameters = _architecture(target)
    rows = _results(run)
    best_row = max(rows, key=lambda r: 0.1 * r["metrics/mAP50(B)"] + 0.9 * r["metrics/mAP50-95(B)"])
    card = {
        "task": "track1-proposals",
        "architecture": architecture,
        "framework": f"ultralytics {ultralytics.__version__}",
        "parameters": parameters,
        "input_size": args["imgsz"],
        "classes": {"0": "mitotic figure"},
        "loading": "YOLO(path) or midog.proposals.load_detector",
        "training": {k: args[k] for k in ("epochs", "time", "batch", "imgsz", "optimizer", "lr0", "lrf", "cos_lr",
                                          "weight_decay", "warmup_epochs", "degrees", "fliplr", "flipud", "mosaic",
                                          "mixup", "close_mosaic", "scale", "translate", "hsv_h", "hsv_s", "hsv_v",
                                          "seed", "device") if k in args},
        "training_notes": "trained from scratch (no pretrained weights) with ultralytics directly, on CPU, with the "
                          "settings above (`time` caps the run); see docs/shipped-weights.md",
        "epochs_run": len(rows),
        "validation_metrics": {"epoch": int(best_row["epoch"]),
                               "mAP50": round(best_row["metrics/mAP50(B)"], 4),
                               "mAP50-95": round(best_row["metrics/mAP50-95(B)"], 4),
                               "precision": round(best_row["metrics/precision(B)"], 4),
                               "recall": round(best_row["metrics/recall(B)"], 4),
                               "what": "ultralytics val on the val canvases (15 held-out slides)"},
        **_data_card(manifest),
        **_chain_numbers(report),
        "git_commit": git_commit(),
    }
    write_model_card(target, card)
    return target


def ship_verifier(checkpoint: Path, out: Path, manifest: dict[str, Any], report: dict[str, Any] | None) -> Path:
    target = out / "verifier.pt"
    if checkpoint.resolve() != target.resolve():
        shutil.copyfile(checkpoint, target)
    card = read_model_card(checkpoint) or {}
    card = {k: v for k, v in card.items() if k not in ("file", "sha256")}
    card["training_data"] = {
        **card.get("training_data", {}),
        "construction": "mitotic_figure: 50 px crops centred on AMi-Br figures (centre jittered <= 6 px, dihedral "
                        "orientation); non_mitotic_figure: 50 px crops centred >= 34 px from every annotated figure "
                        "of the same AMi-Br crops; false_positive: the shipped detector's (first run's) candidates "
                        "> 30 px from every labelled figure on the train/val canvases, cut as the pipeline cuts "
                        "them. All resized to 64 px by the verifier.",
    }
    card.update(_data_card(manifest))
    card.update(_chain_numbers(report))
    card["git_commit"] = git_commit()
    write_model_card(target, card)
    return target


def _data_card(manifest: dict[str, Any]) -> dict[str, Any]:
    counts = manifest["counts"]
    return {
        "data": {
            "source": "AMi-Br (amibr_train_split.csv: 2,894 crops of 128 px centred on mitotic figures, 146 slides "
                      "of MIDOG21 and TUPAC16, human breast cancer), 0.25 um/px",
            "construction": DATA_CONSTRUCTION,
            "split": "by slide, 70/10/20 within each source dataset, seed "
                     f"{manifest['seed']}: " + ", ".join(f"{s} {c['slides']} slides / {c['amibr_crops']} crops / "
                                                         f"{c['canvases']} canvases / {c['figures']} labelled figures"
                                                         for s, c in counts.items()),
            "builder": "python -m training.amibr_detection --amibr ../shared/data/amibr --out DIR --seed "
                       f"{manifest['seed']}",
        },
        "limits": LIMITS,
    }


MANIFEST_KEYS = ("seed", "counts")
REPORT_KEYS = ("tuned", "val_at_tuned", "test_at_tuned", "figures")


def read_inputs(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The set's manifest and the chain report, once every input is known to be there: a missing or malformed one
    is an InputError (exit code 2) before anything is written."""
    for path, what in ((args.detector_run / "weights" / "best.pt", "detector checkpoint"),
                       (args.detector_run / "args.yaml", "detector run settings"),
                       (args.detector_run / "results.csv", "detector run results"),
                       (args.verifier, "verifier checkpoint")):
        if not path.is_file():
            raise InputError(f"{what} not found: {path}")
    manifest = _read_json_of(args.set / "manifest.json", "--set manifest", MANIFEST_KEYS, "training.amibr_detection")
    if args.chain_report is None:
        return manifest, None
    return manifest, _read_json_of(args.chain_report, "--chain-report", REPORT_KEYS, "training.evaluate_chain")


def _read_json_of(path: Path, what: str, keys: tuple[str, ...], writer: str) -> dict[str, Any]:
    """`path`'s JSON object (`midog.cli.read_json_file`), refused without one of the `keys` `writer` puts
    in it (a KeyError later would be an unexpected failure)."""
    value = read_json_file(path, what)
    missing = [key for key in keys if key not in value]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}: not the JSON {writer} writes")
    return value


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", required=True, type=Path, help="DIR written by training.amibr_detection")
    parser.add_argument("--detector-run", required=True, type=Path, help="ultralytics run folder")
    parser.add_argument("--verifier", required=True, type=Path, help="checkpoint from training.train_verifier")
    parser.add_argument("--out", default=REPO_ROOT / "weights", type=Path)
    parser.add_argument("--chain-report", type=Path, help="JSON from training.evaluate_chain on these weights")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    manifest, report = read_inputs(args)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in (ship_detector(args.detector_run, args.out, manifest, report),
                 ship_verifier(args.verifier, args.out, manifest, report)):
        print(path, f"{path.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
