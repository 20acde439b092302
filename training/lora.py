"""LoRA fine-tuning of a foundation model on AMi-Br, through the end-to-end training loop.

    python -m training.lora --backbone uni2-h [--weights PATH] [--r 8] [--alpha 16] [--dropout 0.3]
                            [--targets qkv proj fc1 fc2] [--config training/configs/lora.yaml] [--out DIR]
                            [any training.train_classifier sub-command and option: full ship ship-folds
                             evaluate-tta (or their old flag spelling --full --ship ...) --folds --fold --epochs
                             --resume --half]

This only composes a training config (written to `DIR/train_config.yaml` for the record) and hands it to
`training.train_classifier`: the backbone gets peft LoRA adapters on its attention and MLP projections
(midog.foundation.inject_lora), only the adapters and the linear head train, and the loop, augmentation, folds,
early stopping, thresholds, DDP and checkpoints are the end-to-end classifier's. A fold checkpoint holds the
adapters and the head (a few MB); the backbone comes from its local pretrained weights at load time, and
`load_classifier` merges the adapters into it for inference. `--merged` additionally writes the shipped model
with the adapters merged, self-contained (no base weights needed at run time, but as large as the backbone).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from midog.classifier import load_classifier
from midog.cli import OneLineArgumentParser, add_debug_option, add_quiet_option, entry_point
from midog.foundation import LoraSettings, find_base_weights, options_from_dict, resolve_spec
from midog.weights import read_model_card, write_model_card
from training import train_classifier
from training.config_file import config_from_values, read_training_yaml
from training.runtime import REPO_ROOT

DEFAULT_CONFIG = REPO_ROOT / "training" / "configs" / "lora.yaml"


def lora_train_values(base: dict[str, Any], backbone: str | None = None, weights: str | None = None,
                      lora: dict[str, Any] | None = None, input_size: int | None = None,
                      method: str = "lora") -> dict[str, Any]:
    """The training config `base` (a train_classifier YAML as a dict) with the backbone and LoRA values set."""
    values = dict(base)
    if backbone:
        values["arch"] = backbone
    options = dict(values.get("model_kwargs") or {})
    options["method"] = method
    if weights:
        options["weights"] = weights
    given = {key: value for key, value in (lora or {}).items() if value is not None}
    options["lora"] = {**LoraSettings().__dict__, **(options.get("lora") or {}), **given}
    values["model_kwargs"] = options
    spec = resolve_spec(values.get("arch", "uni2-h"))
    values["input_size"] = input_size or (spec.input_size if backbone else values.get("input_size", spec.input_size))
    return values


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="base training config (train_classifier YAML)")
    parser.add_argument("--backbone", help="foundation registry name or timm name (default: the config's arch)")
    parser.add_argument("--weights", help="local pretrained weights of the backbone (file or folder)")
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--r", type=int, help="LoRA rank (benchmark: 8)")
    parser.add_argument("--alpha", type=int, help="LoRA alpha (benchmark: 16)")
    parser.add_argument("--dropout", type=float, help="LoRA dropout (benchmark: 0.3)")
    parser.add_argument("--targets", nargs="+", help="module-name suffixes (benchmark: qkv proj fc1 fc2)")
    parser.add_argument("--out", help="output folder (default: the config's, or runs/lora_<backbone>)")
    parser.add_argument("--merged", help="with --ship: also write the adapters merged into the backbone here (.pt)")
    add_debug_option(parser)
    add_quiet_option(parser)
    return parser.parse_known_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    base = read_training_yaml(args.config)
    lora = {"r": args.r, "alpha": args.alpha, "dropout": args.dropout, "target_modules": args.targets}
    values = lora_train_values(base, args.backbone, args.weights, lora, args.input_size)
    if args.out or args.backbone:
        values["out"] = args.out or f"runs/lora_{resolve_spec(values['arch']).name}"
    check_before_training(values, f"training config {args.config} with the command line's LoRA values")
    out = Path(values["out"]) if Path(values["out"]).is_absolute() else REPO_ROOT / values["out"]
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "train_config.yaml"
    config_path.write_text(yaml.safe_dump(values, sort_keys=False))
    code = train_classifier.main(["--config", str(config_path)] + rest + (["--debug"] if args.debug else []))
    if code != 0:
        return code
    flags = train_classifier.flag_spelling(rest)  # `ship PATH` as `--ship PATH`
    for shipped in shipped_files(flags, int(values.get("folds", 5))):
        describe_shipped(shipped, values)
    ship = _option(flags, "--ship")
    if args.merged and ship and Path(ship).is_file():
        write_merged(Path(ship), Path(args.merged))
    return code


def check_before_training(values: dict[str, Any], source: str) -> None:
    """A ConfigError for a bad value, a WeightsError for base weights not found, before anything is written."""
    cfg = config_from_values(values, train_classifier.TrainConfig, source)
    options = options_from_dict(cfg.model_kwargs)
    find_base_weights(resolve_spec(cfg.arch, options), options.weights)


def shipped_files(argv: list[str], folds: int) -> list[Path]:
    """What train_classifier's --ship / --ship-folds wrote."""
    paths = []
    if _option(argv, "--ship"):
        paths.append(Path(_option(argv, "--ship")))
    if _option(argv, "--ship-folds"):
        stem = Path(_option(argv, "--ship-folds"))
        folds = int(_option(argv, "--folds") or folds)
        paths += [stem.parent / f"{stem.stem}_fold{k}.pt" for k in range(folds)]
    return [p for p in paths if p.is_file()]


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def describe_shipped(checkpoint: Path, values: dict[str, Any]) -> None:
    """Correct the model card train_classifier wrote (it assumes training from scratch)."""
    card = read_model_card(checkpoint) or {}
    spec = resolve_spec(values["arch"], options_from_dict(values["model_kwargs"]))  # pooling etc. as trained
    lora = values["model_kwargs"]["lora"]
    card.update({
        "pretrained": spec.hub_id or spec.arch,
        "method": (f"LoRA (peft) r={lora['r']} alpha={lora['alpha']} dropout={lora['dropout']} on "
                   f"{', '.join(lora['target_modules'])}; adapters + linear head trained, backbone frozen"),
        "backbone": {"arch": spec.arch, "pooling": spec.pooling, "input_size": values["input_size"]},
        "base_weights_needed": f"foundation/{spec.name} (see docs/foundation-models.md)",
    })
    write_model_card(checkpoint, card)


def write_merged(checkpoint: Path, target: Path) -> Path:
    """The LoRA checkpoint with its adapters merged into the backbone: self-contained, method 'full'."""
    clf = load_classifier(checkpoint)  # merges on load
    clf.save(target, meta={**clf.meta, "merged_from": checkpoint.name})
    card = read_model_card(checkpoint) or {}
    card.pop("base_weights_needed", None)
    write_model_card(target, {**card, "merged_from": checkpoint.name})
    return target


if __name__ == "__main__":
    raise SystemExit(main())
