"""torchrun support: process group set-up, shared decisions and storage, gathering Python objects,
summing gradients."""

from __future__ import annotations

import atexit
import os
import secrets
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def init() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # ranks wait in a barrier while rank 0 writes a checkpoint (tens of GB for a 4B model's full
        # state on shared storage): more than the default 10 minutes must not kill the run
        dist.init_process_group(backend, timeout=timedelta(minutes=60))
        atexit.register(_leave)
    return rank_world()


def _leave() -> None:
    """Leave the process group before the interpreter shuts down. Left to the interpreter's own
    teardown, a gloo rank whose peer has already exited aborts (SIGABRT, "terminate called without
    an active exception") after all its work is done, and torchrun then reports the run as failed:
    2 of 12 two-rank runs of a broadcast and exit did here, none of 16 with this."""
    if dist.is_initialized():
        dist.destroy_process_group()


def end(code) -> None:
    """End a torchrun rank whose command has returned (`code`: sys.exit's argument) without the
    interpreter's finalisation: the exit handlers run (leaving the process group, stopping the
    grader, flushing logs), then the process exits. Even after `_leave`, finalisation could still
    abort a rank while its peer left the group at the same moment (1 of 8 two-rank RL runs, the
    ranks' objects freed in no set order); a rank that has written everything has nothing left for
    it to do. Returns at once outside a process group."""
    if not dist.is_initialized():
        return
    atexit._run_exitfuncs()  # the handlers a normal exit would run (the module has no public name for it)
    status = code if isinstance(code, int) else 0 if code is None else 1
    if not isinstance(code, int | None):
        print(code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather(items: list) -> list:
    """Every rank's list, concatenated in rank order (the list itself when not distributed)."""
    if not dist.is_initialized():
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def from_rank0(value):
    """Rank 0's `value` on every rank (a decision all ranks must share: which checkpoint to resume)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn):
    """`fn()` run by rank 0 alone (merging the ranks' files, writing a summary) while the others
    wait; every rank returns its result, or raises the error it raised (so no rank is left waiting
    in a collective that rank 0 never reaches)."""
    if not dist.is_initialized():
        return fn()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    result, error = from_rank0((result, error))
    if error is not None:
        raise error
    return result


def wait_for_all(folder: Path, name: str) -> None:
    """Wait until every rank has finished its share, without a collective: ranks that finish hours
    apart (a long distillation's last chunks) would outlast the process group's 60-minute timeout
    in a barrier. Each rank writes FOLDER/.NAME.rankR and polls for all of them (rank 0 deletes them
    when it merges: `clear_marks`, called before any rank can write one)."""
    if not dist.is_initialized():
        return
    rank, world = rank_world()
    (folder / f".{name}.rank{rank}").write_text("done")
    while not all((folder / f".{name}.rank{r}").exists() for r in range(world)):
        time.sleep(5.0)
    barrier()  # every rank is here or about to be: a barrier of seconds


def clear_marks(folder: Path, name: str) -> None:
    for mark in folder.glob(f".{name}.rank*"):
        mark.unlink(missing_ok=True)


def check_shared(folder: Path, wait_s: float = 90.0) -> None:
    """Under torchrun every rank reads what rank 0 alone writes (checkpoints, the resolved config,
    the stages before): `folder` must be one filesystem for all of them, which several nodes with
    disks of their own are not. Rank 0 writes a random token; every rank reads it back, and all stop
    together when any cannot. A rank waits up to `wait_s` for it: NFS clients cache a folder's
    listing (and a name's absence) for up to a minute."""
    if not dist.is_initialized():
        return
    mark = folder / ".npr-shared"
    token = from_rank0(secrets.token_hex(8))
    if dist.get_rank() == 0:
        mark.write_text(token)
    barrier()
    deadline = time.monotonic() + wait_s
    while not (ok := _holds(mark, token)) and time.monotonic() < deadline:
        time.sleep(1.0)
    seen = gather([ok])
    barrier()
    if dist.get_rank() == 0:
        mark.unlink(missing_ok=True)
    if not all(seen):
        ranks = [r for r, ok in enumerate(seen) if not ok]
        raise ValueError(f"{folder}: ranks {ranks} do not see rank 0's files; under torchrun on several nodes "
                         "the run folder must be on storage every node shares")  # fmt: skip


def _holds(path: Path, text: str) -> bool:
    try:
        return path.read_text() == text
    except OSError:
        return False


def sum_gradients(params) -> None:
    """All-reduce (sum) the gradients of replicated parameters; missing gradients count as zero."""
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def sum_floats(values: dict) -> dict:
    if not dist.is_initialized():
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def max_int(value: int) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _device() -> str:
    """NCCL reduces CUDA tensors only."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
