"""The ``clex`` command line: a thin shell over the library, and the demo.

Each subcommand parses its flags, calls one importable function and turns the library's errors into one
line that names the flag to fix (``errors.flag_line``). It may import every other part of clex; nothing
imports it.
"""

from clex.cli.main import main

__all__ = ["main"]
