"""Pick the torch device from the config, and set torch up for a run (threads, reproducible GPU kernels)."""

from __future__ import annotations

import os

import torch

from midog.config import RuntimeConfig


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def configure_torch(runtime: RuntimeConfig) -> None:
    """CPU threads (`runtime.num_threads`, 0 keeps torch's default) and, with `runtime.deterministic`, GPU kernels
    that give the same result on every run: cuDNN's deterministic algorithms instead of benchmarking (which may
    pick a different algorithm each run) and a fixed cuBLAS workspace (read before the first cuBLAS call). The CPU
    is deterministic either way; on a GPU, `deterministic: false` trades run-to-run identity for cuDNN's
    fastest algorithms on the fixed tile size."""
    if runtime.num_threads > 0:
        torch.set_num_threads(runtime.num_threads)
    torch.backends.cudnn.deterministic = bool(runtime.deterministic)
    torch.backends.cudnn.benchmark = not runtime.deterministic
    if runtime.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
