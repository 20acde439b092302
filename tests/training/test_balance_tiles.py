"""training.balance_tiles: every labelled tile kept, a seeded sample of the empty ones, the dataset's other keys
unchanged, and a clear error for what it cannot read."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from training.balance_tiles import balance_dataset, label_files, main


def make_layout(root: Path, labelled: dict[str, int], empty: dict[str, int]) -> Path:
    """A prepare_fields-style layout: images/, labels/ (blank or missing for empty tiles), split lists, YAML."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for split in ("train", "val"):
        lines = []
        for i in range(labelled[split] + empty[split]):
            image = root / "images" / f"{split}_{i:03d}.jpg"
            image.write_bytes(b"jpeg")
            if i < labelled[split]:
                (root / "labels" / f"{split}_{i:03d}.txt").write_text("0 0.5 0.5 0.1 0.1\n")
            elif i % 2:
                (root / "labels" / f"{split}_{i:03d}.txt").write_text("")  # blank = empty, as a missing file
            lines.append(f"{image}\n")
        (root / f"set_{split}.txt").write_text("".join(lines))
    data = root / "set.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "set_train.txt", "val": "set_val.txt",
                                    "names": {0: "mitotic figure"}, "pixel_size_um": 0.25, "test": "set_test.txt"},
                                   sort_keys=False))
    return data


def listed(path: str) -> list[Path]:
    return [Path(line) for line in Path(path).read_text().splitlines()]


def is_labelled(image: Path, labelled: int) -> bool:
    """make_layout labels the first `labelled` tiles of a split: {split}_{index}.jpg."""
    return int(image.stem.split("_")[1]) < labelled


def test_keeps_every_labelled_tile_and_the_asked_share_of_empty_ones(tmp_path: Path):
    data = make_layout(tmp_path / "det", {"train": 10, "val": 4}, {"train": 50, "val": 30})
    out, counts = balance_dataset(data, empty_per_labelled=2.0, seed=3)
    assert out == data.with_name("set_balanced.yaml") and counts == {"train": 30, "val": 12}
    balanced = yaml.safe_load(out.read_text())
    original = yaml.safe_load(data.read_text())
    assert {k: v for k, v in balanced.items() if k not in ("train", "val")} == \
        {k: v for k, v in original.items() if k not in ("train", "val")}
    for split, n_labelled in (("train", 10), ("val", 4)):
        images = listed(balanced[split])
        full = listed(str(data.parent / original[split]))
        assert sum(is_labelled(p, n_labelled) for p in images) == n_labelled
        assert len(set(images)) == len(images) and set(images) <= set(full)
        assert images == [p for p in full if p in set(images)]  # the list's order is kept
    first = listed(balanced["train"])  # the files are rewritten in place below
    again, _ = balance_dataset(data, empty_per_labelled=2.0, seed=3)
    assert listed(yaml.safe_load(again.read_text())["train"]) == first
    other, _ = balance_dataset(data, empty_per_labelled=2.0, seed=4)
    assert listed(yaml.safe_load(other.read_text())["train"]) != first


def test_fewer_empty_tiles_than_asked_keeps_them_all(tmp_path: Path):
    data = make_layout(tmp_path / "det", {"train": 5, "val": 1}, {"train": 3, "val": 0})
    _, counts = balance_dataset(data, empty_per_labelled=1.0)
    assert counts == {"train": 8, "val": 1}
    _, counts = balance_dataset(data, empty_per_labelled=0.0)
    assert counts == {"train": 5, "val": 1}


def test_label_path_follows_ultralytics():
    assert label_files([Path("/d/images/train/images/a.jpg"), Path("/d/detection/images/x.png")]) == [
        Path("/d/images/train/labels/a.txt"), Path("/d/detection/labels/x.txt")]


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main([str(tmp_path / "missing.yaml")]) != 0
    assert capsys.readouterr().err.strip().count("\n") == 0
    data = make_layout(tmp_path / "det", {"train": 1, "val": 1}, {"train": 1, "val": 1})
    (data.parent / "set_val.txt").unlink()
    assert main([str(data)]) != 0
    err = capsys.readouterr().err.strip()
    assert "image list not found" in err and "\n" not in err
    assert not list(data.parent.glob("*_balanced*"))  # nothing written, not even the train list
    assert main([str(data), "--empty-per-labelled", "-1"]) != 0
    assert ">= 0" in capsys.readouterr().err
