"""Shared fixtures. Real third-party data lives in ../shared/data beside the checkout and is never committed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import midog  # noqa: F401  before any test module imports ultralytics: this session's own YOLO_CONFIG_DIR, offline

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("MIDOG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the calling test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the third-party data at {path} (../shared/data beside the checkout); not present here")
    return path


@pytest.fixture
def shared_data() -> Path:
    return shared_path()


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in the tests may reach the network or a model hub."""
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiff_decodes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shape of every TIFF series (a slide's pyramid level) decoded whole while the test runs, in order."""
    import tifffile

    decoded: list[tuple[int, ...]] = []
    decode = tifffile.TiffPageSeries.asarray

    def counting(series: tifffile.TiffPageSeries, *args, **kwargs):
        decoded.append(series.shape)
        return decode(series, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", counting)
    return decoded
