"""Several training processes (torchrun): the process group and every collective the loop uses.

detpact's data-parallel mode is launched by torchrun (one process per GPU, or several
CPU processes): each rank trains the same model on its own shard of every global batch.
This module is the only one that imports torch.distributed; with one process every
function here is a no-op, so the loop reads the same either way.

Gradients are averaged with one all-reduce per optimizer step, after the micro-batches
of gradient accumulation (as DDP's `no_sync`), rather than through DDP's backward hooks:
every rank then runs exactly the same collectives whatever happens inside a step (a
non-finite loss on one rank, a parameter unused by one batch, a frozen module), so a
rank can never wait on another that skipped a backward. The price is that communication
does not overlap the backward pass; on the models detpact trains the all-reduce is a
small share of a step (docs/benchmarks.md, bench/ddp.py).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from detpact.errors import DetpactError, TrainingAborted

log = logging.getLogger(__name__)

# torchrun sets these in every worker's environment.
_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Distributed:
    """Where this process stands among the training processes (world_size 1: alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout_s: float = 1800.0  # train.ddp.timeout_s: how long a collective waits for every rank

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and logs progress."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend}


SINGLE = Distributed()


def launched_by_torchrun(environ: Mapping[str, str]) -> bool:
    return all(key in environ for key in _TORCHRUN_KEYS)


def restart_attempt(environ: Mapping[str, str]) -> int:
    """How many times torchrun has restarted the worker group (--max-restarts); 0 at first."""
    try:
        return int(environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def init_distributed(environ: Mapping[str, str], requested: bool, device_name: str,
                     timeout_s: float = 1800.0) -> Distributed:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); SINGLE without torchrun.

    `requested` (the --ddp flag) without torchrun's environment is a user error: one
    process cannot start the others. `timeout_s` (train.ddp.timeout_s): a collective that
    waits longer means a rank died or hung, and fails instead of hanging forever.
    """
    if not launched_by_torchrun(environ):
        if requested:
            raise DetpactError(
                "--ddp needs the environment torchrun sets up (RANK, WORLD_SIZE, MASTER_ADDR, ...). Launch with "
                "torchrun --nproc_per_node=N -m detpact train CONFIG --run-id ID (docs/training.md).")
        return SINGLE
    rank, world_size, local_rank = int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"])
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if device_name == "cuda" and not use_cuda:
        raise DetpactError("run.device is 'cuda' but no CUDA device is available. Use run.device: auto or cpu.")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DetpactError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                               "device(s): lower torchrun's --nproc_per_node.")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        # torchrun's workers share its store across restarts (--max-restarts): without a
        # prefix per attempt, a restarted group reads the dead group's addresses
        # (pytorch#135712) and fails to connect.
        store = dist.PrefixStore(f"detpact/attempt_{restart_attempt(environ)}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend,
                       timeout_s=timeout_s)


def process_device(ctx: Distributed, device: torch.device) -> torch.device:
    """The device this rank trains on: its own GPU under nccl."""
    if ctx.backend == "nccl":
        return torch.device("cuda", ctx.local_rank)
    return device


def close(ctx: Distributed) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Distributed) -> None:
    """Every rank waits here until all have arrived (around checkpoints and validation)."""
    if ctx.enabled:
        dist.barrier()


def meet(ctx: Distributed, what: str) -> None:
    """Every rank waits here for all the others, as `barrier`; a rank that does not arrive
    within train.ddp.timeout_s ends the run with TrainingAborted naming the ranks involved
    (gloo's monitored barrier; under nccl a plain barrier, which fails on the timeout)."""
    if not ctx.enabled:
        return
    try:
        if ctx.backend == "gloo":
            dist.monitored_barrier(wait_all_ranks=True)
        else:
            dist.barrier()
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise TrainingAborted(
            f"rank {ctx.rank}: the processes did not all reach {what} within train.ddp.timeout_s "
            f"({ctx.timeout_s:g} s): {detail[:400]}. A rank died or hung (its log says why); if rank 0's "
            "validations or checkpoint writes legitimately take that long, raise train.ddp.timeout_s. The run "
            "continues from its last committed checkpoint with --resume.", reason="ddp_timeout") from exc


def sum_values(ctx: Distributed, values: Sequence[float], device: torch.device) -> list[float]:
    """The sum over ranks of each number in `values` (the same length on every rank), in float64."""
    if not ctx.enabled:
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_comm_device(ctx, device))
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(ctx: Distributed, flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a stop signal)."""
    return sum_values(ctx, [float(flag)], device)[0] > 0 if ctx.enabled else flag


def broadcast_from_main(ctx: Distributed, value: Any) -> Any:
    """Rank 0's `value` (any picklable object), on every rank."""
    if not ctx.enabled:
        return value
    box = [value if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_gradients(ctx: Distributed, params: Sequence[nn.Parameter], had_grad: Sequence[bool]) -> None:
    """Replace each gradient by its mean over ranks, in one flat all-reduce.

    `had_grad[i]`: whether parameter i got a gradient on any rank this step. A rank
    without one contributes zeros; a parameter without one anywhere keeps grad None, so
    the optimizer skips it exactly as a single process would.
    """
    if not ctx.enabled:
        return
    live = [p for p, has in zip(params, had_grad) if has]
    if not live:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in live]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= ctx.world_size
    for p, synced in zip(live, torch._utils._unflatten_dense_tensors(flat, grads)):
        if p.grad is None:
            p.grad = synced
        else:
            p.grad.copy_(synced)


def broadcast_state(ctx: Distributed, module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's `module` (at start, and the
    BatchNorm statistics after each step: each rank gathered its own)."""
    if not ctx.enabled:
        return
    tensors = [t for t in module.state_dict().values() if t.numel()]
    if tensors:
        _broadcast_tensors(tensors)


def broadcast_buffers(ctx: Distributed, module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics and counters) on every rank."""
    if not ctx.enabled:
        return
    buffers = [b for b in module.buffers() if b.numel()]
    if buffers:
        _broadcast_tensors(buffers)


def _broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    # One flat float64 tensor holds int64 counters and float32 statistics exactly.
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    dist.broadcast(flat, src=0)
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_(flat[offset:offset + count].view_as(tensor).to(tensor.dtype))
        offset += count


def global_normaliser(ctx: Distributed, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loss divisor shared by all ranks (models/losses/normalise.py): the positive count
    of the global batch (at least 1) over the number of ranks, so that the mean of the
    ranks' losses is the loss of one process on the whole batch. Every rank must call it
    for every micro-batch (it all-reduces)."""

    def normalise(total: torch.Tensor) -> torch.Tensor:
        summed = total.detach().to(_comm_device(ctx, device), torch.float32).clone()
        dist.all_reduce(summed)
        return (summed.clamp(min=1.0) / ctx.world_size).to(total.device)

    return normalise


def sync_batchnorm(ctx: Distributed, model: nn.Module, enabled: bool, device: torch.device) -> nn.Module:
    """BatchNorm layers that normalise over the global batch (train.ddp.sync_bn); CUDA only,
    as torch's SyncBatchNorm."""
    if not enabled or not ctx.enabled:
        return model
    if device.type != "cuda":
        raise DetpactError("train.ddp.sync_bn needs CUDA devices (torch's SyncBatchNorm does not run on CPU). "
                           "Set it to false for CPU processes.")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _comm_device(ctx: Distributed, device: torch.device) -> torch.device:
    """nccl communicates CUDA tensors only; gloo, CPU ones."""
    return device if ctx.backend == "nccl" else torch.device("cpu")
