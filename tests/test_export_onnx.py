"""`python -m midog.export_onnx`: the exports it writes beside the checkpoints are what a fresh start then uses,
and only for the weights they were made from; tiny random models."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from midog import export_onnx
from midog.config import resolve_config
from midog.pipeline import load_track1
from roi_factory import tiny_track1_weights, tiny_verifier


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))


def test_exports_written_beside_the_checkpoints_are_what_a_fresh_start_uses(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            capsys: pytest.CaptureFixture[str]):
    weights = tiny_track1_weights(tmp_path / "weights")
    monkeypatch.setenv("MIDOG_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("MIDOG_RUNTIME__DEVICE", "cpu")
    assert export_onnx.main([]) == 0
    printed = capsys.readouterr().out.splitlines()  # the exports' paths (and ultralytics' settings note)
    written = [Path(line) for line in printed if line.endswith(".onnx")]
    assert sorted(path.name.split("-")[0] for path in written) == ["atypical", "detector", "verifier"]
    assert all(path.parent == weights and path.is_file() for path in written)
    cache = tmp_path / "tmp" / "midog-onnx"
    assert not cache.exists()  # nothing went to the temporary cache

    detector = load_track1(resolve_config(None))  # a fresh start: the exports beside the checkpoints, as they are
    used = {detector.proposer.onnx.path, *(c.onnx.path for c in detector.verifier.classifiers),
            *(m.onnx.path for m in detector.atypical.models)}
    assert used == set(written) and not cache.exists()

    tiny_verifier(weights / "verifier.pt", seed=5)  # other weights under the same name: their own export
    detector = load_track1(resolve_config(None))
    fresh = detector.verifier.classifiers[0].onnx.path
    assert fresh.parent == cache and fresh not in written
