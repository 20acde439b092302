"""Pick the torch device from the config, and set torch up for a run (threads, reproducible GPU kernels)."""

from __future__ import annotations

import logging
import os
from typing import Callable, TypeVar

import torch

from midog.config import RuntimeConfig
from midog.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")


def resolve_device(name: str = "auto", setting: str = "config runtime.device") -> torch.device:
    """`auto` is CUDA when available, else the CPU; a device that is not there is a ConfigError naming `setting`
    (where the value came from), not a crash later."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{setting} is {name!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"{setting} is {name!r}, but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s); use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{setting} is {name!r}, but MPS is not available here; use auto or cpu")
    return device


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


def batches_halving_on_oom(count: int, batch_size: int, run: Callable[[int, int], T], device: torch.device,
                           what: str) -> tuple[list[T], int]:
    """`run(start, stop)` over [0, count) in batches of `batch_size`: (the results in order, the batch size the
    last batch ran with). Out of GPU memory, the batch is halved and the same items tried again; only a batch of
    one that does not fit is an error. Callers keep the returned size so later calls start from it."""
    results: list[T] = []
    start = 0
    while start < count:
        stop = min(start + batch_size, count)
        try:
            results.append(run(start, stop))
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            if device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("out of GPU memory: %s batch size lowered to %d", what, batch_size)
            continue
        start = stop
    return results, batch_size
