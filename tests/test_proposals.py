from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from roi_factory import he_roi, tiny_detector

from midog.config import ProposalConfig, TilingConfig
from midog.errors import WeightsError
from midog.proposals import YoloProposer, load_detector
from midog.roi_io import ArrayRoi, PhysicalTransform
from midog.tiling import tile_origins

SPACING = PhysicalTransform((0.00025, 0.00025))


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_detector(tmp_path_factory.mktemp("w") / "detector.pt", class_bias=5.0)


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def proposer(detector: Path, request: pytest.FixtureRequest) -> YoloProposer:
    proposer = YoloProposer.from_weights(detector, torch.device("cpu"), ProposalConfig(batch_size=4,
                                                                                      backend=request.param))
    assert proposer.backend == request.param
    return proposer


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    return np.stack([he_roi(512, 512, seed=s) for s in range(3)])


def test_same_boxes_as_ultralytics_predict(detector: Path, proposer: YoloProposer, tiles: np.ndarray):
    from ultralytics import YOLO

    yolo = YOLO(str(detector), task="detect")
    ours = proposer.predict(tiles)
    assert sum(len(scores) for _, scores, _ in ours) > 0
    for tile, (boxes, scores, classes) in zip(tiles, ours):
        # ultralytics' numpy path wants BGR: this is the flip our tensor path never needs
        result = yolo.predict(tile[..., ::-1], imgsz=512, conf=0.2, iou=0.3, verbose=False, device="cpu")[0]
        assert len(result.boxes) == len(boxes)
        np.testing.assert_allclose(result.boxes.xyxy.numpy(), boxes, atol=0.05)
        np.testing.assert_allclose(result.boxes.conf.numpy(), scores, atol=1e-4)
        assert ((boxes >= 0) & (boxes <= 512)).all()
        assert boxes.dtype == np.float32 and classes.dtype == np.int64


def test_backend_channels_last_and_batch_size_do_not_change_results(detector: Path, proposer: YoloProposer,
                                                                   tiles: np.ndarray):
    plain = YoloProposer.from_weights(detector, torch.device("cpu"),
                                      ProposalConfig(batch_size=1, channels_last=False, backend="torch"))
    for (a, sa, _), (b, sb, _) in zip(proposer.predict(tiles), plain.predict(tiles)):
        np.testing.assert_allclose(a, b, atol=0.05)
        np.testing.assert_allclose(sa, sb, atol=1e-4)


def test_background_tiles_are_skipped(proposer: YoloProposer):
    pixels = he_roi(1500, 1000, seed=2, background=0.45)
    origins = tile_origins(1500, 1000, 512, 0.2)
    results, stats = proposer.propose(ArrayRoi(pixels, SPACING), origins, TilingConfig(), progress=False)
    assert stats.tiles_total == len(origins) == 12
    # glass from x = 825 on: the columns at x 820 (5 px of tissue, under 2 %) and 988 are skipped
    assert stats.tiles_run == len(results) == 6
    assert {r.origin for r in results} == {o for o in origins if o[0] < 820}


def test_an_image_smaller_than_a_tile_is_judged_on_its_own_pixels(proposer: YoloProposer):
    pixels = he_roi(60, 60, seed=4)           # all tissue, but under 2 % of a white-padded 512 px tile
    results, stats = proposer.propose(ArrayRoi(pixels, SPACING), tile_origins(60, 60, 512, 0.2), TilingConfig(),
                                      progress=False)
    assert stats.tiles_run == len(results) == 1


def test_a_slow_nms_never_drops_tiles(detector: Path, tiles: np.ndarray, monkeypatch: pytest.MonkeyPatch):
    from ultralytics.utils import nms

    proposer = YoloProposer.from_weights(detector, torch.device("cpu"), ProposalConfig(batch_size=8))
    expected = proposer.predict(tiles)
    assert all(len(boxes) for boxes, _, _ in expected)

    class SlowClock:                          # every look at the clock finds 10 s more gone: a very busy CPU
        now = 0.0

        def time(self) -> float:
            self.now += 10.0
            return self.now

    monkeypatch.setattr(nms, "time", SlowClock())
    for (got, _, _), (want, _, _) in zip(proposer.predict(tiles), expected):
        np.testing.assert_array_equal(got, want)


def test_out_of_memory_halves_the_batch_and_goes_on(detector: Path, tiles: np.ndarray,
                                                    monkeypatch: pytest.MonkeyPatch):
    proposer = YoloProposer.from_weights(detector, torch.device("cpu"), ProposalConfig(batch_size=8))
    expected = proposer.predict(tiles)
    original = proposer._predict_chunk

    def small_memory(chunk: np.ndarray):
        if len(chunk) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(chunk)

    monkeypatch.setattr(proposer, "_predict_chunk", small_memory)
    got = proposer.predict(tiles)
    assert proposer.batch_size == 1
    for (a, _, _), (b, _, _) in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=0.05)


def test_reader_errors_reach_the_caller(proposer: YoloProposer):
    class Broken(ArrayRoi):
        def _read_inside(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
            raise OSError("disk gone")

    roi = Broken(np.zeros((600, 600, 3), np.uint8), SPACING)
    with pytest.raises(OSError, match="disk gone"):
        proposer.propose(roi, tile_origins(600, 600, 512, 0.2), TilingConfig(), progress=False)


def test_tiles_must_fit_the_model_stride(proposer: YoloProposer):
    with pytest.raises(ValueError, match="stride"):
        proposer.predict(np.zeros((1, 500, 500, 3), np.uint8))


def _favour_class(path: Path, favoured: int, margin: float = 1.0) -> Path:
    """The detector at `path` with `margin` added to one class's logits: it wins every box."""
    from ultralytics.nn.modules import Detect

    checkpoint = torch.load(path, weights_only=False)
    model = checkpoint["model"].float()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Detect):
                for branch in module.cv3:
                    branch[-1].bias[favoured] += margin
    target = path.with_name(f"{path.stem}_class{favoured}.pt")
    torch.save({**checkpoint, "model": model.half()}, target)
    return target


def test_only_the_mitotic_figure_class_of_a_two_class_detector_becomes_a_candidate(tmp_path: Path,
                                                                                  tiles: np.ndarray):
    two_class = tiny_detector(tmp_path / "two.pt", class_bias=5.0, classes=2)
    shipped = ProposalConfig().classes

    def proposals(weights: Path, classes: list[int] | None) -> list[np.ndarray]:
        proposer = YoloProposer.from_weights(weights, torch.device("cpu"), ProposalConfig(classes=classes))
        return [c for _, _, c in proposer.predict(tiles)]

    negatives = _favour_class(two_class, 1)  # every box's best class is the hard negative
    assert sum(len(c) for c in proposals(negatives, None)) > 0
    assert all(set(c.tolist()) == {1} for c in proposals(negatives, None) if len(c))
    assert sum(len(c) for c in proposals(negatives, shipped)) == 0  # none of them is a candidate
    figures = _favour_class(two_class, 0)
    kept = proposals(figures, shipped)
    assert sum(len(c) for c in kept) > 0 and [len(c) for c in kept] == [len(c) for c in proposals(figures, None)]


def test_a_tile_size_off_the_stride_is_a_config_error_at_load(detector: Path):
    from midog.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tiling.tile_size is 500; .* multiple of its stride 32 \(e.g. 512\)"):
        YoloProposer.from_weights(detector, torch.device("cpu"), ProposalConfig(), tile_size=500)


def test_corrupt_detector_weights_are_refused(tmp_path: Path, detector: Path):
    broken = tmp_path / "detector.pt"
    broken.write_bytes(detector.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="cannot load detector weights"):
        load_detector(broken, torch.device("cpu"))


def test_failed_onnx_export_falls_back_to_pytorch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture):
    import midog.proposals as proposals

    weights = tiny_detector(tmp_path / "other.pt", seed=7, class_bias=5.0)

    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::something' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(proposals, "export_onnx", unsupported)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    proposer = YoloProposer.from_weights(weights, torch.device("cpu"), ProposalConfig())
    assert proposer.backend == "torch"
    assert "ONNX export of other.pt failed" in caplog.text
    with pytest.raises(ValueError, match="proposals.backend"):
        YoloProposer.from_weights(weights, torch.device("cpu"), ProposalConfig(backend="tensorrt"))


def test_custom_lsconv_ema_detector_gives_ultralytics_boxes(tmp_path: Path, tiles: np.ndarray):
    yolo_modules = pytest.importorskip("midog.yolo_modules")
    from roi_factory import shift_class_bias
    from ultralytics import YOLO

    torch.manual_seed(0)
    model = yolo_modules.build_detector("n", nc=1)
    shift_class_bias(model, 5.0)
    path = tmp_path / "lsconv.pt"
    torch.save({"model": model.half(), "train_args": {}}, path)
    proposer = YoloProposer.from_weights(path, torch.device("cpu"), ProposalConfig())
    assert proposer.backend == "onnxruntime"  # LSConv/EMA export to ONNX (no fallback to PyTorch)
    yolo = YOLO(str(path), task="detect")
    ours = proposer.predict(tiles[:1])[0]
    result = yolo.predict(tiles[0][..., ::-1], imgsz=512, conf=0.2, iou=0.3, verbose=False, device="cpu")[0]
    assert len(ours[0]) == len(result.boxes) > 0
    np.testing.assert_allclose(result.boxes.xyxy.numpy(), ours[0], atol=0.05)


def test_glass_tiles_of_a_pyramidal_slide_are_skipped_without_decoding(tmp_path: Path, proposer: YoloProposer):
    from roi_factory import write_tiff

    from midog.roi_io import open_roi

    pixels = he_roi(1500, 1000, seed=2, background=0.45)
    path = write_tiff(tmp_path / "slide.tif", pixels, tile=128, pyramid_levels=2, compression="zlib")
    origins = tile_origins(1500, 1000, 512, 0.2)
    with open_roi(path, in_memory_max_megapixels=0.0) as slide:  # streamed, like a whole-slide image
        assert slide.thumbnail(1_000_000).shape == (500, 750, 3)
        decoded: list[tuple[int, int]] = []
        read = slide.read_region

        def counting(x: int, y: int, width: int, height: int) -> np.ndarray:
            decoded.append((x, y))
            return read(x, y, width, height)

        slide.read_region = counting  # type: ignore[method-assign]
        results, stats = proposer.propose(slide, origins, TilingConfig(), progress=False)
        assert {o[0] for o in decoded} == {0, 410, 820}  # the all-glass column at x 988 is never decoded
        decoded.clear()
        plain, _ = proposer.propose(slide, origins, TilingConfig(thumbnail_megapixels=0), progress=False)
        assert len(decoded) == len(origins)
    assert stats.tiles_run == 6
    assert [r.origin for r in results] == [r.origin for r in plain]
    for a, b in zip(results, plain):
        np.testing.assert_array_equal(a.boxes, b.boxes)
