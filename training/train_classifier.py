"""Train the atypical-vs-normal mitotic figure classifier on AMi-Br with slide-grouped cross-validation.

    python -m training.train_classifier [cv] --config training/configs/atypical.yaml [--folds 5] [--fold k]
                                        [--out DIR] [--resume] [--set KEY=VALUE ...]   # --set augment.hed_sigma=0.1
    python -m training.train_classifier evaluate-tta --config ... [--fold k] [--ship-folds PATH]
    python -m training.train_classifier full --config ... [--full-epochs N] [--resume] [--ship PATH]
    python -m training.train_classifier ship PATH --config ... [--full] [--fold k]
    python -m training.train_classifier ship-folds PATH --config ...

Sub-commands (`cv` when none is given); the flag forms `--evaluate-tta`, `--full`, `--ship PATH`,
`--ship-folds PATH` are their old spelling and still work, alone or combined (`--full --ship PATH` is
`full --ship PATH`). A run does its steps in this order: the CV (skipped by evaluate-tta, full, ship-folds once
`cv_summary.json` exists, and by `full --full-epochs N`), the TTA scoring, the full-data model, shipping.

Per fold: AdamW + linear warmup + cosine decay, BCE with a positive-class weight for the imbalance, early stopping
on validation balanced accuracy (with `ship_epoch: best`; with 'last' every fold runs its whole schedule), a
decision threshold chosen on the validation fold (max balanced accuracy) and stored in the checkpoint. Writes
`DIR/fold{k}/{best.pt,final.pt,last.pt,metrics.csv}` and `DIR/cv_summary.json`.
`full` trains one model on all crops for the median best epoch of the CV folds (or `--full-epochs N`, which can
run alongside the CV; `full --full-epochs N --resume` after the CV then only sets its thresholds).

Multi-GPU: `torchrun --nproc_per_node N -m training.train_classifier ...` (DDP, DistributedSampler; every rank
evaluates the whole, small, validation fold so they take the same early-stopping decision; rank 0 writes).

The code: training/classifier_config.py (the config, the run's file names), training/classifier_fold.py (one
fold: data, loop, checkpoints, resume), training/classifier_cv.py (the folds, their summary, TTA scoring),
training/classifier_ship.py (the full-data model, shipping, the model card). Their names stay importable from
here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3

from midog.cli import OneLineArgumentParser, add_debug_option, add_quiet_option, entry_point
from midog.config import TTA_VIEW_COUNTS
from midog.errors import InputError
from training.classifier_config import (SHIP_EPOCH_CHECKPOINTS, TrainConfig, add_split_options, ema_name,
                                        fold_checkpoint_name, fold_checkpoint_path, fold_report_path,
                                        full_checkpoint_name, load_train_config, resolve_data_root, resolve_out_dir,
                                        split_overrides, tta_report_name)
from training.classifier_cv import (crop_names, cross_validate, cv_summary_path, data_description,
                                    evaluate_one_fold, evaluate_tta, fold_scores, fold_sources, fold_thresholds,
                                    load_cv_summary, load_tta_report, mean_std, other_folds_thresholds,
                                    out_of_fold, prepare_data, score_fold, summarise)
from training.classifier_fold import (FoldResult, averaged, balanced_accuracy, best_threshold, binary_metrics,
                                      build_model, make_datasets, make_emas, make_loss, make_optimizer,
                                      make_train_loader, positive_weight, predict, predict_with_bar, train_epoch,
                                      train_fold, training_targets)
from training.classifier_ship import model_card, ship, ship_fold_ensemble, ship_folds, ship_one, train_full
from training.config_file import add_set_option, parse_set_pairs
from training.runtime import REPO_ROOT, Dist, init_distributed

__all__ = [  # what this module held before the split, still imported from here
    "FoldResult", "ModelEmaV3", "SHIP_EPOCH_CHECKPOINTS", "TrainConfig", "averaged", "balanced_accuracy",
    "best_threshold", "binary_metrics", "build_model", "crop_names", "cross_validate", "data_description",
    "ema_name", "evaluate_one_fold", "fold_checkpoint_name", "fold_checkpoint_path", "fold_report_path",
    "fold_scores", "fold_sources", "fold_thresholds", "full_checkpoint_name", "load_train_config", "main",
    "make_datasets", "make_emas", "make_loss", "make_optimizer", "make_train_loader", "mean_std", "model_card",
    "other_folds_thresholds", "out_of_fold", "parse_args", "positive_weight", "predict", "predict_with_bar",
    "prepare_data", "resolve_data_root", "score_fold", "ship", "ship_folds", "summarise", "train_epoch",
    "train_fold", "training_targets", "tta_report_name",
]

COMMANDS: dict[str, str] = {
    "cv": "cross-validation: train the folds (all, or --fold k) and write cv_summary.json once all are done "
          "(the default sub-command)",
    "evaluate-tta": "after the CV, score the fold models on their validation folds with and without TTA",
    "full": "after the CV (or from an existing cv_summary.json, or alongside it with --full-epochs), train one "
            "model on all crops",
    "ship": "write a model to PATH (+ .json model card), e.g. weights/atypical.pt: the full-data model with "
            "--full, else fold --fold k (default 0)",
    "ship-folds": "the fold ensemble: PATH=weights/atypical.pt writes weights/atypical_fold{k}.pt (+ cards)",
}
"""The sub-commands and what each does; the action flags (`ACTION_FLAGS`) are their old spelling."""

ACTION_FLAGS: dict[str, str] = {"evaluate-tta": "--evaluate-tta", "full": "--full", "ship": "--ship",
                                "ship-folds": "--ship-folds"}
"""Each sub-command (but `cv`, which has none) and the flag that did the same before sub-commands."""

VALUE_OPTIONS = ("--config", "--folds", "--fold", "--out", "--epochs", "--full-epochs", "--ship", "--ship-folds",
                 "--ship-ema", "--split", "--tta-views", "--set")
"""The options that take a value (which may spell like a sub-command: `--out cv`)."""

HELP_FLAGS = ("-h", "--help")


# ---------------------------------------------------------------------------------------------------- CLI

def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="The old spelling still works: with no sub-command the action flags "
                                          "--evaluate-tta, --full, --ship PATH, --ship-folds PATH select the "
                                          "sub-command of that name (see `cv --help`).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="sub-commands (default: cv)")
    for name, text in COMMANDS.items():
        spelling = f" (old spelling: {ACTION_FLAGS[name]}{' PATH' if name.startswith('ship') else ''})" \
            if name in ACTION_FLAGS else ""
        sub = commands.add_parser(name, help=text + spelling, description=text + spelling)
        if name in ("ship", "ship-folds"):
            sub.add_argument(name.replace("-", "_"), metavar="PATH", help="where to write the model")
        elif name != "cv":
            sub.set_defaults(**{name.replace("-", "_"): True})
        add_options(sub, command=name)
    return parser


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """The options of every sub-command, and the action flags of the others (which add their step)."""
    parser.add_argument("--config", default=str(REPO_ROOT / "training/configs/atypical.yaml"))
    add_split_options(parser)
    parser.add_argument("--fold", type=int, help="train (or with evaluate-tta score, or ship) only this fold")
    parser.add_argument("--out", help="output folder (overrides the config)")
    parser.add_argument("--resume", action="store_true", help="continue from each fold's (and full's) last.pt")
    parser.add_argument("--epochs", type=int, help="override the epoch budget")
    parser.add_argument("--full-epochs", type=int,
                        help="with full: train this many epochs, without waiting for the CV's median best epoch")
    parser.add_argument("--half", action="store_true", help="store shipped tensors as fp16")
    parser.add_argument("--tta-views", type=int, choices=TTA_VIEW_COUNTS,
                        help="views evaluate-tta averages (overrides the config's tta_views: 8 rotations and "
                             "reflections, or 4 rotations); score other views in a copy of the folds (--out)")
    parser.add_argument("--ship-ema", metavar="H",
                        help="score/ship the moving average with horizon H epochs (one of ema_epochs), or 'none' for "
                             "the raw weights (overrides the config's ship_ema)")
    for name, flag in ACTION_FLAGS.items():
        if name != command:
            text = f"also: {COMMANDS[name]}" + (f" (the old spelling of `{name}`)" if command == "cv" else "")
            kind: dict[str, Any] = {"metavar": "PATH"} if name.startswith("ship") else {"action": "store_true"}
            parser.add_argument(flag, help=text, **kind)
    add_set_option(parser)
    add_debug_option(parser)
    add_quiet_option(parser)


def with_command(argv: list[str]) -> list[str]:
    """`argv` with its sub-command first: moved there from where it stands (a caller may put its options first:
    training.lora), or `cv` when there is none (the old, flag spelling)."""
    if argv and (argv[0] in COMMANDS or argv[0] in HELP_FLAGS):
        return argv
    for i, token in enumerate(argv):
        if token in COMMANDS and not (i > 0 and _takes_value(argv[i - 1])):
            return [token, *argv[:i], *argv[i + 1:]]
    return ["cv", *argv]


def flag_spelling(argv: list[str]) -> list[str]:
    """`argv` in the old spelling (no sub-command, action flags), for callers that read the options (training.lora
    finds what was shipped by `--ship` / `--ship-folds`)."""
    name, *rest = with_command(argv)
    if name == "cv" or name in HELP_FLAGS:
        return argv if name in HELP_FLAGS else rest
    if name in ("evaluate-tta", "full"):
        return [ACTION_FLAGS[name], *rest]
    at = next((i for i, token in enumerate(rest)
               if not token.startswith("-") and not (i > 0 and _takes_value(rest[i - 1]))), None)
    if at is None:
        return [ACTION_FLAGS[name], *rest]  # no PATH: parsing will say so
    return [ACTION_FLAGS[name], rest[at], *rest[:at], *rest[at + 1:]]


def _takes_value(token: str) -> bool:
    """Whether `token` is an option (or argparse's abbreviation of one) whose value is the next token."""
    return token.startswith("--") and "=" not in token and any(name.startswith(token) for name in VALUE_OPTIONS)


def command_of(args: argparse.Namespace) -> str:
    """The sub-command a parsed command line does, the same for its flag spelling: the last step it runs that
    names one (ship-folds and ship after full, full after evaluate-tta)."""
    for name in ("ship-folds", "ship", "full", "evaluate-tta"):
        if getattr(args, name.replace("-", "_")):
            return name
    return "cv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(with_command(list(sys.argv[1:] if argv is None else argv)))
    args.command = command_of(args)
    return args


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config values the command line sets: its named options, then the `--set` pairs."""
    overrides: dict[str, Any] = split_overrides(args)
    if args.out:
        overrides["out"] = args.out
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.tta_views:
        overrides["tta_views"] = args.tta_views
    if args.ship_ema is not None:
        overrides["ship_ema"] = None if args.ship_ema.lower() == "none" else _horizon(args.ship_ema)
    return overrides | parse_set_pairs(args.set)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_train_config(args.config, config_overrides(args))
    if args.fold is not None and not 0 <= args.fold < cfg.folds:
        raise InputError(f"--fold {args.fold}: the config has {cfg.folds} folds (0 to {cfg.folds - 1})")
    ctx = init_distributed()
    if ctx.device.type == "cpu" and cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    code = run(args, cfg, resolve_out_dir(cfg), ctx)
    if ctx.world_size > 1:
        dist.destroy_process_group()
    return code


def run(args: argparse.Namespace, cfg: TrainConfig, out_dir: Path, ctx: Dist) -> int:
    """The steps the command line asks for, in order: CV, TTA scoring, the full-data model, shipping."""
    if args.evaluate_tta and args.fold is not None:
        return evaluate_one_fold(cfg, out_dir, args.fold, ctx)
    if needs_cross_validation(args, out_dir):
        cross_validate(cfg, out_dir, ctx, only_fold=args.fold, resume=args.resume)
    summary = load_cv_summary(out_dir)
    tta_report = None if args.evaluate_tta else load_tta_report(cfg, out_dir)
    if args.evaluate_tta and ctx.main and summary is not None:
        tta_report = evaluate_tta(cfg, out_dir)
    if ctx.world_size > 1:
        dist.barrier()  # the other ranks wait for rank 0's TTA thresholds in the fold checkpoints
    if args.full:
        train_full(cfg, out_dir, ctx, summary, args.full_epochs, args.resume)
    if args.ship_folds and ctx.main and summary is not None:
        ship_fold_ensemble(cfg, out_dir, Path(args.ship_folds), summary, tta_report, half=args.half)
    elif args.ship and ctx.main:
        ship_one(cfg, out_dir, Path(args.ship), summary, tta_report, full=args.full, fold=args.fold or 0,
                 half=args.half)
    return 0


def needs_cross_validation(args: argparse.Namespace, out_dir: Path) -> bool:
    """The CV runs unless a later step only needs its finished summary, or the full-data model trains a fixed
    number of epochs (alongside the CV; once the CV is done, `full --full-epochs N --resume` finds its last epoch
    already trained and only sets the folds' median thresholds)."""
    if args.full and args.full_epochs:
        return False
    return not ((args.full or args.ship_folds or args.evaluate_tta) and cv_summary_path(out_dir).is_file())


def _horizon(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"--ship-ema {text!r}: expected a horizon in epochs (one of ema_epochs) or 'none'") from None


if __name__ == "__main__":
    raise SystemExit(main())
