"""Ship the fold models of a cross-validation run as a fold ensemble for process.py.

    python -m training.ship_ensemble runs/lora_uni2-h --name atypical_uni2h [--to weights] [--half]

Copies `RUN/fold{k}/best.pt` (or `final.pt`: the checkpoint the run's `ship_epoch` names in `cv_summary.json`, or
`--checkpoint`) to `TO/NAME_fold{k}.pt`, each with its model card (architecture, method, fold,
validation metrics, sha256), and writes `TO/NAME_ensemble.json`, the ensemble's card listing every member with its
sha256, threshold and validation metrics plus the cross-validated mean ± std (from `cv_summary.json`), and
`TO/NAME_ensemble.yaml`, the partial pipeline config that serves it:

    python process.py --config weights/NAME_ensemble.yaml      # atypical.weights: [NAME_fold0.pt, ...]

midog.atypical averages the members' P(atypical); its threshold is the mean of theirs unless the config sets one.
Works for end-to-end, linear-probe and LoRA runs alike (a foundation member still needs its backbone weights in
`foundation/`, see docs/foundation-models.md).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from midog.classifier import preprocess_card
from midog.cli import OneLineArgumentParser, add_debug_option, entry_point, read_json_file
from midog.errors import InputError
from midog.weights import sha256_of, write_model_card
from training.runtime import git_commit
from training.train_classifier import SHIP_EPOCH_CHECKPOINTS


def member_card(state: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    card: dict[str, Any] = {
        "task": "Track 2: atypical vs normal mitotic figure; output P(atypical)",
        "architecture": state["arch"], "input_size": state["input_size"], "threshold": state["threshold"],
        "positive": state["positive"], "kind": state.get("kind", "timm"), "preprocess": preprocess_card(state),
        "fold": state.get("meta", {}).get("fold"), "validation": state.get("meta", {}).get("val"),
        "run": run_dir.name, "git_commit": git_commit(),
    }
    if state.get("kind") == "foundation":
        backbone, options = state["foundation"]["backbone"], state["foundation"]["options"]
        card["backbone"] = {"name": backbone["name"], "arch": backbone["arch"], "pooling": backbone["pooling"],
                            "pretrained": backbone.get("hub_id")}
        card["method"] = options["method"]
        if options["method"] == "lora":
            card["lora"] = options["lora"]
        if options["method"] != "full":
            card["base_weights_needed"] = f"foundation/{backbone['name']} (see docs/foundation-models.md)"
    else:
        card["model_kwargs"] = state.get("model_kwargs", {})
    return card


def fold_checkpoint(run_dir: Path, choice: str = "auto") -> str:
    """`best.pt` or `final.pt`; `auto` follows the `ship_epoch` the run recorded (best.pt when it recorded none)."""
    if choice != "auto":
        return SHIP_EPOCH_CHECKPOINTS[choice]
    summary_path = run_dir / "cv_summary.json"
    summary = read_json_file(summary_path, "cross-validation summary") if summary_path.is_file() else {}
    return SHIP_EPOCH_CHECKPOINTS[summary.get("ship_epoch", "best")]


def ship_ensemble(run_dir: Path, target_dir: Path, name: str, folds: int | None = None, half: bool = False,
                  checkpoint: str = "auto") -> Path:
    """Copy the fold checkpoints with their cards; returns the ensemble's partial config (YAML)."""
    file_name = fold_checkpoint(run_dir, checkpoint)
    checkpoints = sorted(run_dir.glob(f"fold*/{file_name}"), key=lambda p: int(p.parent.name[4:]))
    if folds is not None:
        checkpoints = checkpoints[:folds]
    if not checkpoints:
        raise InputError(f"no fold*/{file_name} in {run_dir}")
    target_dir.mkdir(parents=True, exist_ok=True)
    members = []
    for checkpoint in checkpoints:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if half:
            state["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in state["state_dict"].items()}
        target = target_dir / f"{name}_{checkpoint.parent.name}.pt"
        tmp = target.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, target)
        write_model_card(target, member_card(state, run_dir))
        members.append({"file": target.name, "sha256": sha256_of(target), "fold": state.get("meta", {}).get("fold"),
                        "threshold": state["threshold"], "validation": state.get("meta", {}).get("val")})
    summary_path = run_dir / "cv_summary.json"
    summary = read_json_file(summary_path, "cross-validation summary") if summary_path.is_file() else {}
    card = {
        "task": "Track 2: atypical vs normal mitotic figure; fold ensemble, P(atypical) = mean of the members'",
        "members": members,
        "threshold": float(np.mean([m["threshold"] for m in members])),
        "threshold_rule": "mean of the members' thresholds (each chosen on its fold's validation split)",
        "cross_validation": summary.get("cv"), "training_data": summary.get("data"),
        "run": str(run_dir), "git_commit": git_commit(),
    }
    (target_dir / f"{name}_ensemble.json").write_text(json.dumps(card, indent=2) + "\n")
    config_path = target_dir / f"{name}_ensemble.yaml"
    config_path.write_text(f"# fold ensemble from {run_dir.name}; see {name}_ensemble.json\n" + yaml.safe_dump(
        {"atypical": {"weights": [m["file"] for m in members]}}, sort_keys=False))
    return config_path


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a cross-validation output folder (fold*/best.pt)")
    parser.add_argument("--name", default="atypical")
    parser.add_argument("--to", type=Path, default=Path("weights"))
    parser.add_argument("--folds", type=int, help="only the first N folds")
    parser.add_argument("--half", action="store_true", help="store tensors as fp16")
    parser.add_argument("--checkpoint", choices=("auto", *SHIP_EPOCH_CHECKPOINTS), default="auto",
                        help="best (best.pt) or last (final.pt) epoch of each fold; auto: the run's ship_epoch")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    config = ship_ensemble(args.run, args.to, args.name, args.folds, args.half, args.checkpoint)
    print(f"wrote {config}: python process.py --config {config}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
