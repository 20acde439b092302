"""process.py as grand-challenge runs it, each case in its own process: odd inputs it must handle, bad ones it must
refuse (the documented exit code, one `error:` line, no traceback, no output file), no network and no writes
outside the output and temp folders, and the same bytes twice.

Tiny random models in a temporary weights folder (MIDOG_WEIGHTS_DIR) and ROIs of at most 720 px keep it fast.
The matrix runs in children forked from a warm interpreter (tests/process_runner.py: own exit code, environment
and stderr, without importing torch again for each case); what happens at import time (network, settings files,
stderr noise) is tested in fresh `python process.py` processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import pytest
from output_checks import assert_multiple_points, assert_track2_entries
from process_runner import ProcessResult, WarmRunner, base_env, process_args, run_cold
from roi_factory import TRACK1_FOLDER, he_roi, tiny_track1_weights, track1_input
from stack_factory import TRACK2_SLUG, he_pages, track2_input
from stack_factory import write_tiff as write_stack_tiff

from midog.outputs import TRACK1_ATYPICAL_FILENAME, TRACK1_FILENAME, TRACK2_FILENAME
from midog.weights import REPO_WEIGHTS_DIR, write_model_card

TRACK1_FILES = sorted([TRACK1_FILENAME, TRACK1_ATYPICAL_FILENAME])
TRACK2_FILES = [TRACK2_FILENAME]
EXIT_INPUT, EXIT_WEIGHTS, EXIT_OUTPUT, EXIT_CONFIG = 2, 3, 4, 5  # docs/container.md, "Exit codes" (midog/errors.py)
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING) [\w.]+: ")
PROGRESS_BAR = re.compile(r"^(tiles|verification|atypical|pages): +\d+%\|")
SPACING_UM = 0.25


# ---- shared inputs: models, images, the warm runner ---------------------------------------------------------------

@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random detector (biased to propose), verifier and atypical classifier, as a weights folder."""
    return tiny_track1_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


def run_env(home: Path, weights: Path | None, **extra: str) -> dict[str, str]:
    env = base_env(home, MIDOG_ATYPICAL__TTA="false", MIDOG_RUNTIME__DEVICE="cpu", **extra)
    if weights is not None:
        env["MIDOG_WEIGHTS_DIR"] = str(weights)
    return env


@pytest.fixture(scope="module")
def runner(home: Path) -> Iterator[WarmRunner]:
    with WarmRunner(base_env(home)) as warm:
        yield warm


ROI = he_roi(720, 560, seed=5, figures=[(200, 180), (520, 400)])
"""The Track 1 reference ROI: 4 tiles of 512 px; the formats below store these pixels and must give its points."""


def _pages(count: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return he_pages(count, size=size, seed=seed)


# ---- the cases ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One input folder and what process.py must do with it. A case runs in its own folder: `in/` (written by
    `make(input_dir)`), the output folder (`out/` unless `output` says otherwise), and `weights/` when it needs its
    own."""

    make: Callable[[Path], None]
    files: list[str] = field(default_factory=list)
    """Output files expected on success; empty for a refused case."""
    exit_code: int = 0
    message: str = ""
    """Refused: a piece of the error line."""
    env: Mapping[str, str] = field(default_factory=dict)
    weights: Callable[[Path, Path], Path] | None = None
    """Builds this case's weights folder (case folder, shared tiny weights) → folder; None: the shared one."""
    output: str = "out"
    """The output folder, relative to the case folder."""
    shipped_weights: bool = False
    warning: str = ""
    """Succeeds: a piece of the one WARNING line expected on stderr; none when empty."""
    pages: int = 0
    """Track 2 succeeds: the number of entries (one per page)."""


def _track1(name: str = "roi.tif", pixels: np.ndarray = ROI, **tiff_options) -> Callable[[Path], None]:
    def make(input_dir: Path) -> None:
        track1_input(input_dir, pixels, name=name, **tiff_options)
    return make


def _track2(pages: np.ndarray | list[np.ndarray], name: str = "stack.tif") -> Callable[[Path], None]:
    def make(input_dir: Path) -> None:
        write_stack_tiff(track2_input(input_dir, name), pages)
    return make


def _streamed_pyramid(input_dir: Path) -> None:
    track1_input(input_dir, ROI, tile=256, pyramid_levels=2, compression="zlib")


def _no_inputs_json(input_dir: Path) -> None:
    _track2(_pages(2))(input_dir)
    (input_dir / "inputs.json").unlink()


def _inputs_json(entries: list) -> Callable[[Path], None]:
    def make(input_dir: Path) -> None:
        track1_input(input_dir, ROI)
        (input_dir / "inputs.json").write_text(json.dumps(entries))
    return make


def _empty_image_folder(input_dir: Path) -> None:
    (input_dir / "images" / TRACK1_FOLDER).mkdir(parents=True)
    track1_input(input_dir, None)
    (input_dir / "images" / TRACK1_FOLDER / "notes.txt").write_text("not an image")


def _two_images(input_dir: Path) -> None:
    _track2(_pages(2), "a.tif")(input_dir)
    _track2(_pages(2), "b.tiff")(input_dir)


def _truncated_roi(input_dir: Path) -> None:
    path = track1_input(input_dir, ROI)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _not_a_tiff(slug_folder: str) -> Callable[[Path], None]:
    def make(input_dir: Path) -> None:
        if slug_folder == TRACK1_FOLDER:
            (input_dir / "images" / TRACK1_FOLDER).mkdir(parents=True)
            path = track1_input(input_dir, None)
        else:
            path = track2_input(input_dir, "stack.tif")
        path.write_text("this is a text file with a .tif name\n" * 40)
    return make


def _read_only_output(input_dir: Path) -> None:
    _track2(_pages(2))(input_dir)
    (input_dir.parent / "out").mkdir()
    (input_dir.parent / "out").chmod(0o555)


def _output_under_a_file(input_dir: Path) -> None:
    _track2(_pages(2))(input_dir)
    (input_dir.parent / "blocker").write_text("a file where the output folder's parent should be")


def _atypical_output_is_a_folder(input_dir: Path) -> None:
    """Track 1's second output cannot be written: refused before any work, and nothing is written."""
    _track1()(input_dir)
    (input_dir.parent / "out" / TRACK1_ATYPICAL_FILENAME).mkdir(parents=True)


def _earlier_outputs_then(make: Callable[[Path], None]) -> Callable[[Path], None]:
    """`make`'s input, with an earlier run's results already in the output folder: a refused run removes them."""
    def make_with_outputs(input_dir: Path) -> None:
        make(input_dir)
        (input_dir.parent / "out").mkdir(parents=True, exist_ok=True)
        for name in (TRACK1_FILENAME, TRACK1_ATYPICAL_FILENAME, TRACK2_FILENAME):
            (input_dir.parent / "out" / name).write_text("[]")
    return make_with_outputs


def _copy_weights(case_dir: Path, weights: Path) -> Path:
    folder = case_dir / "weights"
    shutil.copytree(weights, folder)
    return folder


def _checksum_mismatch(case_dir: Path, weights: Path) -> Path:
    """A verifier whose model card was written for the full file, then the file was cut short (a broken copy)."""
    folder = _copy_weights(case_dir, weights)
    verifier = folder / "verifier.pt"
    write_model_card(verifier, {"note": "card of the complete file"})
    verifier.write_bytes(verifier.read_bytes()[:-1000])
    return folder


def _empty(name: str) -> Callable[[Path, Path], Path]:
    """A checkpoint of 0 bytes, as a failed upload leaves it."""
    def make(case_dir: Path, weights: Path) -> Path:
        folder = _copy_weights(case_dir, weights)
        (folder / name).write_bytes(b"")
        return folder
    return make


def _atypical_as_verifier(case_dir: Path, weights: Path) -> Path:
    folder = _copy_weights(case_dir, weights)
    shutil.copy(folder / "atypical.pt", folder / "verifier.pt")
    return folder


def _garbage(name: str) -> Callable[[Path, Path], Path]:
    def make(case_dir: Path, weights: Path) -> Path:
        folder = _copy_weights(case_dir, weights)
        (folder / name).write_bytes(np.random.default_rng(0).bytes(4096))
        return folder
    return make


SUCCEEDS: dict[str, Case] = {
    "track2 grayscale": Case(_track2(_pages(3)[..., 0]), TRACK2_FILES, pages=3),
    "track2 RGBA": Case(_track2(np.concatenate([_pages(3), np.full((3, 64, 64, 1), 255, np.uint8)], -1)),
                        TRACK2_FILES, pages=3),
    "track2 16-bit": Case(_track2(_pages(3).astype(np.uint16) * 257), TRACK2_FILES, pages=3),
    "track2 one page": Case(_track2(_pages(1)), TRACK2_FILES, pages=1),
    "track2 odd-sized pages, shipped weights": Case(
        _track2([_pages(1, size, seed=size)[0] for size in (7, 128, 61, 250)]), TRACK2_FILES, pages=4,
        shipped_weights=True),
    "track1 plain TIFF": Case(_track1(), TRACK1_FILES),
    "track1 smaller than a tile": Case(_track1(pixels=ROI[:200, :300]), TRACK1_FILES),
    "track1 no resolution tag": Case(_track1(spacing_um=None), TRACK1_FILES,
                                     warning="no resolution tag; assuming 0.25 µm/px"),
    "track1 all white": Case(_track1(pixels=np.full((560, 720, 3), 255, np.uint8)), TRACK1_FILES,
                             warning="no tile of roi.tif holds tissue"),
    "track1 grayscale, tiles run": Case(_track1(pixels=ROI.mean(axis=-1).astype(np.uint8)), TRACK1_FILES),
    "track1 mha": Case(_track1("roi.mha"), TRACK1_FILES),
    "track1 non-square spacing": Case(_track1(spacing_um=(SPACING_UM, 0.4)), TRACK1_FILES),
    "track1 BigTIFF": Case(_track1(bigtiff=True), TRACK1_FILES),
    "track1 pyramidal TIFF, streamed": Case(_streamed_pyramid, TRACK1_FILES,
                                            env={"MIDOG_IMAGE__IN_MEMORY_MAX_MEGAPIXELS": "0.1"}),
}

REFUSED: dict[str, Case] = {
    "missing inputs.json": Case(_no_inputs_json, exit_code=EXIT_INPUT, message="inputs.json"),
    "unknown slug": Case(_inputs_json([{"interface": {"slug": "some-other-interface"}}]), exit_code=EXIT_INPUT,
                         message="unknown interface slug"),
    "interface not an object": Case(_inputs_json([{"interface": ["histopathology-region-of-interest-cropout"]}]),
                                    exit_code=EXIT_INPUT, message="no interface slug"),
    "slug not a string": Case(_inputs_json([{"interface": {"slug": ["histopathology-region-of-interest-cropout"]}}]),
                              exit_code=EXIT_INPUT, message="interface slug must be a string"),
    "missing slug": Case(_inputs_json([{"image": {"name": "roi.tif"}, "interface": {"kind": "Image"}}]),
                         exit_code=EXIT_INPUT, message="no interface slug"),
    "no image": Case(_empty_image_folder, exit_code=EXIT_INPUT, message="no .tif/.tiff/.mha image"),
    "two images": Case(_two_images, exit_code=EXIT_INPUT, message="expected one image"),
    "truncated TIFF": Case(_truncated_roi, exit_code=EXIT_INPUT, message="truncated"),
    "truncated TIFF, an earlier run's results in the output folder": Case(
        _earlier_outputs_then(_truncated_roi), exit_code=EXIT_INPUT, message="truncated"),
    "track2 text file named .tif, an earlier run's results in the output folder": Case(
        _earlier_outputs_then(_not_a_tiff(TRACK2_SLUG)), exit_code=EXIT_INPUT, message="not a readable TIFF"),
    "track1 text file named .tif": Case(_not_a_tiff(TRACK1_FOLDER), exit_code=EXIT_INPUT,
                                        message="not a readable TIFF"),
    "track2 text file named .tif": Case(_not_a_tiff(TRACK2_SLUG), exit_code=EXIT_INPUT,
                                        message="not a readable TIFF"),
    "read-only output folder": Case(_read_only_output, exit_code=EXIT_OUTPUT, message="cannot write to output folder"),
    "output folder under a file": Case(_output_under_a_file, exit_code=EXIT_OUTPUT, output="blocker/out",
                                       message="cannot write to output folder"),
    "output folder under a file, checked before the weights load": Case(
        _output_under_a_file, exit_code=EXIT_OUTPUT, output="blocker/out", message="cannot write to output folder",
        env={"MIDOG_ATYPICAL__WEIGHTS": "absent.pt"}),
    "output file name taken by a folder": Case(_atypical_output_is_a_folder, exit_code=EXIT_OUTPUT,
                                               message="atypical-mitotic-figures.json"),
    "output file name taken by a folder, found before the weights load": Case(
        _atypical_output_is_a_folder, exit_code=EXIT_OUTPUT, message="a folder of that name is in the way",
        env={"MIDOG_ATYPICAL__WEIGHTS": "absent.pt"}),
    "missing weights": Case(_track1(), exit_code=EXIT_WEIGHTS, message="'absent.pt' not found",
                            env={"MIDOG_VERIFIER__WEIGHTS": "absent.pt"}),
    "checksum mismatch": Case(_track1(), exit_code=EXIT_WEIGHTS, message="checksum mismatch",
                              weights=_checksum_mismatch),
    "garbage atypical weights": Case(_track2(_pages(2)), exit_code=EXIT_WEIGHTS,
                                     message="cannot load classifier weights", weights=_garbage("atypical.pt")),
    "empty verifier weights": Case(_track1(), exit_code=EXIT_WEIGHTS, message="cannot load classifier weights",
                                   weights=_empty("verifier.pt")),
    "atypical weights as the verifier": Case(_track1(), exit_code=EXIT_WEIGHTS, message="not a verifier",
                                             weights=_atypical_as_verifier),
    "garbage detector weights": Case(_track1(), exit_code=EXIT_WEIGHTS, message="cannot load detector weights",
                                     weights=_garbage("detector.pt")),
    "threshold out of range": Case(_track2(_pages(2)), exit_code=EXIT_CONFIG, message="config atypical.threshold",
                                   env={"MIDOG_ATYPICAL__THRESHOLD": "1.5"}),
    "environment value YAML cannot parse": Case(_track2(_pages(2)), exit_code=EXIT_CONFIG,
                                                message="cannot read MIDOG_ATYPICAL__THRESHOLD",
                                                env={"MIDOG_ATYPICAL__THRESHOLD": "[0.5"}),
    "tile size off the detector's stride": Case(_track1(), exit_code=EXIT_CONFIG, message="multiple of its stride",
                                                env={"MIDOG_TILING__TILE_SIZE": "500"}),
    "unknown config key": Case(_track1(), exit_code=EXIT_CONFIG, message="unknown config key 'tiling.tilesize'",
                               env={"MIDOG_TILING__TILESIZE": "256"}),
}


@dataclass
class Ran:
    result: ProcessResult
    output: Path


def prepare(case: Case, case_dir: Path, weights: Path, home: Path) -> tuple[list[str], dict[str, str]]:
    case.make(case_dir / "in")
    if case.shipped_weights:
        if not (REPO_WEIGHTS_DIR / "atypical.pt").is_file():
            pytest.skip("needs the shipped weights/atypical.pt")
        folder = None
    else:
        folder = case.weights(case_dir, weights) if case.weights else weights
    return process_args(case_dir / "in", case_dir / case.output), run_env(home, folder, **case.env)


@pytest.fixture(scope="module")
def ran(runner: WarmRunner, weights: Path, home: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> Callable[[str], Ran]:
    """Run a case once (through the warm runner) and remember it: cases are compared with each other."""
    done: dict[str, Ran] = {}

    def run(name: str) -> Ran:
        if name not in done:
            case = SUCCEEDS.get(name) or REFUSED[name]
            case_dir = tmp_path_factory.mktemp(re.sub(r"\W+", "_", name))
            args, env = prepare(case, case_dir, weights, home)
            done[name] = Ran(runner.run(args, env, cwd=case_dir), case_dir / case.output)
        return done[name]

    return run


def output_files(folder: Path) -> list[str]:
    """The files in an output folder and below it (temporary files included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def unexpected_stderr(result: ProcessResult) -> list[str]:
    """stderr lines that are neither log records nor the tile progress bar (e.g. a library printing, a warning)."""
    return [line for line in result.stderr_lines if not LOG_RECORD.match(line) and not PROGRESS_BAR.match(line)]


def warnings_logged(result: ProcessResult) -> list[str]:
    return [line for line in result.stderr_lines if " WARNING " in line]


# ---- succeeds -----------------------------------------------------------------------------------------------------

def load_outputs(run: Ran) -> dict[str, object]:
    return {name: json.loads((run.output / name).read_text()) for name in output_files(run.output)}


def points(run: Ran) -> list[dict]:
    return json.loads((run.output / TRACK1_FILENAME).read_text())["points"]


def assert_same_points(actual: list[dict], expected: list[dict], y_scale: float = 1.0) -> None:
    assert [p["name"] for p in actual] == [p["name"] for p in expected]
    np.testing.assert_allclose([p["probability"] for p in actual], [p["probability"] for p in expected], atol=1e-6)
    np.testing.assert_allclose([p["point"] for p in actual],
                               [[p["point"][0], p["point"][1] * y_scale, 0.0] for p in expected], rtol=1e-9, atol=1e-12)


def check_track2(name: str, run: Ran) -> None:
    entries = load_outputs(run)[TRACK2_FILENAME]
    assert_track2_entries(entries)
    assert len(entries) == SUCCEEDS[name].pages
    if not SUCCEEDS[name].shipped_weights:  # the tiny model's stored threshold is 0.5
        assert all((e["class"] == "atypical") == (e["confidence"] >= 0.5) for e in entries)


def check_track1(name: str, run: Ran, ran: Callable[[str], Ran]) -> None:
    outputs = load_outputs(run)
    figures, atypical = outputs[TRACK1_FILENAME], outputs[TRACK1_ATYPICAL_FILENAME]
    assert_multiple_points(figures)
    assert_multiple_points(atypical)
    accepted = [p["point"] for p in figures["points"] if p["name"] == "mitotic figure"]
    assert [p["point"] for p in atypical["points"]] == accepted
    reference = points(ran("track1 plain TIFF"))
    if name == "track1 plain TIFF":
        assert figures["points"], "the biased tiny detector proposes candidates on the reference ROI"
        return
    if name == "track1 all white":
        assert figures["points"] == [] and atypical["points"] == []
    elif name == "track1 grayscale, tiles run":  # other pixels, so other points; but not skipped as glass
        assert figures["points"]
    elif name == "track1 smaller than a tile":
        for point in figures["points"]:
            assert 0 <= point["point"][0] <= 300 * SPACING_UM / 1000 and 0 <= point["point"][1] <= 200 * SPACING_UM / 1000
    elif name == "track1 non-square spacing":  # resampled to the models' 0.25 µm/px along y: other pixels,
        assert figures["points"]                # points inside the image's own physical extent
        for point in figures["points"]:
            assert 0 <= point["point"][0] <= 720 * SPACING_UM / 1000 and 0 <= point["point"][1] <= 560 * 0.4 / 1000
        assert [p["point"] for p in figures["points"]] != [p["point"] for p in reference]
    else:  # the same pixels at 0.25 µm/px in another container (or the fallback spacing): the same points
        assert_same_points(figures["points"], reference)


@pytest.mark.parametrize("name", list(SUCCEEDS))
def test_odd_input_succeeds(name: str, ran: Callable[[str], Ran]):
    run = ran(name)
    assert run.result.returncode == 0, run.result.stderr
    assert "Traceback" not in run.result.stderr and unexpected_stderr(run.result) == [], run.result.stderr
    assert output_files(run.output) == SUCCEEDS[name].files  # and nothing else: no temporary file left
    warnings = warnings_logged(run.result)
    expected = SUCCEEDS[name].warning
    assert len(warnings) == bool(expected) and all(expected in line for line in warnings), warnings
    if name.startswith("track2"):
        check_track2(name, run)
    else:
        check_track1(name, run, ran)


# ---- refused ------------------------------------------------------------------------------------------------------

def assert_refused(result: ProcessResult, output: Path, exit_code: int, message: str) -> None:
    """The documented exit code; the last stderr line is the one `error:` line, anything before it a log record (or
    the tile progress bar); no file in the output folder."""
    lines = result.stderr_lines
    assert result.returncode == exit_code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    assert all(LOG_RECORD.match(line) or PROGRESS_BAR.match(line) for line in lines[:-1]), result.stderr
    assert output_files(output) == [], "a refused run leaves no output file, partial or temporary"


@pytest.mark.parametrize("name", list(REFUSED))
def test_bad_input_is_refused(name: str, ran: Callable[[str], Ran]):
    if name == "read-only output folder" and os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder; 'output folder under a file' covers the refusal")
    run = ran(name)
    assert_refused(run.result, run.output, REFUSED[name].exit_code, REFUSED[name].message)


def test_debug_shows_the_traceback(tmp_path: Path, home: Path):
    _no_inputs_json(tmp_path / "in")
    args = process_args(tmp_path / "in", tmp_path / "out")
    quiet = run_cold(args, run_env(home, None), cwd=tmp_path)
    debug = run_cold([*args, "--debug"], run_env(home, None), cwd=tmp_path)
    assert "Traceback" not in quiet.stderr and quiet.returncode == EXIT_INPUT
    assert debug.returncode == EXIT_INPUT  # the documented code, with or without --debug
    assert "Traceback (most recent call last)" in debug.stderr
    assert "midog.errors.InputError: inputs.json not found" in debug.stderr
    assert output_files(tmp_path / "out") == []


@pytest.mark.parametrize("argv, message", [(["--inptu", "x"], "unrecognized arguments: --inptu x"),
                                           (["--input"], "argument --input: expected one argument")])
def test_a_usage_error_is_one_line_and_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]):
    from midog.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert exited.value.code == EXIT_INPUT
    assert len(lines) == 1 and lines[0].startswith(f"error: {message} (see ") and lines[0].endswith(" --help)")


# ---- offline, and nothing written outside the output and temp folders ---------------------------------------------

SOCKET_GUARD = textwrap.dedent('''
    """Installed by tests/test_process_inputs.py as sitecustomize: any network use is logged, then refused."""
    import os
    import socket

    _LOG = os.environ["MIDOG_TEST_NETWORK_LOG"]
    _connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


    def _refuse(what, detail):
        with open(_LOG, "a") as log:
            log.write(f"{what} {detail!r}\\n")
        raise OSError(f"network use refused by the test: {what} {detail!r}")


    def connect(self, address):
        if self.family == socket.AF_UNIX:
            return _connect(self, address)
        _refuse("connect", address)


    def connect_ex(self, address):
        if self.family == socket.AF_UNIX:
            return _connect_ex(self, address)
        _refuse("connect_ex", address)


    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = lambda host, *args, **kwargs: _refuse("getaddrinfo", host)
    socket.gethostbyname = lambda host: _refuse("gethostbyname", host)
    socket.create_connection = lambda address, *args, **kwargs: _refuse("create_connection", address)
''')


def unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


NETWORK_CUT = "unshare -n + socket guard" if unshare_works() else "socket guard"


def offline_run(root: Path, make: Callable[[Path], None], weights: Path) -> tuple[ProcessResult, Path]:
    """process.py in a fresh interpreter with no network, an empty home and working folder, and none of the offline
    variables set: midog must set them itself. Returns the result and the log of refused network use."""
    for folder in ("home", "cwd", "tmp", "guard"):
        (root / folder).mkdir()
    (root / "guard" / "sitecustomize.py").write_text(SOCKET_GUARD)
    make(root / "in")
    network_log = root / "network.log"
    env = base_env(root / "home", TMPDIR=str(root / "tmp"), PYTHONPATH=str(root / "guard"),
                   MIDOG_TEST_NETWORK_LOG=str(network_log), MIDOG_WEIGHTS_DIR=str(weights),
                   MIDOG_RUNTIME__DEVICE="cpu")
    prefix = ["unshare", "-n"] if NETWORK_CUT.startswith("unshare") else []
    result = run_cold(process_args(root / "in", root / "out"), env, cwd=root / "cwd", prefix=prefix)
    return result, network_log


@pytest.mark.parametrize("track", ["track1", "track2"], ids=lambda track: f"{track}, {NETWORK_CUT}")
def test_runs_offline_and_writes_only_its_output(track: str, tmp_path: Path, weights: Path,
                                                 record_property: Callable[[str, object], None]):
    record_property("network_cut", NETWORK_CUT)
    print(f"network cut off with: {NETWORK_CUT}")
    make, files = (_track1(), TRACK1_FILES) if track == "track1" else (_track2(_pages(3)), TRACK2_FILES)
    result, network_log = offline_run(tmp_path, make, weights)
    assert result.returncode == 0, f"[{NETWORK_CUT}] {result.stderr}"
    assert not network_log.exists(), f"[{NETWORK_CUT}] network use: {network_log.read_text()}"
    assert output_files(tmp_path / "out") == files
    written = [str(p.relative_to(tmp_path)) for folder in ("home", "cwd") for p in (tmp_path / folder).rglob("*")]
    assert written == [], f"written outside the output and temp folders: {written}"
    assert "Traceback" not in result.stderr and unexpected_stderr(result) == [], result.stderr


# ---- determinism --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["track1 plain TIFF", "track2 16-bit"])
def test_same_input_twice_gives_the_same_bytes(name: str, ran: Callable[[str], Ran], runner: WarmRunner,
                                               weights: Path, home: Path, tmp_path: Path):
    first = ran(name)
    assert first.result.returncode == 0, first.result.stderr
    args = process_args(first.output.parent / "in", tmp_path / "again")
    again = runner.run(args, run_env(home, weights, **SUCCEEDS[name].env), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert output_files(tmp_path / "again") == SUCCEEDS[name].files
    for file in SUCCEEDS[name].files:
        assert (tmp_path / "again" / file).read_bytes() == (first.output / file).read_bytes(), file
