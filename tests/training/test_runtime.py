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


# The learning rates of the first 20 steps, recorded from each script's own builder before the two were factored
# into `training.runtime.adamw_warmup_cosine` (issue 24): the shared builder must reproduce them.
CLASSIFIER_LRS = [  # TrainConfig(lr=2e-3, epochs=3, warmup_epochs=0.5), 7 steps per epoch: 3 warm-up steps, 21 in all
    0.0005, 0.001, 0.0015, 0.002, 0.001984959675482086, 0.0019402956945780495, 0.0018673651497465944,
    0.0017683839986877882, 0.0016463597335896738, 0.0015049999999999998, 0.0013485999418924122,
    0.0011819116958902611, 0.00101, 0.000838088304109739, 0.0006714000581075881, 0.0005150000000000003,
    0.00037364026641032604, 0.0002516160013122119, 0.00015263485025340568, 7.970430542195077e-05]
VERIFIER_LRS = [  # VerifierTrainConfig(lr=3e-4, min_lr=1e-6, warmup_epochs=1), 5 steps per epoch, 18 steps in all
    4.9999999999999996e-05, 9.999999999999999e-05, 0.00015, 0.00019999999999999998, 0.00025, 0.0003,
    0.00029565580170519477, 0.00028287567583515485, 0.0002624023568515796, 0.00023542567963630775,
    0.00020351343061285904, 0.00016852023369817075, 0.00013247976630182922, 9.748656938714092e-05,
    6.557432036369222e-05, 3.859764314842037e-05, 1.8124324164845135e-05, 5.344198294805224e-06, 1e-06, 1e-06]
VERIFIER_NO_WARMUP_LRS = [  # the same without warm-up, 20 steps in all
    0.0003, 0.00029815940691897306, 0.0002926829491861255, 0.00028370547536616097, 0.0002714480406590546,
    0.00025621246378738883, 0.00023837389521772471, 0.0002183715797110622, 0.0001966980406590546,
    0.0001738869525235145, 0.0001505, 0.00012711304747648546, 0.00010430195934094536, 8.262842028893776e-05,
    6.262610478227528e-05, 4.4787536212611154e-05, 2.9551959340945366e-05, 1.7294524633839018e-05,
    8.317050813874547e-06, 2.84059308102692e-06]


def _tiny_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4, 1))


def _learning_rates(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    steps: int = 20) -> list[float]:
    rates = []
    for _ in range(steps):
        assert len({group["lr"] for group in optimizer.param_groups}) == 1
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def _decay_groups(optimizer: torch.optim.Optimizer) -> list[tuple[float, int]]:
    return [(group["weight_decay"], len(group["params"])) for group in optimizer.param_groups]


def test_classifier_schedule_is_unchanged():
    from training.train_classifier import TrainConfig, make_optimizer

    optimizer, scheduler = make_optimizer(TrainConfig(lr=2e-3, epochs=3, warmup_epochs=0.5), _tiny_net(), 7)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert _decay_groups(optimizer) == [(0.05, 2), (0.0, 4)]  # conv and linear weights; biases and the norm
    assert _learning_rates(optimizer, scheduler) == pytest.approx(CLASSIFIER_LRS, rel=0, abs=1e-9)


def test_verifier_schedule_is_unchanged():
    from training.train_verifier import VerifierTrainConfig, make_optimizer

    cfg = VerifierTrainConfig(lr=3e-4, min_lr=1e-6, warmup_epochs=1.0, weight_decay=1e-5)
    optimizer, scheduler = make_optimizer(cfg, _tiny_net(), 18, 5)
    assert isinstance(optimizer, torch.optim.AdamW) and _decay_groups(optimizer) == [(1e-5, 2), (0.0, 4)]
    assert _learning_rates(optimizer, scheduler) == pytest.approx(VERIFIER_LRS, rel=0, abs=1e-9)
    optimizer, scheduler = make_optimizer(VerifierTrainConfig(lr=3e-4, min_lr=1e-6), _tiny_net(), 20, 5)
    assert _learning_rates(optimizer, scheduler) == pytest.approx(VERIFIER_NO_WARMUP_LRS, rel=0, abs=1e-9)


def test_layer_decay_scales_each_layer_group_on_the_same_schedule():
    """`layer_decay`: the head at lr, each timm layer group below at layer_decay × the one above, every group on
    the classifier's schedule (its lr × the shipped schedule's factors)."""
    import timm

    from training.train_classifier import TrainConfig, make_optimizer

    model = timm.create_model("test_efficientnet", num_classes=1)
    cfg = TrainConfig(lr=2e-3, epochs=3, warmup_epochs=0.5, layer_decay=0.5)
    optimizer, scheduler = make_optimizer(cfg, model, 7)
    scales = sorted({group["lr_scale"] for group in optimizer.param_groups}, reverse=True)
    assert scales[0] == 1.0 and len(scales) >= 3
    assert all(b == pytest.approx(a * 0.5) for a, b in zip(scales, scales[1:]))
    by_name = {name: group["lr_scale"] for group in optimizer.param_groups for name, p in model.named_parameters()
               if any(p is q for q in group["params"])}
    assert by_name["classifier.weight"] == 1.0 and by_name["conv_stem.weight"] == scales[-1]
    assert all(group["weight_decay"] == 0.0 for group in optimizer.param_groups
               if any(p.ndim <= 1 for p in group["params"]))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    for step in range(20):
        for group in optimizer.param_groups:
            assert group["initial_lr"] == pytest.approx(2e-3 * group["lr_scale"])
            assert group["lr"] / group["initial_lr"] == pytest.approx(CLASSIFIER_LRS[step] / 2e-3, rel=1e-6)
        optimizer.step()
        scheduler.step()


def test_layer_decay_is_refused_for_a_model_without_layer_groups_and_out_of_range():
    from midog.errors import ConfigError
    from training.train_classifier import TrainConfig, make_optimizer

    with pytest.raises(ConfigError, match="layer_decay needs a timm model .*Sequential does not"):
        make_optimizer(TrainConfig(layer_decay=0.8), _tiny_net(), 7)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"layer_decay must be in \(0, 1\]"):
            TrainConfig(layer_decay=bad)
