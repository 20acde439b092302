"""ONNX Runtime for the models the pipeline runs on the CPU: the detector (`midog.proposals`) and the timm
classifiers behind the verifier and the atypical stage (`midog.binary_classifier`).

On the CPU, PyTorch's eager kernels are slow for these networks' many small layers (depthwise convolutions,
batch norms not folded into the convolutions); ONNX Runtime folds and fuses them once at load. A model is exported
once (fixed input size, dynamic batch) as `<name>-<sha256[:16]>-<input size>.onnx`, keyed by the checkpoint's
content: beside the checkpoint when that file is there, else in `$TMPDIR/midog-onnx/`, exported there when missing.
When the export fails (an operator ONNX lacks), the PyTorch model runs instead, with a warning: the backend changes
speed, never whether a run works.

`python -m midog.export_onnx` writes the shipped models' exports beside them (the Dockerfile runs it).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from midog.errors import first_line
from midog.weights import sha256_of

log = logging.getLogger(__name__)

OPSET = 17

CLASSIFIER_CALL_BATCH = 32
"""Crops per ONNX Runtime call for the classifiers, whatever batch the stage hands over: its memory arena keeps the
largest call's activations. One thread pair of the development CPU, the EfficientNet-Lite0 at 80 px, 256 crops:
32 per call 0.153 s and 203 MB peak, 64 per call 0.175 s / 308 MB, 256 in one call 0.206 s / 944 MB."""


def export_model(model: torch.nn.Module, path: str | os.PathLike[str], input_shape: tuple[int, int, int],
                 input_name: str = "input", output_name: str = "output") -> Path:
    """Export `model` (float32, eval mode, on the CPU) for inputs of `input_shape` (C, H, W), the batch dimension
    dynamic; written to a temporary name and renamed, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    dummy = torch.zeros(1, *input_shape)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.float().cpu().eval(), (dummy,), str(tmp), dynamo=False, input_names=[input_name],
                          output_names=[output_name], opset_version=OPSET,
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    os.replace(tmp, path)
    return path


class OnnxModel:
    """An exported model in ONNX Runtime: a float tensor batch → the model's output tensor, `batch_size` inputs per
    call (0: the whole batch in one call)."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 0, batch_size: int = 0) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(0, threads)
        # idle worker threads sleep instead of spinning: the tile reader and other processes need the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.input_hw = tuple(self.session.get_inputs()[0].shape[2:])
        """(height, width) the model was exported for."""
        self.batch_size = max(0, batch_size)
        self.path = Path(path)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        inputs = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        step = self.batch_size or max(1, len(inputs))
        outputs = [self.session.run([self.output_name], {self.input_name: inputs[i:i + step]})[0]
                   for i in range(0, len(inputs), step)]
        return torch.from_numpy(np.concatenate(outputs))


def onnx_runtime_available(what: str) -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.warning("onnxruntime is not installed: the %s runs in PyTorch on the CPU", what)
        return False
    return True


_write_beside_checkpoints = False


@contextmanager
def exports_beside_checkpoints() -> Iterator[None]:
    """Within it, `cached_export` writes a missing export beside its checkpoint instead of the temporary cache."""
    global _write_beside_checkpoints
    before, _write_beside_checkpoints = _write_beside_checkpoints, True
    try:
        yield
    finally:
        _write_beside_checkpoints = before


def export_file_name(weights: str | os.PathLike[str], tag: str, sha256: str | None = None) -> str:
    """`<name>-<sha256[:16]>-<tag>.onnx`: a file for this checkpoint's content and this input size only."""
    weights = Path(weights)
    return f"{weights.stem}-{(sha256 or sha256_of(weights))[:16]}-{tag}.onnx"


def cached_export(weights: str | os.PathLike[str], tag: str, export: Callable[[Path], Path], what: str,
                  sha256: str | None = None) -> Path | None:
    """The ONNX file of the checkpoint `weights` for `tag` (e.g. its input size): beside the checkpoint when there,
    else the cache's, exported by `export(path)` when missing. `sha256`: the checkpoint's, when the caller has
    checked it already (else the file is hashed). None (with a warning) when the export fails."""
    weights = Path(weights)
    name = export_file_name(weights, tag, sha256)
    beside = weights.parent / name
    if beside.is_file():
        return beside
    path = beside if _write_beside_checkpoints else Path(tempfile.gettempdir()) / "midog-onnx" / name
    if not path.is_file():
        try:
            export(path)
        except Exception as err:  # an operator without an ONNX mapping: the PyTorch model still works
            log.warning("ONNX export of %s failed (%s): the %s runs in PyTorch", weights.name, first_line(err), what)
            return None
    return path
