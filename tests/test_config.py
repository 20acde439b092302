import re
from pathlib import Path

import pytest

from midog.config import CHOICES, load_config, write_config_values
from midog.errors import ConfigError


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


@pytest.mark.parametrize("key, value, expected", [
    ("atypical.confidence", "probability", "one of p_atypical, stated_class"),
    ("merging.strategy", "wbf", "one of nms, greedy_nmm"),
    ("tiling.overlap", 1.0, "[0, 1)"),
    ("merging.iou", 0, "(0, 1]"),
    ("verifier.threshold", "high", "a number in [0, 1]"),
    ("proposals.batch_size", 0, "a positive integer"),
    ("atypical.crop_size", 64.5, "a positive integer"),
    ("atypical.tta_views", 2, "4 or 8"),
])
def test_values_a_run_cannot_take_are_refused_at_load(key, value, expected):
    with pytest.raises(ConfigError, match=re.escape(f"config {key} is {value!r}; expected") + ".*" + re.escape(expected)):
        load_config(overrides={key: value})


def test_limits_of_the_ranges_are_accepted():
    config = load_config(overrides={"atypical.threshold": None, "verifier.threshold": 1, "tiling.overlap": 0,
                                    "merging.iou": 1.0, "atypical.confidence": "stated_class",
                                    "atypical.tta_views": 4})
    assert config.atypical.threshold is None and config.merging.iou == 1.0 and config.atypical.tta_views == 4


def test_choices_are_the_ones_the_modules_offer():
    from midog.merging import MERGE_STRATEGIES

    assert set(CHOICES["merging.strategy"]) == set(MERGE_STRATEGIES)


def test_unreadable_config_files_are_config_errors(tmp_path: Path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("tiling: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- tiling\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listed)
    section = tmp_path / "section.yaml"
    section.write_text("tiling: 5\n")
    with pytest.raises(ConfigError, match="section 'tiling' must be a mapping"):
        load_config(section)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
