"""The training commands keep the container's error contract (README, "Exit codes"): a failure the user can act on
is one `error: ...` line on stderr, its documented exit code, no traceback without --debug, and nothing written.

Every case fails before any training, data reading or model building starts, so each takes a few seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from midog.cli import INTERRUPTED, entry_point
from midog.errors import ConfigError, InputError, WeightsError
from training import amibr_detection, lora, train_classifier, train_verifier

REPO_ROOT = Path(__file__).resolve().parents[2]


def one_error_line(err: str, *parts: str) -> None:
    """`err` is exactly one line, `error: ...`, holding each of `parts`."""
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, err


def run_module(module: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`python -m training.<module> ARGS` offline, with its own ultralytics settings folder."""
    env = {**os.environ, "YOLO_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp_path / "yolo")}
    return subprocess.run([sys.executable, "-m", f"training.{module}", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


# ---- the shared entry point -------------------------------------------------------------------------------------

@entry_point
def _failing(argv: list[str] | None = None) -> int:
    error = (argv or ["input"])[0]
    if error == "interrupt":
        raise KeyboardInterrupt
    if error == "bug":
        raise RuntimeError("a bug\nsecond line")
    raise InputError("no such folder")


def test_entry_point_gives_one_line_and_the_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert _failing(["input"]) == InputError.exit_code
    assert capsys.readouterr().err == "error: no such folder\n"
    assert _failing(["bug"]) == 1
    assert capsys.readouterr().err == "error: unexpected RuntimeError: a bug\n"
    assert _failing(["interrupt"]) == INTERRUPTED == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_debug_adds_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert _failing(["input", "--debug"]) == InputError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("\nerror: no such folder\n")
    with pytest.raises(RuntimeError, match="a bug"):  # an unexpected failure propagates, as in process.py
        _failing(["bug", "--debug"])


# ---- train_classifier, train_verifier: config typos are ConfigErrors (5), missing data InputErrors (2) ------------

def test_train_classifier_config_typo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(f"out: {tmp_path / 'run'}\nepoch: 3\n")
    assert train_classifier.main(["--config", str(config)]) == ConfigError.exit_code
    one_error_line(capsys.readouterr().err, str(config), "unknown key 'epoch'", "did you mean 'epochs'")
    assert not (tmp_path / "run").exists()


def test_train_classifier_bad_data_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data_root: {tmp_path / 'nowhere'}\nout: {tmp_path / 'run'}\narch: test_resnet\n")
    assert train_classifier.main(["--config", str(config)]) == InputError.exit_code
    one_error_line(capsys.readouterr().err, "split CSV not found", str(tmp_path / "nowhere"))
    assert not (tmp_path / "run").exists()


def test_train_verifier_config_typo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("lr: 0.001\nlos:\n  gamma: 2.0\n")
    args = ["--data", str(tmp_path / "crops"), "--config", str(config), "--out", str(tmp_path / "v.pt"),
            "--run-dir", str(tmp_path / "run")]
    assert train_verifier.main(args) == ConfigError.exit_code
    one_error_line(capsys.readouterr().err, str(config), "unknown key 'los'", "did you mean 'loss'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


@pytest.mark.parametrize("text, part", [(None, "--card-extra not found"), ("{'data': 1}", "is not valid JSON"),
                                        ('["notes"]', "must hold a JSON object, not list")])
def test_train_verifier_bad_card_extra(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None,
                                       part: str) -> None:
    extra = tmp_path / "notes.json"
    if text is not None:
        extra.write_text(text)
    args = ["--data", str(tmp_path / "crops"), "--out", str(tmp_path / "v.pt"), "--run-dir", str(tmp_path / "run"),
            "--card-extra", str(extra)]
    assert train_verifier.main(args) == InputError.exit_code
    one_error_line(capsys.readouterr().err, part, str(extra))
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if text is None else ["notes.json"])


def test_a_usage_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        train_verifier.main(["--config", "x.yaml"])  # no --data
    assert exited.value.code == 2
    one_error_line(capsys.readouterr().err, "--data")


# ---- train_detector: ultralytics' own errors, caught before a model is built or a run folder made ----------------

@pytest.fixture
def data_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "data.yaml"
    path.write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames: {{0: mitotic figure}}\n")
    return path


@pytest.mark.parametrize("args, code, parts", [
    (["--model", "yolo11q.yaml"], ConfigError.exit_code, ["unknown model 'yolo11q.yaml'", "yolo11n.yaml"]),
    (["--model", "yolo11q.pt"], WeightsError.exit_code, ["model checkpoint 'yolo11q.pt' not found"]),
    (["--set", "epoch=1"], ConfigError.exit_code, ["unknown training setting 'epoch'", "did you mean 'epochs'",
                                                    "yolo cfg"]),
    (["--set", "epochs=many"], ConfigError.exit_code, ["'epochs=many'", "int"]),
])
def test_train_detector_errors_are_one_line(tmp_path: Path, data_yaml: Path, args: list[str], code: int,
                                            parts: list[str]) -> None:
    project = tmp_path / "runs"
    result = run_module("train_detector", ["--data", str(data_yaml), "--project", str(project), "--epochs", "1",
                                           "--device", "cpu", *args], tmp_path)
    assert result.returncode == code, result.stderr
    one_error_line(result.stderr, *parts)
    assert not project.exists()


def test_train_detector_config_typo(tmp_path: Path, data_yaml: Path) -> None:
    config = tmp_path / "detector.yaml"
    config.write_text(f"model: yolo11n.yaml\ntrain:\n  epochs: 1\n  project: {tmp_path / 'runs'}\nmodle: x\n")
    result = run_module("train_detector", ["--data", str(data_yaml), "--config", str(config)], tmp_path)
    assert result.returncode == ConfigError.exit_code
    one_error_line(result.stderr, str(config), "unknown key 'modle'", "did you mean 'model'")


# ---- prepare_midogpp, lora, amibr_detection ------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [(["--out", "OUT"], "--out needs --images"),
                                           (["--images", "IMAGES"], "--images needs --out")])
def test_prepare_midogpp_refuses_half_a_conversion(tmp_path: Path, args: list[str], message: str) -> None:
    args = [str(tmp_path / a) if a.isupper() else a for a in args]
    result = run_module("prepare_midogpp", ["--annotations", str(tmp_path / "MIDOG++.json"), "--xvalidation",
                                            str(tmp_path / "x.csv"), *args], tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    one_error_line(result.stderr, message)
    assert not (tmp_path / "OUT").exists()


def test_lora_without_base_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "weights").mkdir()
    monkeypatch.setenv("MIDOG_WEIGHTS_DIR", str(tmp_path / "weights"))
    out = tmp_path / "run"
    assert lora.main(["--backbone", "test_vit", "--weights", str(tmp_path / "base.safetensors"),
                      "--out", str(out)]) == WeightsError.exit_code
    one_error_line(capsys.readouterr().err, "weights of foundation model 'test_vit' not found")
    assert not out.exists()  # not even train_config.yaml


def test_lora_config_typo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "lora.yaml"
    config.write_text("arch: test_vit\nepochs: 2\nbatchsize: 8\n")
    assert lora.main(["--config", str(config), "--out", str(tmp_path / "run")]) == ConfigError.exit_code
    one_error_line(capsys.readouterr().err, str(config), "unknown key 'batchsize'", "did you mean 'batch_size'")
    assert not (tmp_path / "run").exists()


def test_mining_without_a_detection_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "set"
    args = ["--amibr", str(tmp_path), "--out", str(out), "--mine-false-positives", str(tmp_path / "detector.pt")]
    assert amibr_detection.main(args) == InputError.exit_code
    one_error_line(capsys.readouterr().err, "annotations.json not found")
    (out / "detection").mkdir(parents=True)
    (out / "detection" / "annotations.json").write_text(json.dumps(
        {"images": {"images/test/a.png": {"split": "test", "figures": []}}}))
    assert amibr_detection.main(args) == InputError.exit_code
    one_error_line(capsys.readouterr().err, "nothing to mine: no train or val canvases")
    assert not (out / "verifier").exists()


def test_mining_that_finds_nothing_says_why() -> None:
    assert "proposed no candidate on 4 canvases at confidence 0.5" in amibr_detection.nothing_mined(4, 0, 0.5, 30)
    assert "every one of the 7 candidates on 4 canvases lies within 30 px" in \
        amibr_detection.nothing_mined(4, 7, 0.5, 30)



def test_unknown_backbone_is_a_configuration_error():
    """A misspelt `arch` in any training config is a ConfigError (exit code 5 through `entry_point`), not an
    unexpected ValueError (exit code 1): build_classifier refuses it before anything is trained or written."""
    from midog.classifier import build_classifier

    with pytest.raises(ConfigError, match="unknown backbone 'resnet18x'"):
        build_classifier("resnet18x", 64)
