"""Typed training configuration: dataclasses, YAML loading and `key.sub=value` overrides.

A YAML preset (ray_jobs/configs/*.yaml) has five sections, each loaded into one dataclass:

    model:    LMConfig fields plus `preset` (a name for LMConfig.preset); vocab_size defaults
              to the dataset's vocabulary size
    data:     where the tokenised Parquet blocks are (prepared on first use) and the batch size
    optim:    AdamW, warmup + cosine LR, clipping, step budget, NaN/inf policy
    schedule: AdaptiveSparsityScheduler keyword arguments (owned by the schedule actor)
    run:      name, storage_path, workers, logging/eval/checkpoint intervals, fault injection

Every error is a ValueError naming the file and the field, raised before any worker starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

TOKENIZERS = ("word", "byte", "gpt2")
LOADERS = ("ray", "local")
CORPORA = ("ptb", "text")
FAULT_MODES = ("raise", "exit", "kill_actor", "nan")
_SCI_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
_FAULT_RE = re.compile(r"^(raise|exit|kill_actor|nan)@(\d+)$")


def _err(field_name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{field_name}={value!r}: {why}")


def _positive_int(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(name, value, "must be an integer")
    if value < 0 or (value == 0 and not allow_zero):
        raise _err(name, value, "must be >= 0" if allow_zero else "must be > 0")


def _number(name: str, value: Any, lo: float | None = None, hi: float | None = None,
            *, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _err(name, value, "must be a finite number")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise _err(name, value, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise _err(name, value, f"must be <= {hi}")


@dataclass
class DataConfig:
    """Dataset location and batching. `dir` is written by `sparsebk.data.prepare_dataset` on
    first use and reused after (idempotent). `corpus: text` reads `text` (a file, a directory
    of .txt files or a glob); `ptb_lines: N` makes a small text corpus from the first N lines
    of PTB's train split (the `tiny` preset: seconds to prepare).

    `loader: ray` (default) feeds each worker its shard of a Ray Data dataset (streaming split);
    a resumed run skips the batches its epoch had consumed. `loader: local` has every worker
    read the train split's Parquet files itself (rows strided by rank, a seeded permutation
    per epoch when shuffling): no Ray Data actors to start, and an exactly reproducible data
    position after a restart. Both need the dataset on storage every worker can read."""

    dir: str = "data/ptb-word"
    corpus: str = "ptb"
    text: str | None = None
    ptb_lines: int | None = None
    tokenizer: str = "word"
    block_len: int = 128
    max_vocab: int | None = None
    batch_size: int = 16  # per worker
    prefetch_batches: int = 2
    loader: str = "ray"
    shuffle_buffer: int = 0  # rows (Ray Data local shuffle); with loader local: > 0 = shuffle
    eval_batch_size: int = 32

    def __post_init__(self):
        if not isinstance(self.dir, str) or not self.dir:
            raise _err("data.dir", self.dir, "must be a non-empty path")
        if "://" in self.dir:
            # The data package reads and writes local (or network-mounted) paths only.
            raise _err("data.dir", self.dir, "URIs are not supported; use a local path or a "
                       "shared file system mounted on every node (e.g. /mnt/shared/...)")
        self.dir = str(Path(os.path.expanduser(self.dir)).resolve())
        if self.corpus not in CORPORA:
            raise _err("data.corpus", self.corpus, f"choose one of {CORPORA}")
        if self.corpus == "text" and not self.text:
            raise _err("data.text", self.text, "corpus 'text' needs a text file, directory or glob")
        if self.corpus == "ptb" and self.text:
            raise _err("data.text", self.text, "only used with data.corpus: text")
        if self.ptb_lines is not None:
            _positive_int("data.ptb_lines", self.ptb_lines)
            if self.corpus != "ptb":
                raise _err("data.ptb_lines", self.ptb_lines, "only used with data.corpus: ptb")
        if self.tokenizer not in TOKENIZERS:
            raise _err("data.tokenizer", self.tokenizer, f"choose one of {TOKENIZERS}")
        _positive_int("data.block_len", self.block_len)
        if self.max_vocab is not None:
            _positive_int("data.max_vocab", self.max_vocab)
        _positive_int("data.batch_size", self.batch_size)
        _positive_int("data.prefetch_batches", self.prefetch_batches, allow_zero=True)
        if self.loader not in LOADERS:
            raise _err("data.loader", self.loader, f"choose one of {LOADERS}")
        _positive_int("data.shuffle_buffer", self.shuffle_buffer, allow_zero=True)
        _positive_int("data.eval_batch_size", self.eval_batch_size)


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr`."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    max_steps: int = 1000
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    max_bad_steps: int = 5  # consecutive NaN/inf steps before the run stops

    def __post_init__(self):
        _number("optim.lr", self.lr, 0.0, lo_open=True)
        _number("optim.weight_decay", self.weight_decay, 0.0)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise _err("optim.betas", self.betas, "must be a pair [beta1, beta2]")
        for b in self.betas:
            _number("optim.betas", b, 0.0, 1.0)
        self.betas = tuple(float(b) for b in self.betas)
        _positive_int("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        _positive_int("optim.max_steps", self.max_steps)
        _number("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _number("optim.grad_clip", self.grad_clip, 0.0, lo_open=True)
        _positive_int("optim.max_bad_steps", self.max_bad_steps)


@dataclass
class RunConfig:
    """Where and how the run executes.

    `inject_faults` is a TESTING AID: entries "MODE@STEP" with MODE one of raise (the last
    rank raises), exit (the last rank calls os._exit(1)), kill_actor (rank 0 kills the schedule
    actor, which Ray restarts) or nan (rank 0's loss becomes NaN). raise/exit/kill_actor fire
    once per run (a marker file in the run dir remembers); nan fires at that step every time.
    """

    name: str = "sparsebk"
    storage_path: str = "runs"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int | None = None  # per worker; None = cores // workers
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # also the checkpoint interval
    eval_batches: int | None = None  # None = the whole validation split
    keep_checkpoints: int = 2  # N best by val_loss; the latest is always kept too
    max_failures: int = 2
    inject_faults: list[str] = field(default_factory=list)
    plots: bool = True

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise _err("run.name", self.name, "use letters, digits, '_', '.', '-'")
        if not isinstance(self.storage_path, str) or not self.storage_path:
            raise _err("run.storage_path", self.storage_path, "must be a non-empty path")
        if "://" in self.storage_path:
            # Metrics, schedule records and plots are written with local file I/O next to Ray's
            # checkpoints, so a bucket URI would silently land in a local "s3:" folder.
            raise _err("run.storage_path", self.storage_path, "URIs are not supported; use a "
                       "local path or a shared file system mounted on every node")
        # Ray needs an absolute path; relative paths mean relative to the launch directory.
        self.storage_path = str(Path(os.path.expanduser(self.storage_path)).resolve())
        _positive_int("run.num_workers", self.num_workers, allow_zero=True)
        if not isinstance(self.use_gpu, bool):
            raise _err("run.use_gpu", self.use_gpu, "must be true or false")
        _number("run.cpus_per_worker", self.cpus_per_worker, 0.0)
        if self.torch_threads is not None:
            _positive_int("run.torch_threads", self.torch_threads)
        _positive_int("run.seed", self.seed, allow_zero=True)
        _positive_int("run.log_every", self.log_every)
        _positive_int("run.eval_every", self.eval_every)
        if self.eval_batches is not None:
            _positive_int("run.eval_batches", self.eval_batches)
        _positive_int("run.keep_checkpoints", self.keep_checkpoints)
        if isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) \
                or self.max_failures < -1:
            raise _err("run.max_failures", self.max_failures, "must be an integer >= -1")
        if not isinstance(self.inject_faults, (list, tuple)):
            raise _err("run.inject_faults", self.inject_faults, "must be a list of 'MODE@STEP'")
        for f in self.inject_faults:
            if not isinstance(f, str) or not _FAULT_RE.match(f):
                raise _err("run.inject_faults", f,
                           f"entries are 'MODE@STEP' with MODE in {FAULT_MODES}")
        self.inject_faults = list(self.inject_faults)

    @property
    def run_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    def faults(self) -> list[tuple[str, int]]:
        return [(m.group(1), int(m.group(2))) for m in map(_FAULT_RE.match, self.inject_faults)]


def _validate_schedule(d: dict) -> dict:
    """The scheduler validates its own arguments; here we only check it accepts them."""
    if not isinstance(d, dict):
        raise _err("schedule", d, "must be a mapping of AdaptiveSparsityScheduler arguments")
    from sparsebk.scheduler import AdaptiveSparsityScheduler

    try:
        AdaptiveSparsityScheduler(**d)
    except TypeError as e:
        raise ValueError(f"schedule: {e}") from None
    except ValueError as e:
        raise ValueError(f"schedule: {e}") from None
    return dict(d)


def _validate_model(d: dict, vocab_size: int | None = None):
    """Build the LMConfig the section describes (ValueError naming the field if it is wrong)."""
    if not isinstance(d, dict):
        raise _err("model", d, "must be a mapping of LMConfig fields plus `preset`")
    from sparsebk.lm import LMConfig

    d = dict(d)
    preset = d.pop("preset", None)
    if vocab_size is not None:
        d.setdefault("vocab_size", vocab_size)
    known = {f.name for f in fields(LMConfig)}
    for k in d:
        if k not in known:
            raise _err(f"model.{k}", d[k], f"unknown LMConfig field; known: {sorted(known)}")
    try:
        return LMConfig.preset(preset, **d) if preset is not None else LMConfig.from_dict(d)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"model: {e}") from None


@dataclass
class TrainConfig:
    model: dict = field(default_factory=lambda: {"preset": "debug"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: dict = field(default_factory=dict)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        for name, cls in (("data", DataConfig), ("optim", OptimConfig), ("run", RunConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _from_section(cls, value, name))
            elif not isinstance(value, cls):
                raise _err(name, value, f"must be a mapping of {cls.__name__} fields")
        if not isinstance(self.model, dict):
            raise _err("model", self.model, "must be a mapping of LMConfig fields")
        self.model = dict(self.model)
        self.schedule = _validate_schedule(self.schedule)
        if self.run.eval_every > self.optim.max_steps:
            raise _err("run.eval_every", self.run.eval_every,
                       f"must be <= optim.max_steps ({self.optim.max_steps}); "
                       "checkpoints are written at evaluations")

    def lm_config(self, vocab_size: int | None = None):
        """The model's LMConfig; `vocab_size` (from the dataset) fills the field if unset."""
        return _validate_model(self.model, vocab_size)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if not isinstance(d, dict):
            raise ValueError(f"config must be a mapping of sections, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        for k in d:
            if k not in known:
                raise _err(k, d[k], f"unknown section; known: {sorted(known)}")
        return cls(**{k: v for k, v in d.items()})


def _from_section(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise _err(prefix, d, f"must be a mapping of {cls.__name__} fields")
    known = {f.name for f in fields(cls)}
    for k in d:
        if k not in known:
            raise _err(f"{prefix}.{k}", d[k], f"unknown field; known: {sorted(known)}")
    return cls(**d)


def apply_override(d: dict, item: str) -> None:
    """Apply one `key.sub=value` override in place; the value is parsed as YAML."""
    if "=" not in item:
        raise ValueError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {item!r}: empty key part")
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str) and _SCI_RE.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 as a string; users mean the number
    try:
        set_dotted(d, key.strip(), value)
    except ValueError as e:
        raise ValueError(f"override {item!r}: {e}") from None


def set_dotted(d: dict, key: str, value) -> None:
    """d["a"]["b"] = value for key "a.b" (sections created as needed)."""
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"{key}: {p!r} is not a section of the training config")
        node = nxt
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None
                ) -> TrainConfig:
    """Load a YAML preset (or the defaults when `path` is None), apply overrides, validate.

    Errors are ValueErrors that start with the file name and name the field. The model
    section is checked against LMConfig here too (with a placeholder vocabulary size when
    the dataset decides it), so a bad model field fails before any worker starts.
    """
    where = str(path) if path is not None else "<defaults>"
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"{where}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{where}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: top level must be a mapping of sections")
    try:
        for item in overrides or []:
            apply_override(raw, item)
        cfg = TrainConfig.from_dict(raw)
        # The dataset decides vocab_size later; a placeholder checks every other model field.
        cfg.lm_config(cfg.model.get("vocab_size", 2))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return cfg
