"""Pick the torch device from the config, and set torch up for a run (threads, reproducible GPU kernels)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
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


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path | None = None) -> float | None:
    """The CPUs the cgroup's quota allows (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us / cpu.cfs_period_us`),
    None when unlimited or unreadable. `docker run --cpus 2` on a 64-core host gives 2.0."""
    root = CGROUP_ROOT if root is None else root
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path | None = None) -> int:
    """CPUs this process may use: its affinity mask (`taskset`, `docker --cpuset-cpus`), capped by the cgroup's
    quota (`docker --cpus`, Kubernetes limits), at least 1. torch and ONNX Runtime default to the host's cores,
    which oversubscribes a container's share: threads wait on each other (a 16-page Track 2 stack measured
    5.7 s with the default next to another job, 0.64 s with one thread)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        count = min(count, int(quota))  # a fractional share rounds down: a thread that cannot run only waits
    return max(1, count)


def cpu_threads(runtime: RuntimeConfig) -> int:
    """`runtime.num_threads`, or with 0 (the default) `usable_cpus()`."""
    return runtime.num_threads if runtime.num_threads > 0 else usable_cpus()


def configure_torch(runtime: RuntimeConfig) -> int:
    """CPU threads (`cpu_threads`: `runtime.num_threads`, 0 = the CPUs this process may use) and, with
    `runtime.deterministic`, GPU kernels
    that give the same result on every run: cuDNN's deterministic algorithms instead of benchmarking (which may
    pick a different algorithm each run) and a fixed cuBLAS workspace (read before the first cuBLAS call). The CPU
    is deterministic either way; on a GPU, `deterministic: false` trades run-to-run identity for cuDNN's
    fastest algorithms on the fixed tile size."""
    threads = cpu_threads(runtime)
    torch.set_num_threads(threads)
    log.info("CPU threads: %d (%s)", threads, "runtime.num_threads" if runtime.num_threads > 0 else
             "the CPUs this process may use: affinity mask and cgroup quota; set runtime.num_threads to change")
    torch.backends.cudnn.deterministic = bool(runtime.deterministic)
    torch.backends.cudnn.benchmark = not runtime.deterministic
    if runtime.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return threads


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
