"""Pathology foundation models (and any timm model) as classifier backbones: linear probe, LoRA, full fine-tune.

A foundation classifier is a timm backbone created with `num_classes=0`, a pooling of its tokens (the one each
model card prescribes: Virchow's class token concatenated with the mean patch token, UNI's class token, ...) and
one linear logit. It is a `BinaryClassifier`, so training loops, TTA and `process.py` use it unchanged.

Its checkpoint is the usual "midog-classifier/1" dict (see midog/classifier.py) with two more keys:

    kind        "foundation"
    foundation  {"backbone": the BackboneSpec (timm arch + kwargs, pooling, hub id, mean/std, input size, resize),
                 "options": the FoundationOptions (method, LoRA settings, base weights name)}
    state_dict  only what training changed: linear → head.*; lora → LoRA adapters + head.*; full → everything

The frozen base weights of "linear" and "lora" checkpoints are not copied into every checkpoint: they are loaded
from a local file or Hugging Face cache folder (`find_base_weights`); nothing is downloaded at run time. A "full"
checkpoint (full fine-tune, or LoRA merged with `merge_lora`) is self-contained. Loading is strict everywhere: the
base weights must fit the backbone exactly (after `map_foreign_keys`, the one place foreign keys are renamed) and
the checkpoint's keys must be exactly the ones its method trains.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from torch import nn

from midog.binary_classifier import (PLAIN_CROP_PCT, PLAIN_INTERPOLATION, BinaryClassifier, check_resize,
                                     pixel_size_from_state, resize_from_state, tta_threshold_from_state)
from midog.config import load_config
from midog.errors import ConfigError, WeightsError, first_line
from midog.weights import plain, weights_dirs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

METHODS = ("linear", "lora", "full")
POOLINGS = ("cls", "cls+mean", "mean", "model")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
PREFERRED_FILES = ("model.safetensors", "pytorch_model.bin")
DOCS = "docs/foundation-models.md"

# timm takes layer classes for these arguments; checkpoints and YAML hold their names.
_LAYER_NAMES: dict[str, Any] = {
    "swiglu_packed": timm.layers.SwiGLUPacked,
    "swiglu": timm.layers.SwiGLU,
    "mlp": timm.layers.Mlp,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
}


@dataclass
class BackboneSpec:
    """How to build one backbone and feed it: everything a checkpoint needs to rebuild it without the registry."""

    name: str
    arch: str
    """timm architecture, created with pretrained=False, num_classes=0 and `kwargs`."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """timm.create_model keyword arguments as in the model card; layer classes by name (see _LAYER_NAMES)."""
    pooling: str = "model"
    """cls: class token; cls+mean: class token ⊕ mean of the patch tokens (register tokens excluded);
    mean: mean patch token; model: the timm model's own pooled output."""
    mean: tuple[float, float, float] | None = None
    """None: from the timm model's data config."""
    std: tuple[float, float, float] | None = None
    input_size: int = 224
    hub_id: str | None = None
    """Hugging Face repository of the weights (gated: accept the licence there)."""
    interpolation: str | None = None
    """Resize interpolation the backbone was trained with (bilinear/bicubic). None: from the timm data config
    (pretrained_cfg) of the architecture when pretrained base weights are loaded, else a plain bilinear resize."""
    crop_pct: float | None = None
    """Below 1: resize to floor(input_size / crop_pct), then centre-crop input_size. None: as `interpolation`."""


# The resize (interpolation, crop_pct) of each entry is its card's own eval transform; sources in
# tests/test_foundation_registry.py. UNI / UNI2-h: Resize(224) + CenterCrop(224), torchvision's default bilinear.
# Virchow / Virchow2: config.json pretrained_cfg bicubic, crop_pct 1.0. H-optimus-0/1: the card feeds 224 px tiles
# unresized; its config.json gives no interpolation or crop_pct (timm would fall back to its PretrainedCfg defaults,
# bicubic + 0.875, a centre crop the card never makes), so bicubic without a crop. Prov-GigaPath: the card's
# Resize(256, bicubic) + CenterCrop(224), i.e. crop_pct 0.875 (its config.json says 1.0; the card's code wins).
REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec for spec in (
        BackboneSpec("uni", "vit_large_patch16_224",
                     dict(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True),
                     "cls", IMAGENET_MEAN, IMAGENET_STD, 224, "MahmoodLab/UNI", "bilinear", 1.0),
        BackboneSpec("uni2-h", "vit_giant_patch14_224",
                     dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                          mlp_ratio=2.66667 * 2, no_embed_class=True, mlp_layer="swiglu_packed", act_layer="silu",
                          reg_tokens=8, dynamic_img_size=True),
                     "cls", IMAGENET_MEAN, IMAGENET_STD, 224, "MahmoodLab/UNI2-h", "bilinear", 1.0),
        BackboneSpec("virchow", "vit_huge_patch14_224",
                     dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True,
                          mlp_layer="swiglu_packed", act_layer="silu"),
                     "cls+mean", IMAGENET_MEAN, IMAGENET_STD, 224, "paige-ai/Virchow", "bicubic", 1.0),
        BackboneSpec("virchow2", "vit_huge_patch14_224",
                     dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True,
                          reg_tokens=4, mlp_layer="swiglu_packed", act_layer="silu"),
                     "cls+mean", IMAGENET_MEAN, IMAGENET_STD, 224, "paige-ai/Virchow2", "bicubic", 1.0),
        BackboneSpec("h-optimus-0", "vit_giant_patch14_reg4_dinov2",
                     dict(img_size=224, init_values=1e-5, dynamic_img_size=False),
                     "cls", HOPTIMUS_MEAN, HOPTIMUS_STD, 224, "bioptimus/H-optimus-0", "bicubic", 1.0),
        BackboneSpec("h-optimus-1", "vit_giant_patch14_reg4_dinov2",
                     dict(img_size=224, init_values=1e-5, dynamic_img_size=False),
                     "cls", HOPTIMUS_MEAN, HOPTIMUS_STD, 224, "bioptimus/H-optimus-1", "bicubic", 1.0),
        BackboneSpec("prov-gigapath", "vit_giant_patch14_dinov2",
                     dict(img_size=224, patch_size=16, init_values=1e-5, mlp_ratio=5.33334),
                     "cls", IMAGENET_MEAN, IMAGENET_STD, 224, "prov-gigapath/prov-gigapath", "bicubic", 0.875),
    )
}


@dataclass
class LoraSettings:
    """peft LoraConfig fields; the AMi-Br benchmark's values are the defaults."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.3
    target_modules: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    """Module-name suffixes (peft semantics); in timm ViTs 'proj' also matches patch_embed.proj."""


@dataclass
class FoundationOptions:
    """What a classifier's `model_kwargs` hold when its backbone is a foundation model (validated, no free keys)."""

    method: str = "lora"
    """linear: frozen backbone, only the head trains; lora: LoRA adapters + head; full: everything trains."""
    weights: str | None = None
    """Local base weights (file or folder); None searches FoundationConfig.dir and the Hugging Face cache."""
    pooling: str | None = None
    """Override the spec's pooling."""
    interpolation: str | None = None
    """Override the spec's resize interpolation (bilinear/bicubic)."""
    crop_pct: float | None = None
    """Override the spec's crop_pct (resize to floor(input_size / crop_pct), centre-crop input_size)."""
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra timm.create_model arguments (override the spec's)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    grad_checkpointing: bool = False
    """Recompute the backbone's activations in the backward pass (timm): far less GPU memory, ~30 % slower."""


def options_from_dict(values: Mapping[str, Any] | None) -> FoundationOptions:
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(FoundationOptions)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown foundation model options {sorted(unknown)}; known: {sorted(known)}")
    lora_values = dict(values.pop("lora", None) or {})
    lora_known = {f.name for f in dataclasses.fields(LoraSettings)}
    if set(lora_values) - lora_known:
        raise ValueError(f"unknown LoRA options {sorted(set(lora_values) - lora_known)}; known: {sorted(lora_known)}")
    options = FoundationOptions(**values, lora=LoraSettings(**lora_values))
    if options.method not in METHODS:
        raise ValueError(f"foundation method must be one of {METHODS}, got '{options.method}'")
    if options.pooling is not None and options.pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got '{options.pooling}'")
    if options.interpolation is not None or options.crop_pct is not None:
        check_resize(options.interpolation or PLAIN_INTERPOLATION,
                     PLAIN_CROP_PCT if options.crop_pct is None else options.crop_pct)
    return options


def is_foundation(arch: str, model_kwargs: Mapping[str, Any] | None = None) -> bool:
    """True for registry names, `hf-hub:` names, and any timm name whose model_kwargs choose a `method`.

    Every `hf-hub:` name lands here, so an unknown one gets a clear error instead of timm reaching for the hub.
    """
    return (_registry_name(arch) is not None or arch.lower().startswith(("hf-hub:", "hf_hub:"))
            or "method" in (model_kwargs or {}))


def _registry_name(arch: str) -> str | None:
    key = arch.strip()
    for prefix in ("hf-hub:", "hf_hub:"):
        if key.lower().startswith(prefix):
            key = key[len(prefix):]
    key = key.lower()
    if key in REGISTRY:
        return key
    for name, spec in REGISTRY.items():
        if spec.hub_id is not None and spec.hub_id.lower() == key:
            return name
    return None


def resolve_spec(arch: str, options: FoundationOptions | None = None) -> BackboneSpec:
    """The registry's spec for a short or `hf-hub:` name, else a spec for a plain timm name; options override."""
    options = options or FoundationOptions()
    name = _registry_name(arch)
    if name is not None:
        spec = dataclasses.replace(REGISTRY[name], kwargs=dict(REGISTRY[name].kwargs))
    elif arch.lower().startswith(("hf-hub:", "hf_hub:")):
        raise ConfigError(f"'{arch}' is not in the foundation registry ({', '.join(REGISTRY)}); "
                         "use its timm architecture name with `timm_kwargs` and `pooling` instead")
    elif timm.is_model(arch):
        spec = BackboneSpec(name=arch, arch=arch)
    else:
        raise ConfigError(f"unknown backbone '{arch}': neither a foundation model ({', '.join(REGISTRY)}) "
                         "nor a timm model name")
    spec.kwargs.update(options.timm_kwargs)
    if options.pooling is not None:
        spec.pooling = options.pooling
    if options.interpolation is not None:
        spec.interpolation = options.interpolation
    if options.crop_pct is not None:
        spec.crop_pct = float(options.crop_pct)
    return spec


def resolve_resize(spec: BackboneSpec, data_config: Mapping[str, Any], pretrained: bool) -> tuple[str, float]:
    """The spec's (interpolation, crop_pct); an unset one comes from timm's data config of the architecture when the
    backbone is pretrained, and is a plain bilinear resize (crop_pct 1) when it is trained from scratch here."""
    if pretrained:
        interpolation = spec.interpolation or str(data_config["interpolation"])
        crop_pct = spec.crop_pct if spec.crop_pct is not None else float(data_config["crop_pct"])
    else:
        interpolation = spec.interpolation or PLAIN_INTERPOLATION
        crop_pct = spec.crop_pct if spec.crop_pct is not None else PLAIN_CROP_PCT
    check_resize(interpolation, crop_pct)
    return interpolation, float(crop_pct)


# ---------------------------------------------------------------------------------------------------- the model

def pool_tokens(tokens: torch.Tensor, pooling: str, num_prefix_tokens: int) -> torch.Tensor:
    """Pooled features of a ViT's normed output tokens (B, class + registers + patches, D), as the model cards say.

    timm orders the tokens class, registers, patches; `num_prefix_tokens` counts class + registers, so the register
    tokens never enter the patch mean (Virchow2: `output[:, 5:]`).
    """
    if pooling == "cls":
        return tokens[:, 0]
    patches = tokens[:, num_prefix_tokens:].mean(1)
    if pooling == "mean":
        return patches
    if pooling == "cls+mean":
        return torch.cat([tokens[:, 0], patches], dim=-1)
    raise ValueError(f"token pooling must be one of cls, cls+mean, mean; got '{pooling}'")


class PooledClassifier(nn.Module):
    """backbone → pooled features → one logit. `features` is what the linear probe caches."""

    def __init__(self, backbone: nn.Module, pooling: str) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got '{pooling}'")
        if pooling != "model" and not hasattr(backbone, "num_prefix_tokens"):
            raise ValueError(f"pooling '{pooling}' needs a token model (ViT); use 'model' for {type(backbone).__name__}")
        self.backbone = backbone
        self.pooling = pooling
        width = int(backbone.num_features)
        self.num_features = 2 * width if pooling == "cls+mean" else width
        self.head = nn.Linear(self.num_features, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling == "model":
            return self.backbone(x)
        return pool_tokens(self.backbone.forward_features(x), self.pooling, int(self.backbone.num_prefix_tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _timm_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    for key in ("mlp_layer", "act_layer", "norm_layer"):
        if isinstance(out.get(key), str) and out[key] in _LAYER_NAMES:
            out[key] = _LAYER_NAMES[out[key]]
    return out


def create_backbone(spec: BackboneSpec) -> nn.Module:
    """Random-initialised (never downloaded) timm backbone without a head."""
    return timm.create_model(spec.arch, pretrained=False, num_classes=0, **_timm_kwargs(spec.kwargs))


def map_foreign_keys(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """The one place published checkpoints are renamed to timm keys before the strict load.

    Unwraps `{"model": ...}` / `{"state_dict": ...}`, strips a DDP `module.` prefix, drops a pretrained
    classification head (we replace it), and for ViTs applies timm's own converter (DINOv2 layout, position-embedding
    resampling to the configured input size). ValueError for a patch size or class/register-slot layout that differs
    from the model's: timm would reshape those silently, so a wrong architecture would load and compute garbage.
    """
    for wrapper in ("model", "state_dict", "teacher"):
        inner = state_dict.get(wrapper) if isinstance(state_dict, Mapping) else None
        if isinstance(inner, Mapping) and all(isinstance(k, str) for k in inner):
            state_dict = inner
    mapped = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    if not isinstance(getattr(model, "head", None), nn.Linear):
        mapped = {k: v for k, v in mapped.items() if not k.startswith("head.")}
    if isinstance(model, timm.models.vision_transformer.VisionTransformer):
        _refuse_other_token_layout(mapped, model)
        mapped = timm.models.vision_transformer.checkpoint_filter_fn(mapped, model)
    return mapped


def _refuse_other_token_layout(state_dict: Mapping[str, Any], model: nn.Module) -> None:
    """ValueError for a checkpoint that timm's converter would silently reshape into a different architecture.

    The converter resamples a patch-embedding kernel of another size (a patch-16 checkpoint in a patch-14 model
    loads strictly and computes garbage) and reads position embeddings with the model's count of class/register
    slots. Only resampling the patch grid (another img_size) is a legitimate conversion.
    """
    kernel = state_dict.get("patch_embed.proj.weight")
    wanted = tuple(model.patch_embed.proj.weight.shape[-2:])
    if isinstance(kernel, torch.Tensor) and kernel.ndim == 4 and tuple(kernel.shape[-2:]) != wanted:
        raise ValueError(f"patch size {tuple(kernel.shape[-2:])} in the checkpoint, {wanted} in the model")
    pos_embed = state_dict.get("pos_embed")
    if not isinstance(pos_embed, torch.Tensor) or getattr(model, "pos_embed", None) is None:
        return
    slots = 0 if model.no_embed_class else int(model.num_prefix_tokens)  # prefix tokens with a position embedding
    dinov2_class_slot = 1 if "register_tokens" in state_dict else 0  # DINOv2 layout: timm folds it into cls_token
    patches = int(pos_embed.shape[1]) - slots - dinov2_class_slot
    rows, cols = model.patch_embed.grid_size
    if patches != rows * cols and (patches <= 0 or math.isqrt(patches) ** 2 != patches):
        raise ValueError(f"pos_embed of {pos_embed.shape[1]} tokens in the checkpoint does not fit {slots} "
                         f"class/register slots of the model (no_embed_class={model.no_embed_class}, "
                         f"{model.num_prefix_tokens} prefix tokens) plus a square patch grid")


def read_state_dict(path: Path) -> Mapping[str, Any]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise several types for truncated or foreign files
        raise WeightsError(f"cannot read foundation weights {path}: {first_line(err)}") from None


def load_base_weights(backbone: nn.Module, path: Path, spec: BackboneSpec) -> None:
    try:
        state_dict = map_foreign_keys(read_state_dict(path), backbone)
    except (ValueError, RuntimeError) as err:  # ours, or timm's converter failing to reshape
        raise WeightsError(f"{path} does not fit {spec.name} ({spec.arch}): {first_line(err)[:300]}") \
            from None
    try:
        backbone.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise WeightsError(f"{path} does not fit {spec.name} ({spec.arch}): {' '.join(lines[1:3])[:300]}") from None


# ---------------------------------------------------------------------------------------------------- offline weights

def _weights_file_in(folder: Path) -> Path | None:
    for name in PREFERRED_FILES:
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return files[0] if len(files) == 1 else None


def _as_weights_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    if path.is_dir():
        found = _weights_file_in(path)
        if found is not None:
            return found
        hub = _from_hf_cache_folder(path)
        if hub is not None:
            return hub
    for suffix in WEIGHT_SUFFIXES:
        if path.with_name(path.name + suffix).is_file():
            return path.with_name(path.name + suffix)
    return None


def _from_hf_cache_folder(folder: Path) -> Path | None:
    """A `models--org--name` folder, or a hub cache holding exactly one of them."""
    repos = [folder] if folder.name.startswith("models--") else sorted(folder.glob("models--*"))
    if len(repos) != 1:
        return None
    for snapshot in sorted((repos[0] / "snapshots").glob("*")):
        found = _weights_file_in(snapshot) if snapshot.is_dir() else None
        if found is not None:
            return found
    return None


def _hf_cache_dirs(hf_cache: str | None) -> list[Path]:
    dirs = [Path(hf_cache).expanduser()] if hf_cache else []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    dirs.append(home / "hub")
    return dirs


def _from_hf_cache(hub_id: str, cache: Path) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for repo in dict.fromkeys([hub_id, hub_id.lower()]):  # the cache folder keeps the case it was asked with
        for filename in PREFERRED_FILES:
            found = try_to_load_from_cache(repo, filename, cache_dir=str(cache))
            if isinstance(found, str):
                return Path(found)
    return None


def find_base_weights(spec: BackboneSpec, explicit: str | None = None, config: Any = None) -> Path:
    """The local file holding `spec`'s pretrained weights; WeightsError naming what was searched and how to fix it.

    Order: `explicit` (file, folder or Hugging Face cache folder; relative names also under the weights folders),
    then `<weights folder>/<config.dir>/<name>` (file with a weights suffix, or a folder), then the Hugging Face
    cache (`config.hf_cache`, $HF_HUB_CACHE, $HF_HOME/hub) for the spec's hub id. Never downloads.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if config is None:
        config = load_config().foundation
    searched: list[str] = []
    candidates: list[Path] = []
    if explicit:
        path = Path(explicit).expanduser()
        candidates += [path] if path.is_absolute() else [path] + [d / path for d in weights_dirs()]
    folders = [Path(config.dir)] if Path(config.dir).is_absolute() else [d / config.dir for d in weights_dirs()]
    names = list(dict.fromkeys([spec.name] + ([spec.hub_id.split("/")[-1]] if spec.hub_id else [])))
    candidates += [folder / name for folder in folders for name in names]
    for candidate in candidates:
        found = _as_weights_file(candidate)
        if found is not None:
            return found
        searched.append(str(candidate))
    if spec.hub_id:
        for cache in _hf_cache_dirs(config.hf_cache):
            found = _from_hf_cache(spec.hub_id, cache) if cache.is_dir() else None
            if found is not None:
                return found
            searched.append(f"{cache} (Hugging Face cache, {spec.hub_id})")
    how = (f"`hf download {spec.hub_id} --local-dir weights/{config.dir}/{spec.name}` on a machine "
           "with internet (accept the licence on huggingface.co first), then copy that folder here"
           if spec.hub_id else f"put the {spec.arch} weights file at weights/{config.dir}/{spec.name}.safetensors")
    raise WeightsError(f"weights of foundation model '{spec.name}' not found (searched {'; '.join(searched)}); "
                       f"{how}, or set foundation.dir / foundation.hf_cache (see {DOCS})")


# ---------------------------------------------------------------------------------------------------- LoRA

def inject_lora(backbone: nn.Module, settings: LoraSettings) -> None:
    """Add peft LoRA adapters in place; afterwards only the adapters of `backbone` require grad."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), bias="none")
    try:
        inject_adapter_in_model(config, backbone)
    except ValueError as err:  # peft: no module matched
        raise ValueError(f"LoRA target modules {settings.target_modules} not found: {first_line(err)}") \
            from None
    for name, param in backbone.named_parameters():
        param.requires_grad = "lora_" in name


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer and put the plain layer back; returns how many were merged."""
    from peft.tuners.lora import LoraLayer

    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, module in targets:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return len(targets)


def trained_keys(model: nn.Module, method: str) -> list[str]:
    """The state_dict keys a checkpoint of `method` stores (the rest comes from the base weights)."""
    keys = list(model.state_dict())
    if method == "full":
        return keys
    if method == "linear":
        return [k for k in keys if k.startswith("head.")]
    return [k for k in keys if k.startswith("head.") or "lora_" in k]


# ---------------------------------------------------------------------------------------------------- the classifier

@dataclass
class FoundationClassifier(BinaryClassifier):
    """A BinaryClassifier whose model is a PooledClassifier; saves only what its method trained."""

    spec: BackboneSpec = field(default_factory=lambda: BackboneSpec("none", "none"))
    options: FoundationOptions = field(default_factory=FoundationOptions)
    base_weights: str | None = None
    """The local file the pretrained backbone was loaded from (None: random or self-contained)."""

    def features(self, crops: Any, batch_size: int = 64) -> torch.Tensor:
        """Pooled backbone features (N, D) of uint8 RGB crops (N, H, W, 3), in order, on the CPU."""
        self.model.eval()
        out = []
        with torch.inference_mode():
            for start in range(0, len(crops), batch_size):
                out.append(self.model.features(self.preprocess(crops[start:start + batch_size])).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.num_features)

    def state(self, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        full = self.model.state_dict()
        return {
            **self.describe(meta),
            "kind": "foundation",
            "foundation": {"backbone": plain(dataclasses.asdict(self.spec)),
                           "options": plain(dataclasses.asdict(self.options))},
            "state_dict": {k: full[k].detach().cpu() for k in trained_keys(self.model, self.options.method)},
        }


def make_model(spec: BackboneSpec, options: FoundationOptions, base_weights: Path | None) -> PooledClassifier:
    backbone = create_backbone(spec)
    if base_weights is not None:
        load_base_weights(backbone, base_weights, spec)
    if options.method == "lora":
        inject_lora(backbone, options.lora)
    elif options.method == "linear":
        backbone.requires_grad_(False)
    if options.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return PooledClassifier(backbone, spec.pooling)


def build_foundation_classifier(
    arch: str,
    input_size: int | None = None,
    positive: str = "positive",
    threshold: float = 0.5,
    model_kwargs: Mapping[str, Any] | None = None,
    config: Any = None,
) -> FoundationClassifier:
    """A classifier on a pretrained backbone, ready to train: its base weights come from a local file.

    `model_kwargs` are FoundationOptions. Only "full" may start from random weights (a plain timm name with no
    `weights`); "linear" and "lora" need the pretrained base, and a missing one is a WeightsError.
    """
    options = options_from_dict(model_kwargs)
    spec = resolve_spec(arch, options)
    base: Path | None = None
    if options.method != "full" or options.weights is not None or spec.hub_id is not None:
        base = find_base_weights(spec, options.weights, config)
    model = make_model(spec, options, base)
    data_config = timm.data.resolve_model_data_config(model.backbone)
    spec.mean = tuple(spec.mean or data_config["mean"])
    spec.std = tuple(spec.std or data_config["std"])
    spec.interpolation, spec.crop_pct = resolve_resize(spec, data_config, pretrained=base is not None)
    return FoundationClassifier(
        model=model, arch=arch, input_size=int(input_size or spec.input_size), mean=spec.mean, std=spec.std,
        threshold=threshold, positive=positive, model_kwargs=plain(dataclasses.asdict(options)),
        spec=spec, options=options, base_weights=str(base) if base is not None else None,
        interpolation=spec.interpolation, crop_pct=spec.crop_pct,
    )


def load_foundation_classifier(state: Mapping[str, Any], path: Path, device: str | torch.device = "cpu",
                               config: Any = None, merge: bool = True) -> FoundationClassifier:
    """Rebuild a foundation checkpoint: base weights from their local file, then the checkpoint's keys, strictly.

    With `merge`, LoRA adapters are folded into the base weights (same predictions, plain-ViT speed).
    """
    info = state.get("foundation")
    if not isinstance(info, Mapping) or "backbone" not in info or "options" not in info:
        raise WeightsError(f"{path} is a foundation checkpoint without its 'foundation' description")
    backbone_info = dict(info["backbone"])
    for key in ("mean", "std"):
        if backbone_info.get(key) is not None:
            backbone_info[key] = tuple(backbone_info[key])
    spec = BackboneSpec(**backbone_info)
    options = options_from_dict(info["options"])
    base = None if options.method == "full" else find_base_weights(spec, options.weights, config)
    model = make_model(spec, options, base)
    given = state["state_dict"]
    expected = set(trained_keys(model, options.method))
    missing, unexpected = sorted(expected - set(given)), sorted(set(given) - expected)
    if missing or unexpected:
        raise WeightsError(f"{path} does not fit {spec.name} ({options.method}): "
                           f"missing {missing[:3]} ({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})")
    full = model.state_dict()
    full.update(given)
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{path} does not fit {spec.name}: {str(err).splitlines()[-1].strip()[:300]}") from None
    if options.method == "lora" and merge:
        merge_lora(model)
        options = dataclasses.replace(options, method="full")  # saving it again writes the merged weights
    model_kwargs = plain(dataclasses.asdict(options))
    model.eval().to(device)
    return FoundationClassifier(
        model=model, arch=state["arch"], input_size=int(state["input_size"]), mean=tuple(state["mean"]),
        std=tuple(state["std"]), threshold=float(state["threshold"]),
        tta_threshold=tta_threshold_from_state(state), positive=state.get("positive", "positive"),
        model_kwargs=model_kwargs, meta=dict(state.get("meta", {})), spec=spec,
        options=options, base_weights=str(base) if base is not None else None,
        pixel_size_um=pixel_size_from_state(state, path), **resize_from_state(state, path),
    )
