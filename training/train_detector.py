"""Train the Track 1 proposal detector (YOLO11 with LSConv and EMA attention) with ultralytics.

    python -m training.train_detector --data DATA.yaml [--model yolo11x-lsconv-ema] [--epochs 300] [--batch 16]
        [--imgsz 512] [--device 0,1,2,3] [--workers 8] [--set key=value ...] [--out weights/detector.pt]

The method's settings live in training/configs/detector.yaml (AdamW, lr 1e-3 cosine to 1e-5, weight decay 5e-4,
300 epochs, 512 px, rotation up to 180°, flips, mixup 0.3, mosaic off for the last 20 epochs, random erasing).
`--device 0,1,2,3` hands the GPU list to ultralytics' own DDP (see training/detector_trainer.py for how the custom
blocks reach its worker processes). `--out` copies the run's best.pt there and writes its model card beside it.
DATA.yaml is an ultralytics detection dataset (path, train, val, names), as written by the data preparation step.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import yaml

from midog.cli import OneLineArgumentParser, add_debug_option, entry_point
from midog.config import unknown_keys_message
from midog.errors import ConfigError, InputError, MidogError, WeightsError, first_line
from training.config_file import load_training_config, parse_set_pairs
from training.runtime import REPO_ROOT, git_commit

DEFAULT_CONFIG = REPO_ROOT / "training" / "configs" / "detector.yaml"
OUR_MODEL_SUFFIX = "-lsconv-ema"


class DetectorTrainingError(MidogError):
    """The training ended without a checkpoint."""


@dataclass
class DetectorTrainConfig:
    model: str = "yolo11x-lsconv-ema"
    """yolo11{n,s,m,l,x}-lsconv-ema, or any model ultralytics can build or load (YAML or .pt)."""
    train: dict[str, Any] = field(default_factory=dict)
    """ultralytics train arguments."""


def load_detector_config(path: str | os.PathLike[str] = DEFAULT_CONFIG) -> DetectorTrainConfig:
    """ConfigError for a missing or unreadable file, a key other than `model` and `train`, a value of the wrong type
    (the `train` settings are ultralytics', checked by `check_train_settings`)."""
    cfg = load_training_config(path, DetectorTrainConfig)
    cfg.train = dict(cfg.train)
    return cfg


def resolve_model(name: str) -> str:
    """Our model names map to the YAML path whose file name carries the scale; anything else goes to ultralytics."""
    from midog.yolo_modules import SCALES, model_yaml

    stem = Path(name).name.removesuffix(".yaml")
    if stem.endswith(OUR_MODEL_SUFFIX) and not Path(name).is_file():
        scale = stem.removeprefix("yolo11").removesuffix(OUR_MODEL_SUFFIX)
        if scale not in SCALES:
            raise ConfigError(f"unknown model '{name}': expected yolo11{{{','.join(SCALES)}}}{OUR_MODEL_SUFFIX}")
        return str(model_yaml(scale))
    return name


def checked_model(name: str) -> str:
    """`name` when ultralytics can build or load it without a download; else a WeightsError (a .pt file that is not
    there: ultralytics would try to download it) or a ConfigError (a YAML that is neither a file nor one of
    ultralytics' model names)."""
    from ultralytics.nn.tasks import yaml_model_load

    if Path(name).suffix != ".yaml":
        if not Path(name).is_file():
            raise WeightsError(f"model checkpoint '{name}' not found: give the path of a .pt file (nothing is "
                               "downloaded), or a model YAML to train from scratch")
        return name
    try:
        yaml_model_load(name)  # as YOLO(name) finds it: a file, or a YAML ultralytics ships (yolo11n: yolo11, scale n)
    except FileNotFoundError:
        raise ConfigError(f"unknown model '{name}': give a file path, one of ultralytics' model names such as "
                          f"yolo11n.yaml, or one of ours, yolo11{{n,s,m,l,x}}{OUR_MODEL_SUFFIX}") from None
    return name


def train_arguments(cfg: DetectorTrainConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The ultralytics arguments: the config's, then the command-line flags, then --set pairs.

    A resumed run keeps its checkpoint's settings: only the flags and --set pairs given now are passed (ultralytics
    accepts a few, e.g. batch, device, workers), never the config file's values.

    A model given as a .pt checkpoint is fine-tuned from its weights: `pretrained` becomes true whatever the config
    says (its `pretrained: false` means "no downloads" for a model built from a YAML; ultralytics would rebuild the
    checkpoint's architecture untrained and say nothing). `--set pretrained=false` still trains it from scratch.
    """
    train = {} if args.resume else dict(cfg.train)
    for key in ("epochs", "batch", "imgsz", "device", "workers", "project", "name", "seed"):
        value = getattr(args, key)
        if value is not None:
            train[key] = value
    overrides = parse_set_pairs(args.set)
    train.update(overrides)
    data = Path(args.data)
    if not data.is_file():
        raise InputError(f"dataset YAML not found: {data}")
    train["data"] = str(data.resolve())
    if train.get("project") is not None:
        train["project"] = str(Path(train["project"]).resolve())
    if args.resume:
        if not Path(args.resume).is_file():
            raise InputError(f"checkpoint to resume not found: {args.resume}")
        train["resume"] = str(Path(args.resume).resolve())
    if not args.resume and Path(cfg.model).suffix == ".pt" and "pretrained" not in overrides:
        train["pretrained"] = True  # fine-tune from the checkpoint: ultralytics rebuilds it untrained otherwise
    check_train_settings(train, set(overrides), args.config)
    return train


ULTRALYTICS_SETTINGS = "see `yolo cfg` or https://docs.ultralytics.com/modes/train/#train-settings"


def check_train_settings(train: dict[str, Any], from_set: set[str], config: str | os.PathLike[str]) -> None:
    """ConfigError for a setting ultralytics' trainer does not know or a value it refuses, checked as its trainer
    checks them, but before a model is built or a run folder made (ultralytics' own check logs its whole command-line
    help and raises a SyntaxError)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, check_cfg

    known = {*DEFAULT_CFG_DICT, "augmentations", "save_dir"}  # the two extra keys its trainer accepts
    for key in train:
        if key not in known:
            where = "--set" if key in from_set else f"training config {config}"
            unknown = unknown_keys_message([key], known, what="training setting")
            raise ConfigError(f"{where}: {unknown}; {ULTRALYTICS_SETTINGS}")
    try:
        check_cfg(dict(train))  # a copy: it converts some values in place, the trainer does that itself
    except (TypeError, ValueError) as err:
        raise ConfigError(f"training setting {first_line(err)}") from None


RUN_LOCKS = ".run-locks"
"""The folder, inside a project, of the lock files that claim run names (`claimed_run_name`)."""


@contextlib.contextmanager
def claimed_run_name(train: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """`train` with a run folder no other training holds: `name`, else `name-2`, `name-3`, ... (ultralytics' own
    numbering), created now and passed on with `exist_ok: true`; held until the block ends.

    ultralytics picks the folder by looking for one that does not exist yet and creates it later, so two trainings
    started at once with the same project and name (the config's `runs/detector/train`) both chose `train` and wrote
    their weights, last.pt and results into it. Here a name is taken by an exclusive lock on
    `<project>/.run-locks/<name>.lock`, held by this process for the whole run (the system drops it when the
    process ends, however it ends), and only when no folder of that name exists; the lock also keeps the name while
    ultralytics' multi-GPU launcher deletes and recreates the folder. A resumed run keeps its own folder, and
    `exist_ok: true` (asked for) reuses the named one, as in ultralytics.
    """
    if train.get("resume") or train.get("exist_ok") or not train.get("project"):
        yield train
        return
    import fcntl

    project = Path(train["project"])
    name = str(train.get("name") or "train")
    locks = project / RUN_LOCKS
    locks.mkdir(parents=True, exist_ok=True)
    for number in itertools.count(1):
        candidate = name if number == 1 else f"{name}-{number}"
        handle = open(locks / f"{candidate}.lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            (project / candidate).mkdir()
        except (BlockingIOError, FileExistsError):  # another training holds it, or an earlier run's folder
            handle.close()
            continue
        break
    try:
        yield {**train, "name": candidate, "exist_ok": True}
    finally:
        handle.close()


def _describe(checkpoint: Path) -> tuple[str, int]:
    """The architecture name (the model YAML's stem, scale included) and parameter count of a checkpoint."""
    from ultralytics.nn.tasks import load_checkpoint

    model, _ = load_checkpoint(str(checkpoint))
    return Path(model.yaml.get("yaml_file", "unknown")).stem, sum(p.numel() for p in model.parameters())


def dataset_pixel_size(data: str | None) -> float:
    """The `pixel_size_um` a dataset YAML declares (`training.prepare_fields` writes it), else 0.25 µm/px (MIDOG++,
    AMi-Br canvases)."""
    from midog.weights import DEFAULT_PIXEL_SIZE_UM

    if data and Path(data).is_file():
        value = (yaml.safe_load(Path(data).read_text()) or {}).get("pixel_size_um")
        if value is not None:
            return float(value)
    return DEFAULT_PIXEL_SIZE_UM


def ship(best: Path, out: Path, train: dict[str, Any], metrics: dict[str, Any], classes: dict[int, str],
         start: Path | None = None) -> Path:
    """Copy best.pt to `out` and write its model card beside it; returns the card's path. `start`: the checkpoint
    the run was fine-tuned from, recorded in the card by name and sha256."""
    import ultralytics

    from midog.weights import sha256_of, write_model_card

    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    pixel_size_um = dataset_pixel_size(train.get("data"))
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)  # ultralytics' own pickle, our own run
    checkpoint["pixel_size_um"] = pixel_size_um  # read back by midog.proposals.detector_pixel_size
    torch.save(checkpoint, out)
    architecture, parameters = _describe(out)
    card = {
        "task": "track1-proposals",
        "architecture": architecture,
        "framework": f"ultralytics {ultralytics.__version__}",
        "parameters": parameters,
        "input_size": train.get("imgsz"),
        "pixel_size_um": pixel_size_um,
        "classes": {int(k): str(v) for k, v in classes.items()},
        "training": {k: v for k, v in train.items() if k not in {"project", "name", "exist_ok"}},
        "validation_metrics": {k: round(float(v), 5) for k, v in metrics.items()},
        **({"initialised_from": {"file": start.name, "sha256": sha256_of(start)}} if start else {}),
        "loading": "ultralytics YOLO(path) or midog.proposals.load_detector; the custom blocks are midog.yolo_modules",
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }
    return write_model_card(out, card)


def run(cfg: DetectorTrainConfig, train: dict[str, Any], out: Path | None = None) -> Path:
    """Train; returns the run's best.pt (or `out`, where it was copied)."""
    from ultralytics import YOLO

    from midog.yolo_modules import register_custom_modules
    from training.detector_trainer import MidogDetectionTrainer

    register_custom_modules()
    model = YOLO(train["resume"] if train.get("resume") else checked_model(resolve_model(cfg.model)), task="detect")
    with claimed_run_name(train) as claimed:
        model.train(trainer=MidogDetectionTrainer, **claimed)
    trainer = model.trainer
    best = Path(trainer.best) if Path(trainer.best).is_file() else Path(trainer.last)
    if not best.is_file():
        raise DetectorTrainingError(f"training finished without a checkpoint in {trainer.save_dir}")
    if out is None:
        return best
    metrics = {k: v for k, v in (trainer.metrics or {}).items() if isinstance(v, (int, float))}
    # the values the run used (a resumed run takes most of them from its checkpoint)
    used = {k: getattr(trainer.args, k) for k in sorted(set(cfg.train) | set(train)) if hasattr(trainer.args, k)}
    fine_tuned = not train.get("resume") and Path(cfg.model).suffix == ".pt" and bool(train.get("pretrained"))
    ship(best, out, used, metrics, trainer.data["names"], Path(cfg.model) if fine_tuned else None)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="ultralytics dataset YAML")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training settings (default: %(default)s)")
    parser.add_argument("--model", help="yolo11{n,s,m,l,x}-lsconv-ema or an ultralytics YAML/.pt (overrides config)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch", type=int, help="total batch size over all GPUs")
    parser.add_argument("--imgsz", type=int)
    parser.add_argument("--device", help="cpu, 0, or a GPU list such as 0,1,2,3 (ultralytics DDP)")
    parser.add_argument("--workers", type=int, help="dataloader workers per process")
    parser.add_argument("--project", help="folder of the runs (default: the config's)")
    parser.add_argument("--name", help="run name inside the project folder")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other ultralytics train argument, e.g. --set patience=50 (repeatable)")
    parser.add_argument("--resume", metavar="LAST_PT", help="continue an interrupted run from its last.pt")
    parser.add_argument("--threads", type=int, help="torch CPU threads (e.g. 1 on a shared CPU machine)")
    parser.add_argument("--out", help="copy best.pt here and write its model card beside it")
    add_debug_option(parser)
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "1")  # never reach the network, before ultralytics is imported
    cfg = load_detector_config(args.config)
    if args.model:
        cfg.model = args.model
    train = train_arguments(cfg, args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run(cfg, train, Path(args.out) if args.out else None)
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
