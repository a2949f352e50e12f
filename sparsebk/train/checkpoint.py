"""Training checkpoints: one directory per checkpoint, written atomically, read with
`torch.load(weights_only=True)`.

Layout of a checkpoint directory (Ray Train copies it into the run's storage):

    state.pt            rank 0: model, optimizer, LR schedule, step, data position,
                        schedule state (plain JSON-able values), counters, and "meta": what
                        the weights are (the training config, the model config, the
                        tokenizer's identity with its vocabulary checksum, the dataset dir)
    rng_rank{r}.pt      every rank: its own torch (and CUDA) and Python RNG states, so the
                        gate noise continues exactly where it stopped

Ray merges the files all ranks report into one checkpoint directory, which is why each rank's
RNG state has its own file name.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

STATE_FILE = "state.pt"


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(directory: str | os.PathLike, *, rank: int, model=None, optimizer=None,
                    lr_scheduler=None, step: int = 0, data_position: dict | None = None,
                    schedule_state: dict | None = None, extra: dict | None = None,
                    meta: dict | None = None) -> Path:
    """Write this rank's part of a checkpoint into `directory` (created if missing).

    Rank 0 writes the training state; every rank writes its RNG state.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "step": int(step),
            "data_position": dict(data_position or {}),
            "schedule_state": schedule_state,
            "extra": dict(extra or {}),
            "meta": dict(meta or {}),
        }
        _atomic_save(state, d / STATE_FILE)
    _atomic_save(rng_state(), d / f"rng_rank{rank}.pt")
    return d


def load_checkpoint(directory: str | os.PathLike, *, rank: int, model=None, optimizer=None,
                    lr_scheduler=None, map_location="cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint` into the given objects.

    Returns the state dict (step, data_position, schedule_state, extra). The RNG state of
    `rank` is restored when the checkpoint has it (same world size); otherwise the caller
    reseeds.
    """
    d = Path(directory)
    path = d / STATE_FILE
    if not path.is_file():
        raise ValueError(f"checkpoint {d}: missing {STATE_FILE}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if model is not None:
        model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    rng_path = d / f"rng_rank{rank}.pt"
    state["rng_restored"] = rng_path.is_file()
    if state["rng_restored"]:
        set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=True))
    return state
