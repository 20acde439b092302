"""The one progress bar of every long step (tiles, verification, atypical labelling, stack pages; in training the
epochs, TTA scoring, dataset preparation, canvas building, false-positive mining): tqdm on stderr.

On a terminal it redraws in place and goes away when done. Anywhere else (a log file, a container's log) it waits
`LOG_INTERVAL_S` before its first line and writes at most one line per `LOG_INTERVAL_S`, each ended by a newline,
plus the final count: a step shorter than that leaves nothing in the log. `set_quiet(True)` (`--quiet` of process.py
and of every training command that draws bars: `midog.cli.add_quiet_option`) turns every bar off. `progress_iter`
is the same bar over an iterable (the training loops, the preparation steps).
A postfix (`bar.set_postfix(loss=...)`) is shown with the next count the bar writes, never on a line of its own, so
each line in a log shows the count and the postfix of one moment.
"""

from __future__ import annotations

import sys
from functools import cache
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from tqdm import tqdm

LOG_INTERVAL_S = 30.0
"""Seconds between two lines of a bar, and before its first, when stderr is not a terminal."""

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Every bar off (True), whatever its caller asked; process.py sets it from `--quiet` on each run, a training
    command as it parses `--quiet` (`midog.cli.add_quiet_option`)."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    """Whether `set_quiet(True)` holds (`midog.cli.entry_point` puts it back as it was when a command ends)."""
    return _quiet


class _LineEnded:
    """A non-terminal stream that gets each redraw of a bar as a line of its own, never a `\\r`-joined one."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        text = text.strip("\r\n").rstrip()  # tqdm's `\r` redraw and its padding; its closing `\n`
        if text:
            self._stream.write(text + "\n")

    def flush(self) -> None:
        getattr(self._stream, "flush", lambda: None)()


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> tqdm:
    """A tqdm bar of `total` `unit`s on stderr, or a silent one when `enabled` is False or `set_quiet(True)`."""
    return _bar_class()(total=total, desc=desc, unit=unit, **_settings(enabled))


def progress_iter(iterable: Iterable, total: int | None, desc: str, unit: str, enabled: bool = True) -> tqdm:
    """`progress_bar` over `iterable`: iterating it yields the items, each counted once the loop body is done with
    it (`total` None: `len(iterable)`). Leaving the loop early (`break`) closes the bar at the count reached."""
    return _bar_class()(iterable, total=total, desc=desc, unit=unit, **_settings(enabled))


def _settings(enabled: bool) -> dict[str, Any]:
    """tqdm's arguments: redrawn in place on a terminal; a whole line per `LOG_INTERVAL_S` anywhere else (no fixed
    width there, so a long description or postfix is never cut)."""
    stream = sys.stderr
    disable = not enabled or _quiet
    if getattr(stream, "isatty", lambda: False)():
        return {"file": stream, "disable": disable, "leave": False, "dynamic_ncols": True}
    return {"file": _LineEnded(stream), "disable": disable, "leave": True, "mininterval": LOG_INTERVAL_S,
            "delay": LOG_INTERVAL_S, "miniters": 1}


@cache
def _bar_class() -> type[tqdm]:
    """tqdm (imported on first use) whose postfix waits for the bar's next line."""
    from tqdm import tqdm

    class Bar(tqdm):
        def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
            """As tqdm's, but never a line of its own (`refresh` is ignored): one written now would bypass the
            interval and, in a loop over an iterable, show a count tqdm has not yet caught up with."""
            super().set_postfix(ordered_dict, refresh=False, **kwargs)

    return Bar
