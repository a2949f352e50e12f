"""The Ray Train worker function: build a Trainer, restore, fit. Ray touch points: `# [ray]`.

Everything about a training step lives in sparsebk.train.trainer; this module adds what only
a Ray worker has: its rank and device, the parallelism applied to the built model
(`parallelize`: torch.compile of the experts, then DDP through `prepare_model` or FSDP2's
`fully_shard`), the training rows (data.loader ray: the Ray Data shard; local: the whole
split; stream: the split's shards a window at a time), the schedule actor (rank 0 asks it, a gloo broadcast
hands the values to every rank), checkpoints restored from and reported to Ray Train, and
fault injection for the tests.

`ray.train` is imported where a worker uses it, not with this module: the single-process
pieces a test or benchmark needs live below (sparsebk.parallel, sparsebk.train.run_state), and
`ray.train` costs seconds to import.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext

import numpy as np
import ray
import torch
import torch.distributed as dist

from sparsebk.data.loading import load_blocks

from sparsebk.data.manifest import load_manifest
from sparsebk.model.lm import SparseBKLM
from sparsebk.parallel import compile_blocks, shard
from sparsebk.storage.store import open_store
from sparsebk.data.manifest import tokenizer_files
from sparsebk.train.config import TrainConfig
from sparsebk.train.errors import deterministic
from sparsebk.train.ray_train.restore import restore_with_fallback
from sparsebk.train.ray_train.schedule_client import BroadcastSchedule, ScheduleClient
from sparsebk.train.run_state import local_batches, shuffle_seed, stream_batches
from sparsebk.train.trainer import Trainer, eval_rows

logger = logging.getLogger("sparsebk.train")


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
        self.eval_every = cfg.run.eval_every

    def _wait_until_recorded(self, step: int, timeout_s: float = 30.0) -> None:
        """Until Ray Train has recorded the last checkpoint saved before `step` in the run's
        snapshot. Its controller records a reported checkpoint asynchronously, at its next
        poll of the workers: a worker that dies within that interval of the report loses the
        checkpoint, and the run resumes from an earlier one (a race real faults have too, and
        that the fault tests, which assert where a run resumes, would otherwise hit at random
        on a fast machine)."""
        saved = (step - 1) // self.eval_every * self.eval_every
        deadline = time.monotonic() + timeout_s
        while saved > 0 and time.monotonic() < deadline:
            try:
                snap = json.loads(self.store.read_text("checkpoint_manager_snapshot.json"))
                latest = (snap.get("latest_checkpoint_result") or {}).get("metrics", {}).get("step", 0)
            except (FileNotFoundError, ValueError):
                latest = 0
            if latest >= saved:
                return
            time.sleep(0.1)

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
            last = self.rank == self.world - 1
            if mode in ("raise", "exit", "hang") and last and self._once(mode, step):
                logger.warning("fault injection: %s on rank %d at step %d", mode, self.rank, step)
                if mode in ("raise", "exit"):
                    self._wait_until_recorded(step)
                if mode == "raise":
                    raise RuntimeError(f"injected failure at step {step} (run.inject_faults)")
                if mode == "hang":
                    time.sleep(3600)
                    return
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
    resolved), "dataset_dir": str, "schedule_actor": ActorHandle}.

    A deterministic error (a full disk, corrupt data: sparsebk.train.errors) is recorded with
    the schedule actor before it propagates; the workers Ray restarts then return at once, so
    the run ends after one restart instead of burning every retry on the same error."""
    actor = config["schedule_actor"]
    if ray.get(actor.fatal_reason.remote()) is not None:  # [ray] an earlier attempt met it
        return
    try:
        _train_worker(config)
    except Exception as e:
        why = deterministic(e)
        if why is not None:
            rank = ray.train.get_context().get_world_rank()  # [ray]
            ray.get(actor.set_fatal.remote(f"rank {rank}: {why}"))
        raise


def _train_worker(config: dict) -> None:
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
        # only the rows the evaluations take (a large corpus's splits are not read whole)
        valid=load_blocks(dataset_dir, "valid", max_rows=eval_rows(cfg, cfg.run.eval_batches, world)),
        test=lambda: load_blocks(dataset_dir, "test", max_rows=eval_rows(cfg, cfg.run.test_batches, world)),
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
    elif cfg.data.loader == "stream":  # a window of the split at a time, read from the store
        batches = lambda epoch, at: stream_batches(dataset_dir, cfg, epoch, at, rank,  # noqa: E731
                                                   world)
    else:
        rows = load_blocks(dataset_dir, "train")
        batches = lambda epoch, at: local_batches(rows, cfg, epoch, at, rank, world)  # noqa: E731
    trainer.finish(trainer.fit(batches))
