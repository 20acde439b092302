"""The container files without a Docker engine: scripts parse, the Dockerfile follows the grand-challenge rules, and
the image's file layout (rebuilt from the Dockerfile's COPY lines) runs Track 2 on its own."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from stack_factory import he_pages, tiny_atypical, track2_input, write_tiff

DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()


def copy_lines() -> list[tuple[str, str]]:
    """(source, destination) of every COPY into /opt/app."""
    pairs = []
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY "):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            pairs += [(source, parts[-1]) for source in parts[:-1]]
    return [(s, d) for s, d in pairs if d.startswith("/opt/app")]


@pytest.mark.parametrize("script", ["build.sh", "export.sh", "test.sh"])
def test_scripts_parse_and_are_executable(script: str):
    path = REPO_ROOT / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_dockerfile_follows_grand_challenge_rules():
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:2\.14\.1-cuda[\d.]+-cudnn\d+-runtime$", DOCKERFILE, re.MULTILINE)
    assert "PYTHONUNBUFFERED=1" in DOCKERFILE and "YOLO_OFFLINE=1" in DOCKERFILE
    assert re.search(r"^USER user$", DOCKERFILE, re.MULTILINE) and re.search(r"^WORKDIR /opt/app$", DOCKERFILE,
                                                                                re.MULTILINE)
    assert DOCKERFILE.rstrip().endswith('ENTRYPOINT ["python", "process.py"]')
    assert "grep -vE '^(torch|torchvision)=='" in DOCKERFILE and "-c /tmp/constraints.txt" in DOCKERFILE
    sources = {s for s, _ in copy_lines()}
    assert sources == {"process.py", "midog", "weights"}, sources
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[1] == "*" and {f"!{s}" for s in sources} <= set(ignore)


def test_torch_pin_is_what_the_base_image_tag_names():
    pins = dict(line.split("==") for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert f"pytorch/pytorch:{pins['torch']}-" in DOCKERFILE


def test_image_layout_runs_track2(tmp_path: Path):
    """Only what the Dockerfile copies, run from /opt/app's stand-in, with the output the only thing written."""
    app = tmp_path / "opt" / "app"
    app.mkdir(parents=True)
    for source, _ in copy_lines():
        if source == "weights":
            continue  # the shipped weights are replaced by a tiny model below
        src = REPO_ROOT / source
        if src.is_dir():
            shutil.copytree(src, app / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, app / source)
    weights = tiny_atypical(tmp_path / "model" / "atypical.pt", threshold=0.4)
    write_tiff(track2_input(tmp_path / "input"), he_pages(3, size=64))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "__pycache__" not in p.parts)
    result = subprocess.run([sys.executable, "process.py", "--input", str(tmp_path / "input"),
                             "--output", str(tmp_path / "output")], cwd=app, capture_output=True, text=True,
                            timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"),
                                              "PYTHONDONTWRITEBYTECODE": "1", "YOLO_OFFLINE": "1",
                                              "MIDOG_WEIGHTS_DIR": str(weights.parent)})
    assert result.returncode == 0, result.stderr
    entries = json.loads((tmp_path / "output" / "multiple-mitotic-figure-classification.json").read_text())
    assert len(entries) == 3
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "__pycache__" not in p.parts)
    written = sorted(set(after) - set(before))
    assert written == [Path("output"), Path("output/multiple-mitotic-figure-classification.json")], written
