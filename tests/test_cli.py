"""midog.cli.read_json_file: every JSON input fails in one line, with the error class its caller chose."""

from __future__ import annotations

from pathlib import Path

import pytest

from midog.cli import read_json_file
from midog.errors import InputError
from midog.evaluate.io import GroundTruthError


def test_a_json_file_is_read_or_refused_in_one_line(tmp_path: Path):
    good, bad, listed = tmp_path / "good.json", tmp_path / "bad.json", tmp_path / "list.json"
    good.write_text('{"a": 1}')
    bad.write_bytes(b"\xff{not json")
    listed.write_text("[1, 2]")
    assert read_json_file(good, "inputs") == {"a": 1}
    assert read_json_file(listed, "inputs", object) == [1, 2]
    cases = ((tmp_path / "none.json", dict, "inputs not found: "), (bad, dict, "is not valid JSON"),
             (listed, dict, "must hold a JSON object, not list"))
    for path, expected, message in cases:
        with pytest.raises(InputError, match=message) as raised:
            read_json_file(path, "inputs", expected)
        assert "\n" not in str(raised.value)


def test_the_caller_chooses_the_error_class_and_an_unreadable_file_is_one_line(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "gt.json"
    path.write_text("{}")
    with pytest.raises(GroundTruthError, match="ground truth .* must hold a JSON list"):
        read_json_file(path, "ground truth", list, error=GroundTruthError)

    def unreadable(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", unreadable)                 # root reads any file: simulate the refusal
    with pytest.raises(GroundTruthError, match="ground truth .* cannot be read: Permission denied"):
        read_json_file(path, "ground truth", error=GroundTruthError)
