from pathlib import Path

import pytest

from midog.config import load_config, write_config_values


def test_shipped_defaults_match_the_method():
    config = load_config(environ={})
    assert config.tiling.tile_size == 512 and config.tiling.overlap == pytest.approx(0.2)
    assert config.proposals.confidence == pytest.approx(0.2) and config.proposals.nms_iou == pytest.approx(0.3)
    assert config.verifier.crop_size == 64 and config.verifier.threshold == pytest.approx(0.5)


def test_yaml_then_environment_then_overrides(tmp_path: Path):
    partial = tmp_path / "partial.yaml"
    partial.write_text("verifier:\n  threshold: 0.7\ntiling:\n  tile_size: 256\n")
    config = load_config(partial, environ={"MIDOG_VERIFIER__THRESHOLD": "0.6"}, overrides={"tiling.overlap": 0.1})
    assert config.verifier.threshold == pytest.approx(0.6)
    assert config.tiling.tile_size == 256
    assert config.tiling.overlap == pytest.approx(0.1)


def test_unknown_key_is_refused(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("verifier:\n  treshold: 0.7\n")
    with pytest.raises(ValueError, match="verifier.treshold"):
        load_config(bad, environ={})


def test_write_config_values_keeps_other_keys(tmp_path: Path):
    path = tmp_path / "tuned.yaml"
    path.write_text("tiling:\n  tile_size: 256\n")
    write_config_values(path, {"verifier.threshold": 0.42})
    config = load_config(path, environ={})
    assert config.verifier.threshold == pytest.approx(0.42) and config.tiling.tile_size == 256
