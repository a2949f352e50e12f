"""Resuming a run: what may change between its checkpoint and the new config, and which
checkpoint to resume from.

    check_resume(loop_config, where)          # driver, before any worker starts
    (the worker's restore_with_fallback, which needs Ray: sparsebk.train.ray_train.restore)

A checkpoint carries the config it was trained with (state.pt's "meta": the training config,
the model config, the tokenizer's identity with its vocabulary checksum, the dataset dir). On
resume the driver compares it with the new config. Settings that only change how long, how
often or on how many workers the run trains apply, with the diff logged: the data position
is kept in samples, so another worker count or batch size continues at the same sample.
Anything else (model shape, data, tokenizer, sparsity schedule, optimizer, seed) would make
the weights mean something else or crash every worker on load: refused, with the diff and how
to start a new run instead.

A truncated or unreadable latest checkpoint (a node lost while it was copied, a full disk)
is skipped for the one before it, with a warning naming it and why.
"""

from __future__ import annotations

import io
import logging
import posixpath

import torch

from sparsebk.storage.checkpoint import STATE_FILE
from sparsebk.validation import flatten

logger = logging.getLogger("sparsebk.train")

CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's directory names: checkpoint_<timestamp>

# Dotted fields (or whole sections, ending in ".") that may change on resume.
SAFE = (
    "optim.max_steps", "optim.max_bad_steps", "optim.grad_accum_steps",
    "data.batch_size", "data.prefetch_batches", "data.eval_batch_size",
    "run.name", "run.storage_path", "run.num_workers", "run.use_gpu", "run.cpus_per_worker",
    "run.torch_threads", "run.log_every", "run.eval_every", "run.eval_batches", "run.test_batches",
    "run.keep_checkpoints", "run.max_failures", "run.inject_faults", "run.plots", "run.compile",
    "run.tracking", "run.mlflow_uri", "run.mlflow_experiment", "run.placement_strategy",
    "run.min_workers", "run.placement_retries", "run.stop_grace_s",
)


class ResumeRefused(ValueError):
    """The new config changes what the checkpoint's weights mean."""


_ABSENT = "<absent>"


def config_changes(old: dict, new: dict, defaults: dict | None = None) -> list[tuple]:
    """(field, old, new) for every dotted field that differs. A field the old config lacks
    (added to the config since) counts as unchanged when the new value is its default."""
    a, b, dflt = flatten(old), flatten(new), flatten(defaults or {})
    changes = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if isinstance(va, tuple) or isinstance(vb, tuple):
            va, vb = (list(v) if isinstance(v, tuple) else v for v in (va, vb))
        if va == vb or (va is _ABSENT and key in dflt and dflt[key] == vb):
            continue
        changes.append((key, va, vb))
    return changes


def is_safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE)


def classify(changes: list[tuple]) -> tuple[list[tuple], list[tuple]]:
    """(safe, refused) changes."""
    safe = [c for c in changes if is_safe(c[0])]
    return safe, [c for c in changes if not is_safe(c[0])]


def describe(changes: list[tuple]) -> str:
    return "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in changes)


def _yaml_scalar(v) -> str:
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    return str(v)


def restoring_overrides(changes: list[tuple]) -> str:
    """The `--set` flags that put the checkpoint's values back, for the config fields among
    `changes` that the checkpoint records (not the dataset identity)."""
    return " ".join(f"--set {k}={_yaml_scalar(a)}" for k, a, _ in changes
                    if a is not _ABSENT and not k.startswith(("tokenizer", "dataset_dir"))
                    and not isinstance(a, (dict, list)))


def compare(meta: dict, cfg_dict: dict, tokenizer: dict | None, dataset_dir: str | None
            ) -> list[tuple]:
    """Every difference between a checkpoint's meta and the new run (its resolved config dict,
    the dataset's tokenizer identity and dir)."""
    from sparsebk.train.config import TrainConfig

    try:
        defaults = TrainConfig().to_dict()
    except ValueError:  # a default the environment rejects; compare without defaults
        defaults = {}
    old = {"train": meta.get("train_config", {}), "tokenizer": meta.get("tokenizer") or {},
           "dataset_dir": meta.get("dataset_dir")}
    new = {"train": cfg_dict, "tokenizer": tokenizer or {}, "dataset_dir": dataset_dir}
    if old["dataset_dir"] is None or dataset_dir is None:
        old.pop("dataset_dir"), new.pop("dataset_dir")
    if not old["tokenizer"] or tokenizer is None:
        old.pop("tokenizer"), new.pop("tokenizer")
    changes = config_changes(old, new, {"train": defaults})
    return [(k.removeprefix("train."), a, b) for k, a, b in changes]


# --- finding and reading checkpoints -------------------------------------------------------
def list_checkpoints(fs, run_path: str) -> list[str]:
    """The run's checkpoint directories, newest first (Ray names them by timestamp)."""
    import pyarrow.fs as pafs

    info = fs.get_file_info(run_path)
    if info.type != pafs.FileType.Directory:
        return []
    entries = fs.get_file_info(pafs.FileSelector(run_path))
    names = [e.base_name for e in entries
             if e.type == pafs.FileType.Directory and e.base_name.startswith(CHECKPOINT_PREFIX)]
    return [posixpath.join(run_path, n) for n in sorted(names, reverse=True)]


def read_state(fs, checkpoint_path: str) -> dict:
    """state.pt of a checkpoint directory (a truncated or corrupt file fails here: the zip
    directory at its end is read). Local files are memory-mapped, so the weights are not
    copied into the driver's memory; from an object store the file is downloaded."""
    import pyarrow.fs as pafs

    path = posixpath.join(checkpoint_path, STATE_FILE)
    if isinstance(fs, pafs.LocalFileSystem):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    with fs.open_input_file(path) as f:
        data = f.read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def latest_readable(fs, run_path: str) -> tuple[str, dict] | None:
    """(path, state) of the newest checkpoint whose state.pt reads, warning about every newer
    one that does not; None when the run has no checkpoint."""
    paths = list_checkpoints(fs, run_path)
    for i, path in enumerate(paths):
        try:
            return path, read_state(fs, path)
        except Exception as e:  # noqa: BLE001 -- any unreadable file: try the one before
            nxt = paths[i + 1] if i + 1 < len(paths) else None
            logger.warning("checkpoint %s is unreadable (%s); %s", path, _why(e),
                           f"falling back to {nxt}" if nxt else "no earlier checkpoint")
    return None


def check_resume(loop_config: dict, where: str = "config") -> dict | None:
    """Driver side, before any worker starts: compare the run's latest readable checkpoint
    with the new config (`loop_config`: what the workers get: "cfg", "dataset_dir").
    Logs the safe changes; raises ResumeRefused listing the others. Returns the checkpoint's
    meta (None for a new run)."""
    from sparsebk.data.manifest import load_manifest

    cfg = loop_config["cfg"]
    from sparsebk.storage.store import open_store

    run = open_store(cfg["run"]["storage_path"]).join(cfg["run"]["name"])
    fs, run_path = run.fs, run.root
    found = latest_readable(fs, run_path)
    if found is None:
        return None
    path, state = found
    meta = state.get("meta") or {}
    if not meta.get("train_config"):
        logger.warning("checkpoint %s holds no config (written before checkpoints carried "
                       "theirs); resuming without checking what changed", path)
        return meta
    dataset_dir = loop_config.get("dataset_dir")
    tokenizer = load_manifest(dataset_dir)["tokenizer"] if dataset_dir else None
    safe, refused = classify(compare(meta, cfg, tokenizer, dataset_dir))
    name = cfg["run"]["name"]
    if refused:
        restore = restoring_overrides(refused)
        restore = f" ({restore})" if restore else ""
        raise ResumeRefused(
            f"{where}: run {name!r} has a checkpoint ({path}, step {state.get('step')}) trained "
            f"with other settings; resuming would change what its weights mean:\n"
            f"{describe(refused)}\n"
            f"To train with the new settings, start a new run: give it another run.name (e.g. "
            f"--set run.name={name}-2) or another run.storage_path. To resume this run, keep "
            f"those settings as they were{restore}. Settings that may change on resume: "
            f"{', '.join(SAFE)}.")
    if safe:
        logger.info("resuming run %s from %s (step %s) with changed settings:\n%s", name, path,
                    state.get("step"), describe(safe))
    return meta
