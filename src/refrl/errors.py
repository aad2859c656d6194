"""User-facing errors. The CLI prints ``RefrlError`` as one line and exits non-zero
(``exit_code``: 2 where the user's input is at fault, 1 where the run failed)."""

from __future__ import annotations

import reprlib

# Longest quote of an input inside an error message (a value, a key, a file's text):
# a 50 MB value or a deeply nested one must not become a 50 MB error line.
MAX_QUOTE_CHARS = 200


class RefrlError(Exception):
    """An error caused by the user's input (config, data, paths), with a readable message."""

    exit_code = 2


class ConfigError(RefrlError):
    """A bad configuration key or value; the message names the key and the allowed values."""


class RunFailure(RefrlError):
    """The run failed although its input was valid (training diverged to non-finite values,
    a checkpoint could not be written): one line, exit code 1."""

    exit_code = 1


def clip_text(text: str, limit: int = MAX_QUOTE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how many were left out."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit:,} more characters)"


_QUOTE = reprlib.Repr()
_QUOTE.maxstring = _QUOTE.maxother = MAX_QUOTE_CHARS
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 8
_QUOTE.maxlevel = 3


def quote(value: object) -> str:
    """A bounded ``repr`` of any input (long strings, big or deep lists and dicts are cut)."""
    return clip_text(_QUOTE.repr(value))


class Interrupted(RefrlError):
    """Ctrl-C stopped a training run after it saved a checkpoint; the message says where it
    stopped and how to continue (the CLI prints it as its one line, exit 130). Not a
    ``KeyboardInterrupt``: typer would swallow that without a word."""

    exit_code = 130
