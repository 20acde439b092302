"""What every training script shares: seeds, the DDP context torchrun sets up, the optimizer and its learning-rate
schedule, the git commit for model cards, and the run files (metrics CSV,
resumable checkpoints) written so that a crash never leaves half a file."""
from __future__ import annotations

import csv
import math
import os
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from midog.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's global and torch's generators (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Dist:
    """This process's place in a torchrun job; the defaults describe a single process on the CPU."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """DDP when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local_rank)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return Dist(rank=dist.get_rank(), world_size=world, device=device)


def same_model_on_every_rank(model: torch.nn.Module, ctx: Dist) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics drift apart between ranks during an epoch:
    DDP broadcasts them only before the next training forward), so the validation that follows scores, on every
    rank, the model rank 0 saves. No-op in a single process."""
    if ctx.world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def rank0_array(values: np.ndarray, ctx: Dist) -> np.ndarray:
    """Rank 0's `values` on every rank (same shape and dtype everywhere): every decision taken from them, early
    stopping above all, is then the same on every rank, so no rank waits at a barrier the others never reach."""
    if ctx.world_size <= 1:
        return values
    tensor = torch.as_tensor(np.ascontiguousarray(values)).to(ctx.device)
    dist.broadcast(tensor, src=0)
    return tensor.cpu().numpy()


def adamw_warmup_cosine(model: torch.nn.Module, lr: float, weight_decay: float, total_steps: int,
                        warmup_epochs: float, steps_per_epoch: int, min_lr_ratio: float,
                        layer_decay: float | None = None
                        ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay on norms and biases: trainable parameters of at most one dimension) and its schedule,
    stepped once per optimizer step: `int(warmup_epochs * steps_per_epoch)` warm-up steps (at most
    `total_steps - 1`) at lr·(s + 1)/(warmup + 1), then a half cosine from lr to `min_lr_ratio`·lr at
    `total_steps`, and that floor after. A LambdaLR, whose state dict a resumed run reloads.

    `layer_decay`: each layer group of a timm model learns at lr × its scale (`layer_decay_groups`), on the same
    schedule."""
    if layer_decay is None:
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = layer_decay_groups(model, lr, weight_decay, layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr)
    total = max(total_steps, 1)
    warmup = min(int(warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def layer_decay_groups(model: torch.nn.Module, lr: float, weight_decay: float, layer_decay: float
                       ) -> list[dict[str, Any]]:
    """timm's layer-wise decay parameter groups (`param_groups_layer_decay`: the layers its `group_matcher` names,
    the head at scale 1, each group below at `layer_decay` times the one above; no weight decay on norms and
    biases), each with its own `lr` = lr × scale."""
    from timm.optim import param_groups_layer_decay

    if not hasattr(model, "group_matcher"):
        raise ConfigError(f"layer_decay needs a timm model that names its layer groups (group_matcher); "
                          f"{type(model).__name__} does not")
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay)
    return [{**group, "lr": lr * group["lr_scale"]} for group in groups]


def git_commit(repo: str | os.PathLike[str] = REPO_ROOT) -> str:
    """The checked-out commit of `repo`, or "unknown" outside a git checkout (e.g. an unpacked release)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """One row per dict; the columns are every key in first-seen order (a row without one leaves it empty)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file, then rename: a run killed mid-write keeps its previous checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
