"""Find a trained run's checkpoint, in a local folder or in an object store.

    run_dir("tiny")                                  # ~/sparsebk/runs/tiny (a Path)
    run_dir("tiny", "s3://bucket/runs?endpoint_override=host:8333&scheme=http")  # its URI
    best_checkpoint(folder)                          # lowest val_loss among those Ray kept
    resolve_checkpoint(path_or_uri)                  # a checkpoint, its state.pt, or a run folder

A local location comes back as a `Path`, one in an object store as its URI (with its query
options), so that local callers see what they always saw and a URI is never mangled into a
path. Files are read through sparsebk.storage.store (pyarrow.fs), the layer Ray Train wrote them with.

A run folder's best checkpoint is the one of lowest val_loss among those Ray Train kept
(`checkpoint_manager_snapshot.json`), else summary.json's "best_checkpoint" (where the driver
wrote it, else the same name in this folder: a moved or copied run). Every error names the
path or URI at fault.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from sparsebk.storage.store import Store, is_uri, join_location, open_store, resolve_location

DEFAULT_STORAGE_PATH = "runs"  # run.storage_path's default: under $SPARSEBK_HOME
# a checkpoint folder: the state file (weights, optimizer, schedule, run state) and, for a
# sharded (FSDP) run, the shards folder (sparsebk.storage.checkpoint writes both)
STATE_FILE, SHARDS_DIR = "state.pt", "shards"

RAY_SNAPSHOT, SUMMARY_FILE = "checkpoint_manager_snapshot.json", "summary.json"
EXPORT_CONFIG = "config.json"  # what marks an exported model folder (sparsebk.inference.export)


# --- locations: a local Path, or a URI string --------------------------------------------
def location(path: str | os.PathLike) -> str:
    """A URI (its scheme checked) or an absolute local path; a relative one is relative to the
    working directory, as for any file tool's argument."""
    path = str(path)
    return resolve_location(path) if is_uri(path) else str(Path(path).expanduser().resolve())


def _given(loc: str) -> Path | str:
    return loc if is_uri(loc) else Path(loc)


def _child(folder: str | os.PathLike, name: str) -> Path | str:
    return join_location(str(folder), name) if is_uri(str(folder)) else Path(folder) / name


def _name(loc: str | os.PathLike) -> str:
    loc = str(loc)
    return PurePosixPath(urlsplit(loc).path).name if is_uri(loc) else Path(loc).name


def _parent(loc: str | os.PathLike) -> Path | str:
    loc = str(loc)
    if not is_uri(loc):
        return Path(loc).parent
    s = urlsplit(loc)
    return urlunsplit((s.scheme, s.netloc, str(PurePosixPath(s.path).parent), s.query, ""))


def _has_state(where: str | os.PathLike | Store, name: str = "") -> bool:
    """Whether `where`/name holds a checkpoint's state.pt (False for a name no store takes)."""
    try:
        store = where if isinstance(where, Store) else open_store(where)
        return store.join(name).is_file(STATE_FILE)
    except (OSError, ValueError):
        return False


@contextmanager
def local_dir(store: Store):
    """A local folder with the files of `store`: itself, or a temporary copy of a folder in an
    object store, removed on exit (torch.distributed.checkpoint reads local files)."""
    if store.is_local:
        yield Path(store.uri)
        return
    with tempfile.TemporaryDirectory(prefix="sparsebk-checkpoint-") as tmp:
        for name in store.list(recursive=True):
            if store.is_file(name):
                dest = Path(tmp, name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(store.read_bytes(name))
        yield Path(tmp)


# --- finding a checkpoint ------------------------------------------------------------------
def check_run_name(field: str, name) -> str:
    """A run name stays inside its storage path: letters, digits, '_', '.', '-', not only
    dots ("." and ".." would escape it). ValueError naming `field` otherwise."""
    if (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name)
            or set(name) == {"."}):
        raise ValueError(f"{field}={name!r}: use letters, digits, '_', '.', '-' (not only dots)")
    return name


def run_location(name: str, storage_path: str = DEFAULT_STORAGE_PATH) -> str:
    """The folder of run `name` under `storage_path`: an absolute path (a relative one is
    under $SPARSEBK_HOME) or a URI."""
    check_run_name("run.name", name)
    return join_location(resolve_location(storage_path, "run.storage_path"), name)


def run_dir(name: str, storage_path: str | None = None) -> Path | str:
    """The folder of run `name` under `storage_path` (default: training's run.storage_path,
    `runs` under $SPARSEBK_HOME): a Path, or a URI for a run in an object store."""
    storage_path = storage_path or DEFAULT_STORAGE_PATH
    loc = run_location(name, storage_path)
    if not (open_store(loc).exists() if is_uri(loc) else Path(loc).is_dir()):
        raise ValueError(f"{loc}: no run folder here (run {name!r} under "
                         f"{resolve_location(storage_path, 'run.storage_path')})")
    return _given(loc)


def ray_results(folder: Store) -> list[dict]:
    """The checkpoint_results of Ray Train's snapshot in a run folder ([] without one)."""
    if not folder.is_file(RAY_SNAPSHOT):
        return []
    try:
        return list(json.loads(folder.read_text(RAY_SNAPSHOT))["checkpoint_results"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{folder.location(RAY_SNAPSHOT)}: not a readable Ray checkpoint "
                         f"snapshot ({e})") from None


def ray_metrics(ckpt: str | os.PathLike) -> dict:
    """The metrics Ray Train stored with this checkpoint (empty outside a run folder)."""
    for r in ray_results(open_store(_parent(ckpt))):
        if r.get("checkpoint_dir_name") == _name(ckpt):
            return dict(r.get("metrics") or {})
    return {}


def best_checkpoint(folder: str | os.PathLike) -> Path | str:
    """The kept checkpoint of lowest val_loss in a run folder (a Path, or a URI for a run
    folder given as one)."""
    store = open_store(folder)
    scored = []
    for r in ray_results(store):
        loss = (r.get("metrics") or {}).get("val_loss")
        name = str(r.get("checkpoint_dir_name"))
        if isinstance(loss, (int, float)) and math.isfinite(loss) and _has_state(store, name):
            scored.append((loss, name))
    if scored:
        return _child(folder, min(scored)[1])
    if store.is_file(SUMMARY_FILE):
        try:
            best = json.loads(store.read_text(SUMMARY_FILE)).get("best_checkpoint")
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{store.location(SUMMARY_FILE)}: not readable JSON ({e})") from None
        # where the driver wrote it, else the same name here (a moved or copied run folder)
        for path in ((_given(str(best)), _child(folder, _name(best))) if best else ()):
            if _has_state(path):
                return path
    raise ValueError(f"{store.uri}: no checkpoint to load (no {STATE_FILE} under the checkpoints "
                     f"of {RAY_SNAPSHOT} or the best_checkpoint of {SUMMARY_FILE})")


def resolve_checkpoint(path: str | os.PathLike) -> Path | str:
    """A checkpoint dir (or its state.pt) as itself; a run folder as its best checkpoint. A
    local one as an absolute Path, one in an object store as its URI."""
    loc = location(path)
    p, store = _given(loc), open_store(loc)
    if not store.exists():
        raise ValueError(f"{loc}: no such checkpoint or run folder")
    if _name(loc) == STATE_FILE and store.is_file(""):
        return _parent(loc)
    if store.is_file(STATE_FILE):
        return p
    if store.is_file(RAY_SNAPSHOT) or store.is_file(SUMMARY_FILE):
        return best_checkpoint(p)
    if store.is_file(EXPORT_CONFIG):
        raise ValueError(f"{loc}: an exported model, not a training checkpoint; load it with "
                         "load_pretrained / --model")
    raise ValueError(f"{loc}: not a training checkpoint (no {STATE_FILE}) nor a run folder "
                     f"(no {RAY_SNAPSHOT} or {SUMMARY_FILE})")
