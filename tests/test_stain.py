"""midog.stain: Macenko's estimate against torchstain's, normalisation across stains, sampling, and the verifier's use."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch
from roi_factory import he_roi, tiny_verifier, write_tiff
from stain_factory import BLUE, PINK, stained, tissue_concentrations, unit_columns

import midog.stain as stain
from midog.config import VerifierConfig, load_config, validate_config
from midog.errors import ConfigError
from midog.roi_io import ArrayRoi, PhysicalTransform, open_roi
from midog.stain import (REFERENCE_STAIN_MATRIX, estimate_stains, image_stains, normalise, optical_density,
                         sample_pixels)
from midog.verifier import Verifier, candidate_crops

SPACING_MM = (0.00025, 0.00025)


TORCHSTAIN_ESTIMATES = {
    0: (BLUE, [[0.439243, 0.296821], [0.803434, 0.852097], [0.401944, 0.431077]], [1.485531, 1.397831]),
    1: (PINK, [[0.590735, 0.197631], [0.734218, 0.802450], [0.334600, 0.563042]], [1.513072, 1.436530])}
"""Seed → (stains, the stain matrix and 99th-percentile concentrations torchstain 1.4.1's numpy MacenkoNormalizer
estimates from the whole generated image). Computed with it once and stored: its wheel installs a top-level
`tests` package, which would shadow this suite's, so it is not a test dependency. On real MITOS-ATYPIA-14 fields
the normalised images agree with torchstain's within one grey level (its truncation against our rounding)."""


@pytest.mark.parametrize("seed", sorted(TORCHSTAIN_ESTIMATES))
def test_estimate_is_torchstains_macenko_on_a_whole_image(seed: int):
    matrix, expected_matrix, expected_max = TORCHSTAIN_ESTIMATES[seed]
    stains = estimate_stains(stained(tissue_concentrations(400, 300, seed=seed), matrix))
    np.testing.assert_allclose(stains.matrix, expected_matrix, atol=1e-5)
    np.testing.assert_allclose(stains.max_concentrations, expected_max, atol=1e-5)


@pytest.mark.parametrize("matrix", [PINK, BLUE])
def test_estimate_recovers_the_stains_an_image_was_made_with(matrix: np.ndarray):
    stains = estimate_stains(stained(tissue_concentrations(400, 300, seed=1), matrix))
    cosines = np.sum(stains.matrix * unit_columns(matrix), axis=0)
    assert cosines.min() > 0.99, cosines                    # haematoxylin first, eosin second, each within ~8°


def test_one_scene_in_two_labs_stains_looks_alike_after_normalisation():
    scene = tissue_concentrations(400, 300, seed=2)
    pink, blue = stained(scene, PINK), stained(scene, BLUE)
    before = np.abs(pink.astype(int) - blue.astype(int)).mean()
    after = np.abs(normalise(pink, estimate_stains(pink)).astype(int)
                   - normalise(blue, estimate_stains(blue)).astype(int)).mean()
    assert before > 10 and after < min(3, before / 4), (before, after)


def test_normalised_tissue_takes_the_reference_stains():
    pixels = stained(tissue_concentrations(400, 300, seed=3), PINK)
    normalised = normalise(pixels, estimate_stains(pixels))
    assert estimate_stains(normalised).matrix == pytest.approx(unit_columns(REFERENCE_STAIN_MATRIX), abs=0.03)


def test_glass_gives_no_estimate_one_warning_and_untouched_crops(caplog: pytest.LogCaptureFixture):
    glass = ArrayRoi(np.full((200, 300, 3), 238, np.uint8), PhysicalTransform(SPACING_MM))
    with caplog.at_level(logging.WARNING, logger="midog.stain"):
        assert image_stains(glass) is None
        assert image_stains(glass) is None                    # estimated once per image: one warning
    assert len(caplog.records) == 1 and "too little stained tissue" in caplog.records[0].getMessage()
    crops = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert normalise(crops, None) is crops


def test_a_large_image_is_sampled_on_a_grid_within_the_budget():
    pixels = np.zeros((3000, 4000, 3), np.uint8)
    pixels[..., 0] = np.arange(4000) * 255 // 3999             # red encodes x, green encodes y
    pixels[..., 1] = (np.arange(3000) * 255 // 2999)[:, None]
    sample = sample_pixels(ArrayRoi(pixels, PhysicalTransform(SPACING_MM)), max_pixels=1 << 20)
    assert len(sample) <= 1 << 20 and len(sample) >= (1 << 20) // 2
    assert sample[:, 0].min() == 0 and sample[:, 0].max() == 255    # from the left edge to the right
    assert sample[:, 1].min() == 0 and sample[:, 1].max() == 255    # and from the top to the bottom
    small = ArrayRoi(pixels[:100, :200], PhysicalTransform(SPACING_MM))
    np.testing.assert_array_equal(sample_pixels(small), pixels[:100, :200].reshape(-1, 3))


class PyramidRoi(ArrayRoi):
    """An image whose file carries a reduced level, as a pyramidal slide's does."""

    def __init__(self, pixels: np.ndarray, level: np.ndarray) -> None:
        super().__init__(pixels, PhysicalTransform(SPACING_MM))
        self.level = level

    def thumbnail(self, max_pixels: int) -> np.ndarray | None:
        return self.level if self.level.shape[0] * self.level.shape[1] <= max_pixels else None


def sparse_slide(seed: int = 5) -> tuple[np.ndarray, tuple[slice, slice]]:
    """A 48 Mpx slide of glass with one 400 px patch of tissue (0.3 % of it) away from the even grid's windows."""
    pixels = np.full((6000, 8000, 3), 236, np.uint8)
    where = (slice(3700, 4100), slice(1300, 1700))
    pixels[where] = stained(tissue_concentrations(400, 400, seed=seed), BLUE)
    return pixels, where


def test_a_pyramid_level_guides_full_resolution_windows_to_sparse_tissue():
    """A slide's reduced level shows where its tissue is: every window is read there, at full resolution (the
    level's own averaged pixels are not sampled), and the stains come out; the grid alone misses the patch."""
    pixels, (rows, cols) = sparse_slide()
    level = cv2.resize(pixels, (800, 600), interpolation=cv2.INTER_AREA)
    slide = PyramidRoi(pixels, level)
    sample = sample_pixels(slide, max_pixels=1 << 20)
    assert (1 << 19) <= len(sample) <= 1 << 20
    in_patch = pixels[rows, cols].reshape(-1, 3)
    assert len(np.unique(sample, axis=0)) > 1000                     # full-resolution texture, not 236s
    assert np.isin(sample.view([("", np.uint8)] * 3), in_patch.view([("", np.uint8)] * 3)).mean() > 0.8
    stains = image_stains(slide)
    assert stains is not None and np.sum(stains.matrix * unit_columns(BLUE), axis=0).min() > 0.98
    assert estimate_stains(sample_pixels(ArrayRoi(pixels, PhysicalTransform(SPACING_MM)), 1 << 20)) is None


def test_a_pyramid_level_without_tissue_leaves_the_grid():
    pixels = np.zeros((3000, 4000, 3), np.uint8)
    pixels[..., 0] = np.arange(4000) * 255 // 3999
    glass = np.full((300, 400, 3), 236, np.uint8)
    sample = sample_pixels(PyramidRoi(pixels, glass), max_pixels=1 << 20)
    np.testing.assert_array_equal(sample, sample_pixels(ArrayRoi(pixels, PhysicalTransform(SPACING_MM)), 1 << 20))
    assert sample[:, 0].min() == 0 and sample[:, 0].max() == 255


def test_sparse_tissue_on_a_large_image_is_found():
    """A 48 Mpx image of glass with one 700 px patch of tissue (1 % of it), no pyramid: the grid's windows hit it."""
    pixels = np.full((6000, 8000, 3), 236, np.uint8)
    pixels[2650:3350, 5100:5800] = stained(tissue_concentrations(700, 700, seed=5), BLUE)
    stains = image_stains(ArrayRoi(pixels, PhysicalTransform(SPACING_MM)))
    assert stains is not None
    assert np.sum(stains.matrix * unit_columns(BLUE), axis=0).min() > 0.98


def test_verifier_normalises_each_members_crops_with_the_images_stains_estimated_once(
        tmp_path, monkeypatch: pytest.MonkeyPatch):
    weights = [tiny_verifier(tmp_path / "a.pt"), tiny_verifier(tmp_path / "b.pt", seed=1)]
    config = VerifierConfig(weights=[str(w) for w in weights], context_px=[0, 4],
                            stain_normalization=["macenko", "none"], crop_size=64, batch_size=8)
    verifier = Verifier.from_weights(weights, config, torch.device("cpu"))
    roi = ArrayRoi(he_roi(400, 300, seed=4), PhysicalTransform(SPACING_MM))
    boxes = np.array([[100, 50, 150, 100], [200, 150, 250, 200], [10, 10, 60, 60]], np.float32)
    estimates = []
    monkeypatch.setattr(stain, "estimate_stains", lambda p: estimates.append(1) or estimate_stains(p))
    plain = candidate_crops(roi, boxes, 0.25, 0.02, 64, 0, 50)
    normalised = verifier.crops(roi, boxes)
    np.testing.assert_array_equal(normalised, normalise(plain, estimate_stains(roi.read_region(0, 0, 400, 300))))
    assert np.abs(normalised.astype(int) - plain.astype(int)).mean() > 2
    expected = np.mean([verifier.classifiers[0].predict_proba(normalised),
                        verifier.classifiers[1].predict_proba(candidate_crops(roi, boxes, 0.25, 0.02, 64, 4, 50))],
                       axis=0)
    for chunk in (slice(0, 2), slice(2, 3)):
        np.testing.assert_allclose(verifier.probabilities(roi, boxes[chunk]), expected[chunk], rtol=1e-5)
    assert len(estimates) == 1


def test_stain_normalization_is_checked_in_the_config():
    config = load_config(environ={})
    assert config.verifier.stain_normalization == "none"
    config.verifier.stain_normalization = "reinhard"
    with pytest.raises(ConfigError, match="verifier.stain_normalization is 'reinhard'; expected none or macenko"):
        validate_config(config)
    with pytest.raises(ConfigError, match="cuts one crop set"):
        VerifierConfig(stain_normalization=["none", "macenko"]).single_crop_setting("stain_normalization",
                                                                                    "prepare_fields")


def test_optical_density_of_glass_is_near_zero():
    assert np.abs(optical_density(np.full((4, 4, 3), 239, np.uint8))).max() < 1e-9


def test_a_streamed_slides_level_serves_the_tiler_and_the_stain_sample_decoded_once(tmp_path, tiff_decodes: list):
    """The tiler's tissue detection decodes a slide's pyramid level (`tiling.thumbnail_megapixels`); the stain
    estimate is guided by the same level, not another one decoded again."""
    pixels, _ = sparse_slide()
    path = write_tiff(tmp_path / "slide.tif", pixels, tile=256, pyramid_levels=3, compression="zlib")
    with open_roi(path, in_memory_max_megapixels=0.0) as slide:
        assert slide.thumbnail(int(load_config(environ={}).tiling.thumbnail_megapixels * 1e6)) is not None
        stains = image_stains(slide)
    assert len(tiff_decodes) == 1
    assert stains is not None and np.sum(stains.matrix * unit_columns(BLUE), axis=0).min() > 0.98
