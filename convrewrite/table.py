"""The per-device cost table: measured seconds per (spec key, form), stored as JSON.

One file per device fingerprint lives in the user cache dir (``$CONVREWRITE_CACHE_DIR``,
else ``$XDG_CACHE_HOME/convrewrite``, else ``~/.cache/convrewrite``). A default CPU table
ships in the package. Writes are atomic (temp file + ``os.replace``) and merge with what is
on disk under a file lock, so concurrent profiles never lose each other's entries; where that
lock is advisory only (machines sharing a cache dir), a write whose file changed while it
merged merges again.

Only this machine's own clean figures are exact: a table whose fingerprint differs (the
shipped one on another CPU, thread count or torch version) is a *prior*, used to predict and
never as an exact hit, and a figure taken under contention is never stored (see
:mod:`convrewrite.measure`). Tables heal on load: a figure that its neighbours contradict by
more than ``HEAL_FACTOR`` (a conv of ``[4,4,1]`` at 22 ms, say) is dropped, and measuring the
same spec again replaces what was there. Each entry records how it was measured
(``meta``: blocks, spread, other load, date).

Shapes not in the table are predicted by the rule in :meth:`CostTable.predict`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import torch

from .device import device_type, fingerprint
from .forms import source_hashes
from .kinds import get_kind, kinds, parse_key
from .options import Options

VERSION = 5  # 2: spec keys carry the executor; 3: and train-w; 4: figures of the warm, low-quantile protocol, with meta;
# 5: inference figures taken on parameters that require grad, as a model's do
TABLES_DIR = Path(__file__).parent / "tables"
NEIGHBOURS = 4
VOTERS = 8
CATEGORY_PENALTY = 3.0  # distance, in log2 units of size, of one categorical mismatch
PRIOR_PENALTY = 1.0  # distance added to another machine's entries: this machine's own rank first
HEAL_FACTOR = 4.0  # a figure this many times off what its nearest neighbours predict is dropped on load
HEAL_NEIGHBOURS = 4
MERGE_TRIES = 5
GRAPH_KEY = "graph"  # the key prefix of the backend's compiled graphs' figures (no spec kind has this name)


def _file_mode() -> int:
    """What a file this process creates gets: read-write for all, less the umask (read once, at
    import, as setting it to read it is not thread-safe)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


class TableError(ValueError):
    """A cost-table file that cannot be used (truncated, corrupt, wrong version or device)."""


def cache_dir() -> Path:
    """The user cache dir for cost tables."""
    if "CONVREWRITE_CACHE_DIR" in os.environ:
        return Path(os.environ["CONVREWRITE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "convrewrite"


def user_table_path(device="cpu") -> Path:
    """Where this machine's table for ``device`` lives: named by a hash of its fingerprint."""
    fp = fingerprint(device)
    digest = hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"{fp['device']}-{digest}.json"


def shipped_table_path(device="cpu") -> Path:
    """The table shipped in the package for this device type (accelerators: per device name)."""
    return TABLES_DIR / device_type(device).table_name(fingerprint(device))


@dataclasses.dataclass
class CostTable:
    """Seconds per call, ``entries[spec_key][form_name]``, for one device (and the backend's
    compiled graphs, ``entries["graph|..."][variant]``: see :class:`convrewrite.backend.GraphFigures`)."""

    fingerprint: dict
    entries: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    form_hashes: dict[str, str] = dataclasses.field(default_factory=dict)
    profiled: bool = False
    origin: str = "empty"
    meta: dict[str, dict] = dataclasses.field(default_factory=dict)  # key -> how it was measured
    prior: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # other machines' entries
    _nearest: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    # -- file I/O ---------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"version": VERSION, "fingerprint": self.fingerprint, "profiled": self.profiled,
                "forms": self.form_hashes, "entries": self.entries, "meta": self.meta}

    @classmethod
    def read(cls, path: Path) -> "CostTable":
        """Load a table file; raise :class:`TableError` on anything unusable."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TableError(f"cannot read cost table {path}: {e}") from None
        version = data.get("version") if isinstance(data, dict) else None
        if isinstance(version, int) and version < VERSION:
            raise TableError(f"cost table {path} was written by an older convrewrite (table version {version}; this "
                             f"one reads {VERSION}): its figures are not used, and the file is replaced when this "
                             "machine's next figure is stored (`python -m convrewrite.table reset` removes it now)")
        if version != VERSION:
            raise TableError(f"cost table {path} has version {version!r}, expected {VERSION}")
        try:
            entries = {str(k): {str(f): float(t) for f, t in v.items() if math.isfinite(float(t)) and t > 0}
                       for k, v in data["entries"].items()}
            meta = {str(k): dict(v) for k, v in data.get("meta", {}).items() if k in entries}
            table = cls(dict(data["fingerprint"]), entries, dict(data.get("forms", {})),
                        bool(data.get("profiled", False)), origin=str(path), meta=meta)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TableError(f"cost table {path} is malformed: {e!r}") from None
        return table

    def write(self, path: Path, merge: bool = True) -> bool:
        """Merge this table into the file at ``path`` (or, with ``merge=False``, replace it)
        atomically; warn and return False on failure."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(path):
                self._replace(path, merge)
        except OSError as e:
            warnings.warn(f"convrewrite: could not write cost table {path}: {e}; timings kept in memory only", stacklevel=2)
            return False
        return True

    def _replace(self, path: Path, merge: bool) -> None:
        """Write the merged table beside ``path`` and move it into place. Where the lock is
        advisory only (a cache dir on a file system that machines share), another writer can
        replace the file between our read and our move: the merge is redone (up to
        ``MERGE_TRIES`` times) when the file changed meanwhile, so neither loses its entries."""
        for attempt in range(MERGE_TRIES):
            seen = file_state(path)
            merged = self._merged_with_disk(path) if merge else self
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            try:
                os.fchmod(fd, FILE_MODE)  # mkstemp's file is its owner's alone; a table is shared as any file is
                with os.fdopen(fd, "w") as f:
                    json.dump(merged.to_json(), f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                if not merge or attempt == MERGE_TRIES - 1 or file_state(path) == seen:
                    os.replace(tmp, path)
                    return
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def _merged_with_disk(self, path: Path) -> "CostTable":
        try:
            disk = CostTable.read(path)
        except TableError:
            return self
        if disk.fingerprint != self.fingerprint:
            return self
        return disk.merged_with(self)

    def merged_with(self, newer: "CostTable") -> "CostTable":
        """A new table, under this one's fingerprint: this table's entries, less the figures of
        forms edited since they were measured, with ``newer``'s entries added (they win where
        both hold a key)."""
        merged = CostTable(self.fingerprint, {k: dict(v) for k, v in self.entries.items()},
                           {**self.form_hashes, **newer.form_hashes}, newer.profiled or self.profiled,
                           meta=dict(self.meta))
        merged._drop_stale_forms()
        for key, times in newer.entries.items():
            merged.add(key, times, {}, newer.meta.get(key))
        return merged

    # -- content ----------------------------------------------------------------------------
    def add(self, key: str, times: dict[str, float], form_hashes: dict[str, str], meta: dict | None = None) -> None:
        """Record measured seconds for ``key`` (and the source hashes of the forms timed, and
        how they were measured); a new measurement replaces the whole entry: figures taken at
        different times are not mixed in one entry (their level moves with the machine's
        state, while decisions rest on the ranking within an entry)."""
        self.form_hashes.update(form_hashes)
        self.entries[key] = dict(times)
        if meta is not None:
            self.meta[key] = meta
        self._nearest.clear()

    def remember(self, key: str, times: dict[str, float], form_hashes: dict[str, str], meta: dict) -> None:
        """:meth:`add` a clean measurement here and merge it into this machine's user table,
        so later processes find it."""
        self.add(key, times, form_hashes, meta)
        fresh = CostTable(self.fingerprint)
        fresh.add(key, times, form_hashes, meta)
        fresh.write(user_table_path(self.fingerprint["device"]))

    def _drop_stale_forms(self) -> None:
        """Forget timings of forms whose source changed since they were measured."""
        current = source_hashes()
        stale = {n for n, h in self.form_hashes.items() if n in current and current[n] != h}
        for times in self.entries.values():
            for name in stale:
                times.pop(name, None)
        for name in stale:
            del self.form_hashes[name]

    def lookup(self, spec) -> dict[str, float] | None:
        """Seconds this machine measured for exactly this spec, if present (a prior's figures
        are never exact)."""
        return self.entries.get(spec.key())

    def own_share(self, spec, original: str) -> float:
        """The weighted share of the ``VOTERS`` nearest entries that this machine measured
        (0 where a prediction would rest on other machines' figures alone)."""
        near = self._neighbours(spec, original)[:VOTERS]
        weights = [(1.0 / (d + 0.5) ** 2, own) for d, _, _, own in near]
        total = sum(w for w, _ in weights)
        return sum(w for w, own in weights if own) / total if total else 0.0

    def reach(self, spec, original: str) -> float:
        """Distance (as :meth:`predict` measures it) from ``spec`` to the nearest entry this
        machine measured (infinite with none): how far a prediction would extrapolate."""
        return next((d for d, _, _, own in self._neighbours(spec, original) if own), math.inf)

    def predict(self, spec, names: list[str], original: str) -> dict[str, float]:
        """Predicted seconds for each form in ``names`` on an unseen spec.

        The rule: take the table entries of the same spec kind, device and executor, at distance
        ``|log2 sizes - log2 sizes'| + CATEGORY_PENALTY * (categorical mismatches)``
        (sizes: batch, channels per group, groups, output positions). For each form, average
        ``log(t_form / t_original)`` over the ``NEIGHBOURS`` nearest entries that timed both,
        weighted by ``1 / (distance + 0.5)^2``; the original's own time is predicted the same
        way from ``log(t_original / work)``. A form no neighbour timed gets no prediction.
        """
        scored = self._neighbours(spec, original)
        if not scored:
            return {}
        log_orig = _weighted([(d, math.log(t[original] / o.work())) for d, o, t, _ in scored[:NEIGHBOURS]])
        t_orig = math.exp(log_orig) * spec.work()
        out = {original: t_orig}
        for name in names:
            near = [(d, math.log(t[name] / t[original])) for d, o, t, _ in scored if name in t][:NEIGHBOURS]
            if name != original and near:
                out[name] = t_orig * math.exp(_weighted(near))
        return out

    def agreement(self, spec, name: str, original: str) -> float:
        """How sure a prediction of ``name`` is: the weighted share of the ``VOTERS`` nearest
        entries in which ``name`` was within 10% of their fastest form (0 with no neighbours)."""
        near = self._neighbours(spec, original)[:VOTERS]
        if not near:
            return 0.0
        weights = [1.0 / (d + 0.5) ** 2 for d, _, _, _ in near]
        hits = [name in t and t[name] <= 1.1 * min(t.values()) for _, _, t, _ in near]
        return sum(w for w, hit in zip(weights, hits) if hit) / sum(weights)

    def _neighbours(self, spec, original: str) -> list[tuple[float, object, dict, bool]]:
        """Entries that timed ``original``, nearest first, as (distance, spec, times, whether
        this machine measured it); other machines' entries stand ``PRIOR_PENALTY`` further off."""
        cached = self._nearest.get((spec.key(), original))
        if cached is not None:
            return cached
        cat, num = spec.features()
        scored = []
        for own, entries in ((True, self.entries), (False, self.prior)):
            for key, times in entries.items():
                parsed = _parsed(key)
                if parsed is None or original not in times or parsed[0].partition() != spec.partition():
                    continue
                other, ocat, onum = parsed
                dist = math.dist(num, onum) + CATEGORY_PENALTY * sum(a != b for a, b in zip(cat, ocat))
                scored.append((dist + (0.0 if own else PRIOR_PENALTY), other, times, own))
        scored.sort(key=lambda s: s[0])
        self._nearest[(spec.key(), original)] = scored
        return scored


def _weighted(pairs: list[tuple[float, float]]) -> float:
    weights = [1.0 / (d + 0.5) ** 2 for d, _ in pairs]
    return sum(w * v for w, (_, v) in zip(weights, pairs)) / sum(weights)


@functools.lru_cache(maxsize=1 << 16)
def _parsed(key: str) -> tuple | None:
    """(spec, categorical, numeric features) of a table key of a predictable kind, parsed once
    per process; None for keys of other kinds."""
    spec = parse_key(key)
    return None if spec is None else (spec, *spec.features())


def file_state(path: str | os.PathLike | None) -> tuple | None:
    """When and what ``path`` was last written (None if there is no such file)."""
    try:
        stat = os.stat(path)
    except (TypeError, OSError):
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock beside ``path`` (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def table_for(device: str, options: Options) -> CostTable:
    """The cost table for ``device``, loaded once per process per (user table file, table
    option, that file as last written): what this process measures is added to the loaded
    table as it writes it, and a ``table=`` file written again since is read again."""
    table_path = os.fspath(options.table) if options.table else None
    return _loaded(device, os.fspath(user_table_path(device)), table_path, file_state(table_path))


@functools.lru_cache(maxsize=16)
def _loaded(device: str, user_path: str, table_path: str | None, written: tuple | None) -> CostTable:
    return load_table(device, table_path)


def load_table(device="cpu", path: str | os.PathLike | None = None) -> CostTable:
    """The table to decide with for ``device``.

    ``path`` if given; else this machine's table in the cache dir; where that is missing or
    was not written by a full profile, the shipped table for the device type fills in beneath
    it. Layers measured on this machine (same fingerprint) give exact entries; the others
    are a prior for prediction only. Each layer is healed (:func:`heal`). An unusable file
    gives a warning and the next source is used.
    """
    fp = fingerprint(device)
    layers = []
    for candidate in ([Path(path)] if path else []) + [user_table_path(device), shipped_table_path(device)]:
        if not candidate.exists():
            continue
        try:
            table = CostTable.read(candidate)
        except TableError as e:
            warnings.warn(f"convrewrite: {e}; falling back", stacklevel=2)
            continue
        if table.fingerprint.get("device") != fp["device"]:
            warnings.warn(f"convrewrite: cost table {candidate} is for {table.fingerprint.get('device')!r}, "
                          f"not {fp['device']!r}; ignoring it", stacklevel=2)
            continue
        table._drop_stale_forms()
        _warn_unparsable(table)
        heal(table)
        layers.append(table)
        if table.profiled and table.fingerprint == fp:
            break
    return _stack(layers, fp)


def _warn_unparsable(table: CostTable) -> None:
    predictable = {k.name for k in kinds() if k.predictable}
    bad = [k for k in table.entries if k.split("|", 1)[0] in predictable and _parsed(k) is None]
    if bad:
        warnings.warn(f"convrewrite: {len(bad)} entries of cost table {table.origin} have keys this version cannot "
                      f"read (e.g. {bad[0]!r}); they are ignored", stacklevel=3)


def _stack(layers: list[CostTable], fp: dict) -> CostTable:
    """One table from layers, earlier layers winning on the same key; layers measured on
    another machine (fingerprint) go to the prior."""
    own = [t for t in layers if t.fingerprint == fp]
    top = CostTable(fp, {}, {}, any(t.profiled for t in own), " + ".join(t.origin for t in layers) or "empty")
    for table in reversed(layers):
        top.form_hashes.update(table.form_hashes)
        target = top.entries if table.fingerprint == fp else top.prior
        target.update({k: dict(v) for k, v in table.entries.items()})
        if table.fingerprint == fp:
            top.meta.update(table.meta)
    return top


def heal(table: CostTable) -> list[tuple[str, str]]:
    """Drop figures of ``table`` that its nearest entries contradict, and return the
    (key, form) pairs dropped.

    A figure taken under load is too slow (an op of 0.1 ms read as 4-48 ms), so the test is
    one-sided and needs no model of the time: within the same categorical features, an op
    takes at most as long as a neighbour's times its share of extra work (``max(1, work /
    work')``). A form's time more than ``HEAL_FACTOR`` above that bound for most (by weight)
    of its ``HEAL_NEIGHBOURS`` nearest entries is dropped; so is the whole entry of a dropped
    original."""
    keys = [k for k in table.entries if _parsed(k) is not None]
    if len(keys) <= HEAL_NEIGHBOURS:
        return []
    nearest, weights = _nearest_entries(keys)
    work = torch.tensor([_parsed(k)[0].work() for k in keys], dtype=torch.float64)
    allowed = torch.maximum(work[:, None] / work[nearest], torch.ones(()))  # times a neighbour's, at most
    dropped = []
    for name in sorted({n for k in keys for n in table.entries[k]}):
        t = torch.tensor([table.entries[k].get(name, math.nan) for k in keys], dtype=torch.float64)
        w = torch.where(t[nearest].isnan(), 0.0, weights)
        too_slow = t[:, None] > HEAL_FACTOR * allowed * t[nearest]
        off = ((w * too_slow).sum(1) > 0.5 * w.sum(1)) & ((w > 0).sum(1) >= 2)
        dropped += [(keys[i], name) for i in off.nonzero().flatten().tolist()]
    for key, name in dropped:
        if name == get_kind(_parsed(key)[0].kind).original:
            table.entries.pop(key, None)
            table.meta.pop(key, None)
        elif key in table.entries:
            table.entries[key].pop(name, None)
    if dropped:
        table._nearest.clear()
    return dropped


def _nearest_entries(keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each key, the indices of its ``HEAL_NEIGHBOURS`` nearest other keys with the same
    categorical features and partition (log2 size distance, as :meth:`CostTable.predict`
    measures it), and their weights (0 where fewer exist)."""
    parsed = [_parsed(k) for k in keys]
    groups: dict = {}
    group = torch.tensor([groups.setdefault((p[0].kind, p[1], p[0].partition()), len(groups)) for p in parsed])
    num = torch.tensor([p[2] for p in parsed], dtype=torch.float64)
    dist = torch.cdist(num, num).masked_fill(group[:, None] != group[None, :], math.inf).fill_diagonal_(math.inf)
    d, idx = dist.topk(HEAL_NEIGHBOURS, dim=1, largest=False)
    return idx, torch.where(d.isinf(), 0.0, 1.0 / (d + 0.5) ** 2)


if __name__ == "__main__":  # python -m convrewrite.table: the command lives in its own module
    from convrewrite.tablecmd import main

    raise SystemExit(main())
