"""The one progress bar of every long step (tiles, verification, atypical labelling, stack pages): tqdm on stderr.

On a terminal it redraws in place and goes away when done. Anywhere else (a log file, a container's log) it waits
`LOG_INTERVAL_S` before its first line and writes at most one line per `LOG_INTERVAL_S`, each ended by a newline,
plus the final count: a step shorter than that leaves nothing in the log. `set_quiet(True)` (process.py `--quiet`)
turns every bar off.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm

LOG_INTERVAL_S = 30.0
"""Seconds between two lines of a bar, and before its first, when stderr is not a terminal."""

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Every bar off (True), whatever its caller asked; process.py sets it from `--quiet` on each run."""
    global _quiet
    _quiet = bool(quiet)


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
    from tqdm import tqdm

    stream = sys.stderr
    tty = bool(getattr(stream, "isatty", lambda: False)())
    if tty:
        return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=not enabled or _quiet, leave=False,
                    dynamic_ncols=True)
    return tqdm(total=total, desc=desc, unit=unit, file=_LineEnded(stream), disable=not enabled or _quiet,
                leave=True, mininterval=LOG_INTERVAL_S, delay=LOG_INTERVAL_S, miniters=1, ncols=80)
