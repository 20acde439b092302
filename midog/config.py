"""Typed pipeline configuration: dataclasses per stage, loaded from YAML, overridable from the environment.

`midog/configs/default.yaml` is the one home of every shipped value and of what each key means (its comments):
users read it as the reference of every key and copy parts of it into their `--config`, so the values live there,
not in code. The dataclasses below hold only the types: each field takes its default from the YAML, read once at
import (`_default`), so `VerifierConfig()` and `load_config(environ={})` agree by construction.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from midog.config_file import read_config_file
from midog.errors import ConfigError, first_line
from midog.weights import STAGE_SECTIONS, checkpoint_names, claimed_checkpoints, weights_pipeline_values

DEFAULT_CONFIG_PATH = Path(__file__).with_name("configs") / "default.yaml"
ENV_PREFIX = "MIDOG_"

SHIPPED: dict[str, dict[str, Any]] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
"""`default.yaml` as read at import (section -> field -> value); never modified: callers take copies."""


def _default(key: str) -> Any:
    """The dataclass default of `section.field`: its value in `default.yaml` (a fresh copy per instance for a list)."""
    section, name = key.split(".")
    try:
        value = SHIPPED[section][name]
    except KeyError:
        raise KeyError(f"{DEFAULT_CONFIG_PATH} has no {key}") from None
    if isinstance(value, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(value))
    return value


# What each field means: the comments of its key in default.yaml.

@dataclass
class RuntimeConfig:
    device: str = _default("runtime.device")
    num_threads: int = _default("runtime.num_threads")
    seed: int = _default("runtime.seed")
    crop_chunk: int = _default("runtime.crop_chunk")
    deterministic: bool = _default("runtime.deterministic")


@dataclass
class ImageConfig:
    fallback_spacing_um: float = _default("image.fallback_spacing_um")
    max_spacing_um: float = _default("image.max_spacing_um")
    in_memory_max_megapixels: float = _default("image.in_memory_max_megapixels")
    segment_cache_mb: float = _default("image.segment_cache_mb")
    resample_tolerance: float = _default("image.resample_tolerance")


@dataclass
class TilingConfig:
    tile_size: int = _default("tiling.tile_size")
    overlap: float = _default("tiling.overlap")
    tissue_min_fraction: float = _default("tiling.tissue_min_fraction")
    tissue_saturation: float = _default("tiling.tissue_saturation")
    tissue_gray_max: float = _default("tiling.tissue_gray_max")
    thumbnail_megapixels: float = _default("tiling.thumbnail_megapixels")


@dataclass
class ProposalConfig:
    weights: str = _default("proposals.weights")
    confidence: float = _default("proposals.confidence")
    nms_iou: float = _default("proposals.nms_iou")
    batch_size: int = _default("proposals.batch_size")
    half: bool = _default("proposals.half")
    max_detections_per_tile: int = _default("proposals.max_detections_per_tile")
    classes: list[int] | None = _default("proposals.classes")
    channels_last: bool = _default("proposals.channels_last")
    backend: str = _default("proposals.backend")
    onnx_batch_size: int = _default("proposals.onnx_batch_size")


@dataclass
class MergingConfig:
    strategy: str = _default("merging.strategy")
    iou: float = _default("merging.iou")
    box_size_px: int = _default("merging.box_size_px")
    class_agnostic: bool = _default("merging.class_agnostic")
    tile_edge_px: int = _default("merging.tile_edge_px")
    final_radius_um: float = _default("merging.final_radius_um")


@dataclass
class VerifierConfig:
    weights: str | list[str] = _default("verifier.weights")
    crop_size: int = _default("verifier.crop_size")
    threshold: float = _default("verifier.threshold")
    batch_size: int = _default("verifier.batch_size")
    context_px: int | list[int] = _default("verifier.context_px")
    """Pixels of context around each candidate box; a list gives each member of `weights` its own (same length,
    same order), for an ensemble of verifiers trained on crops of different context."""
    probability: str = _default("verifier.probability")
    tta: bool = _default("verifier.tta")
    backend: str = _default("verifier.backend")
    stain_normalization: str | list[str] = _default("verifier.stain_normalization")
    """none, or macenko: each image's crops re-expressed with reference stains (`midog.stain`) before the verifier
    sees them; a list gives each member of `weights` its own (trained on crops normalised, or not)."""

    def single_crop_setting(self, key: str, purpose: str) -> Any:
        """`key` (`context_px`, `stain_normalization`: the settings that may be one per member) where one crop set is
        cut (training crops); ConfigError naming `purpose` for a list."""
        value = getattr(self, key)
        if isinstance(value, list):
            raise ConfigError(f"{purpose} cuts one crop set: verifier.{key} must be one value, not {value} (give a "
                              f"config with the setting of the member being trained)")
        return value


@dataclass
class AtypicalConfig:
    weights: str | list[str] = _default("atypical.weights")
    crop_size: int = _default("atypical.crop_size")
    threshold: float | None = _default("atypical.threshold")
    tta: bool = _default("atypical.tta")
    tta_views: int | list[int] = _default("atypical.tta_views")
    """8 or 4 views per crop; a list gives each member of `weights` its own (same length, same order)."""
    batch_size: int = _default("atypical.batch_size")
    max_batch_megapixels: float = _default("atypical.max_batch_megapixels")
    confidence: str = _default("atypical.confidence")
    backend: str = _default("atypical.backend")

    @property
    def max_batch_pixels(self) -> int:
        """`max_batch_megapixels` in pixels, as `PageStack.iter_batches` takes it."""
        return int(self.max_batch_megapixels * 1e6)


@dataclass
class FoundationConfig:
    dir: str = _default("foundation.dir")
    hf_cache: str | None = _default("foundation.hf_cache")


@dataclass
class PipelineConfig:
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    merging: MergingConfig = field(default_factory=MergingConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    atypical: AtypicalConfig = field(default_factory=AtypicalConfig)
    foundation: FoundationConfig = field(default_factory=FoundationConfig)


TTA_VIEW_COUNTS = (4, 8)
"""How many test-time views `classifier.dihedral_views` can give: the 4 rotations (a subgroup, so the averaged
prediction is still invariant to them) or all 8 rotations and reflections."""

STAIN_NORMALIZATIONS = ("none", "macenko")
"""The values of `verifier.stain_normalization` (`midog.stain`)."""

BACKENDS = ("auto", "torch", "onnxruntime")
"""How a stage's model runs on the CPU (`midog.onnx_runtime`): auto = ONNX Runtime when installed; on CUDA always
PyTorch."""

CHOICES: dict[str, tuple[str, ...]] = {
    "proposals.backend": BACKENDS,
    "verifier.backend": BACKENDS,
    "atypical.backend": BACKENDS,
    "merging.strategy": ("nms", "greedy_nmm"),
    "verifier.probability": ("verifier", "product"),
    "atypical.confidence": ("p_atypical", "stated_class"),
}
"""The values a named option accepts (the modules that act on them take their lists from here)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's true/false are ints to Python


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _non_negative_int(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _finite_number(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _positive_number(value: Any) -> bool:
    return _finite_number(value) and value > 0


def _non_negative_number(value: Any) -> bool:
    return _finite_number(value) and value >= 0


def _fraction(low_open: bool = False, high_open: bool = False, optional: bool = False) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if value is None:
            return optional
        if not _is_number(value):
            return False
        return (0 < value if low_open else 0 <= value) and (value < 1 if high_open else value <= 1)
    return check


is_probability = _fraction()
"""A number in [0, 1] (not a bool, not NaN): what every threshold and probability must be."""


def _one_or_list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """One value passing `check`, or a non-empty list of them (a value per ensemble member)."""
    return lambda value: value != [] and all(check(v) for v in (value if isinstance(value, list) else [value]))


def per_member(value: Any, members: int, key: str, what: str, weights_key: str) -> list[Any]:
    """One value for all `members` ensemble members, or a list with one per member: each member's, in order.
    ConfigError naming `key` when a list has another length than `weights_key`."""
    if not isinstance(value, list):
        return [value] * members
    if len(value) != members:
        raise ConfigError(f"{key} lists {len(value)} {what} for {members} {weights_key}: give one per weights "
                          "file, or one number")
    return list(value)


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "runtime.device": (lambda value: isinstance(value, str) and DEVICE_PATTERN.fullmatch(value) is not None,
                       "auto, cpu, cuda or cuda:N"),
    "runtime.num_threads": (_non_negative_int, "0 (the CPUs this process may use) or a positive integer"),
    "runtime.crop_chunk": (_positive_int, "a positive integer"),
    "image.fallback_spacing_um": (_positive_number, "a positive number"),
    "image.max_spacing_um": (_positive_number, "a positive number"),
    "image.in_memory_max_megapixels": (_non_negative_number, "a number >= 0"),
    "image.segment_cache_mb": (_non_negative_number, "a number >= 0"),
    "image.resample_tolerance": (_fraction(high_open=True), "a number in [0, 1)"),
    "tiling.tile_size": (_positive_int, "a positive integer"),
    "tiling.thumbnail_megapixels": (_non_negative_number, "a number >= 0 (0 = off)"),
    "tiling.overlap": (_fraction(high_open=True), "a number in [0, 1)"),
    "tiling.tissue_min_fraction": (_fraction(), "a number in [0, 1]"),
    "tiling.tissue_saturation": (_fraction(), "a number in [0, 1]"),
    "tiling.tissue_gray_max": (_fraction(), "a number in [0, 1]"),
    "proposals.confidence": (_fraction(), "a number in [0, 1]"),
    "proposals.nms_iou": (_fraction(), "a number in [0, 1]"),
    "proposals.batch_size": (_positive_int, "a positive integer"),
    "proposals.onnx_batch_size": (_positive_int, "a positive integer"),
    "proposals.max_detections_per_tile": (_positive_int, "a positive integer"),
    "merging.iou": (_fraction(low_open=True), "a number in (0, 1]"),
    "merging.box_size_px": (_positive_int, "a positive integer"),
    "merging.tile_edge_px": (_non_negative_int, "an integer >= 0"),
    "merging.final_radius_um": (_non_negative_number, "a number >= 0 (0 = off)"),
    "verifier.crop_size": (_positive_int, "a positive integer"),
    "verifier.threshold": (_fraction(), "a number in [0, 1]"),
    "verifier.batch_size": (_positive_int, "a positive integer"),
    "verifier.context_px": (_one_or_list_of(_non_negative_int),
                            "an integer >= 0, or a list of those, one per weights file"),
    "verifier.stain_normalization": (_one_or_list_of(lambda v: v in STAIN_NORMALIZATIONS),
                                     " or ".join(STAIN_NORMALIZATIONS) + ", or a list of those, one per weights file"),
    "atypical.crop_size": (_positive_int, "a positive integer"),
    "atypical.threshold": (_fraction(optional=True), "null or a number in [0, 1]"),
    "atypical.tta_views": (_one_or_list_of(lambda v: _is_int(v) and v in TTA_VIEW_COUNTS),
                           " or ".join(map(str, TTA_VIEW_COUNTS)) + ", or a list of those, one per weights file"),
    "atypical.batch_size": (_positive_int, "a positive integer"),
    "atypical.max_batch_megapixels": (_positive_number, "a positive number"),
}
"""Every size and threshold whose value can be wrong in a way that would only show deep inside a run. Every other
field is checked against its type (`validate_types`); the tile size against the detector's stride at its load."""

FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "bool": (lambda value: isinstance(value, bool), "true or false"),
    "int": (_is_int, "an integer"),
    "float": (_is_number, "a number"),
    "str": (lambda value: isinstance(value, str), "a string"),
    "str | None": (lambda value: value is None or isinstance(value, str), "null or a string"),
    "float | None": (lambda value: value is None or _is_number(value), "null or a number"),
    "list[int] | None": (lambda value: value is None or (
        isinstance(value, list) and bool(value) and all(_non_negative_int(v) for v in value)),
        "null or a list of class numbers (integers >= 0)"),
    "int | list[int]": (lambda value: _is_int(value) or (
        isinstance(value, list) and bool(value) and all(_is_int(v) for v in value)),
        "an integer or a list of integers"),
    "str | list[str]": (lambda value: isinstance(value, str) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)),
        "a file name or a list of file names"),
}
"""What each annotation of the config dataclasses accepts (a field with another annotation fails the tests); the
same check for a training config's field of the same annotation (`typed_value`)."""

SIMPLE_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list, tuple),
    "tuple": (list, tuple), "dict": (dict,), "None": (type(None),)}
"""What a value of each name in an annotation that FIELD_TYPES lacks may be (YAML gives lists for tuples, and ints
for floats; a bool is never a number): the training configs' other annotations, whose items are not checked."""

NUMBERS = ("int", "float")
"""The SIMPLE_TYPES names a bool does not pass for, though Python's bool is an int."""


def as_float(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string; a number field takes any text float() reads as a finite number
    (the pipeline config's and the training configs' rule)."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if math.isfinite(number):
            return number
    return value


def annotation_text(annotation: Any) -> str:
    """A dataclass field's annotation as written (`"float | None"`), whether it is held as text or as a type."""
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def typed_value(value: Any, annotation: Any) -> tuple[Any, bool]:
    """`value` (text of a number where the annotation takes a float but no str, see `as_float`) and whether it has
    the annotated type: the pipeline's and the training configs' one type check. An annotation of FIELD_TYPES is
    checked by its entry there (list items too), a union of other SIMPLE_TYPES names by those types alone; an
    annotation with any other name (a dataclass, Path, Literal) is not checked."""
    text = annotation_text(annotation)
    names = [part.strip().split("[")[0] for part in text.split("|")]
    if not all(name in SIMPLE_TYPES for name in names):
        return value, True
    if "float" in names and "str" not in names:
        value = as_float(value)
    if text in FIELD_TYPES:
        return value, FIELD_TYPES[text][0](value)
    return value, any(isinstance(value, SIMPLE_TYPES[name]) and not (isinstance(value, bool) and name in NUMBERS)
                      for name in names)


def validate_types(config: PipelineConfig) -> None:
    """ConfigError naming the first field whose value does not have its annotated type (numbers given as text for
    a number field, e.g. `1e-3`, are converted in place)."""
    for section in dataclasses.fields(config):
        part = getattr(config, section.name)
        for f in dataclasses.fields(part):
            value, typed = typed_value(getattr(part, f.name), f.type)
            setattr(part, f.name, value)
            if not typed:
                key = f"{section.name}.{f.name}"
                expected = RANGES.get(key, FIELD_TYPES[annotation_text(f.type)])[1]
                raise ConfigError(f"config {key} is {value!r}; expected {expected}")


def validate_config(config: PipelineConfig) -> PipelineConfig:
    """`config` itself, or ConfigError naming the first option with a value it cannot take."""
    validate_types(config)
    for key, allowed in CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            raise ConfigError(f"config {key} is {value!r}; expected one of {', '.join(allowed)}")
    for key, (check, expected) in RANGES.items():
        value = _get(config, key)
        if not check(value):
            raise ConfigError(f"config {key} is {value!r}; expected {expected}")
    return config


def _get(config: PipelineConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def unknown_keys_message(unknown: Iterable[str], known: Iterable[str], prefix: str = "", what: str = "key") -> str:
    """"unknown key 'epoch' (did you mean 'epochs'?)", one entry per key: the pipeline's and the training configs'
    message for keys they do not know (`prefix` names the section they are in, `what` what they are)."""
    known = list(known)
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), known, n=3)
        hint = f" (did you mean {' or '.join(repr(prefix + name) for name in close)}?)" if close else ""
        parts.append(f"'{prefix}{key}'{hint}")
    return f"unknown {what}{'s' if len(parts) > 1 else ''} {', '.join(parts)}"


def _merge(base: dict[str, Any], override: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    unknown = [key for key in override if key not in base]
    if unknown:
        raise ConfigError(unknown_keys_message(unknown, base, where, "config key"))
    merged = dict(base)
    for key, value in override.items():
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config section '{where}{key}' must be a mapping, not {value!r}")
            merged[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            merged[key] = value
    return merged


def _coerce(text: str) -> Any:
    """Parse an environment value with YAML rules, so `0.6`, `true`, `null` and `[a, b]` mean what they say."""
    return yaml.safe_load(text)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, key = name[len(ENV_PREFIX):].lower().split("__", 1)
        try:
            overrides.setdefault(section, {})[key] = _coerce(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"cannot read {name}={value!r}: {first_line(err)}") from None
    return overrides


def _build(cls: type, values: Mapping[str, Any]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            value = _build(f.default_factory, value)
        kwargs[f.name] = value
    return cls(**kwargs)


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    weights_config: str | Path | Mapping[str, Any] | None = None,
) -> PipelineConfig:
    """Shipped defaults, then `weights_config` (the weights' own pipeline.yaml, or the sections of it that apply,
    see `midog.weights.weights_pipeline_values`), then the YAML at `path` (partial is fine), then MIDOG_* variables,
    then `overrides`.

    `overrides` uses dotted keys (`{"verifier.threshold": 0.6}`) or nested dicts.
    """
    values = copy.deepcopy(SHIPPED)
    for layer in (weights_config, path):
        if isinstance(layer, Mapping):
            values = _merge(values, layer)
        elif layer is not None:
            values = _merge(values, read_config_file(Path(layer)))
    values = _merge(values, _env_overrides(os.environ if environ is None else environ))
    if overrides:
        values = _merge(values, _nest(overrides))
    return validate_config(_build(PipelineConfig, values))


def resolve_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                   environ: Mapping[str, str] | None = None) -> PipelineConfig:
    """The configuration a run uses, resolved the same way by every entry point (process.py, the API, training's
    chain evaluation and data mining, benchmarks): shipped defaults → the `pipeline.yaml` beside the checkpoints
    this configuration loads (only the sections tuned for them, see `midog.weights.weights_pipeline_values`) →
    the YAML at `path` → MIDOG_* variables → `overrides` (dotted keys or nested dicts).

    `load_config` alone skips the weights' layer: use it only to read or validate a file, never to run the models.
    """
    chosen = load_config(path, overrides, environ)
    shipped = load_config(environ={})
    defaults = {section: getattr(shipped, section).weights for section in STAGE_SECTIONS}
    checkpoints = claimed_checkpoints({section: getattr(chosen, section).weights for section in STAGE_SECTIONS},
                                      defaults)
    config = load_config(path, overrides, environ, weights_config=weights_pipeline_values(checkpoints, defaults))
    loaded = {section: getattr(config, section).weights for section in STAGE_SECTIONS}
    if any(checkpoint_names(loaded[s]) != checkpoint_names(checkpoints[s]) for s in STAGE_SECTIONS):
        # the user named a stage's default checkpoint (MIDOG_ATYPICAL__WEIGHTS=atypical.pt), which a weights folder's
        # pipeline.yaml had renamed to its ensemble: the user's choice stands, so only values tuned for it apply
        config = load_config(path, overrides, environ, weights_config=weights_pipeline_values(loaded, defaults))
    return config


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if isinstance(value, Mapping):
            nested.setdefault(key, {}).update(value)
            continue
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"config override '{key}' must be 'section.field'")
        nested.setdefault(section, {})[name] = value
    return nested


def write_config_values(path: str | Path, values: Mapping[str, Any]) -> None:
    """Set dotted keys (`verifier.threshold`) in a YAML config file, keeping its other values.

    Used by threshold tuning to write what it chose into the pipeline config. A key the file already sets at the top
    of its section is rewritten in place, so the file's comments and layout stay (weights/pipeline.yaml explains its
    values in comments); a file this cannot edit line by line is written out whole instead.
    """
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    current = yaml.safe_load(text) or {}
    nested = _nest(values)
    for section, fields in nested.items():
        current.setdefault(section, {}).update(fields)
    load_config(overrides=nested)  # validates the keys
    edited = _set_in_place(text, nested)
    path.write_text(edited if edited is not None and _parses_to(edited, current)
                    else yaml.safe_dump(current, sort_keys=False))


def _parses_to(text: str, expected: Any) -> bool:
    try:
        return yaml.safe_load(text) == expected
    except yaml.YAMLError:
        return False


def _set_in_place(text: str, nested: Mapping[str, Mapping[str, Any]]) -> str | None:
    """`text` with each `section: {field: value}` set on its own line (the value after `field:` replaced, an
    end-of-line comment kept; a missing field added at the end of its section, a missing section at the end of the
    file), or None where the layout is not the plain two-level block style this handles."""
    lines = text.splitlines()
    for section, fields in nested.items():
        header = re.compile(rf"{re.escape(section)}:\s*(#.*)?")
        start = next((i for i, line in enumerate(lines) if header.fullmatch(line)), None)
        if start is None:
            if any(line.startswith(f"{section}:") for line in lines):
                return None  # e.g. a flow-style section on one line
            lines += [f"{section}:"] + [f"  {name}: {_flow(value)}" for name, value in fields.items()]
            continue
        end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()
                    and not lines[i].startswith("#")), len(lines))
        for name, value in fields.items():
            pattern = re.compile(rf"(\s+){re.escape(name)}:[^#]*?(\s+#.*)?")
            hit = next((i for i in range(start + 1, end) if pattern.fullmatch(lines[i])), None)
            if hit is None:
                lines.insert(end, f"  {name}: {_flow(value)}")
                end += 1
                continue
            match = pattern.fullmatch(lines[hit])
            lines[hit] = f"{match.group(1)}{name}: {_flow(value)}{match.group(2) or ''}"
    return "\n".join(lines) + "\n"


def _flow(value: Any) -> str:
    """`value` as one line of YAML (a list in flow style: `[a, b]`)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()


def config_to_dict(config: PipelineConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
