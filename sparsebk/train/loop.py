"""The Ray Train worker function: build a Trainer, restore, fit. Ray touch points: `# [ray]`.

Everything about a training step lives in sparsebk.train.trainer; this module adds what only
a Ray worker has: its rank and device, the parallelism applied to the built model
(`parallelize`: torch.compile of the experts, then DDP through `prepare_model` or FSDP2's
`fully_shard`), the dataset shard, the schedule actor (rank 0 asks it, a gloo broadcast
hands the values to every rank), checkpoints restored from and reported to Ray Train, and
fault injection for the tests.

`ray.train` is imported where a worker uses it, not with this module: the single-process
pieces here (local_batches, shard, compile_blocks) are imported by processes that never run a
Ray Train worker (gloo test runs, benchmarks), and `ray.train` costs seconds to import.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext

import numpy as np
import ray
import torch
import torch.distributed as dist

from sparsebk.data import load_blocks, load_manifest
from sparsebk.lm import SparseBKLM
from sparsebk.store import open_store
from sparsebk.train.checkpoint import tokenizer_files
from sparsebk.train.config import TrainConfig
from sparsebk.train.resume import restore_with_fallback
from sparsebk.train.schedule_client import BroadcastSchedule, ScheduleClient
from sparsebk.train.trainer import Trainer, lr_lambda, shuffle_seed  # noqa: F401 (lr_lambda)

logger = logging.getLogger("sparsebk.train")


def local_batches(rows: torch.Tensor, cfg: TrainConfig, epoch: int, start: int, rank: int,
                  world: int):
    """data.loader local: this rank's batches of one epoch from all rows (R, block_len + 1),
    from sample `start` of the epoch's order on.

    The order is a permutation of all rows seeded by (run.seed, epoch) only; rank r takes
    every world-th of the rows left, so one step of all ranks consumes a contiguous stretch
    of the order and the position is a sample count whatever the worker count and batch size
    (a resumed run with other ones continues at the same sample)."""
    if cfg.data.shuffle_buffer:
        g = torch.Generator().manual_seed(shuffle_seed(cfg.run.seed, epoch))
        order = torch.randperm(len(rows), generator=g)
    else:
        order = torch.arange(len(rows))
    left = order[start:]
    n = len(left) // world * world  # equal shares: every rank runs the same number of steps
    mine = left[:n][rank::world]
    b = cfg.data.batch_size
    for i in range(0, len(mine) - b + 1, b):
        yield rows[mine[i:i + b]]


def _rebatch(batches, skip: int, size: int):
    """Batches of `size` rows from a stream of row tensors, after dropping its first `skip`
    rows; a last short batch is dropped."""
    buf = None
    for x in batches:
        if skip >= len(x):
            skip -= len(x)
            continue
        x, skip = x[skip:], 0
        buf = x if buf is None else torch.cat([buf, x])
        while len(buf) >= size:
            yield buf[:size]
            buf = buf[size:]


def ray_batches(shard, cfg: TrainConfig, epoch: int, start: int, world: int = 1):
    """data.loader ray: this rank's batches of one epoch from its Ray Data shard, from sample
    `start` of the epoch (all workers together) on: this rank skips its share, start // world
    rows. Ray Data splits rows across workers dynamically, so the rows skipped are the right
    number, not necessarily the same rows (loader local is exact)."""
    kw = {}
    if cfg.data.shuffle_buffer:
        kw = {"local_shuffle_buffer_size": cfg.data.shuffle_buffer,
              "local_shuffle_seed": shuffle_seed(cfg.run.seed, epoch)}
    b = cfg.data.batch_size
    it = shard.iter_batches(batch_size=b, batch_format="numpy", drop_last=True,
                            prefetch_batches=cfg.data.prefetch_batches, **kw)
    rows = (torch.from_numpy(np.stack(batch["tokens"]).astype(np.int64)) for batch in it)
    yield from _rebatch(rows, start // max(1, world), b)


class FaultInjector:
    """Testing aid (run.inject_faults): fail once at a given step, remembered by a marker file."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, actor):
        self.faults = cfg.run.faults()
        self.store = open_store(cfg.run.run_dir)  # a path or a URI
        self.rank, self.world, self.actor = rank, world, actor

    def _once(self, mode: str, step: int) -> bool:
        marker = f"faults/{mode}@{step}"
        if self.store.exists(marker):
            return False
        self.store.write_text(marker, str(os.getpid()))
        return True

    def before_step(self, step: int) -> None:
        for mode, at in self.faults:
            if at != step:
                continue
            if mode in ("raise", "exit") and self.rank == self.world - 1 and self._once(mode, step):
                logger.warning("fault injection: %s on rank %d at step %d", mode, self.rank, step)
                if mode == "raise":
                    raise RuntimeError(f"injected failure at step {step} (run.inject_faults)")
                os._exit(1)
            if mode == "kill_actor" and self.rank == 0 and self._once(mode, step):
                logger.warning("fault injection: killing the schedule actor at step %d", step)
                ray.kill(self.actor, no_restart=False)

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self.rank == 0 and ("nan", step) in self.faults else loss


def _device(cfg: TrainConfig, rank: int) -> torch.device:
    if not cfg.run.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        # Never fall back to CPU silently: the NCCL group would then fail obscurely.
        raise RuntimeError(f"run.use_gpu is true but worker rank {rank} sees no CUDA device "
                           f"(torch {torch.__version__}); install a CUDA build of torch on the "
                           "GPU nodes or set run.use_gpu=false")
    if not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"worker rank {rank}: {torch.cuda.get_device_name()} has no bf16 "
                           "support, which the GPU path's autocast uses")
    import ray.train.torch

    return ray.train.torch.get_device()  # [ray]


def compile_blocks(model: SparseBKLM) -> None:
    """torch.compile what compiles cleanly, in place (parameter names unchanged): each
    expert's FFN, with a dynamic token count. A whole block does not: the MoE's per-expert
    slices have data-dependent sizes (inductor fails on them in torch 2.13), and the sparse
    path's `nonzero` is a graph break."""
    from sparsebk.moe import ExpertFFN

    for module in model.modules():
        if isinstance(module, ExpertFFN):
            module.compile(dynamic=True)


def shard(model: SparseBKLM, world: int, device: torch.device) -> torch.nn.Module:
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


def parallelize(model: SparseBKLM, cfg: TrainConfig, world: int, device: torch.device
                ) -> torch.nn.Module:
    """The built model as this worker trains it: compiled parts (run.compile), then DDP
    (run.parallel ddp, through Ray's prepare_model; none for one CPU worker) or `shard`
    (run.parallel fsdp, any number of workers)."""
    if cfg.run.compile:
        compile_blocks(model)
    if cfg.run.parallel == "fsdp":
        return shard(model, world, device)
    if world > 1 or cfg.run.use_gpu:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # [ray] DDP, on the worker's device
    return model


def _report(metrics: dict, directory: str | None) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
    ray.train.report(metrics, checkpoint=checkpoint)  # [ray] a barrier: every rank calls it


def train_loop_per_worker(config: dict) -> None:
    """Run by every Ray Train worker. `config`: {"cfg": TrainConfig.to_dict() (vocabulary
    resolved), "dataset_dir": str, "schedule_actor": ActorHandle}."""
    import ray.train

    cfg = TrainConfig.from_dict(config["cfg"])
    actor, dataset_dir = config["schedule_actor"], config["dataset_dir"]
    ctx = ray.train.get_context()  # [ray]
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device(cfg, rank)
    if device.type == "cpu":
        torch.set_num_threads(cfg.run.torch_threads or max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(cfg.run.seed * 1000 + rank)  # this rank's gate noise and dropout
    with torch.random.fork_rng(devices=[]):
        # the same initial weights on every rank: DDP would broadcast rank 0's, but
        # fully_shard keeps each rank's own slice of what it built
        torch.manual_seed(cfg.run.seed * 1000)
        model = SparseBKLM(cfg.model)
    model = parallelize(model, cfg, world, device)
    trainer = Trainer(
        cfg, model, device=device, rank=rank, world=world,
        valid=load_blocks(dataset_dir, "valid"), test=lambda: load_blocks(dataset_dir, "test"),
        reporter=_report, hooks=FaultInjector(cfg, rank, world, actor), run_dir=cfg.run.run_dir,
        autocast=((lambda: torch.autocast("cuda", dtype=torch.bfloat16))
                  if device.type == "cuda" else nullcontext),
        # the tokenizer files travel in every checkpoint: it loads without its dataset
        meta={"tokenizer": load_manifest(dataset_dir)["tokenizer"], "dataset_dir": dataset_dir,
              "tokenizer_files": tokenizer_files(dataset_dir)})
    sched_state = None
    ckpt = ray.train.get_checkpoint()  # [ray]
    if ckpt is not None:  # the latest, or the newest earlier one if it does not load
        sched_state = restore_with_fallback(trainer, ckpt)
    # The schedule travels on a CPU group even when the default group is NCCL: the values
    # are host floats, and a gloo broadcast needs no device sync.
    group = None
    if world > 1:
        group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    client = ScheduleClient(actor, sched_state) if rank == 0 else None
    trainer.schedule = BroadcastSchedule(client, cfg.model.n_layers, group, world)

    if cfg.data.loader == "ray":
        shard = ray.train.get_dataset_shard("train")  # [ray]
        batches = lambda epoch, start: ray_batches(shard, cfg, epoch, start, world)  # noqa: E731
    else:
        rows = load_blocks(dataset_dir, "train")
        batches = lambda epoch, at: local_batches(rows, cfg, epoch, at, rank, world)  # noqa: E731
    trainer.finish(trainer.fit(batches))
