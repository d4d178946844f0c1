"""Progress bars: on a terminal only, so a log file or a CI run gets the one-line summaries, not a bar
redrawn thousands of times."""

from __future__ import annotations

import sys


def progress_bar(total: int, show: bool = True, **kwargs):
    """A tqdm bar over ``total`` items, or None when ``show`` is off or stderr is not a terminal."""
    if not show or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, **kwargs)
