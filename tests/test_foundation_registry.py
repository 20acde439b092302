"""The foundation registry builds the published architectures, checked without their (gated) weights.

Every entry is built on PyTorch's meta device (shapes only: no memory, no weights, a few seconds) and compared with
what the model cards publish: the timm arguments, the state-dict tensors the released checkpoints hold, the token
layout, the pooled feature width, the normalisation and the resize (interpolation, crop_pct). A wrong argument either changes a shape here (the real
checkpoint would then fail its strict load) or, for the ones that change no shape (activation, gate order, pooling
offset), is asserted directly, because with the real weights it would load and compute garbage.

Sources (model cards and the code they point to):
  UNI            https://huggingface.co/MahmoodLab/UNI ; https://github.com/mahmoodlab/UNI
                 (uni/get_encoder/get_encoder.py: vit_large_patch16_224, img_size 224, patch_size 16,
                 init_values 1e-5, dynamic_img_size, strict load; ImageNet mean/std, Resize 224;
                 features = model(x), 1024-d class token; config.json pretrained_cfg interpolation bilinear,
                 crop_pct 1; MahmoodLab TRIDENT UNIInferenceEncoder: Resize(224) + CenterCrop(224), bilinear)
  UNI2-h         https://huggingface.co/MahmoodLab/UNI2-h ; https://github.com/mahmoodlab/UNI README "timm_kwargs":
                 vit_giant_patch14_224, depth 24, 24 heads, embed_dim 1536, mlp_ratio 2.66667*2, SwiGLUPacked, SiLU,
                 reg_tokens 8, no_embed_class, init_values 1e-5, strict load; model(x) -> [1, 1536]; ImageNet mean/std;
                 MahmoodLab TRIDENT UNIv2InferenceEncoder: Resize(224) + CenterCrop(224), torchvision's default
                 bilinear (the card's own create_transform(resolve_data_config(pretrained_cfg)) reads a config.json
                 that was not available here)
  Virchow        https://huggingface.co/paige-ai/Virchow (config.json: vit_huge_patch14_224, img_size 224,
                 init_values 1e-5, mlp_ratio 5.3375, global_pool "", dynamic_img_size; card: mlp_layer SwiGLUPacked,
                 act_layer SiLU; output 1 x 257 x 1280; embedding = cat(output[:, 0], output[:, 1:].mean(1)) -> 2560;
                 pretrained_cfg ImageNet mean/std, 224, bicubic, crop_pct 1.0)
  Virchow2       https://huggingface.co/paige-ai/Virchow2 (config.json as Virchow plus reg_tokens 4; output
                 1 x 261 x 1280; "tokens 1-4 are register tokens": embedding = cat(output[:, 0], output[:, 5:].mean(1));
                 resize as Virchow: bicubic, crop_pct 1.0)
  H-optimus-0    https://huggingface.co/bioptimus/H-optimus-0 (timm "hf-hub:bioptimus/H-optimus-0", init_values 1e-5,
                 dynamic_img_size False; 224 px at 0.5 um/px; mean (0.707223, 0.578729, 0.703617), std (0.211883,
                 0.230117, 0.177517); features (1, 1536)); explicit arguments in
                 https://github.com/bioptimus/releases/tree/main/models/h-optimus/v0 : patch 14, embed 1536, depth 40,
                 24 heads, mlp_ratio 5.33334, GluMlp(SiLU, gate_last=False) (= SwiGLUPacked), reg_tokens 4,
                 no_embed_class, img_size 224; "1.1B parameters"; the card's transform is ToTensor + Normalize on 224 px
                 tiles (no resize, no crop); config.json pretrained_cfg has no interpolation / crop_pct, so timm's
                 create_transform would use its PretrainedCfg defaults (bicubic, crop_pct 0.875), a crop the card
                 never makes: bicubic (timm's, and the timm port 1aurent/vit_giant_patch14_reg4_224.h-optimus-v0's)
                 with crop_pct 1.0
  H-optimus-1    https://huggingface.co/bioptimus/H-optimus-1 (same architecture, arguments and normalisation)
  Prov-GigaPath  https://huggingface.co/prov-gigapath/prov-gigapath (config.json: vit_giant_patch14_dinov2,
                 img_size 224, patch_size 16, embed_dim 1536, depth 40, 24 heads, init_values 1e-5, mlp_ratio 5.33334,
                 global_pool "token"; ImageNet mean/std; card: Resize(256, bicubic) + CenterCrop(224), i.e. crop_pct
                 0.875 (its config.json pretrained_cfg says bicubic, crop_pct 1.0: the card's code is followed);
                 tile_encoder(x) -> 1536);
                 https://github.com/prov-gigapath/prov-gigapath (demo/3_load_tile_encoder.py)
Parameter counts: the exact counts below are those of the released checkpoints as counted by independent code that
loads them strictly (e.g. UNI2-h 681,394,176 after `load_state_dict(..., strict=True)` of pytorch_model.bin); the
rounded published sizes are UNI ViT-L/16 ~0.3 B, Virchow / Virchow2 632 M (arXiv:2309.07778, arXiv:2408.00738),
H-optimus 1.1 B (card), Prov-GigaPath tile encoder ~1.13 B.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from midog.errors import WeightsError
from midog.foundation import (HOPTIMUS_MEAN, HOPTIMUS_STD, IMAGENET_MEAN, IMAGENET_STD, REGISTRY, BackboneSpec,
                              PooledClassifier, create_backbone, load_base_weights, pool_tokens)

Tokens = torch.Tensor


@dataclass(frozen=True)
class Published:
    """What a model card (and its config.json / loading code) says about one model."""

    params: int
    width: int
    depth: int
    heads: int
    patch: int
    registers: int
    pos_embed: tuple[int, int, int]
    """(1, position-embedded prefix slots + 16x16 or 14x14 patches, width) in the released checkpoint."""
    fc1: tuple[int, int]
    fc2: tuple[int, int]
    act: type[nn.Module]
    swiglu: bool
    """SwiGLUPacked: fc1 holds both halves (2 x hidden), the first half goes through the activation."""
    tokens: int
    """forward_features tokens of one 224 px image: class + registers + patches."""
    features: int
    card_pooling: Callable[[Tokens], Tokens]
    """The card's own pooling of the model's output tokens."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: tuple[str, float]
    """(interpolation, crop_pct) of the card's eval transform."""


def _class_token(out: Tokens) -> Tokens:
    return out[:, 0]


def _virchow(out: Tokens) -> Tokens:  # card: class_token = output[:, 0]; patch_tokens = output[:, 1:]
    return torch.cat([out[:, 0], out[:, 1:].mean(1)], dim=-1)


def _virchow2(out: Tokens) -> Tokens:  # card: patch_tokens = output[:, 5:] (tokens 1-4 are register tokens)
    return torch.cat([out[:, 0], out[:, 5:].mean(1)], dim=-1)


PUBLISHED = {
    "uni": Published(303_350_784, 1024, 24, 16, 16, 0, (1, 1 + 14 * 14, 1024), (4096, 1024), (1024, 4096),
                     nn.GELU, False, 1 + 196, 1024, _class_token, IMAGENET_MEAN, IMAGENET_STD, ("bilinear", 1.0)),
    "uni2-h": Published(681_394_176, 1536, 24, 24, 14, 8, (1, 16 * 16, 1536), (8192, 1536), (1536, 4096),
                        nn.SiLU, True, 1 + 8 + 256, 1536, _class_token, IMAGENET_MEAN, IMAGENET_STD,
                        ("bilinear", 1.0)),
    "virchow": Published(631_229_184, 1280, 32, 16, 14, 0, (1, 1 + 256, 1280), (6832, 1280), (1280, 3416),
                         nn.SiLU, True, 1 + 256, 2560, _virchow, IMAGENET_MEAN, IMAGENET_STD, ("bicubic", 1.0)),
    "virchow2": Published(631_239_424, 1280, 32, 16, 14, 4, (1, 1 + 4 + 256, 1280), (6832, 1280), (1280, 3416),
                          nn.SiLU, True, 1 + 4 + 256, 2560, _virchow2, IMAGENET_MEAN, IMAGENET_STD,
                          ("bicubic", 1.0)),
    "h-optimus-0": Published(1_134_774_272, 1536, 40, 24, 14, 4, (1, 256, 1536), (8192, 1536), (1536, 4096),
                             nn.SiLU, True, 1 + 4 + 256, 1536, _class_token, HOPTIMUS_MEAN, HOPTIMUS_STD,
                             ("bicubic", 1.0)),
    "h-optimus-1": Published(1_134_774_272, 1536, 40, 24, 14, 4, (1, 256, 1536), (8192, 1536), (1536, 4096),
                             nn.SiLU, True, 1 + 4 + 256, 1536, _class_token, HOPTIMUS_MEAN, HOPTIMUS_STD,
                             ("bicubic", 1.0)),
    "prov-gigapath": Published(1_134_953_984, 1536, 40, 24, 16, 0, (1, 1 + 196, 1536), (8192, 1536), (1536, 4096),
                               nn.SiLU, True, 1 + 196, 1536, _class_token, IMAGENET_MEAN, IMAGENET_STD,
                               ("bicubic", 0.875)),
}


def test_every_registry_entry_has_published_facts():
    assert set(PUBLISHED) == set(REGISTRY)


@pytest.fixture(scope="module")
def built() -> dict[str, PooledClassifier]:
    """Every registry entry built on the meta device, once for this module."""
    models = {}
    with torch.device("meta"):
        for name, spec in REGISTRY.items():
            models[name] = PooledClassifier(create_backbone(spec), spec.pooling)
    return models


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_architecture_matches_the_model_card(name: str, built: dict[str, PooledClassifier]):
    facts, model = PUBLISHED[name], built[name]
    backbone = model.backbone
    assert sum(p.numel() for p in backbone.parameters()) == pytest.approx(facts.params, rel=0.01)
    assert (backbone.embed_dim, len(backbone.blocks), backbone.blocks[0].attn.num_heads) == \
        (facts.width, facts.depth, facts.heads)
    assert backbone.num_prefix_tokens == 1 + facts.registers  # class + register tokens
    state = backbone.state_dict()  # the keys and shapes a strict load of the released checkpoint needs
    assert tuple(state["pos_embed"].shape) == facts.pos_embed
    assert tuple(state["cls_token"].shape) == (1, 1, facts.width)
    assert ("reg_token" in state) == (facts.registers > 0)
    if facts.registers:
        assert tuple(state["reg_token"].shape) == (1, facts.registers, facts.width)
    assert tuple(state["patch_embed.proj.weight"].shape) == (facts.width, 3, facts.patch, facts.patch)
    assert tuple(state["blocks.0.mlp.fc1.weight"].shape) == facts.fc1
    assert tuple(state["blocks.0.mlp.fc2.weight"].shape) == facts.fc2
    assert tuple(state["blocks.0.ls1.gamma"].shape) == (facts.width,)  # LayerScale: init_values is set
    assert "head.weight" not in state and "fc_norm.weight" not in state and "norm_pre.weight" not in state
    # what no shape shows: a GELU, or the gate on the other half, would load the real weights and compute garbage
    mlp = backbone.blocks[0].mlp
    assert type(mlp.act) is facts.act
    assert (getattr(mlp, "gate_last", None) is False) == facts.swiglu


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_token_layout_and_pooled_width_match_the_model_card(name: str, built: dict[str, PooledClassifier]):
    facts, model, spec = PUBLISHED[name], built[name], REGISTRY[name]
    with torch.device("meta"):
        tokens = model.backbone.forward_features(torch.empty(1, 3, spec.input_size, spec.input_size))
    assert tuple(tokens.shape) == (1, facts.tokens, facts.width)
    assert model.num_features == facts.features == model.head.in_features
    assert (spec.mean, spec.std, spec.input_size) == (facts.mean, facts.std, 224)
    assert (spec.interpolation, spec.crop_pct) == facts.resize


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_registry_pooling_is_the_model_cards_pooling(name: str, built: dict[str, PooledClassifier]):
    """On real numbers (CPU), a small token tensor laid out as the model's output; registers are made loud."""
    facts = PUBLISHED[name]
    prefix = int(built[name].backbone.num_prefix_tokens)
    tokens = torch.randn(3, facts.tokens, 8, generator=torch.Generator().manual_seed(0))
    tokens[:, 1:prefix] += 100.0  # any register token in the patch mean would move it far
    pooled = pool_tokens(tokens, REGISTRY[name].pooling, prefix)
    torch.testing.assert_close(pooled, facts.card_pooling(tokens))
    assert pooled.shape == (3, 8 * facts.features // facts.width)


# ---------------------------------------------------------------------------------------------- loading a checkpoint
# Strictness alone does not catch a wrong patch size or class/register slot layout: timm's checkpoint converter would
# resample the patch kernel and position embeddings into the wrong architecture. These must be refused.

def _tiny(**kwargs) -> nn.Module:
    args = dict(img_size=64, patch_size=16, depth=1, embed_dim=32, num_heads=2)
    return create_backbone(BackboneSpec("tiny", "vit_small_patch16_224", {**args, **kwargs}))


@pytest.fixture
def class_slot_patch16(tmp_path: Path) -> Path:
    """Like UNI / Prov-GigaPath: 16 px patches, a class slot in pos_embed, no registers."""
    path = tmp_path / "patch16.safetensors"
    save_file(_tiny().state_dict(), str(path))
    return path


@pytest.mark.parametrize("wrong", [
    dict(img_size=56, patch_size=14),  # Prov-GigaPath built as the patch-14 its timm name suggests
    dict(no_embed_class=True),  # class slot dropped (UNI2-h / H-optimus layout)
    dict(reg_tokens=4),  # registers given position slots (Virchow2 layout)
    dict(reg_tokens=4, no_embed_class=True),  # H-optimus layout
])
def test_a_checkpoint_of_another_token_layout_is_refused(class_slot_patch16: Path, wrong: dict):
    with pytest.raises(WeightsError, match="does not fit"):
        load_base_weights(_tiny(**wrong), class_slot_patch16, BackboneSpec("tiny", "vit_small_patch16_224"))


def test_a_checkpoint_of_the_same_layout_loads_and_another_grid_is_resampled(class_slot_patch16: Path):
    same = _tiny()
    load_base_weights(same, class_slot_patch16, BackboneSpec("tiny", "vit_small_patch16_224"))
    larger = _tiny(img_size=96)  # 6x6 patches instead of 4x4: timm resamples the position embeddings
    load_base_weights(larger, class_slot_patch16, BackboneSpec("tiny", "vit_small_patch16_224"))
    assert larger.pos_embed.shape == (1, 1 + 36, 32)
