"""Track 2 end to end through process.py's main(): every odd stack format, the real stack, and every bad input
(non-zero exit, one line on stderr, no output file)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import REPO_ROOT, shared_path
from output_checks import assert_track2_entries
from stack_factory import he_pages, tiny_atypical, track2_input, write_mha, write_tiff

from midog.atypical import load_atypical
from midog.cli import main
from midog.config import AtypicalConfig
from midog.outputs import TRACK2_FILENAME


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_atypical(tmp_path_factory.mktemp("weights") / "atypical.pt", threshold=0.5, seed=3)


@pytest.fixture(autouse=True)
def _tiny_weights(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIDOG_ATYPICAL__WEIGHTS", str(weights))
    monkeypatch.setenv("MIDOG_RUNTIME__DEVICE", "cpu")


def run(input_dir: Path, output_dir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """process.py's exit code and its stderr lines other than log lines. `--quiet`: a page bar that outlasts 30 s
    (a loaded machine) writes progress lines to a stderr that is not a terminal, which are not errors."""
    code = main(["--input", str(input_dir), "--output", str(output_dir), "--quiet"])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if " INFO " not in line]


def read_output(output_dir: Path) -> list[dict]:
    entries = json.loads((output_dir / TRACK2_FILENAME).read_text())
    assert_track2_entries(entries)
    return entries


def expected_entries(pages: list[np.ndarray] | np.ndarray, weights: Path) -> list[dict]:
    stage = load_atypical(AtypicalConfig(weights=str(weights)))
    probabilities = stage.predict_proba(list(pages))
    return [{"class": "atypical" if p >= stage.threshold else "normal", "confidence": float(p)}
            for p in probabilities]


def assert_matches(entries: list[dict], expected: list[dict]) -> None:
    assert [e["class"] for e in entries] == [e["class"] for e in expected]
    np.testing.assert_allclose([e["confidence"] for e in entries], [e["confidence"] for e in expected], atol=1e-5)


def test_16_page_rgb_stack(tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]):
    pages = he_pages(16, seed=11)
    write_tiff(track2_input(tmp_path / "in"), pages)
    code, errors = run(tmp_path / "in", tmp_path / "out", capsys)
    assert code == 0 and errors == []
    entries = read_output(tmp_path / "out")
    assert len(entries) == 16
    assert_matches(entries, expected_entries(pages, weights))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [TRACK2_FILENAME]


def _rgb(n: int, size: int = 40, seed: int = 0) -> np.ndarray:
    return he_pages(n, size=size, seed=seed)


ODD_STACKS = {
    "gray8.tif": lambda p: write_tiff(p, _rgb(5)[..., 0]),
    "rgba.tiff": lambda p: write_tiff(p, np.concatenate([_rgb(5), np.full((5, 40, 40, 1), 255, np.uint8)], -1)),
    "rgb16.tif": lambda p: write_tiff(p, _rgb(5).astype(np.uint16) * 257),
    "gray16.tif": lambda p: write_tiff(p, _rgb(3)[..., 2].astype(np.uint16) * 200),
    "one_page.tif": lambda p: write_tiff(p, _rgb(1)),
    "odd_sizes.tif": lambda p: write_tiff(p, [_rgb(1, s, s)[0] for s in (7, 128, 61, 250)]),
    "zlib.tif": lambda p: write_tiff(p, _rgb(4), compression="zlib"),
    "stack.mha": lambda p: write_mha(p, _rgb(6)),
    "gray16_compressed.mha": lambda p: write_mha(p, _rgb(3)[..., 1].astype(np.uint16) * 257, compress=True),
    "single.mha": lambda p: write_mha(p, _rgb(1)[0], vector=True),
}
ODD_COUNTS = {"gray8.tif": 5, "rgba.tiff": 5, "rgb16.tif": 5, "gray16.tif": 3, "one_page.tif": 1, "odd_sizes.tif": 4,
              "zlib.tif": 4, "stack.mha": 6, "gray16_compressed.mha": 3, "single.mha": 1}


@pytest.mark.parametrize("name", sorted(ODD_STACKS))
def test_odd_stack_formats(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]):
    ODD_STACKS[name](track2_input(tmp_path / "in", name))
    code, errors = run(tmp_path / "in", tmp_path / "out", capsys)
    assert code == 0 and errors == []
    assert len(read_output(tmp_path / "out")) == ODD_COUNTS[name]


def test_rgba_gray_and_16bit_give_the_same_answer_as_rgb(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    pages = _rgb(4, seed=4)
    gray = np.repeat(pages[..., :1], 3, axis=-1)
    variants = {"rgb.tif": pages, "rgba.tif": np.concatenate([pages, np.zeros_like(pages[..., :1])], -1),
                "rgb16.tif": pages.astype(np.uint16) * 257, "gray.tif": pages[..., 0], "gray_rgb.tif": gray}
    results = {}
    for name, data in variants.items():
        write_tiff(track2_input(tmp_path / name, name), data)
        assert run(tmp_path / name, tmp_path / f"{name}.out", capsys)[0] == 0
        results[name] = read_output(tmp_path / f"{name}.out")
    for name in ("rgba.tif", "rgb16.tif"):
        assert_matches(results[name], results["rgb.tif"])
    assert_matches(results["gray.tif"], results["gray_rgb.tif"])


def test_pages_stream_in_configured_batches(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch):
    pages = _rgb(37, size=24, seed=6)
    write_tiff(track2_input(tmp_path / "in"), pages)
    monkeypatch.setenv("MIDOG_ATYPICAL__BATCH_SIZE", "5")
    assert run(tmp_path / "in", tmp_path / "small", capsys)[0] == 0
    monkeypatch.setenv("MIDOG_ATYPICAL__BATCH_SIZE", "64")
    assert run(tmp_path / "in", tmp_path / "large", capsys)[0] == 0
    small, large = read_output(tmp_path / "small"), read_output(tmp_path / "large")
    assert len(small) == 37
    assert_matches(small, large)


def test_large_pages_are_read_within_the_pixel_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch):
    """Four 1,000 px pages with a 2.5 MP budget: read two at a time, whatever atypical.batch_size says."""
    from midog.stack_io import TiffStack

    write_tiff(track2_input(tmp_path / "in"), _rgb(4, size=1000, seed=7))
    reads: list[int] = []
    read_pages = TiffStack.read_pages
    monkeypatch.setattr(TiffStack, "read_pages", lambda self, a, b: reads.append(b - a) or read_pages(self, a, b))
    monkeypatch.setenv("MIDOG_ATYPICAL__MAX_BATCH_MEGAPIXELS", "2.5")
    assert run(tmp_path / "in", tmp_path / "out", capsys)[0] == 0
    assert reads == [2, 2] and len(read_output(tmp_path / "out")) == 4


def test_same_input_twice_is_byte_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    write_tiff(track2_input(tmp_path / "in"), _rgb(6, seed=8))
    for out in ("a", "b"):
        assert run(tmp_path / "in", tmp_path / out, capsys)[0] == 0
    assert (tmp_path / "a" / TRACK2_FILENAME).read_bytes() == (tmp_path / "b" / TRACK2_FILENAME).read_bytes()


def test_real_grand_challenge_stack(tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]):
    example = shared_path("grand-challenge", "track2-input-example")
    code, errors = run(example, tmp_path / "out", capsys)
    assert code == 0 and errors == []
    entries = read_output(tmp_path / "out")
    assert len(entries) == 16
    pages = tifffile.imread(example / "images" / "stacked-histopathology-roi-cropouts" / "stack_5.tiff")
    assert_matches(entries, expected_entries(pages, weights))
    threshold = load_atypical(AtypicalConfig(weights=str(weights))).threshold
    assert all((e["class"] == "atypical") == (e["confidence"] >= threshold) for e in entries)


# ---- bad input: non-zero exit, one line on stderr, no output file ----

def _no_inputs_json(root: Path) -> None:
    write_tiff(track2_input(root), _rgb(2))
    (root / "inputs.json").unlink()


def _unknown_slug(root: Path) -> None:
    write_tiff(track2_input(root), _rgb(2))
    (root / "inputs.json").write_text(json.dumps([{"interface": {"slug": "something-else"}}]))


def _no_image(root: Path) -> None:
    track2_input(root)


def _two_images(root: Path) -> None:
    write_tiff(track2_input(root, "a.tif"), _rgb(2))
    write_tiff(track2_input(root, "b.tif"), _rgb(2))


def _truncated(root: Path) -> None:
    path = write_tiff(track2_input(root), _rgb(8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _not_an_image(root: Path) -> None:
    track2_input(root, "stack.mha").write_bytes(b"not a metaimage at all\n" * 20)


def _missing_weights(root: Path) -> None:
    write_tiff(track2_input(root), _rgb(2))


BAD_INPUTS = {
    "missing inputs.json": (_no_inputs_json, 2, "inputs.json"),
    "unknown slug": (_unknown_slug, 2, "unknown interface slug"),
    "no image": (_no_image, 2, "no .tif/.tiff/.mha image"),
    "two images": (_two_images, 2, "expected one image"),
    "truncated tiff": (_truncated, 2, "truncated"),
    "non-image mha": (_not_an_image, 2, "not a readable MetaImage"),
    "missing weights": (_missing_weights, 3, "not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    make, exit_code, message = BAD_INPUTS[case]
    make(tmp_path / "in")
    if case == "missing weights":
        monkeypatch.setenv("MIDOG_ATYPICAL__WEIGHTS", "no-such-atypical.pt")
    code, errors = run(tmp_path / "in", tmp_path / "out", capsys)
    assert code == exit_code
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], errors
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_unwritable_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    write_tiff(track2_input(tmp_path / "in"), _rgb(2))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder should be")
    code, errors = run(tmp_path / "in", blocker / "out", capsys)
    assert code == 4
    assert len(errors) == 1 and "cannot write to output folder" in errors[0]


@pytest.mark.parametrize("case", ["truncated tiff", "non-image mha"])
def test_bad_input_in_a_real_process_prints_exactly_one_line(tmp_path: Path, weights: Path, case: str):
    BAD_INPUTS[case][0](tmp_path / "in")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "process.py"), "--input", str(tmp_path / "in"),
                             "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "MIDOG_ATYPICAL__WEIGHTS": str(weights),
                                 "YOLO_OFFLINE": "1", "HOME": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: ")
    assert not (tmp_path / "out" / TRACK2_FILENAME).exists()


def test_shipped_container_case_matches_its_expected_output(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch):
    """`make run` / test.sh in miniature: the shipped weights on test/input/track2-generated."""
    case = REPO_ROOT / "test" / "input" / "track2-generated"
    if not (REPO_ROOT / "weights" / "atypical.pt").is_file() or not case.is_dir():
        pytest.skip("needs the shipped weights/atypical.pt and the case test/make_cases.py writes from them")
    monkeypatch.delenv("MIDOG_ATYPICAL__WEIGHTS")
    monkeypatch.delenv("MIDOG_WEIGHTS_DIR", raising=False)
    code, errors = run(case, tmp_path / "out", capsys)
    assert code == 0 and errors == []
    from midog.compare import main as compare_main

    assert compare_main([str(tmp_path / "out"), str(REPO_ROOT / "test" / "output" / "track2-generated")]) == 0
    assert capsys.readouterr().out.startswith("OK: ")
