"""Errors that end a run with one clear line on stderr and a documented exit code (see README)."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (its type name when the message is empty): the one line a user
    sees. Library messages often run over several lines, and some (EOFError of an empty file) have none."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class MidogError(Exception):
    """Base class: a failure the user can act on. `exit_code` is what process.py returns."""

    exit_code = 1


class InputError(MidogError):
    """The input folder is wrong: no inputs.json, unknown slug, no image, unreadable image."""

    exit_code = 2


class WeightsError(MidogError):
    """A checkpoint is missing, corrupt, or does not match its model card."""

    exit_code = 3


class OutputError(MidogError):
    """The output folder cannot be written."""

    exit_code = 4


class ConfigError(MidogError, ValueError):
    """The configuration is wrong: an unknown key, a value of the wrong kind or outside its range, unreadable YAML."""

    exit_code = 5
