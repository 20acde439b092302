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
    ("tiling.thumbnail_megapixels", "abc", "a number >= 0"),
    ("merging.box_size_px", 0, "a positive integer"),
    ("merging.tile_edge_px", -5, "an integer >= 0"),
    ("verifier.context_px", -100, "an integer >= 0"),
    ("image.in_memory_max_megapixels", -1, "a number >= 0"),
    ("image.fallback_spacing_um", float("inf"), "a positive number"),
    ("atypical.max_batch_megapixels", float("inf"), "a positive number"),
    ("runtime.num_threads", 1.5, "0 (the CPUs this process may use) or a positive integer"),
    ("runtime.device", "gpu", "auto, cpu, cuda or cuda:N"),
    ("proposals.half", "maybe", "true or false"),
    ("merging.class_agnostic", "nope", "true or false"),
    ("atypical.tta", 1, "true or false"),
    ("atypical.weights", 123, "a file name or a list of file names"),
    ("atypical.weights", [], "a file name or a list of file names"),
    ("foundation.hf_cache", 5, "null or a string"),
])
def test_values_a_run_cannot_take_are_refused_at_load(key, value, expected):
    with pytest.raises(ConfigError, match=re.escape(f"config {key} is {value!r}; expected") + ".*" + re.escape(expected)):
        load_config(overrides={key: value})


def test_limits_of_the_ranges_are_accepted():
    config = load_config(overrides={"atypical.threshold": None, "verifier.threshold": 1, "tiling.overlap": 0,
                                    "merging.iou": 1.0, "atypical.confidence": "stated_class",
                                    "atypical.tta_views": 4})
    assert config.atypical.threshold is None and config.merging.iou == 1.0 and config.atypical.tta_views == 4


def test_every_config_field_has_a_type_check():
    import dataclasses

    from midog.config import FIELD_TYPES, PipelineConfig

    for section in dataclasses.fields(PipelineConfig):
        for f in dataclasses.fields(section.default_factory):
            assert str(f.type) in FIELD_TYPES, f"{section.name}.{f.name}: {f.type}"


@pytest.mark.parametrize("text, value", [("1e-3", 0.001), ("5E-1", 0.5), ("1", 1)])
def test_numbers_in_scientific_notation_are_numbers(text, value):
    # YAML 1.1 (PyYAML) reads 1e-3 without a dot as a string
    assert load_config(environ={"MIDOG_VERIFIER__THRESHOLD": text}).verifier.threshold == value


def test_an_environment_value_yaml_cannot_parse_is_one_line_naming_the_variable():
    with pytest.raises(ConfigError, match=r"^cannot read MIDOG_ATYPICAL__THRESHOLD='\[0.5': [^\n]*$"):
        load_config(environ={"MIDOG_ATYPICAL__THRESHOLD": "[0.5"})
    with pytest.raises(ConfigError, match="MIDOG_ATYPICAL__THRESHOLD"):
        load_config(environ={"MIDOG_ATYPICAL__THRESHOLD": "!!python/object:os.system ls"})


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
