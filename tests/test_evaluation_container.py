"""The evaluation image (evaluation/Dockerfile) without a Docker engine: its pins and platform conventions, its
scripts (run against a stand-in `docker`), and its file layout, rebuilt from the Dockerfile's COPY lines, scoring the
official evaluation containers' own test vectors the way grand-challenge runs an evaluation method: as a non-root
user, without network, with only the packages the image installs, everything read-only but the output folder.
Every aggregate is checked against a transcription of the final official containers' code."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO_ROOT, shared_path
from test_container_files import NOBODY, _read_only, _snapshot, _unprivileged_prefix

from tests.official_reference import official_froc

from midog.evaluate.container import PLATFORM_GROUND_TRUTH, PLATFORM_INPUT, PLATFORM_OUTPUT, build_parser

EVALUATION = REPO_ROOT / "evaluation"
DOCKERFILE = (EVALUATION / "Dockerfile").read_text()
TRACK2_EXPECTED = EVALUATION / "test" / "track2-expected-metrics.json"
PUBLISHED_TRACK1_AP = 0.3148514926433563
FINAL_TRACK2_ROC_AUC = 0.660494
"""The final Track 2 container (P(atypical) on every page) on its test vectors; the earlier reading gave 0.728395."""


def pins(path: Path) -> dict[str, str]:
    return dict(line.split("==") for line in path.read_text().splitlines() if "==" in line and not line.startswith("#"))


def copy_sources() -> list[str]:
    sources = []
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY ") and "/opt/app" in line:
            sources += [p for p in line.split()[1:-1] if not p.startswith("--")]
    return sources


def entrypoint() -> list[str]:
    match = re.search(r"^ENTRYPOINT (\[.*\])$", DOCKERFILE, re.MULTILINE)
    assert match, "evaluation/Dockerfile has no exec-form ENTRYPOINT"
    return json.loads(match.group(1))


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in table.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def assert_same_aggregates(actual: dict[str, Any], expected: dict[str, Any], atol: float = 1e-9) -> None:
    actual, expected = flatten(actual), flatten(expected)
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=0, abs=atol, nan_ok=True), key


# ---- the final official containers, transcribed --------------------------------------------------------------

def _jobs(input_dir: Path, input_slug: str, output_slug: str) -> list[tuple[str, Any]]:
    """(image name, output payload) per job, in predictions.json order."""
    jobs = []
    for job in json.loads((input_dir / "predictions.json").read_text()):
        image = next(v["image"]["name"] for v in job["inputs"] if v["interface"]["slug"] == input_slug)
        relative = next(v["interface"]["relative_path"] for v in job["outputs"]
                        if v["interface"]["slug"] == output_slug)
        jobs.append((image, json.loads((input_dir / job["pk"] / "output" / relative).read_text())))
    return jobs


def _froc(truths: list, detections: list) -> float:
    """The final Track 1 container's calc_froc_score with evalutils' score_detection."""
    from grand_challenge_metrics.scorers import score_detection

    return official_froc(truths, detections, lambda truth, kept: score_detection(
        ground_truth=truth, predictions=kept, radius=7.5e-3))


def final_track1_aggregates(input_dir: Path, ground_truth: dict[str, Any]) -> dict[str, Any]:
    """DeepMicroscopy/MIDOG25_T1_evaluation_docker's evaluate.py in its final version (8577851: jobs one after
    another in predictions.json order; evalutils' score_detection; torchmetrics' map_50; calc_froc_score), without
    its coordinate check, plus the tumour x ROI-type table of the organisers' final metrics.json files (F1
    2tp/(2tp+fp+fn+eps))."""
    from grand_challenge_metrics.scorers import score_detection
    from torch import IntTensor, Tensor
    from torchmetrics.detection.mean_ap import MeanAveragePrecision

    results = []
    for image, payload in _jobs(input_dir, "histopathology-region-of-interest-cropout", "mitotic-figures"):
        truth = ground_truth[image]
        pred = [[*p["point"][0:3], 1 if p["name"] == "mitotic figure" else 0, p["probability"]]
                for p in payload["points"]]
        counts = score_detection(ground_truth=truth["annotations"], radius=7.5e-3,
                                 predictions=[[x, y, 0] for x, y, z, cls, sc in pred if cls == 1])
        results.append({"gt": truth["annotations"], "pred": pred, "domain": truth["tumor domain"],
                        "roi": truth["roi type"], "tp": counts.true_positives, "fp": counts.false_positives,
                        "fn": counts.false_negatives})

    eps, b = 1e-6, 0.01125

    def group(rs: list[dict[str, Any]]) -> dict[str, float]:
        tp, fp, fn = (sum(r[k] for r in rs) for k in ("tp", "fp", "fn"))
        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", max_detection_thresholds=[1, 10, 1e6],
                                      rec_thresholds=np.arange(0, 1.01, 0.01).tolist())
        for r in rs:
            metric.update([{"boxes": Tensor([[x - b, y - b, x + b, y + b] for (x, y, z, _, _) in r["pred"]]),
                            "labels": IntTensor([1] * len(r["pred"])),
                            "scores": Tensor([sc for (x, y, z, _, sc) in r["pred"]])}],
                          [{"boxes": Tensor([[x - b, y - b, x + b, y + b] for (x, y, z) in r["gt"]]),
                            "labels": IntTensor([1] * len(r["gt"]))}])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ap = metric.compute()["map_50"].tolist()
        return {"precision": tp / (tp + fp + eps), "recall": tp / (tp + fn + eps),
                "f1": (2 * tp + eps) / ((2 * tp) + fp + fn + eps), "AP": ap,
                "froc_auc": _froc([r["gt"] for r in rs], [r["pred"] for r in rs]),
                "table_f1": 2 * tp / ((2 * tp) + fp + fn + eps), "positives": tp + fn}

    overall = group(results)
    out: dict[str, Any] = {"precision": overall["precision"], "recall": overall["recall"],
                           "f1_score": overall["f1"], "froc_auc": overall["froc_auc"], "AP": overall["AP"]}
    domains = np.unique([r["domain"] for r in results]).tolist()
    for d in domains:
        g = group([r for r in results if r["domain"] == d])
        out.update({f"tumor_{d}_{k}": g[k] for k in ("precision", "recall", "f1", "AP", "froc_auc")})
    table = {}
    for roi in ("hotspot", "challenging", "random"):
        g = group([r for r in results if r["roi"] == roi])
        out.update({f"roi_type_{roi}_{k}": g[k] for k in ("precision", "recall", "f1", "AP", "froc_auc")})
        for d in domains:
            subset = [r for r in results if r["roi"] == roi and r["domain"] == d]
            if subset:
                g = group(subset)
                g["f1"] = g["table_f1"]
                table.update({f"{d}_{roi}_{k}": g[k] for k in ("f1", "precision", "recall", "positives", "AP",
                                                                 "froc_auc")})
    out["tumor_roitype"] = table
    return out


def final_track2_aggregates(input_dir: Path, ground_truth: list[dict[str, Any]]) -> dict[str, Any]:
    """DeepMicroscopy/MIDOG25_T2_evaluation_docker's evaluate.py after 2d1b108 (2025-07-27): `confidence` is
    P(atypical) on every page."""
    from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

    ids = {"normal": 0, "atypical": 1}
    labels = {x["image"]: x["labels"] for x in ground_truth}
    domains = {x["image"]: x["tumordomains"] for x in ground_truth}
    gt, pred, score, tumordomain = [], [], [], []
    for image, payload in _jobs(input_dir, "stacked-histopathology-roi-cropouts",
                                "multiple-mitotic-figure-classification"):
        gt += [ids[x] for x in labels[image]]
        pred += [ids[r["class"]] for r in payload]
        score += [r["confidence"] for r in payload]
        tumordomain += domains[image]
    gt, pred, score, tumordomain = map(np.array, (gt, pred, score, tumordomain))
    tp, fp = int(np.sum((pred == 1) & (gt == 1))), int(np.sum((pred == 1) & (gt == 0)))
    fn, tn = int(np.sum((pred == 0) & (gt == 1))), int(np.sum((pred == 0) & (gt == 0)))
    sens, spec = tp / (tp + fn), tn / (tn + fp)
    out: dict[str, Any] = {"overall_sensitivity": sens, "overall_specificity": spec,
                           "overall_balanced_accuracy": (spec + sens) / 2,
                           "overall_roc_auc": float(roc_auc_score(gt, score)),
                           "overall_accuracy": (tp + tn) / (tp + fn + fp + tn)}
    with warnings.catch_warnings():  # sklearn: ROC AUC of a domain with one class only is undefined (NaN)
        warnings.simplefilter("ignore")
        for td in np.sort(np.unique(tumordomain)):
            m = tumordomain == td
            s = recall_score(y_true=gt[m], y_pred=pred[m])
            p = recall_score(y_true=gt[m], y_pred=pred[m], pos_label=0)
            out[f"domain_{td}"] = {"sensitivity": s, "specificity": p, "balanced_accuracy": (s + p) / 2,
                                   "accuracy": accuracy_score(y_true=gt[m], y_pred=pred[m]),
                                   "roc_auc": roc_auc_score(y_true=gt[m], y_score=score[m])}
    return out


# ---- the Dockerfile, its pins, its scripts -------------------------------------------------------------------

def test_dockerfile_follows_the_platform_conventions():
    assert re.search(r"^FROM --platform=linux/amd64 \$\{BASE_IMAGE\}$", DOCKERFILE, re.MULTILINE)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert re.search(rf"^ARG BASE_IMAGE=python:{re.escape(python)}-slim$", DOCKERFILE, re.MULTILINE), \
        f"the base image must carry the Python the suite runs ({python})"
    assert re.search(r"^ARG TRACK=auto$", DOCKERFILE, re.MULTILINE) and "MIDOG_EVAL_TRACK=${TRACK}" in DOCKERFILE
    assert re.search(r"^USER user$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^WORKDIR /opt/app$", DOCKERFILE, re.MULTILINE)
    assert entrypoint() == ["python", "-m", "midog.evaluate.container"]
    assert copy_sources() == ["midog"]
    ignore = (EVALUATION / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore and {"!midog", "!evaluation/requirements.txt"} <= set(ignore)
    assert "COPY evaluation/requirements.txt" in DOCKERFILE


def test_the_image_installs_the_suites_versions_and_no_torch():
    pinned = pins(EVALUATION / "requirements.txt")
    algorithm = pins(REPO_ROOT / "requirements.txt")
    assert not {"torch", "torchvision", "torchmetrics", "ultralytics", "timm"} & set(pinned)
    for name, version in pinned.items():
        assert algorithm.get(name, version) == version, f"{name}: requirements.txt pins {algorithm[name]}"
        assert importlib.metadata.version(name) == version, f"{name}: the suite runs {importlib.metadata.version(name)}"


def test_the_platform_paths_are_the_defaults():
    args = build_parser().parse_args([])
    assert (args.input, args.ground_truth, args.output) == (PLATFORM_INPUT, PLATFORM_GROUND_TRUTH, PLATFORM_OUTPUT)
    assert (PLATFORM_INPUT, PLATFORM_GROUND_TRUTH, PLATFORM_OUTPUT) == (
        Path("/input"), Path("/opt/ml/input/data/ground_truth"), Path("/output"))


@pytest.mark.parametrize("script", ["evaluation/build.sh", "evaluation/test.sh", "evaluation/export.sh",
                                    "revision.sh"])
def test_scripts_parse_and_are_executable(script: str):
    path = REPO_ROOT / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_revision_names_the_checkout():
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO_ROOT).returncode != 0
    revision = subprocess.run([str(REPO_ROOT / "revision.sh")], capture_output=True, text=True, check=True).stdout
    match = re.fullmatch(r"(?:.+-g)?([0-9a-f]{7,})(-dirty-[0-9a-f]{8})?\n", revision)
    assert match and head.stdout.startswith(match.group(1)), revision
    assert bool(match.group(2)) == dirty


FAKE_DOCKER = '''#!{python}
"""A stand-in for `docker`: logs its arguments; `run` runs the evaluation entry point (or --entrypoint python) on
the host with the --volume paths mapped, as the image would."""
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[0] == "image":
    print(os.environ.get("FAKE_DOCKER_LABEL", ""))
elif args[0] == "save":
    sys.stdout.write("image")
elif args[0] == "run":
    volumes, entry, i = {{}}, None, 1
    while args[i].startswith("--"):
        if args[i] in ("--rm", "--read-only"):
            i += 1
            continue
        if args[i] == "--volume":
            source, target = args[i + 1].split(":")[:2]
            volumes[target] = source
        if args[i] == "--entrypoint":
            entry = args[i + 1]
        i += 2
    rest = args[i + 1:]
    for target, source in sorted(volumes.items(), key=lambda v: -len(v[0])):
        rest = [source + a[len(target):] if a.startswith(target) else a for a in rest]
    if entry is None:
        rest = ["-m", "midog.evaluate.container", "--input", volumes["/input"], "--ground-truth",
                volumes["/opt/ml/input/data/ground_truth"], "--output", volumes["/output"], *rest]
    sys.exit(subprocess.run([sys.executable, *rest], cwd={repo!r}).returncode)
'''


@pytest.fixture
def fake_docker(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(FAKE_DOCKER.format(python=sys.executable, repo=str(REPO_ROOT)))
    docker.chmod(0o755)
    log = tmp_path / "docker.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DOCKER_LOG": str(log)}
    return env, log


def _calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_build_script_pins_the_platform_and_the_track(fake_docker: tuple[dict[str, str], Path]):
    env, log = fake_docker
    subprocess.run([str(EVALUATION / "build.sh")], env={**env, "TRACK": "1"}, check=True, capture_output=True)
    revision = subprocess.run([str(REPO_ROOT / "revision.sh")], capture_output=True, text=True).stdout.strip()
    (build,) = _calls(log)
    assert build[:2] == ["build", "--platform=linux/amd64"] and build[-1] == "."
    assert {"--file", "evaluation/Dockerfile", "TRACK=1", "midog-evaluation-track1",
            f"org.opencontainers.image.revision={revision}"} <= set(build)
    bad = subprocess.run([str(EVALUATION / "build.sh")], env={**env, "TRACK": "3"}, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: TRACK must be 1, 2 or auto")


def test_export_script_refuses_a_stale_image_and_stamps_the_tarball(fake_docker: tuple[dict[str, str], Path],
                                                                     tmp_path: Path):
    env, _ = fake_docker
    revision = subprocess.run([str(REPO_ROOT / "revision.sh")], capture_output=True, text=True).stdout.strip()
    out = tmp_path / "export"
    stale = subprocess.run([str(EVALUATION / "export.sh"), str(out)], env={**env, "FAKE_DOCKER_LABEL": "0000000"},
                           capture_output=True, text=True)
    assert stale.returncode == 1 and "run evaluation/build.sh" in stale.stderr and not out.exists()
    subprocess.run([str(EVALUATION / "export.sh"), str(out)], env={**env, "FAKE_DOCKER_LABEL": revision},
                   check=True, capture_output=True)
    assert [p.name for p in out.iterdir()] == [f"midog-evaluation_{revision}.tar.gz"]


def test_test_script_checks_both_tracks_on_the_official_vectors(fake_docker: tuple[dict[str, str], Path]):
    """evaluation/test.sh end to end with the stand-in docker: the platform's limits on every run, Track 1 rejected
    by the coordinate check and then matching the published metrics.json, Track 2 matching its expected file."""
    vectors = shared_path("grand-challenge")
    env, log = fake_docker
    result = subprocess.run([str(EVALUATION / "test.sh")], env={**env, "VECTORS": str(vectors)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rejected, as by the final container: error: job c82e7041" in result.stdout
    assert result.stdout.count("OK: ") == 2, result.stdout
    runs = [c for c in _calls(log) if c[0] == "run"]
    evaluations = [c for c in runs if "--entrypoint" not in c]
    assert len(evaluations) == 3 and len(runs) == 5
    for call in runs:
        assert {"--network", "none", "--read-only"} <= set(call)
    for call in evaluations:
        assert call[call.index("--memory") + 1] == "15g" and call[call.index("--memory-swap") + 1] == "15g"
        assert any(v.endswith(":/input:ro") for v in call) and any(v.endswith(":/opt/ml/input/data/ground_truth:ro")
                                                                   for v in call)


def test_track2_expected_file_is_what_the_final_container_computes():
    root = shared_path("grand-challenge", "track2-evaluation")
    ground_truth = json.loads((root / "ground_truth" / "ground_truth.json").read_text())
    expected = json.loads(TRACK2_EXPECTED.read_text())
    assert expected["results"] == {}
    assert_same_aggregates(expected["aggregates"], final_track2_aggregates(root / "test" / "input", ground_truth))


# ---- the image's file layout, run as the platform runs it ----------------------------------------------------

def _image_site_packages(folder: Path) -> None:
    """A site-packages holding only the distributions evaluation/requirements.txt pins: links into this
    environment's, so that an import of anything else (torch) fails as it would in the image."""
    folder.mkdir()
    for name in pins(EVALUATION / "requirements.txt"):
        distribution = importlib.metadata.distribution(name)
        for top in {Path(f).parts[0] for f in distribution.files or []} - {".."}:
            source = Path(distribution.locate_file(top))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)


def _no_network(prefix: list[str]) -> list[str]:
    """The prefix run in a network namespace of its own (no interface but a down loopback), where possible."""
    if os.geteuid() == 0 and shutil.which("unshare") and subprocess.run(
            ["unshare", "--net", "--", "true"], capture_output=True).returncode == 0:
        return ["unshare", "--net", "--", *prefix]
    return prefix


@pytest.fixture(scope="module")
def image() -> tuple[Path, list[str]]:
    """/opt/app rebuilt from evaluation/Dockerfile's COPY lines (read-only), the image's site-packages, a writable
    /tmp, under a world-traversable folder of its own (pytest's temp folders are private to their owner)."""
    root = Path(tempfile.mkdtemp(prefix="midog-evaluation-image-"))
    root.chmod(0o755)
    app = root / "opt" / "app"
    app.mkdir(parents=True)
    for source in copy_sources():
        shutil.copytree(REPO_ROOT / source, app / source, ignore=shutil.ignore_patterns("__pycache__"))
    _read_only(root / "opt")
    _image_site_packages(root / "site-packages")
    (root / "site-packages").chmod(0o555)
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)
    (root / "home").mkdir(mode=0o555)
    (root / "runs").mkdir(mode=0o755)
    scratch = root / "scratch"
    scratch.mkdir(mode=0o755)
    yield root, _no_network(_unprivileged_prefix(scratch))
    for folder, _, _ in os.walk(root):  # not into the links to this environment's packages
        os.chmod(folder, 0o755)
    shutil.rmtree(root)


def _run_folder(image: tuple[Path, list[str]], name: str, vectors: Path) -> Path:
    """<root>/runs/<name>/{input, ground_truth} copied from the vectors (edit them, then `_evaluate`), output/."""
    run = image[0] / "runs" / name
    run.mkdir(mode=0o755)
    shutil.copytree(vectors / "test" / "input", run / "input")
    shutil.copytree(vectors / "ground_truth", run / "ground_truth")
    for folder, _, files in os.walk(run):  # the shared copies are read-only; the tests edit theirs first
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(Path(folder) / name, 0o644)
    output = run / "output"
    output.mkdir(mode=0o777)
    output.chmod(0o777)
    return run


def _evaluate(image: tuple[Path, list[str]], run: Path, *args: str,
              track: str | None = None) -> subprocess.CompletedProcess[str]:
    """The image's entry point on `run`, as a non-root user with a read-only input, ground truth and app, only the
    image's packages (`-S`: none of this environment's), no network; asserts it wrote nowhere but output and tmp."""
    root, prefix = image
    _read_only(run / "input")
    _read_only(run / "ground_truth")
    python, *module = entrypoint()
    assert python == "python"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root / "home"), "TMPDIR": str(root / "tmp"),
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(root / "site-packages"), "YOLO_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    if track:
        env["MIDOG_EVAL_TRACK"] = track  # what the image's TRACK build argument sets
    before = _snapshot(root)
    result = subprocess.run([*prefix, sys.executable, "-S", *module, "--input", str(run / "input"),
                             "--ground-truth", str(run / "ground_truth"), "--output", str(run / "output"), *args],
                            cwd=root / "opt" / "app", capture_output=True, text=True, timeout=300, env=env)
    written = _snapshot(root) - before
    output = (run / "output").relative_to(root)
    outside = sorted(str(p) for p in written if p.parts[0] != "tmp" and p.parent != output)
    assert outside == [], f"written outside the output and temp folders: {outside}"
    if prefix and result.returncode == 0:
        assert {p.stat().st_uid for p in (run / "output").iterdir()} == {NOBODY}
    return result


def _assert_rejected(result: subprocess.CompletedProcess[str], run: Path, *fragments: str) -> None:
    """The platform's view of bad input: non-zero exit, one error line naming the problem, no metrics file."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert list((run / "output").iterdir()) == []


def test_track1_published_vectors_are_rejected_by_the_coordinate_check(image: tuple[Path, list[str]]):
    """As with the final container: job c82e7041 (007.tiff) has a point at (130.1, 115.5) mm."""
    run = _run_folder(image, "track1-checked", shared_path("grand-challenge", "track1-evaluation"))
    _assert_rejected(_evaluate(image, run), run, "job c82e7041-c42b-49c2-96d5-b0d8ec8bdc8f: points[1]",
                     "pixel coordinates")


def test_track1_official_vectors_give_every_aggregate_of_the_final_container(image: tuple[Path, list[str]]):
    vectors = shared_path("grand-challenge", "track1-evaluation")
    run = _run_folder(image, "track1", vectors)
    result = _evaluate(image, run, "--no-coordinate-check")  # the published vectors predate the check
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (run / "output").iterdir()] == ["metrics.json"]
    written = json.loads((run / "output" / "metrics.json").read_text())
    ground_truth = json.loads((vectors / "ground_truth" / "ground_truth.json").read_text())
    assert_same_aggregates(written["aggregates"], final_track1_aggregates(vectors / "test" / "input", ground_truth))
    published_file = json.loads((vectors / "test" / "output" / "metrics.json").read_text())
    published = published_file["aggregates"]
    assert len(published) == 24 and published["AP"] == PUBLISHED_TRACK1_AP
    for key, value in published.items():
        assert written["aggregates"][key] == pytest.approx(value, rel=0, abs=1e-12), key
    # per-image results as the container writes them: points and counts kept, each image's ground truth emptied
    by_image = {result["image"]: result for result in written["results"]}  # job order; the published file's differs
    assert len(by_image) == len(written["results"]) == len(published_file["results"])
    assert all(by_image[result["image"]] == result for result in published_file["results"])
    assert all(result["gt"] == [] for result in written["results"])

    stripped = _run_folder(image, "track1-aggregates-only", vectors)
    result = _evaluate(image, stripped, "--no-coordinate-check", "--aggregates-only")
    assert result.returncode == 0, result.stderr
    only = json.loads((stripped / "output" / "metrics.json").read_text())
    assert only["results"] == [] and only["aggregates"] == written["aggregates"]


@pytest.mark.parametrize("track", [None, "2"], ids=["auto", "pinned"])
def test_track2_official_vectors_give_every_aggregate_of_the_final_container(image: tuple[Path, list[str]],
                                                                            track: str | None):
    vectors = shared_path("grand-challenge", "track2-evaluation")
    run = _run_folder(image, f"track2-{track}", vectors)
    result = _evaluate(image, run, track=track)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (run / "output").iterdir()] == ["metrics.json"]
    written = json.loads((run / "output" / "metrics.json").read_text())
    assert written["results"] == {}
    ground_truth = json.loads((vectors / "ground_truth" / "ground_truth.json").read_text())
    assert_same_aggregates(written["aggregates"], final_track2_aggregates(vectors / "test" / "input", ground_truth))
    assert written["aggregates"]["overall_roc_auc"] == pytest.approx(FINAL_TRACK2_ROC_AUC, abs=1e-6)
    assert math.isnan(written["aggregates"]["domain_6"]["roc_auc"])


def test_a_pinned_track_refuses_the_other_tracks_ground_truth(image: tuple[Path, list[str]]):
    run = _run_folder(image, "track2-as-track1", shared_path("grand-challenge", "track2-evaluation"))
    _assert_rejected(_evaluate(image, run, track="1"), run, "is Track 2's", "TRACK=1")


def _edit_json(path: Path, edit) -> None:
    payload = json.loads(path.read_text())
    edit(payload)
    path.write_text(json.dumps(payload))


def _pixel_coordinates(run: Path) -> tuple[str, ...]:
    """007.tiff's 130 mm point back in mm, and every point of 201.tiff's job (the last) in pixels (0.25 µm/px)."""
    def millimetres(payload: dict[str, Any]) -> None:
        payload["points"][1]["point"] = [0.1301, 0.1155, 0.5]

    def pixels(payload: dict[str, Any]) -> None:
        for point in payload["points"]:
            point["point"] = [v * 4000 for v in point["point"]]

    _edit_json(run / "input" / "c82e7041-c42b-49c2-96d5-b0d8ec8bdc8f" / "output" / "mitotic-figures.json",
               millimetres)
    _edit_json(run / "input" / "0cb7cb36-4819-4c69-a43d-45b4de395e8d" / "output" / "mitotic-figures.json", pixels)
    return "job 0cb7cb36-4819-4c69-a43d-45b4de395e8d: points[0]", "pixel coordinates", "millimetres"


def _missing_output(run: Path) -> tuple[str, ...]:
    (run / "input" / "bf330895-59cf-4c19-8065-edc60c1deafe" / "output" /
     "multiple-mitotic-figure-classification.json").unlink()
    return "job bf330895-59cf-4c19-8065-edc60c1deafe output not found: ", "multiple-mitotic-figure-classification.json"


def _confidence(value: Any):
    def edit(run: Path) -> tuple[str, ...]:
        def set_value(payload: list[dict[str, Any]]) -> None:
            payload[3]["confidence"] = value

        _edit_json(run / "input" / "012079d4-8a8f-4e61-9c4c-3a0d289dfe12" / "output" /
                   "multiple-mitotic-figure-classification.json", set_value)
        return ("job 012079d4-8a8f-4e61-9c4c-3a0d289dfe12: entry 3: field 'confidence' must be a float",
                f"got {value!r}")
    return edit


@pytest.mark.parametrize("vectors, spoil", [
    ("track1-evaluation", _pixel_coordinates),
    ("track2-evaluation", _missing_output),
    ("track2-evaluation", _confidence(1)),
    ("track2-evaluation", _confidence("0.84")),
], ids=["pixel-coordinates", "missing-job-output", "integer-confidence", "string-confidence"])
def test_a_malformed_prediction_gives_one_error_line_and_no_metrics(image: tuple[Path, list[str]], vectors: str,
                                                                    spoil, request: pytest.FixtureRequest):
    run = _run_folder(image, request.node.callspec.id, shared_path("grand-challenge", vectors))
    fragments = spoil(run)
    _assert_rejected(_evaluate(image, run), run, *fragments)
