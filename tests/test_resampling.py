"""Inference at the models' own pixel size: one generated scene at several scanners' pixel sizes gives the same
points in millimetres, and each model sees its crops at the scale it was trained at."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from midog.config import load_config
from midog.merging import TileDetections
from midog.pipeline import Track1Detector
from midog.proposals import ProposalStats
from midog.resampling import ResampledRoi, at_pixel_size, needs_resampling
from midog.roi_io import ArrayRoi, PhysicalTransform, open_roi
from midog.tiling import read_tiles
from midog.verifier import Verifier
from roi_factory import write_tiff

FIGURES_UM = [(41.3, 37.9), (150.2, 60.7), (97.6, 140.1), (230.4, 190.3), (120.0, 118.9), (260.9, 40.2)]
"""Dark round 'figures' (radius 5 µm) in a 300 x 240 µm field, some across tile borders at every scale."""
FIELD_UM = (300.0, 240.0)
RADIUS_UM = 5.0
MODEL_UM = 0.25


def scene(spacing_um: tuple[float, float]) -> np.ndarray:
    """The field rendered at `spacing_um` (x, y): pink tissue, dark disks, each pixel's value from its centre."""
    width, height = (int(round(FIELD_UM[0] / spacing_um[0])), int(round(FIELD_UM[1] / spacing_um[1])))
    xs = (np.arange(width) + 0.5) * spacing_um[0]
    ys = (np.arange(height) + 0.5) * spacing_um[1]
    darkness = np.zeros((height, width))
    for fx, fy in FIGURES_UM:
        distance = np.sqrt((xs[None, :] - fx) ** 2 + (ys[:, None] - fy) ** 2)
        darkness = np.maximum(darkness, np.clip(RADIUS_UM + 0.5 - distance, 0, 1))
    pink, dark = np.array([230, 180, 215]), np.array([60, 30, 90])
    return (pink * (1 - darkness[..., None]) + dark * darkness[..., None]).round().astype(np.uint8)


def field(spacing_um: tuple[float, float]) -> ArrayRoi:
    return ArrayRoi(scene(spacing_um), PhysicalTransform((spacing_um[0] / 1000, spacing_um[1] / 1000)))


class BlobProposer:
    """A stand-in detector trained at 0.25 µm/px: the centroid of each dark blob of a tile, as a 50 px box whose
    score is the share of a whole figure's area it holds (a figure cut by the tile border scores lower)."""

    pixel_size_um = MODEL_UM
    batch_size = 4

    def propose(self, image, origins, tiling, progress=False):
        stats = ProposalStats(tiles_total=len(origins))
        full_area = np.pi * (RADIUS_UM / MODEL_UM) ** 2
        results = []
        for batch_origins, tiles, _ in read_tiles(image, origins, tiling, self.batch_size):
            for origin, tile in zip(batch_origins, tiles):
                labels, count = ndimage.label(tile.mean(axis=2) < 140)
                boxes, scores = [], []
                for index in range(1, count + 1):
                    ys, xs = np.nonzero(labels == index)
                    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
                    boxes.append([cx - 25, cy - 25, cx + 25, cy + 25])
                    scores.append(min(1.0, len(xs) / full_area))
                results.append(TileDetections(origin, np.array(boxes, np.float32).reshape(-1, 4),
                                              np.array(scores, np.float32), np.zeros(len(scores), np.int64)))
            stats.tiles_run += len(batch_origins)
        return results, stats


@dataclass
class DarknessClassifier:
    """A stand-in verifier model: P = the dark share of the crop's central quarter (a figure fills it at the
    right scale, a quarter of it at half the scale)."""

    pixel_size_um: float = MODEL_UM
    positive: str = "mitotic figure"

    def predict_proba(self, crops: np.ndarray, tta: bool = False, batch_size: int = 64) -> np.ndarray:
        size = crops.shape[1]
        centre = crops[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4].mean(axis=3)
        return (centre < 140).mean(axis=(1, 2)).astype(np.float32)


def chain() -> Track1Detector:
    config = load_config()
    verifier = Verifier([DarknessClassifier()], config.verifier, config.merging.box_size_px,
                        config.image.resample_tolerance)
    return Track1Detector(config, BlobProposer(), verifier, None)


def matched_distances_um(points_mm: np.ndarray) -> np.ndarray:
    """Distance (µm) from each true figure to the nearest point; also checks that there is one point per figure."""
    truth = np.array(FIGURES_UM) / 1000
    assert len(points_mm) == len(truth), points_mm * 1000
    return np.sqrt(((truth[:, None] - points_mm[None]) ** 2).sum(-1)).min(axis=1) * 1000


@pytest.mark.parametrize("spacing_um", [(0.2273, 0.2273), (0.25, 0.25), (0.5, 0.5), (0.2273, 0.2275)])
def test_same_scene_gives_the_same_millimetres_at_every_pixel_size(spacing_um):
    image = field(spacing_um)
    candidates, _ = chain().candidates(image)
    points_mm = image.transform.to_mm(candidates.centres)
    assert matched_distances_um(points_mm).max() < 2.0


def test_boxes_come_back_in_the_images_own_pixels():
    image = field((0.5, 0.5))
    candidates, _ = chain().candidates(image)
    truth_px = np.array(FIGURES_UM) / 0.5
    nearest = np.sqrt(((truth_px[:, None] - candidates.centres[None]) ** 2).sum(-1)).min(axis=1)
    assert nearest.max() < 4  # 2 µm at 0.5 µm/px
    widths = candidates.boxes[:, 2] - candidates.boxes[:, 0]
    assert widths == pytest.approx(np.full(len(widths), 25.0), abs=0.01)  # 50 model px = 12.5 µm = 25 px here


def test_verifier_sees_its_crops_at_its_own_scale():
    probabilities = []
    for spacing in [(0.25, 0.25), (0.5, 0.5), (0.2273, 0.2275)]:
        image = field(spacing)
        detector = chain()
        candidates, _ = detector.candidates(image)
        probabilities.append(np.sort(detector.verify(image, candidates.boxes)))
    assert probabilities[1] == pytest.approx(probabilities[0], abs=0.05)
    assert probabilities[2] == pytest.approx(probabilities[0], abs=0.05)


def test_within_tolerance_the_image_itself_is_used():
    image = field((0.2273, 0.2273))
    assert at_pixel_size(image, 0.25, tolerance=0.02) is not image
    assert at_pixel_size(image, 0.25, tolerance=0.11) is image
    assert not needs_resampling((0.251, 0.249), 0.25, 0.02)
    assert needs_resampling((0.25, 0.2273), 0.25, 0.02)  # one axis is enough


def test_view_geometry_and_millimetres():
    source = field((0.5, 0.4))
    view = ResampledRoi(source, 0.25)
    assert (view.width, view.height) == (1200, 960)
    assert view.transform.spacing_um == pytest.approx((0.25, 0.25))
    # a view pixel's position is the source's at u / scale: the same millimetres
    assert view.transform.to_mm(np.array([[200.0, 160.0]])) == pytest.approx(
        source.transform.to_mm(np.array([[100.0, 100.0]])))


def test_a_region_reads_the_same_alone_or_inside_a_larger_one():
    for spacing in [(0.2273, 0.2275), (0.5, 0.5), (0.125, 0.125)]:
        view = ResampledRoi(field(spacing), 0.25)
        whole = view.read_region(0, 0, 700, 500).astype(int)
        part = view.read_region(123, 77, 300, 211).astype(int)
        assert np.abs(whole[77:288, 123:423] - part).max() <= 1


def test_shrinking_is_antialiased():
    """Fine stripes at 0.125 µm/px (2 px period) average out at 0.25 instead of aliasing into bands."""
    stripes = np.zeros((400, 400, 3), np.uint8)
    stripes[:, ::2] = 255
    view = ResampledRoi(ArrayRoi(stripes, PhysicalTransform((0.000125, 0.000125))), 0.25)
    pixels = view.read_region(10, 10, 150, 150).astype(float)
    assert pixels.std() < 8 and abs(pixels.mean() - 127.5) < 3


def test_image_without_pixel_size_uses_the_fallback_with_one_warning(tmp_path: Path, caplog):
    path = write_tiff(tmp_path / "roi.tif", scene((0.25, 0.25)), spacing_um=None)
    with caplog.at_level(logging.WARNING):
        with open_roi(path) as image:
            candidates, _ = chain().candidates(image)
            points_mm = image.transform.to_mm(candidates.centres)
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    assert matched_distances_um(points_mm).max() < 2.0  # the fallback is 0.25 µm/px, as the scene
