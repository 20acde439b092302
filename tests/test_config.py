import ast
import dataclasses
import inspect
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from midog.config import (CHOICES, DEFAULT_CONFIG_PATH, PipelineConfig, config_to_dict, load_config,
                          write_config_values)
from midog.errors import ConfigError


def _sections() -> list[tuple[str, type]]:
    return [(section.name, section.default_factory) for section in dataclasses.fields(PipelineConfig)]


def test_default_yaml_and_the_dataclasses_have_the_same_keys_and_values():
    # a field without its key in default.yaml, or a key no field reads, fails here (or at import)
    assert config_to_dict(PipelineConfig()) == yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())


def test_every_dataclass_default_is_read_from_default_yaml_under_its_own_key():
    for section, cls in _sections():
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        for node in tree.body[0].body:
            if isinstance(node, ast.AnnAssign):
                key = f"{section}.{node.target.id}"
                assert ast.unparse(node.value) == f"_default('{key}')", f"{key} = {ast.unparse(node.value)}"


def test_dataclass_defaults_are_the_shipped_config_without_layers():
    assert PipelineConfig() == load_config(environ={})


def test_configs_do_not_share_the_shipped_lists():
    load_config(environ={}).proposals.classes.append(7)
    PipelineConfig().proposals.classes.append(8)
    assert PipelineConfig().proposals.classes == load_config(environ={}).proposals.classes \
        == yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())["proposals"]["classes"]


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


def test_an_unknown_key_names_the_closest_known_ones_wherever_it_is_given(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("verifier:\n  treshold: 0.7\n")
    with pytest.raises(ConfigError, match=r"^unknown config key 'verifier.treshold' "
                                          r"\(did you mean 'verifier.threshold'\?\)$"):
        load_config(bad, environ={})
    with pytest.raises(ConfigError, match=r"^unknown config key 'verifer' \(did you mean 'verifier'\?\)$"):
        load_config(environ={"MIDOG_VERIFER__THRESHOLD": "0.5"})
    with pytest.raises(ConfigError, match=r"^unknown config keys 'tiling.tilesize' \(did you mean 'tiling.tile_size'"
                                          r"\?\), 'tiling.zzz'$"):
        load_config(overrides={"tiling.tilesize": 256, "tiling.zzz": 1}, environ={})


def test_write_config_values_keeps_other_keys(tmp_path: Path):
    path = tmp_path / "tuned.yaml"
    path.write_text("tiling:\n  tile_size: 256\n")
    write_config_values(path, {"verifier.threshold": 0.42})
    config = load_config(path, environ={})
    assert config.verifier.threshold == pytest.approx(0.42) and config.tiling.tile_size == 256


def test_write_config_values_keeps_the_files_comments_and_layout(tmp_path: Path):
    path = tmp_path / "pipeline.yaml"
    text = ("# why these values\nverifier:\n  weights: [a.pt, b.pt]   # the pair\n  threshold: 0.25  # fold median\n"
            "# the atypical stage\natypical:\n  weights: [c.pt]\n")
    path.write_text(text)
    write_config_values(path, {"verifier.threshold": 0.336, "atypical.threshold": 0.4, "tiling.overlap": 0.25})
    assert path.read_text() == text.replace("threshold: 0.25  #", "threshold: 0.336  #").replace(
        "  weights: [c.pt]\n", "  weights: [c.pt]\n  threshold: 0.4\n") + "tiling:\n  overlap: 0.25\n"
    config = load_config(path, environ={})
    assert config.verifier.weights == ["a.pt", "b.pt"] and config.verifier.threshold == pytest.approx(0.336)
    # a value spread over several lines is not edited in place: the file is written out whole, values intact
    path.write_text("verifier:\n  weights:\n  - a.pt\n  - b.pt\n  threshold: 0.25\n")
    write_config_values(path, {"verifier.weights": ["c.pt"]})
    assert yaml.safe_load(path.read_text()) == {"verifier": {"weights": ["c.pt"], "threshold": 0.25}}


@pytest.mark.parametrize("key, value, expected", [
    ("atypical.confidence", "probability", "one of p_atypical, stated_class"),
    ("merging.strategy", "wbf", "one of nms, greedy_nmm"),
    ("tiling.overlap", 1.0, "[0, 1)"),
    ("merging.iou", 0, "(0, 1]"),
    ("verifier.threshold", "high", "a number in [0, 1]"),
    ("proposals.batch_size", 0, "a positive integer"),
    ("atypical.crop_size", 64.5, "a positive integer"),
    ("atypical.tta_views", 2, "4 or 8"),
    ("atypical.tta_views", [8, 2], "4 or 8, or a list of those, one per weights file"),
    ("atypical.tta_views", [], "4 or 8, or a list of those"),
    ("tiling.thumbnail_megapixels", "abc", "a number >= 0"),
    ("merging.box_size_px", 0, "a positive integer"),
    ("merging.tile_edge_px", -5, "an integer >= 0"),
    ("verifier.context_px", -100, "an integer >= 0"),
    ("verifier.context_px", [15, -1], "an integer >= 0, or a list of those, one per weights file"),
    ("verifier.context_px", [], "an integer >= 0, or a list of those"),
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
    assert load_config(overrides={"atypical.tta_views": [8, 4]}).atypical.tta_views == [8, 4]


def test_every_config_field_has_a_type_check():
    from midog.config import FIELD_TYPES

    for section, cls in _sections():
        for f in dataclasses.fields(cls):
            assert str(f.type) in FIELD_TYPES, f"{section}.{f.name}: {f.type}"


@pytest.mark.parametrize("key, annotation, value", [
    ("runtime.seed", "int", "thirty"),
    ("runtime.seed", "int", True),
    ("proposals.half", "bool", 1),
    ("foundation.hf_cache", "str | None", 5),
    ("proposals.classes", "list[int] | None", [-1]),
])
def test_a_value_of_the_wrong_type_is_refused_alike_by_the_pipeline_and_the_training_configs(key, annotation, value):
    from training.config_file import config_from_values

    name = key.split(".")[1]
    training = dataclasses.make_dataclass("Training", [(name, annotation, dataclasses.field(default=None))])
    with pytest.raises(ConfigError) as pipeline_error:
        load_config(overrides={key: value}, environ={})
    with pytest.raises(ConfigError) as training_error:
        config_from_values({name: value}, training, "training config")
    assert re.fullmatch(rf"config {re.escape(key)} is {re.escape(repr(value))}; expected \S.*",
                        str(pipeline_error.value))
    assert re.fullmatch(rf"training config: {re.escape(name)} is {re.escape(repr(value))}; expected \S.*",
                        str(training_error.value))


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
