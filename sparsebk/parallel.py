"""What a worker does differently when the model is wrapped for data parallelism.

The Trainer is written once for three kinds of model: a plain module (one process, the
benchmarks), DistributedDataParallel (a replica per worker) and torch's fully_shard (FSDP2:
parameters, gradients and optimizer state sharded). The few places where they differ are
here, so the training step reads the same for all three:

    unwrap(model)                 the module under DDP's wrapper (FSDP2's is the module itself)
    is_sharded(model)             FSDP2: forwards and checkpoints are collective
    gradient_sync(model, last)    gradient accumulation: synchronise on the last micro-batch only
    all_reduce_sum(t, world)      sums across workers (nothing to do with one)
    memory_stats(model, optim)    what this worker holds (its shards under FSDP)
    shard(model, world, device)   FSDP2 over the default process group, block by block
    compile_blocks(model)         torch.compile of each expert FFN, in place
    leave_worker()                end a spawned worker whose results are saved, skipping the
                                  interpreter's teardown (where gloo's threads can abort it)

Nothing here imports Ray: sparsebk.train.ray_train.loop applies the wrapping from outside.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import NoReturn

import torch
import torch.distributed as dist


def leave_worker() -> NoReturn:
    """End a worker process started by torch.multiprocessing (the benchmarks' and the tests'
    gloo workers) once its work is done and written: destroy its process group if it still
    has one, flush its output and exit with status 0 at once.

    Why not return: `destroy_process_group` drops only torch's own references to the group;
    one still held elsewhere (a fully_shard model's device mesh, a pending work object) is
    freed during the interpreter's finalization, where a gloo thread still joinable aborts
    the process (std::terminate, "terminate called without an active exception", SIGABRT:
    seen once in CI, in `sparsebk bench scale`'s FSDP worker). Exiting here skips that
    teardown; on an error, let the exception propagate instead, so the spawner reports its
    traceback."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP's wrapper (a fully_shard model is its own module)."""
    return model.module if hasattr(model, "module") else model


def is_sharded(model: torch.nn.Module) -> bool:
    """A fully_shard (FSDP2) model: its forward and its checkpoints are collective."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Backward passes inside synchronise gradients across workers only when `enabled`:
    DDP's `no_sync`, FSDP2's `set_requires_gradient_sync`; a plain module has nothing to
    synchronise. Forward and backward of a micro-batch both belong inside (DDP reads the flag
    in forward)."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DistributedDataParallel
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # fully_shard (FSDP2)
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    """`t` summed over the workers, in place (a single process has nothing to reduce and may
    have no process group)."""
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def memory_stats(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """This worker's memory: parameters + gradients + optimizer state it holds (its shards
    under FSDP), the process's peak resident set, and on CUDA the peak allocated. No device
    sync: sizes and host counters only."""
    import resource

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's own shard

    held = 0
    for p in model.parameters():
        held += local(p).nbytes + (local(p.grad).nbytes if p.grad is not None else 0)
    for st in optimizer.state.values():
        held += sum(local(v).nbytes for v in st.values() if torch.is_tensor(v))
    out = {"param_optim_mb": held / 2**20,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile what compiles cleanly, in place (parameter names unchanged): each
    expert's FFN, with a dynamic token count. A whole block does not: the MoE's per-expert
    slices have data-dependent sizes (inductor fails on them in torch 2.13), and the sparse
    path's `nonzero` is a graph break."""
    from sparsebk.model.moe import ExpertFFN

    for module in model.modules():
        if isinstance(module, ExpertFFN):
            module.compile(dynamic=True)


def shard(model: torch.nn.Module, world: int, device: torch.device) -> torch.nn.Module:
    """FSDP2: fully_shard each block, then the root (embedding, tied head, final norm) over
    all `world` ranks of the default process group. Each rank keeps 1/world of every
    parameter, its gradient and its optimizer state; a block's parameters are all-gathered
    for its forward and backward, its gradients reduce-scattered."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = model.to(device)
    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)
