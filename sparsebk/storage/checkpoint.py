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

    manifest_rank{r}.json
                        every rank, written last: the size and sha256 of each file that rank
                        wrote, the rank and the world size. Its presence means the rank's part
                        is complete; `verify_checkpoint` checks every listed file (and that
                        every rank's manifest is there) before anything is loaded, so a
                        truncated or bit-flipped checkpoint is refused with the file named
                        (resume then falls back to the one before). A checkpoint from before
                        manifests loads with a warning.

Ray merges the files all ranks report into one checkpoint directory, which is why each rank's
RNG state (and DCP shard) has its own file name.

Nothing in a checkpoint runs code when read: state.pt and the RNG files go through
`torch.load(weights_only=True)`, and a sharded checkpoint's DCP metadata (a pickle in torch's
format) is read by an unpickler that builds only DCP's metadata classes, torch sizes, dtypes
and paths (`_MetadataUnpickler`), its non-tensor values with `weights_only=True`. A crafted
`.metadata` that names anything else is refused with the class it asked for.

`load_model_weights` reads the weights of either layout into a plain single-process model
(export, evaluation). A checkpoint carries its tokenizer's files (a word vocabulary, GPT-2's
two files when the dataset has them) so that it loads without its dataset, which may live in
a bucket, on another machine, or nowhere any more.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
from pathlib import Path

import torch

from sparsebk.parallel import is_sharded
from sparsebk.storage.run_folder import SHARDS_DIR, STATE_FILE  # noqa: F401 (re-exported)
from sparsebk.storage.store import Store, open_store

logger = logging.getLogger(__name__)

MANIFEST = "manifest_rank{rank}.json"
MANIFEST_FORMAT = "sparsebk-checkpoint-manifest"



def _atomic_save(obj, path: Path) -> None:
    """Whole or not at all: a failed write (a full disk) leaves no partial file behind."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
                    meta: dict | None = None, sharded: bool = False, world: int = 1) -> Path:
    """Write this rank's part of a checkpoint into `directory` (created if missing).

    Rank 0 writes the training state; every rank writes its RNG state. `sharded` (a
    fully_shard model; every rank calls this, it is collective): model and optimizer go to
    `shards/` through torch.distributed.checkpoint, each rank writing its own shards. Each
    rank's manifest (sizes and sha256 of its files) is written last.
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
    write_manifest(d, rank, world, sharded)
    return d


def _sha256(read_chunks) -> str:
    h = hashlib.sha256()
    for chunk in read_chunks:
        h.update(chunk)
    return h.hexdigest()


def _file_chunks(path: Path, size: int = 1 << 22):
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def write_manifest(d: Path, rank: int, world: int, sharded: bool) -> None:
    """manifest_rank{rank}.json: what this rank wrote, written last (atomically)."""
    names = [f"rng_rank{rank}.pt"] + ([STATE_FILE] if rank == 0 else [])
    if sharded:  # DCP: every rank its __{rank}_*.distcp, the coordinator (rank 0) .metadata
        shards = d / SHARDS_DIR
        names += [f"{SHARDS_DIR}/{f.name}" for f in sorted(shards.iterdir())
                  if f.name.startswith(f"__{rank}_") or (rank == 0 and f.name == ".metadata")]
    files = {n: {"bytes": (d / n).stat().st_size, "sha256": _sha256(_file_chunks(d / n))}
             for n in names}
    record = {"format": MANIFEST_FORMAT, "version": 1, "rank": rank, "world": world,
              "files": files}
    tmp = d / (MANIFEST.format(rank=rank) + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, d / MANIFEST.format(rank=rank))


def verify_checkpoint(location: str | os.PathLike | Store) -> bool:
    """Check a checkpoint against its manifests before anything in it is loaded: every rank's
    manifest present, every listed file of the listed size and sha256. ValueError naming the
    checkpoint and the file otherwise. Returns False (with a warning) for a checkpoint written
    before manifests, True when verified. `location`: a local path, a URI or a Store."""
    store = location if isinstance(location, Store) else open_store(str(location))
    where = store.uri
    first = _read_manifest(store, 0, where)
    if first is None:
        logger.warning("checkpoint %s has no manifest (written before checkpoints carried "
                       "checksums): loaded unverified", where)
        return False
    world = first.get("world")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"{where}: {MANIFEST.format(rank=0)} has no valid world size ({world!r})")
    for rank in range(world):
        record = first if rank == 0 else _read_manifest(store, rank, where)
        if record is None:
            raise ValueError(f"{where}: incomplete checkpoint: {MANIFEST.format(rank=rank)} is "
                             f"missing (rank {rank} of {world} did not finish writing it)")
        for name, want in sorted(record.get("files", {}).items()):
            _verify_file(store, name, want, where)
    return True


def _read_manifest(store: Store, rank: int, where: str) -> dict | None:
    name = MANIFEST.format(rank=rank)
    if not store.is_file(name):
        return None
    try:
        record = json.loads(store.read_text(name))
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: {name} is not readable JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{where}: {name} is not a sparsebk checkpoint manifest")
    return record


def _verify_file(store: Store, name: str, want: dict, where: str) -> None:
    if ".." in Path(name).parts or Path(name).is_absolute():
        raise ValueError(f"{where}: manifest names a file outside the checkpoint: {name!r}")
    if not store.is_file(name):
        raise ValueError(f"{store.location(name)}: missing (the checkpoint's manifest lists "
                         "it): an incomplete checkpoint")
    if store.is_local:
        path = Path(store.path(name))
        size, digest = path.stat().st_size, None
        if size == want.get("bytes"):
            digest = _sha256(_file_chunks(path))
    else:
        data = store.read_bytes(name)
        size, digest = len(data), hashlib.sha256(data).hexdigest()
    if size != want.get("bytes"):
        raise ValueError(f"{store.location(name)}: {size} bytes where the checkpoint's manifest "
                         f"says {want.get('bytes')}: truncated or replaced")
    if digest != want.get("sha256"):
        raise ValueError(f"{store.location(name)}: does not match the sha256 in the "
                         "checkpoint's manifest: corrupt")


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
    verify_checkpoint(d)
    state = torch.load(path, map_location=map_location, weights_only=True)
    sharded = state.get("sharded", False)
    if model is not None and sharded != is_sharded(model):
        raise ValueError(f"checkpoint {d} was written by a "
                         f"{'sharded (run.parallel fsdp)' if sharded else 'replicated (ddp)'} "
                         "run; resume it with the same run.parallel")
    if sharded and model is not None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        target = _sharded_state(model, optimizer)
        _dcp_load(target, d / SHARDS_DIR)
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
    verify_checkpoint(d)
    state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
    if not state.get("sharded", False):
        model.load_state_dict(state["model"])
        return
    load_sharded_weights(d / SHARDS_DIR, model)


def load_sharded_weights(shards: str | os.PathLike, model: torch.nn.Module) -> None:
    """A checkpoint's DCP `shards/` folder gathered into a plain `model` in this process."""
    target = {"model": model.state_dict()}
    _dcp_load(target, Path(shards))  # no process group: read in this process
    model.load_state_dict(target["model"])


# --- reading DCP without running code ------------------------------------------------------
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {
    (_DCP_METADATA, n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                 "TensorStorageMetadata", "BytesStorageMetadata",
                                 "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
     ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what DCP's metadata holds: its own dataclasses, torch sizes, dtypes,
    layouts and paths. Anything else (os.system, a module's function...) is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a checkpoint's "
                                     "metadata holds DCP's classes only")


def _dcp_load(target: dict, shards: Path) -> None:
    """dcp.load into `target` from a shards folder, its metadata read by
    `_MetadataUnpickler` and its non-tensor values with weights_only=True."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except (pickle.UnpicklingError, AttributeError, EOFError, TypeError) as e:
                    raise ValueError(f"{path}: not a DCP metadata file this reader trusts "
                                     f"({e})") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element as set_at

                set_at(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    try:
        dcp.load(target, storage_reader=Reader(shards), planner=Planner())
    except dcp.api.CheckpointException as e:  # every rank's failure, wrapped: the first one
        first = str(next(iter(e.failures.values()), e))
        m = re.search(r"(\S+: not a DCP metadata file this reader trusts \([^)]*\))", first)
        raise (ValueError(m.group(1)) if m else e) from None
