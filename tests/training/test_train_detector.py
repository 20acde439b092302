"""Detector training: settings, model names, random erasing, DDP worker rebuild, a tiny real training run, and
what concurrent runs share (a run folder, ultralytics' settings)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import yaml
from ultralytics import YOLO
from ultralytics.utils.instance import Instances

from midog.errors import ConfigError, InputError
from midog.weights import sha256_of
from midog.yolo_modules import C3k2_LSConv, model_yaml
from training.detector_trainer import DetectionErasing, MidogDetectionTrainer
from training.train_detector import (
    RUN_LOCKS,
    claimed_run_name,
    load_detector_config,
    main,
    resolve_model,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
N_PARAMS = 2_471_981  # yolo11n-lsconv-ema, nc=1 (tests/test_yolo_modules.py)


def make_yolo_dataset(root: Path, n_train: int = 3, n_val: int = 2, size: int = 96) -> Path:
    """Pinkish tissue-like noise with one dark purple disc per image, labelled with a 24 px box."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(count):
            img = np.full((size, size, 3), (200, 170, 210), np.uint8) + rng.integers(0, 20, (size, size, 3), np.uint8)
            cx, cy = (int(v) for v in rng.integers(20, size - 20, 2))
            cv2.circle(img, (cx, cy), 7, (60, 20, 80), -1)
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), img)
            (root / "labels" / split / f"{i}.txt").write_text(f"0 {cx / size} {cy / size} {24 / size} {24 / size}\n")
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                    "names": {0: "mitotic figure"}}))
    return data


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_yolo_dataset(tmp_path / "data")


def test_config_holds_the_methods_settings():
    cfg = load_detector_config()
    t = cfg.train
    assert cfg.model == "yolo11x-lsconv-ema"
    assert (t["optimizer"], t["lr0"], t["lr0"] * t["lrf"], t["cos_lr"], t["weight_decay"]) == (
        "AdamW", 1e-3, pytest.approx(1e-5), True, 5e-4)
    assert (t["epochs"], t["imgsz"], t["degrees"], t["fliplr"], t["flipud"]) == (300, 512, 180, 0.5, 0.5)
    assert (t["mixup"], t["close_mosaic"], t["pretrained"], t["plots"]) == (0.3, 20, False, False)
    assert t["erasing"] > 0


def test_model_names_resolve_to_the_scaled_yaml():
    assert resolve_model("yolo11x-lsconv-ema") == str(model_yaml("x"))
    assert resolve_model("yolo11n-lsconv-ema.yaml") == str(model_yaml("n"))
    assert resolve_model("yolo11n.yaml") == "yolo11n.yaml"  # ultralytics' own models pass through
    with pytest.raises(ConfigError, match="unknown model"):
        resolve_model("yolo11q-lsconv-ema")


def test_missing_dataset_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["--data", str(tmp_path / "nope.yaml")]) == InputError.exit_code
    assert capsys.readouterr().err == f"error: dataset YAML not found: {tmp_path / 'nope.yaml'}\n"


def _labels(img: np.ndarray, boxes_xyxy: list[list[float]]) -> dict:
    boxes = np.array(boxes_xyxy, dtype=np.float32)
    return {"img": img, "cls": np.zeros((len(boxes), 1), np.float32),
            "instances": Instances(boxes, np.zeros((len(boxes), 0, 2), np.float32), None, "xyxy", normalized=False)}


def test_erasing_everything_drops_every_box():
    img = np.zeros((64, 64, 3), np.uint8)
    labels = DetectionErasing(p=1.0, area=(1.0, 1.0), aspect=(1.0, 1.0))(_labels(img, [[4, 4, 20, 20], [30, 30, 60, 50]]))
    assert len(labels["instances"]) == 0 and labels["cls"].shape == (0, 1)
    assert labels["img"].any() and not img.any()  # noise painted on a copy, the source image is untouched


def test_erasing_keeps_boxes_that_stay_visible():
    random.seed(3)
    np.random.seed(3)
    boxes = [[x, y, x + 12, y + 12] for x in range(0, 60, 10) for y in range(0, 60, 10)]
    img = np.zeros((72, 72, 3), np.uint8)
    out = DetectionErasing(p=1.0, area=(0.1, 0.1), aspect=(1.0, 1.0), min_visible=0.4)(_labels(img, boxes))
    ys, xs = np.nonzero(out["img"].any(axis=2))
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    assert (x1 - x0) * (y1 - y0) == pytest.approx(0.1 * 72 * 72, rel=0.1)
    visible = [1 - max(0, min(b[2], x1) - max(b[0], x0)) * max(0, min(b[3], y1) - max(b[1], y0)) / 144 for b in boxes]
    expected = [b for b, v in zip(boxes, visible) if v >= 0.4]
    assert 0 < len(expected) < len(boxes)
    np.testing.assert_allclose(out["instances"].bboxes, np.array(expected, np.float32))
    assert len(out["cls"]) == len(expected)


def test_trainer_adds_erasing_and_ddp_workers_can_rebuild_it(tmp_path: Path, dataset: Path):
    """What ultralytics' DDP launcher does: pickle the trainer class, args and model, rebuild them in a new process."""
    from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file

    trainer = MidogDetectionTrainer(overrides={
        "model": str(model_yaml("n")), "data": str(dataset), "device": "cpu", "imgsz": 64, "epochs": 1,
        "workers": 0, "plots": False, "pretrained": False, "erasing": 0.4, "project": str(tmp_path / "runs"),
        "name": "ddp"})
    trainer.model = trainer.get_model(cfg=str(model_yaml("n")), verbose=False)
    train_set = trainer.build_dataset(str(dataset.parent / "images" / "train"), mode="train", batch=2)
    steps = train_set.transforms.transforms
    assert isinstance(steps[-2], DetectionErasing) and type(steps[-1]).__name__ == "Format"  # erase, then format
    assert steps[-2].p == 0.4
    sample = train_set[0]
    assert tuple(sample["img"].shape) == (3, 64, 64) and sample["bboxes"].shape[1] == 4
    val_set = trainer.build_dataset(str(dataset.parent / "images" / "val"), mode="val", batch=2)
    assert not any(isinstance(t, DetectionErasing) for t in val_set.transforms.transforms)
    trainer.train_loader = SimpleNamespace(dataset=train_set)
    trainer._close_dataloader_mosaic()
    assert any(isinstance(t, DetectionErasing) for t in train_set.transforms.transforms)

    script = generate_ddp_file(trainer)
    try:
        worker = textwrap.dedent(f"""
            from ultralytics.nn import tasks
            from ultralytics.utils import DEFAULT_CFG_DICT
            from ultralytics.utils.patches import torch_load
            state = torch_load({str(Path(script).with_suffix('.pt'))!r}, map_location="cpu")
            cfg = DEFAULT_CFG_DICT.copy()
            cfg.update(save_dir="")
            trainer = state["trainer"](cfg=cfg, overrides=state["args"], _callbacks=state["callbacks"])
            rebuilt = trainer.get_model(cfg={str(model_yaml('n'))!r}, verbose=False)
            print(type(trainer).__module__, type(state["model"].model[16]).__name__,
                  type(rebuilt.model[16]).__name__, hasattr(tasks.parse_model, "midog_original"))
        """)
        result = subprocess.run([sys.executable, "-c", worker], cwd=REPO_ROOT, capture_output=True, text=True,
                                env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=300)
    finally:
        ddp_cleanup(trainer, script)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-4:] == ["training.detector_trainer", "C3k2_LSConv", "C3k2_LSConv", "True"]


def test_tiny_training_run_ships_loadable_weights(tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch):
    import socket

    import ultralytics.utils.checks as checks

    monkeypatch.setattr(checks, "USER_CONFIG_DIR", tmp_path / "fresh-config")  # no font cached from an earlier run
    lookups: list[str] = []

    def no_network(host, *args, **kwargs):
        lookups.append(str(host))
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    out = tmp_path / "shipped" / "detector.pt"
    code = main(["--data", str(dataset), "--model", "yolo11n-lsconv-ema", "--epochs", "1", "--batch", "2",
                 "--imgsz", "64", "--device", "cpu", "--workers", "0", "--threads", "1",
                 "--project", str(tmp_path / "runs"), "--name", "tiny", "--out", str(out)])
    assert code == 0
    assert lookups == []  # ultralytics' font download (for plots) never tried
    weights = tmp_path / "runs" / "tiny" / "weights"
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["sha256"] == sha256_of(out)
    shipped = torch.load(out, map_location="cpu", weights_only=False)
    best = torch.load(weights / "best.pt", map_location="cpu", weights_only=False)
    assert shipped.pop("pixel_size_um") == card["pixel_size_um"] == 0.25  # best.pt plus its training pixel size
    assert shipped.keys() == best.keys()
    best_state = best["model"].state_dict()
    assert all(torch.equal(value, best_state[key]) for key, value in shipped["model"].state_dict().items())
    assert card["architecture"] == "yolo11n-lsconv-ema" and card["parameters"] == N_PARAMS
    assert card["training"]["optimizer"] == "AdamW" and card["training"]["epochs"] == 1
    assert card["classes"] == {"0": "mitotic figure"} and card["input_size"] == 64
    assert "initialised_from" not in card  # built from a YAML: trained from scratch
    assert "metrics/mAP50(B)" in card["validation_metrics"]
    image = cv2.imread(str(dataset.parent / "images" / "val" / "0.png"))
    for path in (out, weights / "last.pt"):
        model = YOLO(str(path), task="detect")
        assert isinstance(model.model.model[16], C3k2_LSConv)
        results = model.predict(image, imgsz=64, conf=0.0, device="cpu", verbose=False)
        assert len(results) == 1 and results[0].orig_shape == (96, 96)
        assert torch.is_tensor(results[0].boxes.xyxy)


def test_amp_is_checked_offline_while_the_trainer_sets_up():
    import ultralytics.engine.trainer as engine_trainer

    from training.detector_trainer import offline_check_amp, offline_checks

    original = engine_trainer.check_amp
    with offline_checks():
        assert engine_trainer.check_amp is offline_check_amp  # ultralytics' own downloads yolo26n.pt on CUDA
    assert engine_trainer.check_amp is original
    assert offline_check_amp(torch.nn.Linear(2, 2)) is False  # on the CPU, as ultralytics' (AMP is for GPUs)


def test_an_interrupted_run_resumes_with_its_own_settings(tmp_path: Path, dataset: Path):
    from midog.yolo_modules import register_custom_modules

    register_custom_modules()
    model = YOLO(str(model_yaml("n")), task="detect")

    def interrupt(trainer):  # after the first epoch's last.pt (with optimizer state) is written
        raise KeyboardInterrupt

    model.add_callback("on_model_save", interrupt)
    with pytest.raises(KeyboardInterrupt):
        model.train(trainer=MidogDetectionTrainer, data=str(dataset), epochs=2, imgsz=64, batch=2, device="cpu",
                    workers=0, plots=False, pretrained=False, project=str(tmp_path / "runs"), name="cut")
    last = tmp_path / "runs" / "cut" / "weights" / "last.pt"
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 0
    out = tmp_path / "resumed.pt"
    assert main(["--data", str(dataset), "--resume", str(last), "--device", "cpu", "--workers", "0",
                 "--out", str(out)]) == 0
    finished = torch.load(last, map_location="cpu", weights_only=False)
    assert finished["epoch"] == -1 and finished["optimizer"] is None  # a completed, stripped checkpoint
    assert finished["train_args"]["imgsz"] == 64 and finished["train_args"]["batch"] == 2  # not the config's 512/16
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["architecture"] == "yolo11n-lsconv-ema" and card["input_size"] == 64
    assert card["training"]["epochs"] == 2 and card["training"]["imgsz"] == 64


# ---- concurrent runs share nothing --------------------------------------------------------------------------------

def test_trainings_at_once_never_share_a_run_folder(tmp_path: Path):
    """ultralytics picks `name`, `name-2`, ... by looking for a folder that does not exist yet and creates it later:
    two trainings started at once with the config's project and name both chose `train`."""
    project = tmp_path / "runs"
    train = {"project": str(project), "name": "tiny", "epochs": 1}
    (project / "tiny").mkdir(parents=True)  # an earlier run's folder is never reused
    with claimed_run_name(train) as first, claimed_run_name(train) as second:
        assert (first["name"], second["name"]) == ("tiny-2", "tiny-3")
        assert first["exist_ok"] is second["exist_ok"] is True and first["epochs"] == 1
        assert (project / "tiny-2").is_dir() and (project / "tiny-3").is_dir()
        # ultralytics' multi-GPU launcher deletes the folder and its workers make it again: the name stays taken
        (project / "tiny-2").rmdir()
        with claimed_run_name(train) as third:
            assert third["name"] == "tiny-4"
    assert sorted(p.name for p in project.iterdir()) == [RUN_LOCKS, "tiny", "tiny-3", "tiny-4"]
    with claimed_run_name(train) as again:  # a finished claim frees its name (here its folder is gone)
        assert again["name"] == "tiny-2"
    with claimed_run_name({**train, "exist_ok": True}) as reuse, claimed_run_name({**train, "resume": "x"}) as resume:
        assert reuse["name"] == resume["name"] == "tiny"  # asked for, or a resumed run's own folder: unchanged


def test_a_run_name_is_held_by_its_process_until_it_ends(tmp_path: Path):
    """The lock belongs to the training process: another process skips the name while it runs, then may take it."""
    project = tmp_path / "runs"
    script = textwrap.dedent(f"""
        import sys
        from training.train_detector import claimed_run_name
        with claimed_run_name({{"project": {str(project)!r}, "name": "train"}}) as train:
            print(train["name"], flush=True)
            sys.stdin.read()  # hold the name until the test closes stdin
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().split() == ["train"]
        (project / "train").rmdir()  # as the multi-GPU launcher does
        with claimed_run_name({"project": str(project), "name": "train"}) as other:
            assert other["name"] == "train-2"
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    with claimed_run_name({"project": str(project), "name": "train"}) as later:
        assert later["name"] == "train"


SETTINGS_PROBE = textwrap.dedent("""
    import json, os, sys
    import midog
    from ultralytics.utils import LOGGER, SETTINGS, USER_CONFIG_DIR
    LOGGER.info("ultralytics still speaks")
    print(json.dumps({"config_dir": os.environ["YOLO_CONFIG_DIR"], "user_config_dir": str(USER_CONFIG_DIR),
                      "runs_dir": SETTINGS["runs_dir"], "sync": SETTINGS["sync"]}))
""")


def test_each_process_has_its_own_ultralytics_settings(tmp_path: Path):
    """The settings folder was one per user (`<temp>/midog-yolo-<uid>`): every run read and rewrote one settings.json
    (non-atomically), and took its runs/weights/datasets folders from whichever checkout wrote it first."""
    temp = tmp_path / "tmp"
    uid = os.getuid()
    stale = temp / f"midog-yolo-{uid}" / "Ultralytics" / "settings.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"settings_version": "0.0.8", "runs_dir": "/another/checkout/runs", "sync": True}))
    orphan = temp / f"midog-yolo-{uid}-{2 ** 22 + 7}-abc"  # a killed process's folder (no such process id)
    (orphan / "Ultralytics").mkdir(parents=True)
    env = {key: value for key, value in os.environ.items() if key != "YOLO_CONFIG_DIR"}
    env.update(TMPDIR=str(temp), PYTHONPATH=str(REPO_ROOT))
    probes = [subprocess.Popen([sys.executable, "-c", SETTINGS_PROBE], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]  # two at once
    results = []
    for probe in probes:
        out, err = probe.communicate(timeout=300)
        assert probe.returncode == 0, err[-2000:]
        lines = out.strip().splitlines()
        assert lines[0] == "ultralytics still speaks" and len(lines) == 2, out  # no "Creating new ... Settings" note
        results.append(json.loads(lines[-1]))
    folders = [Path(r["config_dir"]) for r in results]
    assert folders[0] != folders[1] and all(f.parent == temp and f.name.startswith(f"midog-yolo-{uid}-")
                                            for f in folders)
    assert [Path(r["user_config_dir"]) for r in results] == [f / "Ultralytics" for f in folders]
    assert all(r["runs_dir"] != "/another/checkout/runs" for r in results)  # ultralytics' defaults, not the stale file
    assert not any(f.exists() for f in folders)  # removed when its process exits
    assert not orphan.exists() and stale.is_file()  # a dead process's folder is cleared; the old shared one untouched


def test_a_checkpoint_given_as_model_is_fine_tuned_not_rebuilt(tmp_path: Path, dataset: Path):
    """`--model X.pt` starts from X's weights (the config's `pretrained: false` would have ultralytics rebuild the
    architecture untrained): with a learning rate of 0, the run's weights are the checkpoint's."""
    start = tmp_path / "start.pt"
    from ultralytics.nn.tasks import DetectionModel

    torch.save({"model": DetectionModel("yolo11n.yaml", nc=1, verbose=False), "train_args": {}}, start)
    out = tmp_path / "tuned.pt"
    code = main(["--data", str(dataset), "--model", str(start), "--epochs", "1", "--batch", "2", "--imgsz", "64",
                 "--device", "cpu", "--workers", "0", "--threads", "1", "--project", str(tmp_path / "runs"),
                 "--name", "tune", "--set", "lr0=0", "--set", "warmup_epochs=0", "--set", "weight_decay=0",
                 "--out", str(out)])
    assert code == 0
    before = dict(torch.load(start, map_location="cpu", weights_only=False)["model"].named_parameters())
    after = dict(torch.load(out, map_location="cpu", weights_only=False)["model"].named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.allclose(after[k].float(), before[k].float(), rtol=1e-3, atol=1e-3) for k in before)
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["training"]["pretrained"] is True
    assert card["initialised_from"] == {"file": "start.pt", "sha256": sha256_of(start)}


def test_pretrained_follows_the_model_and_an_explicit_setting(tmp_path: Path, dataset: Path):
    from training.train_detector import parse_args, train_arguments

    start = tmp_path / "start.pt"
    start.write_bytes(b"")
    cfg = load_detector_config()
    assert cfg.train["pretrained"] is False

    def pretrained(model: str, *extra: str) -> object:
        args = parse_args(["--data", str(dataset), "--model", model, *extra])
        cfg.model = model
        return train_arguments(cfg, args)["pretrained"]

    assert pretrained(str(start)) is True
    assert pretrained(str(start), "--set", "pretrained=false") is False
    assert pretrained("yolo11n-lsconv-ema") is False
