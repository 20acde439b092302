"""Builders for evaluation tests: points in mm, official payloads and container folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

UM = 1e-3  # one micrometre in mm


def point(x_um: float, y_um: float, probability: float = 0.9, name: str = "mitotic figure",
          z: float = 0.0) -> dict[str, Any]:
    return {"name": name, "point": [x_um * UM, y_um * UM, z], "probability": probability}


def payload(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"name": "Points of interest", "type": "Multiple points", "points": list(points),
            "version": {"major": 1, "minor": 0}}


def truth(points_um: Sequence[tuple[float, float]], domain: int = 0, roi: str = "hotspot") -> dict[str, Any]:
    return {"annotations": [[x * UM, y * UM, 0] for x, y in points_um], "tumor domain": domain, "roi type": roi}


def container_folder(root: Path, jobs: dict[str, Any], track: int = 1) -> Path:
    """predictions.json + <pk>/output/<file> for image name → output payload, pk = job-<i>."""
    if track == 1:
        in_slug, out_slug, rel = ("histopathology-region-of-interest-cropout", "mitotic-figures",
                                  "mitotic-figures.json")
    else:
        in_slug, out_slug, rel = ("stacked-histopathology-roi-cropouts", "multiple-mitotic-figure-classification",
                                  "multiple-mitotic-figure-classification.json")
    entries = []
    for i, (image, output) in enumerate(jobs.items()):
        pk = f"job-{i}"
        entries.append({"pk": pk,
                        "inputs": [{"image": {"name": image}, "interface": {"slug": in_slug}}],
                        "outputs": [{"interface": {"slug": out_slug, "relative_path": rel}}],
                        "status": "Succeeded"})
        (root / pk / "output").mkdir(parents=True)
        (root / pk / "output" / rel).write_text(json.dumps(output))
    (root / "predictions.json").write_text(json.dumps(entries))
    return root
