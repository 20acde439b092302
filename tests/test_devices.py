import os

import pytest
import torch

from midog.config import load_config
from midog.errors import ConfigError
from midog.devices import configure_torch, resolve_device


@pytest.fixture
def torch_state():
    """Restore what configure_torch changes, so other tests see torch as they found it."""
    saved = (torch.get_num_threads(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.set_num_threads(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]
    if saved[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[3]


def test_deterministic_runs_use_deterministic_gpu_kernels(torch_state, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    configure_torch(load_config().runtime)  # the default
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_fast_gpu_kernels_when_asked(torch_state, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    configure_torch(load_config(overrides={"runtime.deterministic": False, "runtime.num_threads": 1}).runtime)
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert torch.get_num_threads() == 1


def test_auto_device_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_an_explicit_device_that_is_not_there_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="runtime.device is 'cuda:1'.*0 CUDA device"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match="expected auto, cpu"):
        resolve_device("gpu")


def test_an_explicit_cuda_device_is_taken_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_cgroup_quota_v2_v1_and_unlimited(tmp_path):
    from midog.devices import cgroup_cpu_quota

    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path) is None
    assert cgroup_cpu_quota(tmp_path / "absent") is None


def test_default_threads_follow_the_quota_and_the_affinity(tmp_path, monkeypatch, torch_state, caplog):
    import logging

    import midog.devices as devices

    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # docker --cpus 2.5 on an 8-CPU affinity mask
    monkeypatch.setattr(devices, "CGROUP_ROOT", tmp_path)
    assert devices.usable_cpus() == 2
    with caplog.at_level(logging.INFO, logger="midog.devices"):
        assert devices.configure_torch(load_config().runtime) == 2
    assert torch.get_num_threads() == 2
    assert any("CPU threads: 2" in r.getMessage() for r in caplog.records)
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one thread
    assert devices.usable_cpus() == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert devices.usable_cpus() == 8
    assert devices.configure_torch(load_config(overrides={"runtime.num_threads": 3}).runtime) == 3

