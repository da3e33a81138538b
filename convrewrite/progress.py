"""Progress bars on stderr for the long steps: the profile, the bench, and a first call that
measures. tqdm's own rule keeps them off where stderr is not a terminal (logs, CI);
``CONVREWRITE_PROGRESS=0`` or ``Options(progress=False)`` turns them off anywhere."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm import tqdm

QUIET_ENV = "CONVREWRITE_PROGRESS"


class _Bar(tqdm):
    # no monitor thread: a daemon thread still running at interpreter exit can crash the
    # process during torch's teardown (seen as a segfault after pytest's summary)
    monitor_interval = 0


def bar(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
        delay: float = 0.0, enabled: bool = True) -> tqdm:
    """A tqdm bar (with rate and ETA) on stderr that appears after ``delay`` seconds; iterating
    it iterates ``iterable``, as tqdm's own."""
    off = not enabled or os.environ.get(QUIET_ENV, "1") == "0"
    return _Bar(iterable, total=total, desc=desc, unit=unit, delay=delay, file=sys.stderr, disable=True if off else None,
                dynamic_ncols=True)
