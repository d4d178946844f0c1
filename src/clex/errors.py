"""The errors clex raises, and the argument checks that raise them.

Three kinds mean something to a caller: ``BadInput`` (an argument, option, input file or output directory
to change), ``UnsupportedModel`` (a model clex cannot apply a method to) and ``DamagedFile`` (a file or model
directory that cannot be read as what it should be), each a ``ClexError`` and a ``ValueError``; ``NonFiniteLogits``
(a ``RuntimeError``) stops a generation whose logits turned NaN. A few
subclasses exist where code catches one case apart (``OutDirError``, ``ChatDataError``, ``ChatTemplateError``,
``PPLEvalError``, ``ModelNotFoundError``), and the older names (``DataError``, ``TrainError``, …) stay as aliases.

A message names an argument as the Python API spells it, in single backticks (`max_factor`); the command line
puts its flag (--max-factor) in that place at its one boundary (``clex.cli.main.flag_words``), so a library
caller never reads a flag it has no way to pass.
"""

from __future__ import annotations

import math
import numbers


class ClexError(Exception):
    """Every error clex raises on purpose; anything else is a bug to report."""


class BadInput(ClexError, ValueError):
    """An argument, option, input file or output directory to change; the message says what and how."""


class UnsupportedModel(ClexError, ValueError):
    """A model clex cannot apply the method to (no rotary module it can replace, or a scaling it cannot compose
    with), refused before anything runs."""


class DamagedFile(ClexError, ValueError):
    """A file or model directory that cannot be read as what it should be: malformed, truncated, changed since
    clex wrote it, or missing. The message names the file."""


class OutDirError(BadInput):
    """An output directory clex may not write into as asked (another job's, someone else's files, a run with
    other settings); the message says what to do."""


class NonFiniteLogits(ClexError, RuntimeError):
    """The model produced NaN logits while generating: its answers would be garbage, so generation stops."""


def describe(value) -> str:
    """A value as an argument error shows it: its type, and short values themselves."""
    if value is None:
        return "None"
    if isinstance(value, (str, bytes, int, float, bool)):
        text = repr(value)
        return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
    return type(value).__name__


def check_number(name: str, value, ok, rule: str, integer: bool = False, optional: bool = False) -> None:
    """``value`` is a finite number (an integer where ``integer``; None where ``optional``) that ``ok`` accepts,
    else one refusal in the argument's name saying ``rule``: TypeError for another kind of value, ValueError
    for one out of range."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise TypeError(f"{name} must be {rule}, got {describe(value)}")
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
