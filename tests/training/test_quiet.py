"""`--quiet` on the training commands that draw progress bars (midog.cli.add_quiet_option): no bar at all with it,
the bar on a terminal without it, and the quiet setting as it was once the command ends."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from PIL import Image

from midog.progress import is_quiet, set_quiet
from tests.training.test_amibr_detection import _write_amibr
from training import (amibr_detection, benchmark_amibr, evaluate_chain, evaluate_fields, linear_probe, lora,
                      prepare_fields, prepare_midogpp, train_classifier, train_verifier, verifier_data)

REPO_ROOT = Path(__file__).resolve().parents[2]


class Terminal(io.StringIO):
    """A stderr that says it is a terminal: bars redraw on it at once, with no delay."""

    def isatty(self) -> bool:
        return True


def has_bar(text: str, desc: str) -> bool:
    return any(re.match(rf"^{desc}: +\d+%\|", line) for line in re.split(r"[\r\n]", text))


def verifier_args(tmp_path: Path) -> list[str]:
    """Two optimizer steps of a tiny verifier on 4 + 4 generated crops per split."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for folder in ("mitotic_figure", "hard_negative"):
            (tmp_path / "crops" / split / folder).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "crops" / split / folder / f"{i}.png")
    return ["--data", str(tmp_path / "crops"), "--out", str(tmp_path / "v.pt"), "--run-dir", str(tmp_path / "run"),
            "--arch", "test_convnext", "--max-steps", "2", "--batch-size", "4"]


def amibr_detection_args(tmp_path: Path) -> list[str]:
    """Canvases of 256 px from a generated AMi-Br folder of 10 small slides."""
    _write_amibr(tmp_path / "amibr", {f"MIDOG21/{i:03d}.tiff": 3 for i in range(10)}, np.random.default_rng(2))
    config = tmp_path / "construction.yaml"
    config.write_text(yaml.safe_dump({"canvas_size": 256, "uses_per_crop": {"train": 1, "val": 1, "test": 1},
                                      "verifier_per_crop": {"train": 1, "val": 1, "test": 1}}))
    return ["--amibr", str(tmp_path / "amibr"), "--out", str(tmp_path / "set"), "--config", str(config)]


COMMANDS: dict[str, tuple[Callable[[list[str] | None], int], Callable[[Path], list[str]], tuple[str, ...]]] = {
    "train_verifier": (train_verifier.main, verifier_args, ("verifier ep1", "verifier val ep1")),
    "amibr_detection": (amibr_detection.main, amibr_detection_args, ("canvases",)),
}
"""Command → its main, the arguments of a run on tiny generated data, the bars that run draws."""


@pytest.fixture(autouse=True)
def _not_quiet():
    set_quiet(False)
    yield
    set_quiet(False)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_quiet_turns_every_bar_off(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    main, make_args, bars = COMMANDS[name]
    shown = {}
    for flags in ((), ("--quiet",)):
        stderr = Terminal()
        monkeypatch.setattr(sys, "stderr", stderr)
        assert main([*make_args(tmp_path / ("quiet" if flags else "plain")), *flags]) == 0
        assert not is_quiet()  # the switch --quiet set is off again once the command ends
        shown[flags] = stderr.getvalue()
    for desc in bars:
        assert has_bar(shown[()], desc), (desc, shown[()])  # each bar is there on a terminal without --quiet ...
    assert "%|" not in shown[("--quiet",)], shown[("--quiet",)]  # ... and no bar at all with it


@pytest.mark.parametrize("main, args", [
    (train_verifier.main, []), (verifier_data.main, []), (train_classifier.main, ["cv"]),
    (train_classifier.main, ["ship-folds"]), (lora.main, []), (amibr_detection.main, []),
    (evaluate_chain.main, []), (prepare_midogpp.main, []), (benchmark_amibr.main, []), (linear_probe.main, []),
    (prepare_fields.main, []), (evaluate_fields.main, []),
])
def test_every_command_with_bars_offers_quiet(main: Callable[[list[str] | None], int], args: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*args, "--help"])
    assert exited.value.code == 0
    assert "--quiet" in capsys.readouterr().out
