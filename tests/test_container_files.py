"""The container files without a Docker engine: scripts parse, the Dockerfile follows the grand-challenge rules, and
the image's file layout (rebuilt from the Dockerfile's COPY lines) runs both tracks on its own, as a non-root user
that can write only the output and temp folders."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from roi_factory import he_roi, tiny_track1_weights, track1_input
from stack_factory import he_pages, track2_input, write_tiff

from midog.outputs import TRACK1_ATYPICAL_FILENAME, TRACK1_FILENAME, TRACK2_FILENAME

DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()


def pinned_versions() -> dict[str, str]:
    """name → version of every `name==version` line of requirements.txt."""
    return dict(line.split("==") for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))


def copy_lines() -> list[tuple[str, str]]:
    """(source, destination) of every COPY into /opt/app."""
    pairs = []
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY "):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            pairs += [(source, parts[-1]) for source in parts[:-1]]
    return [(s, d) for s, d in pairs if d.startswith("/opt/app")]


@pytest.mark.parametrize("script", ["build.sh", "export.sh", "test.sh", "benchmarks/gpu_check.sh"])
def test_scripts_parse_and_are_executable(script: str):
    path = REPO_ROOT / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_gpu_check_carries_the_pinned_versions():
    """The wheels gpu_check.sh tells a GPU session to carry are the versions requirements.txt pins."""
    pins = pinned_versions()
    carried = dict(re.findall(r"([\w-]+)==([\w.]+)", (REPO_ROOT / "benchmarks" / "gpu_check.sh").read_text()))
    for name in ("ultralytics", "pycocotools"):
        assert carried[name] == pins[name], name
    sahi = dict(re.findall(r"([\w-]+)==([\w.]+)", (REPO_ROOT / "benchmarks" / "requirements.txt").read_text()))
    assert carried["sahi"] == sahi["sahi"]


def test_dockerfile_follows_grand_challenge_rules():
    assert re.search(r"^FROM --platform=linux/amd64 \$\{BASE_IMAGE\}$", DOCKERFILE, re.MULTILINE)
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
    pins = pinned_versions()
    assert f"pytorch/pytorch:{pins['torch']}-" in DOCKERFILE


def test_the_image_exports_the_shipped_models_after_copying_them_as_its_user():
    """`python -m midog.export_onnx` (tests/test_export_onnx.py) runs once the weights are in, as the user that owns
    them, so the exports land beside them and a fresh container starts without exporting."""
    lines = DOCKERFILE.splitlines()
    copied = max(i for i, line in enumerate(lines)
                 if line.startswith("COPY") and line.split()[-1] == "/opt/app/weights")
    exported = lines.index("RUN python -m midog.export_onnx")
    assert lines.index("USER user") < copied < exported


NOBODY = 65534
"""uid/gid the layout runs under when the tests run as root: the container's `user` is not root either."""


def _private_ancestor(path: Path) -> Path | None:
    """The outermost folder above `path` that other users cannot enter (/root for an interpreter under /root)."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not parent.stat().st_mode & 0o001:
            return parent
    return None


def _unprivileged_prefix(scratch: Path) -> list[str]:
    """A command prefix that runs the rest as the unprivileged user NOBODY; [] when not root or not possible.

    The interpreter and its packages often live in a folder only root may enter (pyenv or a venv under /root).
    Then the run gets a private mount namespace in which that folder is an empty world-readable tmpfs with only the
    interpreter's and the environment's folders bound back in, so the unprivileged user can start Python and
    nothing else changes for it. `scratch` (world-traversable) holds the bind sources while the tmpfs goes on."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return []
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    needed = sorted({Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()})
    hidden = [(path, _private_ancestor(path)) for path in needed]
    hidden = [(path, blocker) for path, blocker in hidden if blocker is not None]
    prefix = drop
    if hidden and shutil.which("unshare"):
        lines = ["set -e"]
        for index, (path, _) in enumerate(hidden):
            stash = scratch / f"stash{index}"
            stash.mkdir(mode=0o755)
            lines.append(f"mount --bind '{path}' '{stash}'")
        for blocker in sorted({blocker for _, blocker in hidden}):
            lines.append(f"mount -t tmpfs -o mode=755 tmpfs '{blocker}'")
        for index, (path, _) in enumerate(hidden):
            lines += [f"mkdir -p '{path}'", f"mount --bind '{scratch / f'stash{index}'}' '{path}'"]
        lines.append('exec "$@"')
        prefix = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", "\n".join(lines), "sh", *drop]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import os, torch, timm, ultralytics; print(os.getuid())"],
                           capture_output=True, text=True, cwd="/", timeout=120)
    return prefix if probe.returncode == 0 and probe.stdout.split() == [str(NOBODY)] else []


def _read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)


def _snapshot(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def image() -> tuple[Path, list[str]]:
    """/opt/app rebuilt from the Dockerfile's COPY lines (read-only), tiny weights in a model folder, a writable /tmp.

    Built under a world-traversable folder of its own, since pytest's temp folders are private to their owner."""
    root = Path(tempfile.mkdtemp(prefix="midog-image-"))
    root.chmod(0o755)
    app = root / "opt" / "app"
    app.mkdir(parents=True)
    for source, _ in copy_lines():
        if source == "weights":
            continue  # the shipped weights are replaced by tiny models below
        src = REPO_ROOT / source
        if src.is_dir():
            shutil.copytree(src, app / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, app / source)
    model = root / "opt" / "ml" / "model"
    tiny_track1_weights(model)
    for folder in (root / "opt", app, model):
        _read_only(folder)
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)
    (root / "home").mkdir(mode=0o555)
    scratch = root / "scratch"
    scratch.mkdir(mode=0o755)
    yield root, _unprivileged_prefix(scratch)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(root)


@pytest.mark.parametrize("track", ["track1", "track2"])
def test_image_layout_runs_as_a_user_writing_only_output_and_tmp(image: tuple[Path, list[str]], track: str):
    """Only what the Dockerfile copies, run from /opt/app's stand-in as a non-root user with a read-only input,
    app and home folder: a file the Dockerfile forgets, or a write outside the output and temp folders, fails.

    As root (CI), the run drops to NOBODY, also where the interpreter lives in a root-only folder (see
    `_unprivileged_prefix`); only where neither setpriv nor a mount namespace is available does it stay root, and
    the snapshot of written files is then the remaining check."""
    image_root, as_user = image
    run = image_root / track
    run.mkdir(mode=0o755)
    if track == "track1":
        track1_input(run / "input", he_roi(700, 560, seed=5, figures=[(200, 180), (520, 400)]))
        produced = {TRACK1_FILENAME, TRACK1_ATYPICAL_FILENAME}
    else:
        write_tiff(track2_input(run / "input"), he_pages(3, size=64))
        produced = {TRACK2_FILENAME}
    _read_only(run / "input")
    output = run / "output"
    output.mkdir(mode=0o777)
    output.chmod(0o777)
    before = _snapshot(image_root)
    result = subprocess.run([*as_user, sys.executable, "process.py", "--input", str(run / "input"),
                             "--output", str(output)],
                            cwd=image_root / "opt" / "app", capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(image_root / "home"),
                                 "TMPDIR": str(image_root / "tmp"), "PYTHONDONTWRITEBYTECODE": "1",
                                 "MIDOG_WEIGHTS_DIR": str(image_root / "opt" / "ml" / "model")})
    assert result.returncode == 0, result.stderr
    if as_user:
        assert {p.stat().st_uid for p in output.iterdir()} == {NOBODY}
    written = _snapshot(image_root) - before
    outside = sorted(str(p) for p in written if p.parts[0] != "tmp" and p.parent != output.relative_to(image_root))
    assert outside == [], f"written outside the output and temp folders: {outside}"
    assert {p.name for p in output.iterdir()} == produced
    if track == "track2":
        assert len(json.loads((output / TRACK2_FILENAME).read_text())) == 3
