"""training.prepare_fields and training.evaluate_fields on generated fields in the MITOS-ATYPIA-14 layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from midog.config import resolve_config
from midog.errors import ConfigError, InputError
from tests.roi_factory import he_roi, tiny_detector, tiny_verifier
from tests.stain_factory import BLUE, PINK, stained, tissue_concentrations
from tests.training.fake_amibr import write_amibr
from training.evaluate_fields import cross_fold_scores, per_fold_paths, verifier_weights
from training.evaluate_fields import main as evaluate_main
from midog.stain import estimate_stains, image_stains, normalise
from training.fields import load_field_index, open_field, slide_folds
from training.prepare_fields import (FieldDataConfig, far_from, frame_splits, positive_boxes, prepare, tile_labels)
from training.train_verifier import NegativeDraw

CROPS = Path(__file__).resolve().parents[2] / "training" / "configs" / "fields_context.yaml"
"""One crop setting (80 px, 15 px of context): the shipped verifiers use two contexts, which prepare refuses."""

SPACING = (0.2273, 0.2275)
WIDTH, HEIGHT = 700, 600
FIELDS = {  # frame → mitoses (pixels): three slides, fields of unequal counts
    "S1_a.jpg": [(100, 120), (400, 300)],
    "S1_b.jpg": [(650, 550)],
    "S2_a.jpg": [(300, 200)],
    "S2_b.jpg": [(50, 60), (500, 500)],
    "S3_a.jpg": [(350, 300)],
}


@pytest.fixture
def fields_root(tmp_path: Path) -> Path:
    root = tmp_path / "fields"
    (root / "frames").mkdir(parents=True)
    rows = []
    for seed, (name, figures) in enumerate(FIELDS.items()):
        Image.fromarray(he_roi(WIDTH, HEIGHT, seed=seed, figures=figures)).save(root / "frames" / name, quality=95)
        rows += [(name, name.split("_")[0], float(x), float(y)) for x, y in figures]
    pd.DataFrame(rows, columns=["frame", "slide", "x", "y"]).to_csv(root / "mitoses.csv", index=False)
    return root


def test_tile_labels_keep_figures_whose_centre_is_in_the_tile():
    cfg = FieldDataConfig()
    lines = tile_labels(np.array([[10.0, 300.0], [600.0, 300.0], [520.0, 20.0]]), (0, 0), cfg)
    assert lines == ["0 0.034180 0.585938 0.068359 0.097656"]  # clipped at x = 0: centre 17.5 px, 35 px wide
    assert tile_labels(np.array([[512.0, 10.0]]), (0, 0), cfg) == []  # centre on the next tile's first column


def test_far_from_uses_micrometres_on_each_axis():
    mitoses = np.array([[100.0, 100.0]])
    points = np.array([[100.0 + 7.4 / 0.25, 100.0], [100.0, 100.0 + 7.6 / 0.5]])
    assert far_from(points, mitoses, (0.25, 0.5), 7.5).tolist() == [False, True]
    assert far_from(points, np.zeros((0, 2)), (0.25, 0.5), 7.5).tolist() == [True, True]


def test_positive_boxes_are_model_sized_and_jittered():
    cfg = FieldDataConfig(jitter_copies=200, jitter_px=3.0)
    boxes = positive_boxes(np.array([[100.0, 100.0]]), (0.9092, 0.91), cfg, np.random.default_rng(0))
    widths = boxes[:, 2] - boxes[:, 0]
    assert widths == pytest.approx(np.full(200, 50 / 0.9092))  # 50 model px in the field's pixels
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2 * [0.9092, 0.91]  # back in model pixels
    assert np.std(centres - [90.92, 91.0], axis=0) == pytest.approx([3.0, 3.0], rel=0.2)


def test_splits_keep_test_slides_out_of_training(fields_root: Path):
    index = load_field_index(fields_root, SPACING)
    folds = slide_folds(index, 3)
    sets = frame_splits(index, folds, FieldDataConfig(folds=3, val_fraction=0.5))
    for name, splits in sets.items():
        test_slides = {f.split("_")[0] for f in splits["test"]}
        seen = {f.split("_")[0] for f in splits["train"] + splits["val"]}
        assert not test_slides & seen, name
        assert sorted(splits["train"] + splits["val"] + splits["test"]) == sorted(FIELDS)
    assert sets["all"]["test"] == []
    assert len(sets["all"]["val"]) == 2  # half of each two-field slide; a one-field slide stays in train


def test_prepare_writes_the_layouts(fields_root: Path, tmp_path: Path):
    detector = tiny_detector(tmp_path / "w" / "detector.pt", class_bias=5.0)  # proposes boxes everywhere
    out = tmp_path / "out"
    cfg = FieldDataConfig(folds=3, jitter_copies=2, tissue_per_field=3)
    summary = prepare(fields_root, out, str(detector), cfg, progress=False, config_path=CROPS)

    # detection: 700 x 600 px at 0.2273 µm/px is 636 x 546 px at 0.25: 2 x 2 tiles per field
    images = sorted((out / "detection" / "images").glob("*.jpg"))
    assert len(images) == 4 * len(FIELDS)
    assert Image.open(images[0]).size == (512, 512)
    labels = sum(len((out / "detection" / "labels" / f"{p.stem}.txt").read_text().splitlines()) for p in images)
    assert labels >= sum(len(v) for v in FIELDS.values())  # every figure at least once (overlaps twice)
    data = yaml.safe_load((out / "detection" / "fold0.yaml").read_text())
    assert data["pixel_size_um"] == 0.25 and data["names"] == {0: "mitotic figure"}
    test_tiles = (out / "detection" / data["test"]).read_text().split()
    train_tiles = (out / "detection" / data["train"]).read_text().split()
    test_slide = [s for s, k in summary["folds"].items() if k == 0]
    assert all(Path(p).name.split("_")[0] in test_slide for p in test_tiles)
    assert not any(Path(p).name.split("_")[0] in test_slide for p in train_tiles)

    # verifier: crops at the pipeline's size, every class, symlinked per set, test slides left out
    crops = out / "verifier" / "crops"
    positives = sorted(crops.glob("*/mitotic_figure/*.png"))
    assert len(positives) == 2 * sum(len(v) for v in FIELDS.values())
    crop = resolve_config(CROPS, overrides={"proposals.weights": str(detector)}).verifier.crop_size
    assert Image.open(positives[0]).size == (crop, crop)
    assert json.loads((out / "folds.json").read_text())["crops"]["crop_size"] == crop
    assert list(crops.glob("*/false_positive/*.png")) and list(crops.glob("*/tissue/*.png"))
    fold0 = out / "verifier" / "fold0"
    linked = [p for p in fold0.glob("*/*/*.png")]
    assert linked and all(p.is_symlink() and p.resolve().is_file() for p in linked)
    assert not any(p.name.split("_")[0] in test_slide for p in linked)

    candidates = pd.read_csv(out / "candidates.csv")
    assert set(candidates["frame"]) == set(FIELDS) and (candidates["x2"] <= WIDTH + 1e-3).all()
    assert json.loads((out / "folds.json").read_text())["folds"] == summary["folds"]
    with pytest.raises(InputError, match="already holds a prepared dataset"):
        prepare(fields_root, out, str(detector), cfg, progress=False, config_path=CROPS)


def test_prepare_cuts_crops_with_the_configs_size_and_context(fields_root: Path, tmp_path: Path):
    """--config: the verifier crops follow the pipeline YAML's crop_size and context_px, as the chain that runs the
    verifier trained on them will cut its candidates."""
    detector = tiny_detector(tmp_path / "w" / "detector.pt", class_bias=5.0)
    config = tmp_path / "context.yaml"
    config.write_text("verifier:\n  crop_size: 80\n  context_px: 15\n  stain_normalization: none\n")
    out = tmp_path / "out"
    prepare(fields_root, out, str(detector), FieldDataConfig(jitter_copies=1, tissue_per_field=1), progress=False,
            config_path=config)
    crops = sorted((out / "verifier" / "crops").glob("*/*/*.png"))
    assert crops and {Image.open(p).size for p in crops} == {(80, 80)}
    assert json.loads((out / "folds.json").read_text())["crops"] == {"crop_size": 80, "context_px": 15,
                                                                     "stain_normalization": "none"}


def test_prepare_cuts_stain_normalised_crops_as_the_chain_does(fields_root: Path, tmp_path: Path):
    """`verifier.stain_normalization: macenko`: the same crops, each re-expressed with its field's own stains, as the
    chain's `candidate_crops` will cut them."""
    detector = tiny_detector(tmp_path / "w" / "detector.pt", class_bias=5.0)
    cfg = FieldDataConfig(jitter_copies=1, tissue_per_field=2)
    crops = {}
    for method in ("none", "macenko"):
        config = tmp_path / f"{method}.yaml"
        config.write_text(f"verifier:\n  crop_size: 80\n  context_px: 15\n  stain_normalization: {method}\n")
        prepare(fields_root, tmp_path / method, str(detector), cfg, progress=False, config_path=config)
        crops[method] = sorted((tmp_path / method / "verifier" / "crops").glob("*/*/*.png"))
    summary = json.loads((tmp_path / "macenko" / "folds.json").read_text())
    assert summary["crops"]["stain_normalization"] == "macenko"
    assert [p.relative_to(tmp_path / "macenko") for p in crops["macenko"]] == \
        [p.relative_to(tmp_path / "none") for p in crops["none"]]
    index = load_field_index(fields_root)
    for plain, normalised in zip(crops["none"], crops["macenko"]):
        frame = plain.name.rsplit("_", 1)[0] + ".jpg"
        field = open_field(index.frames.set_index("frame").loc[frame, "path"], index.spacing_um)
        np.testing.assert_array_equal(np.asarray(Image.open(normalised)),
                                      normalise(np.asarray(Image.open(plain)), image_stains(field)))


def test_prepare_refuses_one_context_per_member_before_writing(fields_root: Path, tmp_path: Path):
    """A chain config with `verifier.context_px` as a list (an ensemble of contexts) names no one crop set."""
    config = tmp_path / "multiscale.yaml"
    config.write_text("verifier:\n  crop_size: 80\n  context_px: [15, 31]\n")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"prepare_fields \(--config\) cuts one crop set"):
        prepare(fields_root, out, None, FieldDataConfig(), progress=False, config_path=config)
    assert not out.exists()


def test_amibr_positives_join_every_train_split_and_leave_field_crops_alone(fields_root: Path, tmp_path: Path):
    """--amibr-positives: one crop per AMi-Br mitosis, cut at the pipeline's crop size with the figure inside the
    box, linked into every set's train split (never val), and the field crops are the ones a run without them cuts."""
    detector = tiny_detector(tmp_path / "w" / "detector.pt", class_bias=5.0)
    amibr = write_amibr(tmp_path / "amibr", n_slides=2, per_slide=3, size=128)
    cfg = FieldDataConfig(jitter_copies=1, tissue_per_field=2)
    config = tmp_path / "context.yaml"
    config.write_text("verifier:\n  crop_size: 80\n  context_px: 15\n  stain_normalization: none\n")
    plain, extra = tmp_path / "plain", tmp_path / "extra"
    prepare(fields_root, plain, str(detector), cfg, progress=False, config_path=config)
    summary = prepare(fields_root, extra, str(detector), cfg, progress=False, config_path=config,
                      amibr_positives=amibr)
    assert summary["amibr_positives"] == 6
    cut = sorted((extra / "verifier" / "crops" / "amibr" / "mitotic_figure").glob("*.png"))
    assert len(cut) == 6 and {Image.open(p).size for p in cut} == {(80, 80)}
    # the fake figure is a centred disc of radius 32 px: dark (atypical) crops stay dark in the middle
    dark = np.asarray(Image.open(next(p for p in cut if p.stem.endswith("_0"))), dtype=np.float64)
    assert dark[30:50, 30:50].mean() < 120 < np.asarray(Image.open(next(p for p in cut if p.stem.endswith("_1"))),
                                                         dtype=np.float64).mean()
    for name in ("fold0", "fold1", "fold2", "all"):
        train = list((extra / "verifier" / name / "train" / "mitotic_figure").glob("amibr_*.png"))
        assert len(train) == 6 and all(p.resolve().is_file() for p in train)
        assert not list((extra / "verifier" / name / "val").glob("*/amibr_*.png"))
    field_crops = sorted(p.relative_to(plain) for p in (plain / "verifier" / "crops").glob("S*/*/*.png"))
    assert field_crops == sorted(p.relative_to(extra) for p in (extra / "verifier" / "crops").glob("S*/*/*.png"))
    assert all((plain / p).read_bytes() == (extra / p).read_bytes() for p in field_crops)


def test_amibr_positives_are_normalised_with_their_slides_stains(fields_root: Path, tmp_path: Path):
    """`stain_normalization: macenko` with --amibr-positives: each AMi-Br crop is the plain cut normalised with the
    stains estimated from all its slide's crops together, so two slides stained by different labs come out alike."""
    detector = tiny_detector(tmp_path / "w" / "detector.pt", class_bias=5.0)
    amibr = write_amibr(tmp_path / "amibr", n_slides=2, per_slide=3, size=128)
    for slide, lab in enumerate((PINK, BLUE)):
        for i in range(3):
            path = next(amibr.glob(f"*/S{slide}_{i}.png"))
            Image.fromarray(stained(tissue_concentrations(128, 128, seed=i), lab)).save(path)
    cfg = FieldDataConfig(jitter_copies=1, tissue_per_field=1)
    cut = {}
    for method in ("none", "macenko"):
        config = tmp_path / f"{method}.yaml"
        config.write_text(f"verifier:\n  crop_size: 80\n  context_px: 15\n  stain_normalization: {method}\n")
        prepare(fields_root, tmp_path / method, str(detector), cfg, progress=False, config_path=config,
                amibr_positives=amibr)
        folder = tmp_path / method / "verifier" / "crops" / "amibr" / "mitotic_figure"
        cut[method] = {p.stem: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}
    for slide in (0, 1):
        pooled = np.concatenate([np.asarray(Image.open(next(amibr.glob(f"*/S{slide}_{i}.png")))).reshape(-1, 3)
                                 for i in range(3)])
        stains = estimate_stains(pooled)
        for i in range(3):
            np.testing.assert_array_equal(cut["macenko"][f"S{slide}_{i}"], normalise(cut["none"][f"S{slide}_{i}"], stains))

    def labs_apart(crops: dict[str, np.ndarray]) -> float:
        """Mean colour difference of the two slides' crops of one scene (each crop is jittered on its own)."""
        colour = {name: crop.reshape(-1, 3).mean(axis=0) for name, crop in crops.items()}
        return float(np.mean([np.abs(colour[f"S0_{i}"] - colour[f"S1_{i}"]).mean() for i in range(3)]))

    assert labs_apart(cut["macenko"]) < 0.5 * labs_apart(cut["none"]), (labs_apart(cut["macenko"]), labs_apart(cut["none"]))


def test_evaluate_reuses_saved_candidates_with_the_same_result(fields_root: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]):
    """--candidates verifies prepare_fields' saved candidates: the report equals a run of the detector; another
    detector than the one that wrote them, or a file of other fields, is refused in one line."""
    detector = tiny_detector(tmp_path / "w" / "detector.pt", class_bias=5.0)
    verifier = tiny_verifier(tmp_path / "w" / "verifier.pt")
    out = tmp_path / "out"
    prepare(fields_root, out, str(detector), FieldDataConfig(jitter_copies=1, tissue_per_field=1), progress=False,
            config_path=CROPS)
    config = tmp_path / "chain.yaml"
    config.write_text(yaml.safe_dump({"proposals": {"weights": str(detector)}}))
    common = ["--root", str(fields_root), "--verifier", str(verifier), "--config", str(config)]
    assert evaluate_main([*common, "--out", str(tmp_path / "ran.json")]) == 0
    assert evaluate_main([*common, "--out", str(tmp_path / "saved.json"),
                          "--candidates", str(out / "candidates.csv")]) == 0
    ran, saved = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ran", "saved"))
    assert len(pd.read_csv(out / "candidates.csv")) > 0
    assert saved["slides"] == ran["slides"] and saved["summary"] == ran["summary"]
    twice = ["--verifier", f"{verifier},{verifier}"]                # an ensemble of one model twice: the same figures
    assert evaluate_main([*common, *twice, "--out", str(tmp_path / "pair.json"),
                          "--candidates", str(out / "candidates.csv")]) == 0
    assert json.loads((tmp_path / "pair.json").read_text())["summary"] == saved["summary"]

    # the mean of two kept outputs of the same candidates scores as the ensemble of their verifiers
    second = tiny_verifier(tmp_path / "w" / "second.pt", seed=1)
    saved_candidates = ["--candidates", str(out / "candidates.csv")]
    for name, path in (("a", verifier), ("b", second)):
        assert evaluate_main([*common, "--verifier", str(path), *saved_candidates, "--out",
                              str(tmp_path / f"{name}.json"), "--keep-predictions", str(tmp_path / f"{name}.npz")]) == 0
    assert evaluate_main([*common, "--verifier", f"{verifier},{second}", *saved_candidates,
                          "--out", str(tmp_path / "ensemble.json")]) == 0
    assert evaluate_main(["--root", str(fields_root), "--out", str(tmp_path / "mean.json"),
                          "--mean-of", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]) == 0
    ensemble, mean, alone = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ensemble", "mean", "a"))
    assert mean["slides"].keys() == ensemble["slides"].keys()
    for slide, scores in ensemble["slides"].items():
        assert mean["slides"][slide]["AP"] == pytest.approx(scores["AP"], abs=1e-6)
    assert any(ensemble["slides"][s]["AP"] != alone["slides"][s]["AP"] for s in alone["slides"])  # a real mean
    assert evaluate_main(["--root", str(fields_root), "--out", str(tmp_path / "z.json"),
                          "--mean-of", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--floor"]) == 2

    # the final suppression acts on the mean: --mean-of with it in --config scores as the ensemble's chain with it
    radius = tmp_path / "radius.yaml"
    radius.write_text(yaml.safe_dump({"proposals": {"weights": str(detector)}, "merging": {"final_radius_um": 20.0}}))
    assert evaluate_main(["--root", str(fields_root), "--verifier", f"{verifier},{second}", "--config", str(radius),
                          *saved_candidates, "--out", str(tmp_path / "ensemble_r.json"),
                          "--keep-predictions", str(tmp_path / "ensemble_r.npz")]) == 0
    assert evaluate_main(["--root", str(fields_root), "--config", str(radius), "--out", str(tmp_path / "mean_r.json"),
                          "--mean-of", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]) == 0
    ensemble_r, mean_r = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ensemble_r", "mean_r"))
    for slide, scores in ensemble_r["slides"].items():
        assert mean_r["slides"][slide]["AP"] == pytest.approx(scores["AP"], abs=1e-6)
    with np.load(tmp_path / "ensemble_r.npz") as suppressed, np.load(tmp_path / "a.npz") as every:
        assert 0 < len(suppressed["probabilities"]) < len(every["probabilities"])

    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"proposals": {"weights": str(tmp_path / "w" / "elsewhere.pt")}}))
    capsys.readouterr()
    assert evaluate_main(["--root", str(fields_root), "--verifier", str(verifier), "--config", str(other),
                          "--out", str(tmp_path / "x.json"), "--candidates", str(out / "candidates.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "written with the detector" in err and len(err.splitlines()) == 1
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("frame,slide,x1,y1,x2,y2,score\nZ9_a.jpg,Z9,1,1,50,50,0.9\n")
    assert evaluate_main([*common, "--out", str(tmp_path / "y.json"), "--candidates", str(foreign)]) == 2
    assert "not in the fields" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()



def test_kept_outputs_score_each_stage_alone(fields_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """A product-mode run keeps each point's detector confidence and verifier probability (their product is the
    output); --stage verifier of it scores as the chain in verifier mode, --stage detector as the saved candidates'
    scores; one file alone rescores as its own run; a file kept without stages is refused in one line."""
    detector = tiny_detector(tmp_path / "w" / "detector.pt", class_bias=5.0)
    verifier = tiny_verifier(tmp_path / "w" / "verifier.pt")
    out = tmp_path / "out"
    prepare(fields_root, out, str(detector), FieldDataConfig(jitter_copies=1, tissue_per_field=1), progress=False,
            config_path=CROPS)
    report = {}
    for mode in ("product", "verifier"):
        config = tmp_path / f"{mode}.yaml"
        config.write_text(yaml.safe_dump({"proposals": {"weights": str(detector)}, "verifier": {"probability": mode}}))
        assert evaluate_main(["--root", str(fields_root), "--verifier", str(verifier), "--config", str(config),
                              "--candidates", str(out / "candidates.csv"), "--out", str(tmp_path / f"{mode}.json"),
                              "--keep-predictions", str(tmp_path / f"{mode}.npz")]) == 0
        report[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
    with np.load(tmp_path / "product.npz") as kept:
        assert len(kept["probabilities"]) > 0
        np.testing.assert_allclose(kept["probabilities"], kept["detector_confidence"] * kept["verifier_probability"],
                                   rtol=1e-6)
        saved_scores = pd.read_csv(out / "candidates.csv")["score"]
        assert sorted(kept["detector_confidence"]) == pytest.approx(sorted(saved_scores))

    def rescored(stage: str) -> dict:
        assert evaluate_main(["--root", str(fields_root), "--mean-of", str(tmp_path / "product.npz"),
                              "--stage", stage, "--out", str(tmp_path / f"{stage}.json")]) == 0
        return json.loads((tmp_path / f"{stage}.json").read_text())

    alone, verifier_stage, detector_stage = rescored("output"), rescored("verifier"), rescored("detector")
    for slide, scores in report["product"]["slides"].items():
        assert alone["slides"][slide]["AP"] == pytest.approx(scores["AP"], abs=1e-6)
        assert verifier_stage["slides"][slide]["AP"] == pytest.approx(report["verifier"]["slides"][slide]["AP"],
                                                                      abs=1e-6)
    assert detector_stage["stage"] == "detector" and any(
        detector_stage["slides"][s]["AP"] != pytest.approx(v["AP"], abs=1e-6)
        for s, v in verifier_stage["slides"].items())

    with np.load(tmp_path / "product.npz") as kept:  # a file kept before stages were
        np.savez(tmp_path / "old.npz", **{k: kept[k] for k in ("frames", "counts", "points", "probabilities")})
    capsys.readouterr()
    assert evaluate_main(["--root", str(fields_root), "--mean-of", str(tmp_path / "old.npz"), "--stage", "verifier",
                          "--out", str(tmp_path / "old.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "without each stage's probability" in err and len(err.splitlines()) == 1
    assert evaluate_main(["--root", str(fields_root), "--verifier", str(verifier), "--stage", "detector",
                          "--out", str(tmp_path / "no.json")]) == 2
    assert not (tmp_path / "old.json").exists() and not (tmp_path / "no.json").exists()

def test_cross_fold_scores_use_the_other_folds_threshold(fields_root: Path):
    index = load_field_index(fields_root, SPACING)
    folds = {"S1": 0, "S2": 1, "S3": 2}
    truth = index.truth_mm()
    # each frame: its true points at probability 0.9 and one false point at probability p
    false_p = {"S1": 0.3, "S2": 0.95, "S3": 0.5}
    predictions = {}
    for frame, points in truth.items():
        fp = points[:1] + 0.05  # 50 µm away
        p = false_p[frame.split("_")[0]]
        predictions[frame] = (np.vstack([points, fp]), np.r_[np.full(len(points), 0.9), p])
    report = cross_fold_scores(predictions, index, folds)
    own = {k: v["own_optimal_threshold"] for k, v in report["folds"].items()}
    assert own["0"] == pytest.approx(0.9) and own["2"] == pytest.approx(0.9)
    # fold 1's false points outrank its figures: its own optimum differs, and it is scored at fold 0/2's 0.9
    assert report["folds"]["1"]["threshold"] == pytest.approx(np.median([own["0"], own["2"]]))
    assert report["folds"]["1"]["fp"] == 2 and report["folds"]["1"]["tp"] == 3
    assert report["folds"]["0"]["f1"] == pytest.approx(1.0, abs=1e-6)
    assert report["summary"]["mean_f1"] == pytest.approx(np.mean(report["summary"]["fold_f1"]))


def test_per_fold_paths():
    assert per_fold_paths(["a.pt"], 2, "verifier") == {0: "a.pt", 1: "a.pt"}
    assert per_fold_paths(["fold1=b.pt", "fold0=a.pt"], 2, "verifier") == {0: "a.pt", 1: "b.pt"}
    assert per_fold_paths(None, 2, "verifier") == {0: None, 1: None}
    assert verifier_weights("a.pt") == "a.pt" and verifier_weights("a.pt,b.pt") == ["a.pt", "b.pt"]
    with pytest.raises(InputError, match="fold"):
        per_fold_paths(["fold0=a.pt"], 2, "verifier")


def test_evaluate_runs_the_chain_per_fold(fields_root: Path, tmp_path: Path):
    detector = tiny_detector(tmp_path / "w" / "detector.pt", class_bias=5.0)
    verifier = tiny_verifier(tmp_path / "w" / "verifier.pt")
    report_path, card, pipeline = tmp_path / "report.json", tmp_path / "w" / "verifier.json", tmp_path / "p.yaml"
    card.write_text(json.dumps({"architecture": "test_resnet"}))
    code = evaluate_main(["--root", str(fields_root), "--out", str(report_path), "--detector", str(detector),
                          "--verifier", str(verifier), "--name", "tiny", "--card", str(card),
                          "--write-threshold", str(pipeline)])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert set(report["folds"]) == {"0", "1", "2"} and set(report["slides"]) == {"S1", "S2", "S3"}
    assert report["slides"]["S2"]["mitoses"] == 3
    recorded = json.loads(card.read_text())
    assert recorded["architecture"] == "test_resnet"
    assert recorded["real_fields_evaluation"]["summary"] == report["summary"]
    assert "--verifier" in recorded["real_fields_evaluation"]["command"]
    if report["summary"]["ship_threshold"] is not None:
        assert yaml.safe_load(pipeline.read_text()) == {"verifier": {"threshold": report["summary"]["ship_threshold"]}}


def test_negative_draw_sees_every_positive_and_fresh_negatives():
    labels = np.array([1] * 5 + [0] * 100)
    draw = NegativeDraw(labels, negatives=20, seed=0)
    draw.set_epoch(1)
    first = list(draw)
    draw.set_epoch(2)
    second = list(draw)
    assert len(first) == len(draw) == 25
    assert set(range(5)) <= set(first) and set(range(5)) <= set(second)
    assert set(first) - set(range(5)) != set(second) - set(range(5))
    ranks = [list(NegativeDraw(labels, 20, 0, world_size=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 13 and set(ranks[0]) | set(ranks[1]) >= set(range(5))


@pytest.mark.parametrize("module", ["training.fields", "training.prepare_fields", "training.evaluate_fields"])
def test_field_commands_fail_in_one_line(module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """The container's error contract: a root without fields is one `error:` line, exit code 2, nothing written."""
    import importlib

    out = tmp_path / "out"
    argv = {"training.fields": ["--report", str(out)], "training.prepare_fields": ["--out", str(out)],
            "training.evaluate_fields": ["--out", str(out)]}[module]
    assert importlib.import_module(module).main(["--root", str(tmp_path / "missing"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "frames/" in err[0]
    assert not out.exists()
