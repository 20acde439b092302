"""Cross-validated figures of an ensemble of Track 2 recipes, from the out-of-fold probabilities their runs kept.

    python -m training.ensemble_cv --config training/configs/atypical_lite0.yaml \
        --runs docs/results/atypical-gpu60 docs/results/atypical-lite0 --out docs/results/atypical-pair/cv.json \
        [--card weights/atypical_ensemble.json --members weights/atypical.pt weights/atypical_lite0_128.pt]

Each run is a cross-validation on the same folds (the config's data, split, folds and fold seed) scored with
`train_classifier evaluate-tta`, which keeps every fold's TTA P(atypical) per crop (`fold{k}/tta_report.json`). For
every fold the members were trained without it, so the ensemble's out-of-fold probability is the mean of the
members' (what `midog.atypical` computes for an ensemble). Every member and the ensemble are then scored as one run
is: per fold the balanced-accuracy-optimal threshold (`best_threshold`), balanced accuracy at the median of the
other folds' thresholds (`other_folds_thresholds`: the honest estimate), ROC AUC per fold and pooled, and the
threshold to ship with the ensemble (the median of its fold thresholds). No model is run, nothing is trained.

`--card` writes the shipped ensemble's card: its members (the full-data checkpoints trained by the same recipes as
the runs, in the same order, each named with its sha256 and its own card), the threshold, the cross-validated
figures of the ensemble and of each member, and this command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from midog.cli import OneLineArgumentParser, add_debug_option, entry_point, read_json_file
from midog.errors import InputError
from midog.evaluate.io import is_number
from midog.outputs import write_json_atomic
from midog.weights import model_card_path, sha256_of
from training.amibr import assign_folds, load_index
from training.classifier_config import (TrainConfig, add_split_options, fold_report_path, load_train_config,
                                        resolve_data_root, split_overrides)
from training.classifier_cv import crop_names, mean_std, other_folds_thresholds
from training.classifier_fold import balanced_accuracy, best_threshold


def fold_probabilities(cfg: TrainConfig, run: Path, k: int, files: list[str]) -> tuple[np.ndarray, int]:
    """A run's fold-k TTA P(atypical) (its report at `fold_report_path`), checked to be of the same crops in the
    same order as `files`, and the TTA views they average (8 where the report predates `tta_views`)."""
    path = fold_report_path(cfg, run, k)
    if not path.is_file():
        raise InputError(f"{path} not found: score the run with `train_classifier evaluate-tta` first")
    report = read_json_file(path, f"fold {k} report")
    if report.get("files") != files:
        raise InputError(f"{path} scored other crops than fold {k} of the config's split (another split, "
                         "fold seed or data?)")
    tta = report.get("tta")
    probs = tta.get("probs") if isinstance(tta, dict) else None
    if not isinstance(probs, list) or len(probs) != len(files) or not all(is_number(p) and 0 <= p <= 1 for p in probs):
        raise InputError(f"{path} holds no tta.probs of {len(files)} probabilities in [0, 1]: rescore the run with "
                         "`train_classifier evaluate-tta`")
    return np.asarray(probs, dtype=np.float64), int(report.get("tta_views", 8))


def run_probabilities(cfg: TrainConfig, run: Path, index: Any, vals: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
    """A run's out-of-fold TTA probabilities, fold by fold, and the one TTA view count they were scored with."""
    scored = [fold_probabilities(cfg, run, k, crop_names(index, val)) for k, val in enumerate(vals)]
    views = sorted({v for _, v in scored})
    if len(views) > 1:
        raise InputError(f"{run}: its folds were scored with different TTA views {views}: rescore them alike")
    return [p for p, _ in scored], views[0]


def score_out_of_fold(labels: list[np.ndarray], probs: list[np.ndarray]) -> dict[str, Any]:
    """One recipe's out-of-fold figures, as `classifier_cv.out_of_fold` reports them."""
    own = [best_threshold(y, p)[0] for y, p in zip(labels, probs)]
    transferred = other_folds_thresholds(own)
    return {
        "balanced_accuracy_at_other_folds_threshold": mean_std(
            [balanced_accuracy(y, p, t) for y, p, t in zip(labels, probs, transferred)]),
        "roc_auc": mean_std([roc_auc_score(y, p) for y, p in zip(labels, probs)]),
        "pooled_roc_auc": round(float(roc_auc_score(np.concatenate(labels), np.concatenate(probs))), 4),
        "fold_thresholds": [round(float(t), 6) for t in own],
        "ship_threshold": float(np.median(own)),
    }


def ensemble_cv(cfg: TrainConfig, runs: list[Path]) -> dict[str, Any]:
    """Every run alone and the mean of all, scored on the config's folds."""
    if len(runs) < 2:
        raise InputError("--runs needs two or more cross-validation runs to average")
    index = load_index(resolve_data_root(cfg), cfg.csv)
    labels = index["label"].to_numpy()
    fold_of = assign_folds(index, cfg.split, cfg.folds, cfg.fold_seed)
    vals = [np.flatnonzero(fold_of == k) for k in range(cfg.folds)]
    scored = {str(run): run_probabilities(cfg, run, index, vals) for run in runs}
    fold_labels = [labels[val] for val in vals]
    mean = [np.mean([scored[str(run)][0][k] for run in runs], axis=0) for k in range(cfg.folds)]
    return {"folds": cfg.folds, "fold_seed": cfg.fold_seed, "split": cfg.split, "crops": int(len(labels)),
            "members": {name: {**score_out_of_fold(fold_labels, probs), "tta_views": views}
                        for name, (probs, views) in scored.items()},
            "ensemble": score_out_of_fold(fold_labels, mean),
            "tta_views": [scored[str(run)][1] for run in runs]}


def ensemble_card(report: dict[str, Any], members: list[Path], runs: list[Path], command: str) -> dict[str, Any]:
    """The shipped ensemble's card: members by file, sha256 and card, the threshold and the CV figures."""
    if len(members) != len(runs):
        raise InputError(f"--members names {len(members)} checkpoint(s) for {len(runs)} run(s): one per run, in order")
    entries = []
    for member, run in zip(members, runs):
        if not member.is_file():
            raise InputError(f"--members: no such checkpoint {member}")
        card = model_card_path(member)
        entries.append({"file": member.name, "sha256": sha256_of(member), "card": card.name if card.is_file() else None,
                        "cross_validated_run": str(run), "cross_validation": report["members"][str(run)]})
    return {"task": "Track 2: atypical vs normal mitotic figure; output the members' mean P(atypical)",
            "members": entries, "threshold": report["ensemble"]["ship_threshold"],
            "tta_views": report["tta_views"],
            "tta_views_rule": "the TTA views each member's out-of-fold probabilities averaged, in the order of "
                              "members: set atypical.tta_views to them (one number where all are equal)",
            "threshold_rule": "the median of the ensemble's per-fold balanced-accuracy-optimal thresholds",
            "cross_validation": {k: v for k, v in report.items() if k != "members"}, "command": command}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True,
                        help="a training config of the runs: its data, split, folds and fold seed define the folds")
    add_split_options(parser)
    parser.add_argument("--runs", type=Path, nargs="+", required=True,
                        help="cross-validation run folders, each with fold{k}/tta_report.json")
    parser.add_argument("--out", type=Path, default=None, help="write the report here (JSON)")
    parser.add_argument("--card", type=Path, default=None,
                        help="write the shipped ensemble's card here (needs --members)")
    parser.add_argument("--members", type=Path, nargs="+", default=None,
                        help="with --card: the shipped checkpoints, one per run, in the order of --runs")
    add_debug_option(parser)
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (args.card is None) != (args.members is None):
        raise InputError("--card and --members go together")
    report = ensemble_cv(load_train_config(args.config, split_overrides(args)), args.runs)
    card = None
    if args.card is not None:
        command = "python -m training.ensemble_cv " + " ".join(argv if argv is not None else sys.argv[1:])
        card = ensemble_card(report, args.members, args.runs, command)
    if args.out is not None:
        write_json_atomic(args.out, report)
    if card is not None:
        write_json_atomic(args.card, card)
    for name, scores in [*report["members"].items(),
                         (f"ensemble (mean P(atypical), TTA views {report['tta_views']})", report["ensemble"])]:
        accuracy, auc = scores["balanced_accuracy_at_other_folds_threshold"], scores["roc_auc"]
        print(f"{name}: balanced accuracy at the other folds' threshold {accuracy['mean']:.4f} ± {accuracy['std']:.4f} "
              f"{accuracy['folds']}, ROC AUC {auc['mean']:.4f} {auc['folds']}, ship threshold "
              f"{scores['ship_threshold']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
