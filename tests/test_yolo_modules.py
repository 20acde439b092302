"""The custom YOLO blocks, their registration with ultralytics' parser, the model YAML, save and reload."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from ultralytics import YOLO
from ultralytics.cfg import get_cfg
from ultralytics.nn import tasks
from ultralytics.nn.modules import C2PSA, C3k2, Detect
from ultralytics.nn.modules.block import Attention

from midog.yolo_modules import (
    EMA,
    C2PSA_EMA,
    C3k2_LSConv,
    C3k_LSConv,
    LSBottleneck,
    LSConv,
    aggregate_dynamic,
    build_detector,
    model_yaml,
    register_custom_modules,
)

# Measured with ultralytics 8.4.190, nc=1 (plain YOLO11 from ultralytics' own yolo11{n,x}.yaml, same nc).
PARAMS = {"n": 2_471_981, "x": 53_837_683}
PLAIN_YOLO11_PARAMS = {"n": 2_590_035, "x": 56_874_931}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)


def _all_parameters_get_gradients(module: torch.nn.Module, out: torch.Tensor) -> None:
    out.square().mean().backward()
    missing = [name for name, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


def _parameter_count(scale: str) -> tuple[int, int]:
    """Parameters of our model and of plain YOLO11 at `scale`, built by parse_model alone (no stride pass)."""
    register_custom_modules()
    ours = tasks.yaml_model_load(model_yaml(scale))
    plain = tasks.yaml_model_load(f"yolo11{scale}.yaml")
    counts = []
    for cfg in (ours, plain):
        cfg["nc"] = 1
        layers, _ = tasks.parse_model(cfg, ch=3, verbose=False)
        counts.append(sum(p.numel() for p in layers.parameters()))
    return counts[0], counts[1]


def test_dynamic_aggregation_with_constant_kernels_is_a_grouped_convolution():
    x = torch.randn(2, 16, 9, 11)
    kernel = torch.randn(2, 4, 9)  # per image: 4 channel groups (16 channels), 3x3 kernels
    kernels = kernel[..., None, None].expand(2, 4, 9, 9, 11)
    out = aggregate_dynamic(x, kernels)
    for b in range(2):
        weight = kernel[b].repeat_interleave(4, dim=0).view(16, 1, 3, 3)  # channel i uses group i // 4
        expected = F.conv2d(x[b : b + 1], weight, padding=1, groups=16)
        torch.testing.assert_close(out[b : b + 1], expected, atol=1e-5, rtol=1e-5)


def test_dynamic_aggregation_uses_each_pixels_own_kernel():
    x = torch.randn(1, 8, 5, 5)
    kernels = torch.zeros(1, 1, 9, 5, 5)
    kernels[0, 0, 4, 2, 3] = 2.0  # centre tap, only at pixel (2, 3)
    out = aggregate_dynamic(x, kernels)
    expected = torch.zeros_like(x)
    expected[..., 2, 3] = 2.0 * x[..., 2, 3]
    torch.testing.assert_close(out, expected)


def test_lsconv_keeps_shape_and_trains():
    module = LSConv(32)
    assert module.perceive[1].conv.kernel_size == (7, 7) and module.perceive[1].conv.groups == 16
    assert module.kernel_channels == 4 and module.small_kernel == 3
    x = torch.randn(2, 32, 12, 10)
    out = module(x)
    assert out.shape == x.shape
    _all_parameters_get_gradients(module, out)


@pytest.mark.parametrize("block", [LSConv(32), EMA(32)], ids=["LSConv", "EMA"])
def test_blocks_accept_channels_last_inputs(block: torch.nn.Module):
    """ultralytics trains channels_last on CUDA; the result must not depend on the memory format."""
    x = torch.randn(2, 32, 8, 8)
    out = block(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, block(x))
    _all_parameters_get_gradients(block, out)


def test_lsconv_rejects_channels_it_cannot_group():
    with pytest.raises(ValueError, match="divisible"):
        LSConv(20)


@pytest.mark.parametrize("c3k", [False, True])
def test_c3k2_lsconv_shapes_blocks_and_backward(c3k: bool):
    module = C3k2_LSConv(48, 64, n=2, c3k=c3k)
    inner = C3k_LSConv if c3k else LSBottleneck
    assert all(isinstance(block, inner) for block in module.m) and len(module.m) == 2
    assert sum(isinstance(m, LSConv) for m in module.modules()) == (4 if c3k else 2)
    x = torch.randn(2, 48, 16, 16)
    out = module(x)
    assert out.shape == (2, 64, 16, 16)
    _all_parameters_get_gradients(module, out)


def test_ema_gates_its_input_per_pixel():
    module = EMA(64)
    assert module.groups == 32 and module.conv1x1.in_channels == 2  # 32 groups of 2 channels
    x = torch.rand(2, 64, 8, 6) + 0.1
    out = module(x)
    assert out.shape == x.shape
    ratio = out / x
    assert ((ratio > 0) & (ratio < 1)).all()  # a sigmoid gate on every value
    per_group = ratio.view(2, 32, 2, 8, 6)  # both channels of a group share the gate
    torch.testing.assert_close(per_group[:, :, 0], per_group[:, :, 1])
    _all_parameters_get_gradients(module, out)


def test_ema_validates_channels():
    with pytest.raises(ValueError, match="divisible"):
        EMA(48)
    with pytest.raises(ValueError, match="keeps its channel count"):
        EMA(64, 128)


def test_c2psa_ema_replaces_attention_with_ema():
    module = C2PSA_EMA(128, 128, n=2)
    assert isinstance(module, C2PSA)
    assert not any(isinstance(m, Attention) for m in module.modules())
    assert sum(isinstance(m, EMA) for m in module.modules()) == 2
    x = torch.randn(2, 128, 8, 8)
    out = module(x)
    assert out.shape == x.shape
    _all_parameters_get_gradients(module, out)


def test_registration_is_idempotent_and_leaves_stock_yamls_alone():
    register_custom_modules()
    wrapper = tasks.parse_model
    register_custom_modules()
    assert tasks.parse_model is wrapper and wrapper.midog_original is not wrapper
    assert tasks.C3k2_LSConv is C3k2_LSConv and tasks.EMA is EMA
    cfg = tasks.yaml_model_load("yolo11n.yaml")
    ours, _ = wrapper(copy.deepcopy(cfg), ch=3, verbose=False)
    stock, _ = wrapper.midog_original(copy.deepcopy(cfg), ch=3, verbose=False)
    assert [type(m) for m in ours] == [type(m) for m in stock]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in stock.parameters())


def test_a_yaml_cannot_use_a_custom_block_and_its_rule_donor():
    register_custom_modules()
    cfg = tasks.yaml_model_load(model_yaml("n"))
    cfg["head"].insert(0, [-1, 1, "GhostConv", [1024, 1, 1]])
    with pytest.raises(ValueError, match="both EMA and GhostConv"):
        tasks.parse_model(cfg, ch=3, verbose=False)


def test_scale_n_builds_runs_and_trains():
    model = build_detector("n", nc=1)
    layers = list(model.model)
    assert isinstance(layers[10], C2PSA_EMA)
    assert [type(layers[i]) for i in (16, 19, 22)] == [C3k2_LSConv] * 3
    assert type(layers[13]) is C3k2 and all(isinstance(layers[i], EMA) for i in (23, 24, 25))
    assert layers[-1].f == [23, 24, 25] and isinstance(layers[-1], Detect) and layers[-1].nc == 1
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    assert sum(p.numel() for p in model.parameters()) == PARAMS["n"]
    # P5 block keeps its YAML c3k=True at scale n; P3/P4 use plain LS bottlenecks
    assert isinstance(layers[22].m[0], C3k_LSConv) and isinstance(layers[16].m[0], LSBottleneck)
    model.args = get_cfg()  # loss hyperparameters, as the trainer sets them
    model.train()
    batch = {
        "img": torch.rand(2, 3, 64, 64),
        "cls": torch.zeros(2, 1),
        "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.3, 0.6, 0.3, 0.3]]),
        "batch_idx": torch.tensor([0.0, 1.0]),
    }
    loss, _ = model.loss(batch)
    loss.sum().backward()
    for i in (10, 16, 19, 22, 23, 24, 25):
        missing = [n for n, p in layers[i].named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"layer {i}: no gradient reaches {missing}"
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert out.shape == (1, 4 + 1, 8 * 8 + 4 * 4 + 2 * 2)


def test_parameter_counts_against_plain_yolo11():
    for scale in ("n", "x"):
        ours, plain = _parameter_count(scale)
        assert (ours, plain) == (PARAMS[scale], PLAIN_YOLO11_PARAMS[scale])
    ours, plain = PARAMS["x"], PLAIN_YOLO11_PARAMS["x"]
    assert 0.9 < ours / plain < 1.0  # LS bottlenecks are lighter than the 3x3 pairs they replace


def test_scale_x_follows_ultralytics_c3k_rule():
    register_custom_modules()
    layers, _ = tasks.parse_model(tasks.yaml_model_load(model_yaml("x")), ch=3, verbose=False)
    assert all(isinstance(layers[i].m[0], C3k_LSConv) for i in (16, 19, 22))  # like C3k2 at m, l, x
    assert layers[23].gn.num_channels == 384 // 32  # P3 input: 256 * 1.5 channels


def test_checkpoint_saves_and_reloads(tmp_path):
    model = build_detector("n", nc=1).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)[0]
    path = tmp_path / "detector.pt"
    torch.save({"model": model, "train_args": {}}, path)
    register_custom_modules()
    loaded, _ = tasks.load_checkpoint(str(path))
    assert isinstance(loaded.model[16], C3k2_LSConv) and isinstance(loaded.model[23], EMA)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x)[0], expected, atol=1e-4, rtol=1e-4)
    results = YOLO(str(path), task="detect").predict(torch.rand(1, 3, 64, 64), imgsz=64, verbose=False)
    assert len(results) == 1 and results[0].boxes is not None
