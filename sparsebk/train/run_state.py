"""Where a run is: its step, its data position and its counters, as a checkpoint keeps them.

The data position is kept in samples: `sample_in_epoch` is the number of rows all workers
together have consumed in the epoch, and the epoch's order depends only on run.seed and the
epoch (`shuffle_seed`), so a run resumed with another worker count, batch size or gradient
accumulation continues at the same sample. `from_checkpoint` reads a checkpoint's state in the
resumed run's terms, including a checkpoint from before positions were kept in samples.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sparsebk.train.config import TrainConfig


def shuffle_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's sample order: the run's seed and the epoch, nothing else (not
    the worker count or batch size), so a sample position means the same row after a resume."""
    return seed * 100_003 + epoch


@dataclass
class RunState:
    """What a resumed run needs besides the weights, optimizer and schedule."""

    step: int = 0  # optimizer steps
    epoch: int = 0
    sample_in_epoch: int = 0  # rows all workers together consumed in this epoch
    batch_in_epoch: int = 0  # this worker's micro-batches in the epoch (N per step; for logs)
    best_val_loss: float = math.inf
    last_val_loss: float | None = None
    bad_steps: int = 0  # non-finite steps skipped, in total
    nonfinite_evals: int = 0  # validations whose loss was not finite (kept from the schedule)

    def data_position(self, seed: int) -> dict:
        """The position as a checkpoint records it (the seed names the epoch's order)."""
        return {"epoch": self.epoch, "sample_in_epoch": self.sample_in_epoch,
                "shuffle_seed": shuffle_seed(seed, self.epoch)}

    @classmethod
    def from_checkpoint(cls, ckpt: dict, cfg_dict: dict, world: int, batch_size: int
                        ) -> "RunState":
        """The checkpoint's RunState in the resumed run's terms: this worker's batch count from
        the sample position (the worker count `world` or `batch_size` may have changed). A
        checkpoint from before sample positions counted batches of its own run's shape: its
        training config (`cfg_dict` when it has none) converts them."""
        saved = dict(ckpt["extra"]["run_state"])
        if "sample_in_epoch" not in saved:
            old = ckpt.get("meta", {}).get("train_config", cfg_dict)
            per_batch = (old["data"]["batch_size"] * max(1, old["run"]["num_workers"]))
            saved["sample_in_epoch"] = saved.get("batch_in_epoch", 0) * per_batch
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in saved.items() if k in names})
        state.batch_in_epoch = state.sample_in_epoch // (world * batch_size)
        return state


def local_batches(rows: torch.Tensor, cfg: "TrainConfig", epoch: int, start: int, rank: int,
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


def stream_batches(dataset_dir, cfg: "TrainConfig", epoch: int, start: int, rank: int,
                   world: int, *, prefetch: bool = True):
    """data.loader stream: this rank's batches of one epoch, read shard by shard from the
    dataset's store (sparsebk.data.stream), from sample `start` of the epoch's order on.

    The order depends only on (run.seed, epoch) and the dataset: windows of
    data.shuffle_window rows, each permuted (when data.shuffle_buffer > 0 turns shuffling
    on), after a seeded permutation of the shards. Rank r takes the same positions as in
    `local_batches`, so the position is a sample count whatever the worker count and batch
    size; with one window the rows are local_batches' own, batch for batch."""
    import numpy as np

    from sparsebk.data.stream import stream_rows

    seed = shuffle_seed(cfg.run.seed, epoch) if cfg.data.shuffle_buffer else None
    b = cfg.data.batch_size
    buf = None
    for chunk in stream_rows(dataset_dir, "train", seed, window=cfg.data.shuffle_window,
                             start=start, rank=rank, world=world, prefetch=prefetch):
        buf = chunk if buf is None or not len(buf) else np.concatenate([buf, chunk])
        n = len(buf) // b * b
        for i in range(0, n, b):
            yield torch.from_numpy(buf[i:i + b].astype(np.int64))
        buf = buf[n:]
