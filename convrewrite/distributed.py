"""One decision per job: under ``torch.distributed``, rank 0 decides and every rank runs it.

Data-parallel training runs the same model in every process. Left alone, each process would
time the candidates at its first call (all at once, on shared cores: the contention that
makes figures wrong) and could choose differently (replicas running different code, with
numerics that differ in the last bits). When a process group with more than one rank is
initialised and the model trains (grad enabled, training mode: evaluation is often run on
one rank alone, and decides per rank), rank 0 builds each specialisation as usual (measuring, checking) and
broadcasts its report; the other ranks wait for it, time nothing, and run the forms it
chose. If rank 0 fails to decide, every rank runs the original; if it never answers, the
broadcast gives up at the process group's timeout and the rank runs the original, saying so.
"""

from __future__ import annotations

import torch

from .report import Report

DECIDING_RANK = 0


def coordinated() -> bool:
    """Whether this process is one rank of several in an initialised process group."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def deciding() -> bool:
    """Whether this process decides (rank 0) for the job."""
    return torch.distributed.get_rank() == DECIDING_RANK


def share(report: Report | None) -> Report | None:
    """Rank 0's report, on every rank: rank 0 sends ``report`` (None where it could not
    decide), the others receive it. Raises where the process group fails or times out."""
    dist = torch.distributed
    box = [report if deciding() else None]
    dist.broadcast_object_list(box, src=DECIDING_RANK, device=_object_device())
    return box[0]


def _object_device() -> torch.device | None:
    """Where the broadcast stages its bytes: NCCL needs them on this rank's GPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None
