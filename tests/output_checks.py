"""Checks that an output payload follows the official MIDOG 2025 formats, as grand-challenge's evaluators read them
(floats stay floats: the evaluators refuse ints)."""

from __future__ import annotations


def assert_multiple_points(payload: dict) -> None:
    """Track 1: a grand-challenge "Multiple points" object, points in mm with a probability."""
    assert payload["name"] == "Points of interest"
    assert payload["type"] == "Multiple points"
    assert payload["version"] == {"major": 1, "minor": 0}
    for point in payload["points"]:
        assert set(point) == {"name", "point", "probability"}
        assert len(point["point"]) == 3 and point["point"][2] == 0.0
        assert all(type(v) is float for v in point["point"]) and type(point["probability"]) is float
        assert 0.0 <= point["probability"] <= 1.0


def assert_track2_entries(entries: list) -> None:
    """Track 2: one {"class", "confidence"} per page, the confidence a float in [0, 1]."""
    assert isinstance(entries, list)
    for entry in entries:
        assert set(entry) == {"class", "confidence"}
        assert type(entry["confidence"]) is float and 0.0 <= entry["confidence"] <= 1.0
        assert entry["class"] in ("atypical", "normal")
