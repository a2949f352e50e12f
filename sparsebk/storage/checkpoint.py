"""Training checkpoints: one directory per checkpoint, written atomically, read with
`torch.load(weights_only=True)`.

Layout of a checkpoint directory (Ray Train copies it into the run's storage):

    state.pt            rank 0: model, optimizer, LR schedule, step, data position,
                        schedule state (plain JSON-able values), counters, and "meta": what
                        the weights are (the training config, the model config, the
                        tokenizer's identity with its vocabulary checksum, the dataset dir,
                        and the text of the tokenizer's files: `tokenizer_files`)
    rng_rank{r}.pt      every rank: its own torch (and CUDA) and Python RNG states, so the
                        gate noise continues exactly where it stopped
    shards/             sharded runs (run.parallel fsdp) only, instead of state.pt's model and
                        optimizer: a torch.distributed.checkpoint (DCP) folder, every rank
                        writing its own shard file (__{r}_0.distcp) and rank 0 the .metadata;
                        it loads into any number of workers (DCP reshards on load)

Ray merges the files all ranks report into one checkpoint directory, which is why each rank's
RNG state (and DCP shard) has its own file name.

`load_model_weights` reads the weights of either layout into a plain single-process model
(export, evaluation). A checkpoint carries its tokenizer's files (a word vocabulary, GPT-2's
two files when the dataset has them) so that it loads without its dataset, which may live in
a bucket, on another machine, or nowhere any more.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from sparsebk.parallel import is_sharded
from sparsebk.storage.run_folder import SHARDS_DIR, STATE_FILE  # noqa: F401 (re-exported)



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


def _sharded_state(model, optimizer) -> dict:
    """{"model": ..., "optimizer": ...} of a fully_shard model: this rank's DTensor shards,
    keyed by parameter name (the optimizer's state initialised if it has none yet)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def save_checkpoint(directory: str | os.PathLike, *, rank: int, model=None, optimizer=None,
                    lr_scheduler=None, step: int = 0, data_position: dict | None = None,
                    schedule_state: dict | None = None, extra: dict | None = None,
                    meta: dict | None = None, sharded: bool = False) -> Path:
    """Write this rank's part of a checkpoint into `directory` (created if missing).

    Rank 0 writes the training state; every rank writes its RNG state. `sharded` (a
    fully_shard model; every rank calls this, it is collective): model and optimizer go to
    `shards/` through torch.distributed.checkpoint, each rank writing its own shards.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if sharded:
        import torch.distributed.checkpoint as dcp

        dcp.save(_sharded_state(model, optimizer), checkpoint_id=d / SHARDS_DIR)
    if rank == 0:
        state = {
            "sharded": sharded,
            **({} if sharded else {"model": model.state_dict(),
                                   "optimizer": optimizer.state_dict()}),
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
    reseeds. A sharded checkpoint loads into a fully_shard model and its optimizer (every
    rank calls this, with any number of ranks); the layouts do not mix.
    """
    d = Path(directory)
    path = d / STATE_FILE
    if not path.is_file():
        raise ValueError(f"checkpoint {d}: missing {STATE_FILE}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    sharded = state.get("sharded", False)
    if model is not None and sharded != is_sharded(model):
        raise ValueError(f"checkpoint {d} was written by a "
                         f"{'sharded (run.parallel fsdp)' if sharded else 'replicated (ddp)'} "
                         "run; resume it with the same run.parallel")
    if sharded and model is not None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        target = _sharded_state(model, optimizer)
        dcp.load(target, checkpoint_id=d / SHARDS_DIR)
        set_state_dict(model, optimizer, model_state_dict=target["model"],
                       optim_state_dict=target["optimizer"])
    elif model is not None:
        model.load_state_dict(state["model"])
    if optimizer is not None and not sharded:
        optimizer.load_state_dict(state["optimizer"])
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    rng_path = d / f"rng_rank{rank}.pt"
    state["rng_restored"] = rng_path.is_file()
    if state["rng_restored"]:
        set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=True))
    return state


def load_model_weights(directory: str | os.PathLike, model: torch.nn.Module) -> None:
    """The checkpoint's weights into a plain (unsharded) `model` in this process, whichever
    layout wrote them: state.pt's "model", or the DCP shards gathered into full tensors."""
    d = Path(directory)
    state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
    if not state.get("sharded", False):
        model.load_state_dict(state["model"])
        return
    load_sharded_weights(d / SHARDS_DIR, model)


def load_sharded_weights(shards: str | os.PathLike, model: torch.nn.Module) -> None:
    """A checkpoint's DCP `shards/` folder gathered into a plain `model` in this process."""
    import torch.distributed.checkpoint as dcp

    target = {"model": model.state_dict()}
    dcp.load(target, checkpoint_id=Path(shards))  # no process group: read in this process
    model.load_state_dict(target["model"])
