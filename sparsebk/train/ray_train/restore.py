"""Restoring a worker from Ray Train's checkpoint, with a fallback to an older one.

    restore_with_fallback(trainer, ckpt)      # worker, instead of trainer.restore

The rules of what a resumed run may change live one floor down (sparsebk.train.resume); this
module holds the part that needs Ray's Checkpoint and the workers' process group.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import tempfile

from sparsebk.train.resume import _why, list_checkpoints

logger = logging.getLogger(__name__)


def restore_with_fallback(trainer, checkpoint) -> dict | None:
    """Worker side: `trainer.restore` from Ray's checkpoint, or, when it does not load
    (truncated, unreadable), from the newest earlier checkpoint of the run that does.
    Returns the schedule state.

    Every rank reads the checkpoint itself, and a read can fail on one rank only (a flaky
    store under load), so the ranks agree: each reports the newest candidate it could read,
    and all restore the oldest of those (the newest that every rank reads). Ranks that
    restored different steps would wait for each other's `ray.train.report` forever."""
    from ray.train import Checkpoint

    fs, path = checkpoint.filesystem, checkpoint.path
    older = [p for p in list_checkpoints(fs, posixpath.dirname(path.rstrip("/")))
             if posixpath.basename(p) < posixpath.basename(path.rstrip("/"))]
    candidates = [checkpoint] + [Checkpoint(p, filesystem=fs) for p in older]
    mine, state, error = _first_readable(trainer, candidates, 0)
    while True:
        lo, hi = _agree(trainer, mine)  # over the ranks; hi: the newest that every rank read
        if hi >= len(candidates):
            raise RuntimeError(f"no readable checkpoint on every worker: the last one tried, "
                               f"{candidates[-1].path}, failed with {error}")
        if lo == hi:
            if hi > 0 and trainer.rank == 0:
                logger.warning("checkpoint %s is unreadable on at least one worker; falling "
                               "back to %s on every worker", candidates[0].path, candidates[hi].path)
            return state
        if mine < hi:  # another rank could not read what this one restored: step back
            mine, state, error = _first_readable(trainer, candidates, hi)


def _first_readable(trainer, candidates: list, start: int) -> tuple[int, dict | None, str | None]:
    """(index, schedule state, last error) of the first of candidates[start:] this rank
    restores; index len(candidates) when none loads."""
    error = None
    for i in range(start, len(candidates)):
        try:
            with private_copy(candidates[i]) as d:
                return i, trainer.restore(d), error
        except Exception as e:  # noqa: BLE001 -- a bad file of any kind: the one before
            error = _why(e)
            logger.warning("rank %d: checkpoint %s is unreadable (%s)", trainer.rank,
                           candidates[i].path, error)
    return len(candidates), None, error


@contextlib.contextmanager
def private_copy(checkpoint):
    """A Ray checkpoint as a local folder this process alone reads: the folder itself on a
    local file system, else a download into a temporary folder of this process, removed
    afterwards. (Ray's `as_directory` shares one download folder among the processes of a
    node, named by the checkpoint: on one machine with a bucket, a rank read state.pt there
    while another process was still writing or removing it, and got a corrupt file.)"""
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield checkpoint.path
        return
    with tempfile.TemporaryDirectory(prefix="sparsebk-restore-") as d:
        yield checkpoint.to_directory(d)


def _agree(trainer, index: int) -> tuple[int, int]:
    """(min, max) of `index` over the workers (a single process: itself)."""
    if trainer.world <= 1:
        return index, index
    import torch
    import torch.distributed as dist

    t = torch.tensor([index, -index], dtype=torch.int64, device=trainer.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return -int(t[1]), int(t[0])
