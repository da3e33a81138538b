"""One decision per job: under ``torch.distributed``, rank 0 decides and every rank runs it.

Data-parallel training runs the same model in every process. Left alone, each process would
time the candidates at its first call (all at once, on shared cores: the contention that
makes figures wrong) and could choose differently (replicas running different code, with
numerics that differ in the last bits). When a process group with more than one rank is
initialised and the model trains (grad enabled, parameters that require grad, training
mode), rank 0 decides as usual (measuring, checking) and posts each decision in the process
group's store under what it decided (the graph, its inputs and the options); the other ranks
wait for the post on the same graph, time nothing, and run the forms it chose. This holds
for optimize()'s fx and dynamo captures and for ``torch.compile(backend="convrewrite")``:
the sites' forms, the whole-graph check and the backend's choice between compiled graphs.
Evaluation (no grad, or eval mode) decides per rank: it is often run on one rank alone.

If rank 0 fails to decide, every rank runs the original; if it never posts, a waiting rank
gives up at the process group's timeout and runs the original, saying so. Rank 0 never waits.
"""

from __future__ import annotations

import hashlib
import pickle
from typing import Callable, TypeVar

import torch

DECIDING_RANK = 0
T = TypeVar("T")


def coordinated() -> bool:
    """Whether this process is one rank of several in an initialised process group."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def deciding() -> bool:
    """Whether this process decides (rank 0) for the job."""
    return torch.distributed.get_rank() == DECIDING_RANK


def training(params) -> bool:
    """Whether this call is one rank's part of a job that trains: coordinated, grad enabled,
    and some of ``params`` requiring grad (every rank of a data-parallel job answers alike)."""
    return coordinated() and torch.is_grad_enabled() and any(p.requires_grad for p in params)


def decided_once(topic: str, decide_here: Callable[[], T]) -> T | None:
    """``decide_here()`` as rank 0 returns it, on every rank: rank 0 runs it and posts the
    result (None, and the error raised on, where it fails) in the process group's store under
    ``topic`` (what is decided: the graph and its inputs); the other ranks run nothing and wait
    for that post, at most the store's timeout (the process group's), then raise
    ``RuntimeError``. A post is not a collective, so rank 0 never waits for the others (when
    it trains alone, say), and a rank only ever takes a decision on the same topic."""
    store, key = _store(), f"convrewrite/{hashlib.sha256(topic.encode()).hexdigest()}"
    if deciding():
        try:
            value = decide_here()
        except BaseException:
            store.set(key, pickle.dumps(None))  # the other ranks must not wait for a decision that will not come
            raise
        store.set(key, pickle.dumps(value))
        return value
    try:
        store.wait([key])
        return pickle.loads(store.get(key))  # noqa: S301 (posted by rank 0 of this job)
    except Exception as e:
        raise RuntimeError(f"rank {DECIDING_RANK}'s decision did not arrive (the process group's "
                           f"timeout bounds the wait): {e}") from e


def _store():
    return torch.distributed.distributed_c10d._get_default_store()
