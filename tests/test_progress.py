"""Progress bars (midog/progress.py): redrawn on a terminal, a few whole lines in a log, none when disabled or under
process.py --quiet; every long step of both tracks has one, and so do the training loops (`progress_iter`), whose
logged lines show a count and a postfix of one moment."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import tqdm.std
from conftest import REPO_ROOT
from roi_factory import he_roi, tiny_track1_weights
from stack_factory import he_pages, tiny_atypical, track2_input, write_tiff

from midog.config import load_config
from midog.outputs import TRACK2_FILENAME
from midog.pipeline import Track1Detector
from midog import progress
from midog.progress import LOG_INTERVAL_S, progress_bar, progress_iter, set_quiet
from midog.roi_io import ArrayRoi, PhysicalTransform


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def bar_lines(text: str, desc: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]", text) if re.match(rf"^{desc}: +\d+%\|", line)]


@pytest.fixture(autouse=True)
def _not_quiet():
    set_quiet(False)
    yield
    set_quiet(False)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """tqdm's clock, advanced by hand: `clock[0]` seconds."""
    now = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    return now


def test_a_disabled_or_quieted_bar_writes_nothing(monkeypatch: pytest.MonkeyPatch):
    for enabled, quiet, writes in ((True, False, True), (False, False, False), (True, True, False)):
        stderr = Terminal()
        monkeypatch.setattr(sys, "stderr", stderr)
        set_quiet(quiet)
        with progress_bar(100, "pages", "page", enabled) as bar:
            for _ in range(100):
                bar.update(1)
        assert bool(bar_lines(stderr.getvalue(), "pages")) == writes, (enabled, quiet, stderr.getvalue())
        if not writes:
            assert stderr.getvalue() == ""


def test_in_a_log_a_bar_writes_a_whole_line_per_interval(monkeypatch: pytest.MonkeyPatch, clock: list[float]):
    stderr = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", stderr)
    with progress_bar(10_000, "verification", "candidate") as bar:
        for _ in range(10_000):
            clock[0] += 0.01  # 100 s in all
            bar.update(1)
    text = stderr.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n"), repr(text)  # nothing half drawn for a log record to join
    assert lines == bar_lines(text, "verification")
    assert 3 <= len(lines) <= 100 / LOG_INTERVAL_S + 1, lines  # one per interval and the final count
    assert "10000/10000" in lines[-1] and "10000/10000" not in lines[-2]


def test_in_a_log_a_short_step_writes_nothing(monkeypatch: pytest.MonkeyPatch, clock: list[float]):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    with progress_bar(50, "pages", "page") as bar:
        for _ in range(50):
            clock[0] += 0.5 * LOG_INTERVAL_S / 50
            bar.update(1)
    assert stderr.getvalue() == ""


def test_in_a_log_a_loop_writes_its_count_and_postfix_of_one_moment(monkeypatch: pytest.MonkeyPatch,
                                                                     clock: list[float]):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    bar = progress_iter(range(1000), 1000, "train ep1", "batch")
    for step in bar:
        clock[0] += 0.1  # 100 s in all
        bar.set_postfix(loss=str(step))  # refresh=True, as train_verifier asks: still no line of its own
    text = stderr.getvalue()
    lines = text.splitlines()
    assert lines == bar_lines(text, "train ep1") and "\r" not in text, repr(text)
    assert 3 <= len(lines) <= 100 / LOG_INTERVAL_S + 1, lines  # one per interval and the final count
    for line in lines:
        done, loss = re.search(r" (\d+)/1000 \[.*, loss=(\d+)\]$", line).groups()
        assert int(done) == int(loss) + 1, line  # the count includes the step whose loss the line shows
    assert " 1000/1000 " in lines[-1]


def test_a_loop_left_early_closes_its_bar_at_the_count_reached(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0)  # every count on a line of its own
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    for step in progress_iter(range(10), 10, "verifier ep2", "batch"):
        if step == 4:  # train_verifier's max_steps
            break
    lines = bar_lines(stderr.getvalue(), "verifier ep2")
    assert [re.search(r" (\d+)/10 ", line).group(1) for line in lines][-2:] == ["4", "4"], lines


def test_a_disabled_loop_yields_everything_and_writes_nothing(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0)
    for stderr, enabled, quiet in ((io.StringIO(), False, False), (Terminal(), False, False), (Terminal(), True, True)):
        monkeypatch.setattr(sys, "stderr", stderr)
        set_quiet(quiet)
        bar = progress_iter(iter(range(5)), 5, "proposals", "slide", enabled)
        assert [step for step in bar] == list(range(5))
        bar.set_postfix(loss="0.1")
        assert stderr.getvalue() == ""


def test_on_a_terminal_a_loop_shows_its_postfix(monkeypatch: pytest.MonkeyPatch, clock: list[float]):
    stderr = Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    bar = progress_iter(range(3), 3, "train ep1", "batch")
    for step in bar:
        clock[0] += 1.0
        bar.set_postfix(loss=str(step))
    assert bar_lines(stderr.getvalue(), "train ep1")[-1].endswith(" 3/3 [00:03<00:00,  1.00batch/s, loss=2]")


def test_track1_detect_shows_a_bar_per_stage_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MIDOG_WEIGHTS_DIR", str(tiny_track1_weights(tmp_path / "weights")))
    config = load_config(overrides={"atypical.tta": False, "verifier.threshold": 0.0})  # every candidate a figure
    detector = Track1Detector.from_config(config, device="cpu")
    image = ArrayRoi(he_roi(700, 600, seed=5, figures=[(300, 300)]), PhysicalTransform((2.5e-4,) * 2))
    for wanted in (True, False):
        stderr = Terminal()
        monkeypatch.setattr(sys, "stderr", stderr)
        result = detector.detect(image, progress=wanted)
        assert result.mitotic_figures, "the biased tiny detector proposes candidates"
        for desc in ("tiles", "verification", "atypical"):
            assert bool(bar_lines(stderr.getvalue(), desc)) == wanted, (desc, stderr.getvalue())


def run_in_terminal(args: list[str], env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    """`python process.py ARGS` with stderr on a pseudo-terminal (as a user at a shell): exit code, what it showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty has 0 columns
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "process.py"), *args], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=slave, env=env, cwd=REPO_ROOT)
    os.close(slave)
    shown, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    return code, shown.decode(errors="replace")


def test_process_py_quiet_shows_no_bar_on_a_terminal(tmp_path: Path):
    weights = tiny_atypical(tmp_path / "atypical.pt", threshold=0.5, seed=3)
    write_tiff(track2_input(tmp_path / "in"), he_pages(5, size=40, seed=2))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "MIDOG_ATYPICAL__WEIGHTS": str(weights), "MIDOG_RUNTIME__DEVICE": "cpu", "YOLO_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    shown = {}
    for flags in ((), ("--quiet",)):
        out = tmp_path / ("quiet" if flags else "plain")
        code, shown[flags] = run_in_terminal(["--input", str(tmp_path / "in"), "--output", str(out), *flags], env)
        assert code == 0, shown[flags]
        assert (out / TRACK2_FILENAME).is_file()
    assert bar_lines(shown[()], "pages"), shown[()]  # the bar is there without --quiet ...
    assert "%|" not in shown[("--quiet",)], shown[("--quiet",)]  # ... and no bar at all with it
    assert " INFO midog" in shown[("--quiet",)]  # the log is unchanged
