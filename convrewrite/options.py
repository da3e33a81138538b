"""Options of the rewrite pass, shared by ``optimize()``, ``explain()`` and the dynamo backend."""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Options:
    """What the pass may do, for ``optimize()``, ``explain()`` and the dynamo backend
    (``torch.compile(model, backend="convrewrite", options={...})``). The pass rewrites three
    patterns: pointwise convs, layout chains between a permute and its inverse, and
    convolutions written as code (loops, unfold + multiply + sum).

    margin: keep the original unless a form is predicted at least this many times faster.
    measure: True times the exact shapes met at specialisation that the table lacks, and adds
        them to this machine's table (slower first call, exact choices); "auto" (default) does
        so only where the table's nearest entries disagree on the best form; False never does.
    verify: check every rewritten site numerically against the original op at
        specialisation, and keep the original where they disagree.
    check: at specialisation, time the whole rewritten graph against the model's own forward
        on copies of the inputs (both warm, interleaved), and keep the original unless the
        rewrite is faster there by 5% and by more than the figures' noise.
        The backend times the compiled graphs, rewritten and as dynamo gave it (see
        ``alternatives`` for when they compile); with nothing rewritten it compiles only
        the latter.
    table: path of a cost-table file to use before this machine's own and the shipped one.
    forms: if given, only these form names may be chosen (the original is always allowed).
    progress: show a progress bar on stderr when choosing forms takes more than 2 s (a
        first call that measures); never where stderr is not a terminal, or with
        ``CONVREWRITE_PROGRESS=0``.
    inner (backend only, not a field): the compiler the rewritten graphs go to,
        ``"inductor"`` (default) or ``"eager"``.
    alternatives (backend only, not a field): ``"first_call"`` (default) compiles the graphs
        the check compares before the first call returns; ``"background"`` compiles only the
        rewritten one then and the original on a background thread while it runs (wait for it
        with ``convrewrite.backend.settle()``; do not fx-trace or ``torch.export`` in another
        thread meanwhile: fx patches ``nn.Module`` process-wide while it traces).
    """

    margin: float = 1.1
    measure: bool | str = "auto"
    verify: bool = True
    check: bool = True
    table: str | os.PathLike | None = None
    forms: tuple[str, ...] | None = None
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not self.margin >= 1.0:
            raise ValueError(f"margin must be a number >= 1.0, got {self.margin!r}")
        if not (isinstance(self.measure, bool) or self.measure == "auto"):
            raise TypeError(f"measure must be True, False or 'auto', got {self.measure!r}")
        for name in ("verify", "check", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.table is not None and not os.path.isfile(self.table):
            raise FileNotFoundError(f"table: no cost-table file at {os.fspath(self.table)!r}")
        if self.forms is not None:
            self._check_forms()

    def _check_forms(self) -> None:
        from .forms import registered_names
        from .kinds import kinds
        if isinstance(self.forms, str) or not all(isinstance(f, str) for f in self.forms):
            raise TypeError(f"forms must be a sequence of form names, e.g. ('matmul',), got {self.forms!r}")
        object.__setattr__(self, "forms", tuple(self.forms))
        unknown = sorted(set(self.forms) - set(registered_names()))
        if unknown:
            by_kind = "; ".join(f"{k.name}: {', '.join(sorted(registered_names(k.name)))}" for k in kinds())
            raise ValueError(f"unknown form name(s) {unknown}; registered forms by kind: {by_kind}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "Options":
        """Build options from keyword arguments, naming the valid ones if any is unknown."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise TypeError(f"unknown convrewrite option(s) {unknown}; valid options: {valid}")
        return cls(**kwargs)
