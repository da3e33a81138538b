"""Options of the rewrite pass, shared by ``optimize()``, ``explain()`` and the dynamo backend."""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Options:
    """What the pass may do.

    margin: keep the original unless a form is predicted at least this many times faster.
    measure: time the exact shapes met at specialisation that the table lacks, and add them
        to this machine's table (slower first call, exact choices).
    verify: check every rewritten site numerically against the original op at
        specialisation, and keep the original where they disagree.
    table: path of a cost-table file to use before this machine's own and the shipped one.
    forms: if given, only these form names may be chosen (the original is always allowed).
    """

    margin: float = 1.1
    measure: bool = False
    verify: bool = True
    table: str | os.PathLike | None = None
    forms: tuple[str, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.margin, (int, float)) or not self.margin >= 1.0:
            raise ValueError(f"margin must be a number >= 1.0, got {self.margin!r}")
        for name in ("measure", "verify"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.forms is not None:
            object.__setattr__(self, "forms", tuple(self.forms))

    @classmethod
    def from_kwargs(cls, **kwargs) -> "Options":
        """Build options from keyword arguments, naming the valid ones if any is unknown."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise TypeError(f"unknown convrewrite option(s) {unknown}; valid options: {valid}")
        return cls(**kwargs)
