"""Lift code that computes a convolution (Python loops, unfold + multiply + sum, ...) to one
conv op: derive the convolution by running the code, then prove the two equal.

The code is run, never read, so any spelling works:

1. Shrink: input sizes above ``KEEP`` run as distinct small primes, in order (a 100x100
   per-pixel loop runs 17x17 iterations); the weight's sizes are kept. Sizes the code rejects
   are retried larger, up to the real ones. Code whose sizes are fixed (a graph of unrolled
   loops) runs at its real sizes only.
2. Probe (float64): data = element ids 1..n, weight = one-hot at one tap; each output then
   holds the id of the one data element that tap reads for it, or 0.
3. Fit: data index ``j = A i + B k + c`` (output index ``i``, tap ``k``) in exact integers;
   output dims that follow a weight index are tied to it (output channels). Each data dim is
   then a batch, group, input-channel or spatial dim (stride, dilation, offset, flip).
4. Prove: polynomial identity tests with random integers (exact in float64, and in float32
   too for code that casts), at the small size under a dispatch mode that admits only
   polynomial ops and no data-dependent control flow, then at the real size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ...kinds.conv import ConvSpec
from ...kinds.conv.forms import conv_direct

KEEP = 16  # input sizes up to this run as they are
MAX_OPERANDS = 4  # tensors code may read to be analysed: data, weight, bias and one more
_PRIMES = (17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97)
_EXACT = {torch.float64: 2 ** 53, torch.float32: 2 ** 24}  # integers below these are exact
_FAILURE = 1e-9  # bound on the chance that a wrong convolution passes the identity test

Run = Callable[[dict], torch.Tensor]  # operand name -> tensor; returns the code's output


class NotLiftable(Exception):
    """The code is not (shown to be) a convolution; the message says why."""


class NotPolynomial(NotLiftable):
    """The code runs an op that no role assignment can make a convolution."""


@dataclasses.dataclass(frozen=True)
class Operand:
    """A tensor the code reads: an input (``shrinkable``: its sizes may be shrunk) or a weight."""

    name: str
    shape: tuple[int, ...]
    shrinkable: bool


@dataclasses.dataclass(frozen=True)
class Lifted:
    """The derived convolution (at the real sizes) and which operands are x, w and b."""

    spec: ConvSpec
    x: str
    w: str
    b: str | None


def lift(run: Run, operands: list[Operand], y_shape: tuple[int, ...], *, shrink: bool = True,
         **spec_fields) -> Lifted:
    """The convolution ``run`` computes from ``operands`` (output ``y_shape``), proven equal;
    ``shrink=False`` analyses it at the real sizes only; ``spec_fields`` (dtype, device, grad,
    ...) go into the spec. Raises :class:`NotLiftable`."""
    reasons = []
    with torch.random.fork_rng(devices=[]), _default_dtype(torch.float64), torch.no_grad():
        for x, w, b in _role_candidates(operands):
            try:
                return _lift_as(run, operands, y_shape, x, w, b, shrink, spec_fields)
            except NotPolynomial:
                raise
            except NotLiftable as e:
                reasons.append(str(e))
    raise NotLiftable(reasons[0] if reasons else "reads no data input and weight")


def _role_candidates(operands: list[Operand]):
    """(x, w, b) assignments to try: data is an input; weights are preferred to inputs as w."""
    for x in (o for o in operands if o.shrinkable):
        ws = sorted((o for o in operands if o is not x and o.shape), key=lambda o: o.shrinkable)
        for w in ws:
            rest = [o for o in operands if o not in (x, w) and len(o.shape) == 1]
            for b in (*sorted(rest, key=lambda o: o.shrinkable), None):
                yield x, w, b


def _lift_as(run, operands, y_shape, x, w, b, shrink, spec_fields) -> Lifted:
    small, small_y, dtype = _small_problem(run, operands, x, w, shrink)
    probes = _probe(run, small, x, w)
    fit = _fit(probes, small[x.name], small[w.name], small_y)
    bias = b is not None
    lifted = Lifted(_spec(fit, x.shape, w.shape, y_shape, bias, spec_fields), x.name, w.name, b and b.name)
    exact = _EXACT.get(dtype, 0)
    _prove(run, lifted, _spec(fit, small[x.name], small[w.name], small_y, bias, spec_fields), small, exact, checked=True)
    real = {o.name: o.shape for o in operands}
    if small != real:
        _prove(run, lifted, lifted.spec, real, exact, checked=False)
    return lifted


# -- 1. shrink ------------------------------------------------------------------------------
def _small_problem(run, operands, x, w, shrink) -> tuple[dict, tuple, torch.dtype]:
    """Operand shapes to probe at (the smallest the code accepts, if ``shrink``), and the
    output's shape and dtype there (float32 if the code casts float64 data)."""
    pinned = {s for o in operands if not o.shrinkable or o is w for s in o.shape}
    large = sorted({s for o in operands if o.shrinkable and o is not w for s in o.shape} - pinned)
    large = [s for s in large if s > KEEP and shrink]
    floors = (KEEP, 2 * max(pinned, default=0) + 1)
    tried = set()
    for floor in (*floors, math.inf):
        primes = [p for p in _PRIMES if p > floor]
        mapping = {s: p for s, p in zip(large, primes) if p < s}
        shapes = {o.name: tuple(mapping.get(s, s) for s in o.shape) for o in operands}
        key = tuple(sorted(shapes.items()))
        if key in tried:
            continue
        tried.add(key)
        try:
            y = _checked(run, {n: torch.zeros(s) for n, s in shapes.items()})
        except NotLiftable:
            raise
        except Exception:  # the code rejects these sizes (or hard-codes others): try larger ones
            continue
        if y.numel():
            return shapes, tuple(y.shape), y.dtype
    raise NotLiftable("the code fails when run on zeros of its input sizes")


# -- 2. probe -------------------------------------------------------------------------------
def _probe(run, shapes: dict, x: Operand, w: Operand) -> list[tuple[tuple, torch.Tensor]]:
    """(tap, output) pairs: ids as data, one-hot weights at a centre tap and its neighbours."""
    x_shape, w_shape = shapes[x.name], shapes[w.name]
    n = math.prod(x_shape)
    ids = torch.arange(1, n + 1, dtype=torch.float64).reshape(x_shape)
    centre = tuple(s // 2 for s in w_shape)
    taps = [centre] + [centre[:f] + (centre[f] + (1 if centre[f] + 1 < s else -1),) + centre[f + 1:]
                       for f, s in enumerate(w_shape) if s > 1]
    probes = []
    for tap in taps:
        weight = torch.zeros(w_shape, dtype=torch.float64)
        weight[tap] = 1
        y = _checked(run, {**{name: torch.zeros(s) for name, s in shapes.items()}, x.name: ids, w.name: weight})
        read = y.double().round()
        if not torch.equal(read, y.double()) or read.min() < 0 or read.max() > n:
            raise NotLiftable("an output is not one data element times one weight")
        probes.append((tap, read.long()))
    return probes


# -- 3. fit ---------------------------------------------------------------------------------
@dataclasses.dataclass
class _Fit:
    ties: dict[int, int]  # output dim -> weight dim whose index it equals
    free: list[int]  # output dims (size > 1) that are not tied
    taps: list[int]  # weight dims of size > 1
    coef: torch.Tensor  # [len(free) + len(taps) + 1, x dims]: j = [i_free, k_taps, 1] @ coef
    x_shape: tuple
    w_shape: tuple
    y_shape: tuple


def _fit(probes, x_shape, w_shape, y_shape) -> _Fit:
    rows = []
    for tap, y in probes:
        i = y.nonzero()
        if not len(i):
            raise NotLiftable("a weight element reads no data")
        j = torch.stack(torch.unravel_index(y[y > 0] - 1, x_shape), 1) if x_shape else torch.zeros(len(i), 0)
        rows.append((i, torch.tensor(tap).expand(len(i), -1), j))
    ties = _ties(rows, y_shape, w_shape)
    free = [e for e, s in enumerate(y_shape) if s > 1 and e not in ties]
    taps = [f for f, s in enumerate(w_shape) if s > 1]
    i, k, j = (torch.cat(parts) for parts in zip(*rows))
    design = torch.cat([i[:, free], k[:, taps], torch.ones(len(i), 1, dtype=torch.long)], 1).double()
    if torch.linalg.matrix_rank(design) < design.shape[1]:
        raise NotLiftable("the probes do not determine how data is indexed")
    coef = torch.linalg.lstsq(design, j.double()).solution.round()
    if not torch.equal(design @ coef, j.double()):
        raise NotLiftable("data is not indexed by an affine function of output and tap")
    fit = _Fit(ties, free, taps, coef.long(), x_shape, w_shape, y_shape)
    for tap, y in probes:
        if not torch.equal(_support(fit, tap), y > 0):
            raise NotLiftable("outputs read data where a convolution would read padding, or the reverse")
    return fit


def _ties(rows, y_shape, w_shape) -> dict[int, int]:
    """Output dims whose index equals one weight dim's index wherever a tap reads anything."""
    ties = {}
    for e, size in enumerate(y_shape):
        if size > 1 and all(len(set(i[:, e].tolist())) == 1 for i, _, _ in rows):
            match = [f for f in range(len(w_shape)) if all(torch.equal(i[:, e], k[:, f]) for i, k, _ in rows)]
            if len(match) != 1:
                raise NotLiftable(f"output dim {e} follows no single weight dim")
            ties[e] = match[0]
    return ties


def _support(fit: _Fit, tap: tuple) -> torch.Tensor:
    """Where a convolution with this fit reads data for a one-hot weight at ``tap``."""
    grid = torch.cartesian_prod(*(torch.arange(s) for s in fit.y_shape)).reshape(-1, len(fit.y_shape))
    k = torch.tensor(tap)
    design = torch.cat([grid[:, fit.free], k[fit.taps].expand(len(grid), -1), torch.ones(len(grid), 1, dtype=torch.long)], 1)
    j = design @ fit.coef
    inside = ((j >= 0) & (j < torch.tensor(fit.x_shape))).all(1)
    for e, f in fit.ties.items():
        inside &= grid[:, e] == tap[f]
    return inside.reshape(fit.y_shape)


# -- roles -> spec --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Role:
    """How the code reads one data dim: ``kind`` "one" (a dim of size 1), "batch" (as output
    dim ``y``), "group" or "in" (as weight dim ``w``), or "spatial": output dim ``y`` slides
    over it and weight dim ``w`` taps it, at data index ``stride * i + dilation * k + offset``
    for output index ``i`` and tap ``k`` (``-dilation * k`` where ``flip``)."""

    kind: str
    y: int | None = None
    w: int | None = None
    stride: int = 1
    dilation: int = 1
    flip: bool = False
    offset: int = 0


def _roles(fit: _Fit) -> dict[int, _Role]:
    """Each data dim's role."""
    n_free, n_taps = len(fit.free), len(fit.taps)
    roles = {}
    for d in range(len(fit.x_shape)):
        col = fit.coef[:, d].tolist()
        outs = [(fit.free[e], v) for e, v in enumerate(col[:n_free]) if v]  # (output dim, coefficient)
        taps = [(fit.taps[f], v) for f, v in enumerate(col[n_free:n_free + n_taps]) if v]  # (weight dim, coefficient)
        offset = col[-1]
        y, a = outs[0] if len(outs) == 1 else (None, 0)
        w, b = taps[0] if len(taps) == 1 else (None, 0)
        if fit.x_shape[d] == 1 and not outs and not taps and offset == 0:
            roles[d] = _Role("one")
        elif len(outs) == 1 and a == 1 and not taps and offset == 0:
            roles[d] = _Role("batch", y=y)
        elif not outs and len(taps) == 1 and b == 1 and offset == 0:
            roles[d] = _Role("group" if w in fit.ties.values() else "in", w=w)
        elif len(outs) == 1 and len(taps) == 1 and a > 0:
            roles[d] = _Role("spatial", y, w, stride=a, dilation=abs(b), flip=b < 0, offset=offset)
        else:
            raise NotLiftable(f"data dim {d} is not read as a batch, channel or sliding-window dim")
    used_y = [r.y for r in roles.values() if r.kind in ("batch", "spatial")]
    used_w = [r.w for r in roles.values() if r.kind in ("group", "in", "spatial")]
    if sorted(used_y) != fit.free or len(set(used_w)) != len(used_w) or \
            set(fit.taps) - set(used_w) - set(fit.ties.values()):
        raise NotLiftable("output or weight dims are not matched one-to-one with data dims")
    return roles


def _spec(fit: _Fit, x_shape, w_shape, y_shape, bias: bool, fields: dict) -> ConvSpec:
    """The spec at the real sizes."""
    roles = _roles(fit)
    by = {kind: [d for d, r in roles.items() if r.kind == kind] for kind in ("one", "batch", "group", "in", "spatial")}
    if not 1 <= len(by["spatial"]) <= 3:
        raise NotLiftable(f"{len(by['spatial'])} sliding-window dims (a conv has 1 to 3)")
    tied_w = {f: e for e, f in fit.ties.items()}
    group_w = [roles[d].w for d in by["group"]]
    out_w = [f for f in sorted(tied_w) if f not in group_w]
    ones_w = [f for f, s in enumerate(w_shape) if f not in fit.taps]
    in_w = [roles[d].w for d in by["in"]]
    kernel_w = [roles[d].w for d in by["spatial"]]
    spatial = [roles[d] for d in by["spatial"]]
    pads, checks = [], []
    for d, r in zip(by["spatial"], spatial):
        span = r.dilation * (w_shape[r.w] - 1)
        before = -(r.offset - span) if r.flip else -r.offset
        pads.append((before, (y_shape[r.y] - 1) * r.stride + span + 1 - x_shape[d] - before))
    checks += [(x_shape[d], y_shape[roles[d].y]) for d in by["batch"]]
    checks += [(x_shape[d], w_shape[roles[d].w]) for d in by["group"] + by["in"]]
    checks += [(w_shape[f], y_shape[e]) for f, e in tied_w.items()]
    if any(a != b for a, b in checks) or any(y_shape[e] > 1 for e in range(len(y_shape))
                                             if e not in fit.free and e not in fit.ties):
        raise NotLiftable("the real sizes do not fit the convolution derived at small sizes")
    return ConvSpec(
        x_shape=tuple(x_shape), w_shape=tuple(w_shape), y_shape=tuple(y_shape),
        x_perm=tuple(by["one"] + by["batch"] + by["group"] + by["in"] + by["spatial"]),
        x_batch=len(by["one"]) + len(by["batch"]),
        w_perm=tuple(ones_w + group_w + out_w + in_w + kernel_w),
        y_perm=tuple([roles[d].y for d in by["batch"]] + [tied_w[f] for f in group_w + out_w]
                     + [r.y for r in spatial]),
        groups=math.prod(x_shape[d] for d in by["group"]),
        stride=tuple(r.stride for r in spatial), dilation=tuple(r.dilation for r in spatial), pads=tuple(pads),
        flip=tuple(r.flip for r in spatial), bias=bias, **fields)


# -- 4. prove -------------------------------------------------------------------------------
def _prove(run, lifted: Lifted, spec: ConvSpec, shapes: dict, exact: int, *, checked: bool) -> None:
    """Polynomial identity test of ``run`` against ``spec`` (``lifted``'s roles) at ``shapes``,
    with integers small enough that every sum is exact below ``exact``."""
    spec = dataclasses.replace(spec, dtype="float64", grad=False)
    terms = math.prod(spec.conv_weight_shape[1:]) + 1
    bound = math.isqrt(exact // terms // 2)
    if bound < 2:
        raise NotLiftable("the code computes in a dtype too narrow to check exactly")
    trials = math.ceil(math.log(_FAILURE) / math.log(2 / (2 * bound + 1)))
    generator = torch.Generator().manual_seed(0)
    for _ in range(trials):
        values = {n: torch.randint(-bound, bound + 1, s, generator=generator, dtype=torch.float64)
                  for n, s in shapes.items()}
        got = (_checked if checked else _call)(run, values)
        want = conv_direct(values[lifted.x], values[lifted.w], values[lifted.b] if lifted.b else None, spec=spec)
        if tuple(got.shape) != tuple(want.shape) or not torch.equal(got.double(), want):
            raise NotLiftable(f"differs from the derived {spec.describe()} on random inputs")


# -- running the code -----------------------------------------------------------------------
POLYNOMIAL_OPS = frozenset("""
    add add_ sub sub_ mul mul_ neg neg_ sum cumsum mm bmm addmm baddbmm addbmm dot mv matmul
    select slice narrow index index_select gather take unbind split split_with_sizes chunk
    view _unsafe_view reshape _reshape_alias expand expand_as permute transpose t unsqueeze squeeze
    flatten unflatten flip roll movedim cat stack clone contiguous copy_ _to_copy to detach alias
    lift_fresh lift_fresh_copy as_strided zeros zeros_like new_zeros ones ones_like new_ones empty
    empty_like new_empty empty_strided full full_like new_full fill_ zero_ scalar_tensor arange
    constant_pad_nd pad unfold im2col col2im index_put index_put_ index_add index_add_ slice_scatter
    select_scatter repeat tile diagonal resize_
""".split())


class _PolynomialOnly(TorchDispatchMode):
    """Raises NotPolynomial on any op outside ``POLYNOMIAL_OPS``: comparisons, nonlinearities,
    random numbers, and the scalar reads (``.item()``, ``if tensor``) of data-dependent control flow."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in POLYNOMIAL_OPS:
            raise NotPolynomial(f"runs {func.overloadpacket.__name__}, which is not a polynomial op")
        return func(*args, **(kwargs or {}))


def _call(run: Run, values: dict) -> torch.Tensor:
    y = run(values)
    if not isinstance(y, torch.Tensor):
        raise NotLiftable(f"returns {type(y).__name__}, not one tensor")
    return y


def _checked(run: Run, values: dict) -> torch.Tensor:
    with _PolynomialOnly():
        return _call(run, values)


class _default_dtype:
    """Run with this default dtype (code that allocates with the default accumulates exactly)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __enter__(self):
        self.saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.saved)

