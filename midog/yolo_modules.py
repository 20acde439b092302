"""The Track 1 proposal network's custom YOLO11 blocks, registered with ultralytics' model parser.

Blocks (ordinary `nn.Module`s):
- `LSConv`: LS convolution from "LSNet: See Large, Focus Small" (Wang et al., CVPR 2025): a 7×7 depth-wise
  large-kernel *perception* branch predicts, at every pixel, a 3×3 kernel per group of channels, and a *dynamic
  grouped aggregation* applies those kernels to the input.
- `C3k2_LSConv`: ultralytics' C3k2 whose bottlenecks run an LSConv between their 3×3 and 1×1 convolutions.
- `EMA`: Efficient Multi-scale Attention (Ouyang et al., ICASSP 2023) over 32 channel groups.
- `C2PSA_EMA`: ultralytics' C2PSA whose position-sensitive attention blocks use EMA instead of multi-head attention.

`register_custom_modules()` makes `ultralytics.nn.tasks.parse_model` accept these names in a model YAML, without
touching ultralytics' files: see `_parse_model_with_custom_modules` for how. Checkpoints pickle these classes by
their import path (`midog.yolo_modules.*`), so loading a trained `.pt` needs only this module to be importable;
building a model from a YAML (training, resuming) needs the registration.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import types
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn import tasks
from ultralytics.nn.modules import C2PSA, C3k2, Conv
from ultralytics.nn.modules.block import C3k

MODELS_DIR = Path(__file__).resolve().parent / "models"
MODEL_NAME = "yolo11-lsconv-ema"
SCALES = ("n", "s", "m", "l", "x")


class LSConv(nn.Module):
    """LS convolution: large-kernel perception, small-kernel dynamic grouped aggregation, BatchNorm, residual.

    Perception: 1×1 conv to c/2 → ReLU → 7×7 depth-wise conv → 1×1 conv → ReLU → 1×1 conv to k²·c/groups weights,
    GroupNorm. Aggregation: each output pixel of channel i is the k×k neighbourhood of input channel i weighted by the
    kernel predicted for channel group i // groups at that pixel (`groups` neighbouring channels share a kernel).
    """

    def __init__(self, c: int, large_kernel: int = 7, small_kernel: int = 3, groups: int = 8) -> None:
        super().__init__()
        if c % groups or (c // 2) < 1:
            raise ValueError(f"LSConv needs channels divisible by its {groups} channel groups, got {c}")
        hidden = c // 2
        self.small_kernel = small_kernel
        self.kernel_channels = c // groups
        self.perceive = nn.Sequential(
            Conv(c, hidden, 1, act=nn.ReLU()),
            Conv(hidden, hidden, large_kernel, g=hidden, act=False),
            Conv(hidden, hidden, 1, act=nn.ReLU()),
            nn.Conv2d(hidden, small_kernel**2 * self.kernel_channels, 1),
            nn.GroupNorm(self.kernel_channels, small_kernel**2 * self.kernel_channels),
        )
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        kernels = self.perceive(x).reshape(b, self.kernel_channels, self.small_kernel**2, h, w)
        return x + self.bn(aggregate_dynamic(x, kernels))


def aggregate_dynamic(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-pixel k×k grouped convolution: out[:, i] = Σ_k shift_k(x[:, i]) · kernels[:, i // (C // G), k].

    `x` is (B, C, H, W), `kernels` is (B, G, k², H, W) with C divisible by G; zero padding keeps H×W. Summing k²
    shifted views needs no unfolded copy of `x` (9× its size), which matters at P3 resolution.
    """
    b, c, h, w = x.shape
    n_groups, k2 = kernels.shape[1], kernels.shape[2]
    k = math.isqrt(int(k2))  # int(), not round(): stays a Python int under the ONNX/TorchScript tracer
    pad = k // 2
    # reshape, not view: ultralytics trains channels_last on CUDA
    padded = F.pad(x, (pad, pad, pad, pad)).reshape(b, n_groups, c // n_groups, h + 2 * pad, w + 2 * pad)
    out = x.new_zeros(b, n_groups, c // n_groups, h, w)
    for index, (dy, dx) in enumerate(itertools.product(range(k), range(k))):
        out = out + padded[..., dy : dy + h, dx : dx + w] * kernels[:, :, index : index + 1]
    return out.reshape(b, c, h, w)


class LSBottleneck(nn.Module):
    """Bottleneck with an LSConv: 3×3 conv to the hidden width → LSConv → 1×1 conv back, plus the shortcut."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, k: int = 3, e: float = 0.5) -> None:
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, k, 1, g=g)
        self.ls = LSConv(hidden)
        self.cv2 = Conv(hidden, c2, 1)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.ls(self.cv1(x)))
        return x + y if self.add else y


class C3k_LSConv(C3k):
    """ultralytics' C3k with LSBottlenecks (used by C3k2_LSConv when c3k is set, i.e. at scales m, l, x)."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5, k: int = 3):
        super().__init__(c1, c2, n, shortcut, g, e, k)
        hidden = int(c2 * e)
        self.m = nn.Sequential(*(LSBottleneck(hidden, hidden, shortcut, g, k, e=1.0) for _ in range(n)))


class C3k2_LSConv(C3k2):
    """ultralytics' C3k2 (same arguments and YAML rules, minus `attn`) whose inner blocks use LSConv."""

    def __init__(
        self, c1: int, c2: int, n: int = 1, c3k: bool = False, e: float = 0.5, g: int = 1, shortcut: bool = True
    ) -> None:
        super().__init__(c1, c2, n, c3k, e, False, g, shortcut)
        self.m = nn.ModuleList(
            C3k_LSConv(self.c, self.c, 2, shortcut, g) if c3k else LSBottleneck(self.c, self.c, shortcut, g)
            for _ in range(n)
        )


class EMA(nn.Module):
    """Efficient Multi-scale Attention: re-weights each pixel of each of `groups` channel groups.

    Per group: a 1×1 branch (pooling along H and along W, shared 1×1 conv, sigmoid gates, GroupNorm) and a 3×3 branch;
    each branch's softmaxed global descriptor is matched against the other branch's pixels (cross-spatial learning)
    and the summed maps gate the input. Input and output channels are equal (`c2` exists for the YAML's (c1, c2) rule).
    """

    def __init__(self, c1: int, c2: int | None = None, groups: int = 32) -> None:
        super().__init__()
        if c2 is not None and c2 != c1:
            raise ValueError(f"EMA keeps its channel count: input {c1}, output {c2}")
        if c1 % groups:
            raise ValueError(f"EMA needs channels divisible by its {groups} groups, got {c1}")
        self.groups = groups
        per_group = c1 // groups
        self.conv1x1 = nn.Conv2d(per_group, per_group, 1)
        self.conv3x3 = nn.Conv2d(per_group, per_group, 3, padding=1)
        self.gn = nn.GroupNorm(per_group, per_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = x.reshape(b * self.groups, c // self.groups, h, w)
        pooled_h = g.mean(dim=3, keepdim=True)  # (bg, c/g, h, 1)
        pooled_w = g.mean(dim=2, keepdim=True).transpose(2, 3)  # (bg, c/g, w, 1)
        gate_h, gate_w = self.conv1x1(torch.cat((pooled_h, pooled_w), dim=2)).split((h, w), dim=2)
        x1 = self.gn(g * gate_h.sigmoid() * gate_w.transpose(2, 3).sigmoid())
        x2 = self.conv3x3(g)
        d1 = x1.mean(dim=(2, 3)).softmax(dim=-1).unsqueeze(1)  # (bg, 1, c/g)
        d2 = x2.mean(dim=(2, 3)).softmax(dim=-1).unsqueeze(1)
        weights = d1 @ x2.flatten(2) + d2 @ x1.flatten(2)  # (bg, 1, h*w)
        return (g * weights.view(b * self.groups, 1, h, w).sigmoid()).reshape(b, c, h, w)


class EMABlock(nn.Module):
    """PSABlock with EMA in place of multi-head self-attention: x + EMA(x), then x + FFN(x)."""

    def __init__(self, c: int, groups: int = 32) -> None:
        super().__init__()
        self.attn = EMA(c, groups=groups)
        self.ffn = nn.Sequential(Conv(c, c * 2, 1), Conv(c * 2, c, 1, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.ffn(x)


class C2PSA_EMA(C2PSA):
    """ultralytics' C2PSA (same arguments and YAML rules) whose attention blocks use EMA."""

    def __init__(self, c1: int, c2: int, n: int = 1, e: float = 0.5) -> None:
        super().__init__(c1, c2, n, e)
        self.m = nn.Sequential(*(EMABlock(self.c) for _ in range(n)))


YAML_MODULES: tuple[type[nn.Module], ...] = (C3k2_LSConv, C2PSA_EMA, EMA)
"""The custom classes a model YAML may name (LSConv lives inside C3k2_LSConv)."""

# ultralytics' parse_model() fills a row's arguments by the row's class membership in two sets it builds from its
# module's globals on every call: `base_modules` (arguments become (c1, c2, *rest), c2 scaled by width and capped by
# max_channels) and `repeat_modules` (the depth-scaled repeat count goes in third). Each custom class borrows the
# name of a stock class with the same rules and no special case in parse_model; for one call, that name is bound to
# the custom class in a private copy of the globals. A YAML may not use a custom class and its donor together.
_RULE_DONORS: dict[type[nn.Module], str] = {
    C3k2_LSConv: "C3x",  # base + repeat rules, like C3k2
    C2PSA_EMA: "C3TR",  # base + repeat rules, like C2PSA
    EMA: "GhostConv",  # base rule only: (c1, c2)
}
_C3K_SCALES = frozenset({"m", "l", "x"})  # parse_model switches C3k2 to C3k blocks at these scales


def _model_rows(d: dict[str, Any]) -> list[list[Any]]:
    return list(d.get("backbone", [])) + list(d.get("head", []))


def _parse_model_with_custom_modules(original: Callable, d: dict[str, Any], ch: int, verbose: bool = True):
    """Run ultralytics' own parse_model with the custom classes visible to its name lookup and argument rules."""
    used = {row[2] for row in _model_rows(d)}
    custom = [cls for cls in YAML_MODULES if cls.__name__ in used]
    if not custom:
        return original(d, ch, verbose)
    bindings: dict[str, Any] = {cls.__name__: cls for cls in YAML_MODULES}
    for cls in custom:
        donor = _RULE_DONORS[cls]
        if donor in used:
            raise ValueError(f"a model YAML cannot use both {cls.__name__} and {donor} (see midog.yolo_modules)")
        bindings[donor] = cls
    d = copy.deepcopy(d)
    if d.get("scale") in _C3K_SCALES:  # parse_model's C3k2 rule, applied to C3k2_LSConv rows
        for row in _model_rows(d):
            if row[2] == C3k2_LSConv.__name__:
                row[3][1:2] = [True]
    parse = types.FunctionType(original.__code__, {**original.__globals__, **bindings}, original.__name__)
    parse.__defaults__, parse.__kwdefaults__ = original.__defaults__, original.__kwdefaults__
    return parse(d, ch, verbose)


def register_custom_modules() -> None:
    """Let ultralytics build models from YAMLs naming C3k2_LSConv, C2PSA_EMA and EMA. Idempotent.

    Replaces `ultralytics.nn.tasks.parse_model` in memory (not on disk) with a wrapper that runs the original with the
    custom classes bound in a copy of its globals, and puts the class names into the `tasks` namespace. YAMLs that do
    not name a custom class are parsed by the untouched original.
    """
    for cls in YAML_MODULES:
        setattr(tasks, cls.__name__, cls)
    if getattr(tasks.parse_model, "midog_original", None) is not None:
        return
    original = tasks.parse_model

    @functools.wraps(original)
    def parse_model(d: dict[str, Any], ch: int, verbose: bool = True):
        return _parse_model_with_custom_modules(original, d, ch, verbose)

    parse_model.midog_original = original  # type: ignore[attr-defined]
    tasks.parse_model = parse_model


def model_yaml(scale: str = "x") -> Path:
    """The path that selects `scale` of our model YAML: ultralytics reads the scale from the file name
    (`yolo11x-lsconv-ema.yaml`) and, when that file does not exist, loads `yolo11-lsconv-ema.yaml` beside it."""
    if scale not in SCALES:
        raise ValueError(f"unknown model scale '{scale}', expected one of {', '.join(SCALES)}")
    return MODELS_DIR / f"yolo11{scale}{MODEL_NAME.removeprefix('yolo11')}.yaml"


def build_detector(scale: str = "x", nc: int = 1, verbose: bool = False) -> tasks.DetectionModel:
    """YOLO11 with LSConv and EMA at `scale` (n, s, m, l, x), `nc` classes, freshly initialised."""
    register_custom_modules()
    cfg = tasks.yaml_model_load(model_yaml(scale))
    return tasks.DetectionModel(cfg, nc=nc, verbose=verbose)
