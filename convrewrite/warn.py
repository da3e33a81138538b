"""Warnings that point at the user's own line: the first frame outside convrewrite and torch
(the pass is reached through several layers of both, so no fixed ``stacklevel`` fits)."""

from __future__ import annotations

import os
import sys
import warnings

import torch

_INTERNAL = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))


def warn_user(message: str) -> None:
    """``warnings.warn(message)`` attributed to the user's code that led here."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)
