import csv
import random
import re
import subprocess

import numpy as np
import pytest
import torch

from training.runtime import REPO_ROOT, Dist, git_commit, init_distributed, save_atomic, seed_everything, write_csv


def test_seed_everything_repeats_every_generator():
    draws = []
    for _ in range(2):
        seed_everything(7)
        draws.append((np.random.rand(), torch.rand(1).item(), random.random()))
    assert draws[0] == draws[1]
    seed_everything(8)
    assert np.random.rand() != draws[0][0]


def test_init_distributed_without_torchrun_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.main) == (0, 1, True)
    assert ctx.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not Dist(rank=1, world_size=2).main


def test_git_commit_of_a_checkout_and_of_a_plain_folder(tmp_path):
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", git_commit()) and git_commit() == head
    assert git_commit(tmp_path) == "unknown"


def test_write_csv_takes_the_union_of_keys_in_first_seen_order(tmp_path):
    path = tmp_path / "metrics.csv"
    write_csv(path, [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4, "auc": 0.8}])
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["epoch", "loss", "auc"], ["1", "0.5", ""], ["2", "0.4", "0.8"]]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_save_atomic_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"step": 1}, path)
    save_atomic({"step": 2, "weights": torch.ones(3)}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 2 and torch.equal(loaded["weights"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def _two_ranks(rank: int, port: int, results: "torch.multiprocessing.SimpleQueue") -> None:
    import torch.distributed as dist

    from training.runtime import rank0_array, same_model_on_every_rank

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ctx = Dist(rank=rank, world_size=2)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        model.train()
        model(torch.randn(2, 3, 8, 8) + rank)  # each rank's running statistics drift its own way, as after an epoch
        same_model_on_every_rank(model, ctx)
        probabilities = rank0_array(np.full(5, 0.1 + rank, np.float32), ctx)
        results.put((rank, model[1].running_mean.tolist(), int(model[1].num_batches_tracked), probabilities.tolist()))
    finally:
        dist.destroy_process_group()


def test_every_rank_validates_rank_0s_model_and_decides_on_its_numbers():
    """Early stopping is decided per rank from validation numbers: if they differ, one rank stops and waits at a
    barrier while another trains on (the hang a 2-process run showed before). Both ranks must see rank 0's."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_two_ranks, args=(port, results), nprocs=2, start_method="spawn", join=True)
    (_, mean0, count0, probs0), (_, mean1, count1, probs1) = sorted(results.get() for _ in range(2))
    assert mean0 == mean1 and count0 == count1 == 1
    assert probs0 == probs1 == pytest.approx([0.1] * 5)
