"""Write the ONNX Runtime exports of every model a config runs beside its checkpoint:

    python -m midog.export_onnx [--config FILE]

The Dockerfile runs it once the weights are in the image, so a fresh container starts without exporting (the
detector's export alone takes seconds, and every grand-challenge job starts a fresh container). The exports are
`midog.onnx_runtime`'s, named by the checkpoint's sha256 and input size, so they are used only for those weights.
"""

from __future__ import annotations

from pathlib import Path

from midog.cli import OneLineArgumentParser, add_debug_option, entry_point, load_run_config
from midog.config import PipelineConfig
from midog.onnx_runtime import exports_beside_checkpoints
from midog.pipeline import load_track1


def export_beside_checkpoints(config: PipelineConfig) -> list[Path]:
    """Load Track 1's models as process.py does (they include Track 2's: the atypical stage is the same
    `atypical` section), with every ONNX export written beside its checkpoint; the exports the resolved config runs
    (none where it runs PyTorch: on a GPU, or with a backend `torch`)."""
    with exports_beside_checkpoints():
        detector = load_track1(config)
    classifiers = [*detector.verifier.classifiers, *detector.atypical.models]
    onnx_models = [detector.proposer.onnx, *(classifier.onnx for classifier in classifiers)]
    return sorted({model.path for model in onnx_models if model is not None})


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m midog.export_onnx",
                                   description="Export the models the config runs in ONNX Runtime beside their "
                                               "checkpoints.")
    parser.add_argument("--config", type=Path, default=None, help="pipeline config (default: the shipped one)")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    for path in export_beside_checkpoints(load_run_config(args.config)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
