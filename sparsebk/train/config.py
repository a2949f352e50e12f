"""Typed training configuration: dataclasses, YAML loading and `key.sub=value` overrides.

A YAML preset (ray_jobs/configs/*.yaml) has five sections, each loaded into one dataclass:

    model:    LMConfig fields plus `preset` (a name for LMConfig.preset); vocab_size defaults
              to the dataset's vocabulary size
    data:     where the tokenised Parquet blocks are (prepared on first use) and the batch size
    optim:    AdamW, warmup + cosine LR, clipping, step budget, NaN/inf policy
    schedule: SchedulerConfig (sparsebk.scheduler): the AdaptiveSparsityScheduler's arguments,
              which the schedule actor runs
    run:      name, storage_path, workers, logging/eval/checkpoint intervals, fault injection

Every error is a ValueError naming the file and the field, raised before any worker starts.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from sparsebk.scheduler import SchedulerConfig
from sparsebk.storage.run_folder import DEFAULT_STORAGE_PATH, check_run_name
from sparsebk.storage.store import join_location, redact, resolve_location
from sparsebk.validation import (check_bool, check_choice, check_float, check_int, check_known,
                                 field_error, from_mapping)

TOKENIZERS = ("word", "byte", "gpt2")
LOADERS = ("ray", "local", "stream")
CORPORA = ("ptb", "text")
FAULT_MODES = ("raise", "exit", "kill_actor", "nan", "hang")
PARALLEL = ("ddp", "fsdp")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement group strategies
_SCI_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
_FAULT_RE = re.compile(r"^(raise|exit|kill_actor|nan|hang)@(\d+)$")


def _location(field: str, value: str) -> str:
    try:
        return resolve_location(value, field)
    except ValueError as e:
        raise field_error(field, redact(value), str(e).split(": ", 1)[1]) from None


@dataclass
class DataConfig:
    """Dataset location and batching. `dir` is written by `sparsebk.data.prepare_dataset` on
    first use and reused after (idempotent). `corpus: text` reads `text` (a file, a directory
    of .txt files or a glob, local or in a bucket); `ptb_lines: N` makes a small text corpus from the first N lines
    of PTB's train split (the `tiny` preset: seconds to prepare).

    Sizes count rows (samples of block_len + 1 tokens): `batch_size` per worker and micro-batch,
    `eval_batch_size`, `shuffle_buffer`. So does a checkpoint's data position: the samples all
    workers together consumed in the epoch, so a run resumed with another worker count or
    batch size continues at that sample. `loader: ray` (default) feeds each worker its shard
    of a Ray Data dataset (streaming split); on resume each worker skips its share of those
    samples (as many rows, not necessarily the same ones). `loader: local` has every worker
    read the train split's Parquet files itself (a seeded permutation per epoch when
    shuffling, the rows left strided by rank): no Ray Data actors to start, and exactly the
    same rows left after a restart. `loader: stream` has every worker read the train split's
    shards from the store a window of `shuffle_window` rows at a time (never the whole split;
    the next window read in a background thread), in an order that depends only on run.seed,
    the epoch and the dataset (sparsebk.data.stream): exactly the same rows left after a
    restart with any worker count, like local, in bounded memory. All three need the dataset
    on storage every worker can read.

    `dir`: a local path or a URI (s3://, gs://, ...; sparsebk.storage.store); a relative path is under
    $SPARSEBK_HOME (default ~/sparsebk), never the launch directory."""

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
    shuffle_buffer: int = 0  # rows (Ray Data local shuffle); loader local, stream: > 0 = shuffle
    shuffle_window: int = 16384  # loader stream: rows mixed together (and held) at a time
    eval_batch_size: int = 32

    def __post_init__(self):
        if not isinstance(self.dir, str) or not self.dir:
            raise field_error("data.dir", self.dir, "must be a non-empty path")
        # a URI (s3://, gs://, ...) as it is; a relative path under sparsebk.storage.store.home()
        self.dir = _location("data.dir", self.dir)
        check_choice("data.corpus", self.corpus, CORPORA)
        if self.corpus == "text" and not self.text:
            raise field_error("data.text", self.text, "corpus 'text' needs a text file, directory or glob")
        if self.corpus == "ptb" and self.text:
            raise field_error("data.text", self.text, "only used with data.corpus: text")
        if self.ptb_lines is not None:
            check_int("data.ptb_lines", self.ptb_lines, min=1)
            if self.corpus != "ptb":
                raise field_error("data.ptb_lines", self.ptb_lines, "only used with data.corpus: ptb")
        check_choice("data.tokenizer", self.tokenizer, TOKENIZERS)
        check_int("data.block_len", self.block_len, min=1)
        if self.max_vocab is not None:
            check_int("data.max_vocab", self.max_vocab, min=1)
        check_int("data.batch_size", self.batch_size, min=1)
        check_int("data.prefetch_batches", self.prefetch_batches, min=0)
        check_choice("data.loader", self.loader, LOADERS)
        check_int("data.shuffle_buffer", self.shuffle_buffer, min=0)
        check_int("data.shuffle_window", self.shuffle_window, min=1)
        check_int("data.eval_batch_size", self.eval_batch_size, min=1)


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr`.

    `grad_accum_steps: N`: an optimizer step is N micro-batches of `data.batch_size` rows per
    worker (gradients summed, each micro-batch's loss scaled 1/N, synchronised across workers
    on the last one only): a global batch of workers * N * batch_size rows. Steps, the LR and
    sparsity schedules and the logs count optimizer steps."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    max_steps: int = 1000
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    max_bad_steps: int = 5  # consecutive NaN/inf steps before the run stops
    grad_accum_steps: int = 1

    def __post_init__(self):
        check_float("optim.lr", self.lr, min=0.0, min_open=True)
        check_float("optim.weight_decay", self.weight_decay, min=0.0)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise field_error("optim.betas", self.betas, "must be a pair [beta1, beta2]")
        for b in self.betas:
            check_float("optim.betas", b, min=0.0, max=1.0)
        self.betas = tuple(float(b) for b in self.betas)
        check_int("optim.warmup_steps", self.warmup_steps, min=0)
        check_int("optim.max_steps", self.max_steps, min=1)
        check_float("optim.min_lr_ratio", self.min_lr_ratio, min=0.0, max=1.0)
        check_float("optim.grad_clip", self.grad_clip, min=0.0, min_open=True)
        check_int("optim.max_bad_steps", self.max_bad_steps, min=1)
        check_int("optim.grad_accum_steps", self.grad_accum_steps, min=1)


@dataclass
class RunConfig:
    """Where and how the run executes.

    `inject_faults` is a TESTING AID: entries "MODE@STEP" with MODE one of raise (the last
    rank raises), exit (the last rank calls os._exit(1)), kill_actor (rank 0 kills the schedule
    actor, which Ray restarts), nan (rank 0's loss becomes NaN) or hang (the last rank sleeps
    for an hour before the step: a step that outlasts run.stop_grace_s). raise/exit/
    kill_actor/hang fire once per run (a marker file in the run dir remembers); nan fires at
    that step every time. raise and exit first wait (up to 30 s) until Ray Train has recorded
    the last checkpoint saved before that step, so the run resumes from it.

    `parallel`: how workers share the model: "ddp" (a replica per worker, gradients
    all-reduced) or "fsdp" (parameters, gradients and optimizer state sharded across workers
    with torch's fully_shard, per block; checkpoints sharded, one file per worker, through
    torch.distributed.checkpoint). `compile`: torch.compile the parts of each block that
    compile cleanly (the experts' FFNs); off by default (see BENCHMARKS.md for what it buys).
    `placement_strategy`: how Ray places the workers on nodes (ScalingConfig's; STRICT_SPREAD:
    one worker per node).

    `tracking`: experiment trackers rank 0 also logs the metrics to, any of "tensorboard"
    and "mlflow" (sparsebk.train.tracking); `mlflow_uri`: the MLflow tracking URI (None: a
    SQLite store inside the run folder), `mlflow_experiment`: its experiment (None: the run
    name; a sweep sets one name for all its trials).

    `storage_path`: a local path or a URI (s3://bucket/runs?region=..., gs://...); a relative
    path is under $SPARSEBK_HOME (default ~/sparsebk). The run's folder is storage_path/name
    (`run_dir`); `name` cannot leave it (no '/', not only dots).
    """

    name: str = "sparsebk"
    storage_path: str = DEFAULT_STORAGE_PATH
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int | None = None  # per worker; None = cores // workers
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # also the checkpoint interval
    eval_batches: int | None = None  # None = the whole validation split
    test_batches: int | None = None  # the final test evaluation; None = the whole test split
    keep_checkpoints: int = 2  # N best by val_loss; the latest is always kept too
    max_failures: int = 2
    inject_faults: list[str] = field(default_factory=list)
    plots: bool = True
    parallel: str = "ddp"
    compile: bool = False
    tracking: list[str] = field(default_factory=list)
    mlflow_uri: str | None = None
    mlflow_experiment: str | None = None
    placement_strategy: str = "PACK"
    # elastic training: None keeps num_workers fixed; an int >= 1 lets a run that lost nodes
    # continue on as few as min_workers (from its latest checkpoint, at the same sample) and
    # grow back to num_workers when capacity returns (Ray Train's elastic ScalingConfig)
    min_workers: int | None = None
    # how many times a worker group that cannot be placed (a lost node, no free capacity) is
    # waited for (Ray's worker-group start timeout, 60 s each) before the run stops with a
    # message saying how to resume; -1 waits forever (Ray's default)
    placement_retries: int = 3
    # SIGTERM / SIGINT to the driver: the workers stop at the next step boundary with a
    # checkpoint of that step; after this many seconds without one (a step or a checkpoint
    # that takes longer, workers that do not answer) the run is aborted as Ray Train aborts
    # it, and the steps since the latest checkpoint are redone on resume. 0: abort at once
    stop_grace_s: float = 90.0

    def __post_init__(self):
        check_run_name("run.name", self.name)
        if not isinstance(self.storage_path, str) or not self.storage_path:
            raise field_error("run.storage_path", self.storage_path, "must be a non-empty path")
        # Ray needs an absolute location: a URI as it is, a relative path under the stable
        # home (sparsebk.storage.store.home()), never the launch directory (a job's temporary copy)
        self.storage_path = _location("run.storage_path", self.storage_path)
        check_int("run.num_workers", self.num_workers, min=1)  # 0 (Ray's local mode) saves nothing
        check_bool("run.use_gpu", self.use_gpu)
        check_float("run.cpus_per_worker", self.cpus_per_worker, min=0.0)
        if self.torch_threads is not None:
            check_int("run.torch_threads", self.torch_threads, min=1)
        check_int("run.seed", self.seed, min=0)
        check_int("run.log_every", self.log_every, min=1)
        check_int("run.eval_every", self.eval_every, min=1)
        for name in ("eval_batches", "test_batches"):
            if getattr(self, name) is not None:
                check_int(f"run.{name}", getattr(self, name), min=1)
        check_int("run.keep_checkpoints", self.keep_checkpoints, min=1)
        check_int("run.max_failures", self.max_failures, min=-1)  # -1: retry forever
        if not isinstance(self.inject_faults, (list, tuple)):
            raise field_error("run.inject_faults", self.inject_faults, "must be a list of 'MODE@STEP'")
        for f in self.inject_faults:
            if not isinstance(f, str) or not _FAULT_RE.match(f):
                raise field_error("run.inject_faults", f,
                           f"entries are 'MODE@STEP' with MODE in {FAULT_MODES}")
        self.inject_faults = list(self.inject_faults)
        check_choice("run.parallel", self.parallel, PARALLEL)
        check_bool("run.compile", self.compile)
        check_choice("run.placement_strategy", self.placement_strategy, PLACEMENTS)
        if self.min_workers is not None:
            check_int("run.min_workers", self.min_workers, min=1, max=self.num_workers)
            if self.parallel == "fsdp" and self.min_workers != self.num_workers:
                raise field_error("run.min_workers", self.min_workers, "elastic training is for "
                                  "run.parallel ddp (a sharded run keeps its worker count)")
        check_int("run.placement_retries", self.placement_retries, min=-1)
        self.stop_grace_s = check_float("run.stop_grace_s", self.stop_grace_s, min=0.0)
        self._check_tracking()

    def _check_tracking(self) -> None:
        import importlib.util

        from sparsebk.train.tracking import TRACKERS

        if not isinstance(self.tracking, (list, tuple)):
            raise field_error("run.tracking", self.tracking,
                              f"must be a list of trackers from {tuple(TRACKERS)}")
        for t in self.tracking:
            check_choice("run.tracking", t, tuple(TRACKERS))
            if importlib.util.find_spec(TRACKERS[t]) is None:
                raise field_error("run.tracking", t, f"needs the {TRACKERS[t]!r} package: "
                                  "pip install -e '.[tracking]'")
        if len(set(self.tracking)) != len(self.tracking):
            raise field_error("run.tracking", self.tracking, "lists a tracker twice")
        self.tracking = list(self.tracking)
        for name in ("mlflow_uri", "mlflow_experiment"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                raise field_error(f"run.{name}", value, "must be a non-empty string")
            if "mlflow" not in self.tracking:
                raise field_error(f"run.{name}", value, "only used with mlflow in run.tracking")
        if "://" in self.storage_path and "tensorboard" in self.tracking:
            raise field_error("run.tracking", self.tracking, "tensorboard writes local event "
                              f"files; run.storage_path={self.storage_path!r} is a URI")
        if "://" in self.storage_path and "mlflow" in self.tracking and self.mlflow_uri is None:
            raise field_error("run.mlflow_uri", None, "the default MLflow store is a SQLite file "
                              "in the run folder, which cannot live at a URI "
                              f"run.storage_path={self.storage_path!r}; set a tracking server "
                              "(http://...)")
        if self.mlflow_uri is not None and self.mlflow_uri.startswith("file:"):
            raise field_error("run.mlflow_uri", self.mlflow_uri, "MLflow (>= 3.7) refuses new "
                              "file stores; use sqlite:///PATH/mlflow.db or a tracking server "
                              "(http://...), or leave it unset for a store in the run folder")

    @property
    def run_dir(self) -> str:
        """The run's folder: an absolute path or a URI (sparsebk.storage.store.open_store reads it)."""
        return join_location(self.storage_path, self.name)

    def faults(self) -> list[tuple[str, int]]:
        return [(m.group(1), int(m.group(2))) for m in map(_FAULT_RE.match, self.inject_faults)]


def _schedule_config(d) -> SchedulerConfig:
    """The schedule section as a SchedulerConfig (validated there, once; errors name
    "schedule.<field>"). The per-layer length is checked against the model in TrainConfig."""
    if isinstance(d, SchedulerConfig):
        return d
    if not isinstance(d, Mapping):
        raise field_error("schedule", d, "must be a mapping of SchedulerConfig fields "
                          "(AdaptiveSparsityScheduler arguments)")
    check_known("schedule", d, (f.name for f in fields(SchedulerConfig)))
    return SchedulerConfig(**d, prefix="schedule.")


def _model_config(d) -> "LMConfig":
    """The model section as an LMConfig: LMConfig fields plus an optional `preset` (the preset's
    sizes, overridden by the fields given). Without vocab_size the vocabulary stays unresolved
    (None) until the driver reads the dataset's (TrainConfig.resolve_vocab)."""
    from sparsebk.model.lm import LMConfig

    if isinstance(d, LMConfig):
        return d
    if not isinstance(d, dict):
        raise field_error("model", d, "must be a mapping of LMConfig fields plus `preset`")
    d = dict(d)
    preset = d.pop("preset", None)
    check_known("model", d, (f.name for f in fields(LMConfig)), "LMConfig field")
    d.setdefault("vocab_size", None)
    try:
        return LMConfig.preset(preset, **d) if preset is not None else LMConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model: {e}") from None


@dataclass
class TrainConfig:
    """The whole run: a typed section per YAML section. `model` is an LMConfig; its vocab_size
    may be None until `resolve_vocab` fills in the dataset's (the driver does, once)."""

    model: Any = field(default_factory=lambda: {"preset": "debug"})  # -> LMConfig
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: SchedulerConfig = field(default_factory=SchedulerConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        for name, cls in (("data", DataConfig), ("optim", OptimConfig), ("run", RunConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, from_mapping(cls, value, name))
            elif not isinstance(value, cls):
                raise field_error(name, value, f"must be a mapping of {cls.__name__} fields")
        self.model = _model_config(self.model)
        self.schedule = _schedule_config(self.schedule)
        # The one check of the per-layer targets' length: the schedule meets the model here.
        per_layer = self.schedule.num_layers
        if per_layer is not None and per_layer != self.model.n_layers:
            key = "layer_scales" if self.schedule.layer_scales is not None else "layer_final_sparsity"
            raise field_error(f"schedule.{key}", list(getattr(self.schedule, key)),
                              f"{per_layer} per-layer targets for a model with "
                              f"{self.model.n_layers} layers (model.n_layers)")
        if self.run.eval_every > self.optim.max_steps:
            raise field_error("run.eval_every", self.run.eval_every,
                              f"must be <= optim.max_steps ({self.optim.max_steps}); "
                              "checkpoints are written at evaluations")

    def resolve_vocab(self, vocab_size: int) -> "TrainConfig":
        """This config with the model's vocab_size set to the dataset's when the config left it
        unset (a config that sets it keeps its value; the driver checks that it fits)."""
        if self.model.vocab_size is not None:
            return self
        return dataclasses.replace(self, model=dataclasses.replace(self.model,
                                                                   vocab_size=vocab_size))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["model"] = self.model.to_dict()
        out["schedule"] = self.schedule.to_dict()
        out["optim"]["betas"] = list(self.optim.betas)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if not isinstance(d, dict):
            raise ValueError(f"config must be a mapping of sections, got {type(d).__name__}")
        check_known("", d, (f.name for f in fields(cls)), "section")
        return cls(**d)


def apply_override(d: dict, item: str) -> None:
    """Apply one `key.sub=value` override in place; the value is parsed as YAML."""
    if "=" not in item:
        raise ValueError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {item!r}: empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        why = " ".join(str(e).split())  # one line: the parser's message spans several
        raise ValueError(f"override {item!r}: the value is not valid YAML ({why})") from None
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
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return cfg
