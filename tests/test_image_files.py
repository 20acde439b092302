"""Finding the one image of an interface folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from midog.errors import InputError
from midog.image_files import find_single_image


def test_find_single_image(tmp_path: Path):
    with pytest.raises(InputError, match="no image folder"):
        find_single_image(tmp_path / "nope")
    (tmp_path / ".hidden.tif").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="no .tif/.tiff/.mha image"):
        find_single_image(tmp_path)
    (tmp_path / "a.TIFF").write_bytes(b"x")
    assert find_single_image(tmp_path).name == "a.TIFF"
    (tmp_path / "b.mha").write_bytes(b"x")
    with pytest.raises(InputError, match="found 2: a.TIFF, b.mha"):
        find_single_image(tmp_path)
