"""Tuner setup, restore and the end-of-sweep report.

    cfg = load_sweep_config("ray_jobs/configs/sweep-tiny.yaml")
    summary = run_sweep(cfg)        # needs a running Ray; resumes an interrupted sweep

`prepare_sweep` does every check that can fail (sweep fields, each parameter's extreme values
applied to the real training config, the dataset) before Ray Tune starts a trial. The sweep
lives in STORAGE/NAME: Tune's experiment state and trial folders, `sweep.json` (the sweep
config), `train_runs/<trial_id>/` (each trial's Train run and checkpoints), `trial_status/`
(attempt logs and completion markers) and `report/`.

Trials stopped early leave their Train workers' placement group behind (Ray Train V2 under
Tune, upstream ray-project/ray#54305); `PlacementGroupReaper` removes them while the sweep
runs, so a sweep with more trials than the cluster holds at once runs to the end (root cause
in sparsebk/tune/cleanup.py).

Running the same sweep again resumes it (`Tuner.restore`): finished and failed trials are
kept, unfinished ones continue, and the searcher goes on from its saved state.

Resuming runs what the sweep folder holds: `Tuner.restore` unpickles `tuner.pkl`, the
experiment snapshot and the searcher's state, and the resumed trials load their Train runs'
checkpoints from `train_runs/` (DESIGN.md §3: files that are unpickled are code). So before
restoring, `check_restorable` requires that nobody but this user (or root) can have written
any of it: every folder and file in the sweep folder owned by this user or root, none
writable by group or others, no symbolic link; and every parent folder owned by this user or
root and not writable by others unless sticky (as /tmp and the launcher's `chmod 1777`
mount are), since whoever can rename entries in a parent can swap the whole sweep folder.
Otherwise the sweep refuses to resume, naming the offending path and the fix. The check
trusts this user: anyone who can act as this uid (e.g. every pod of a KubeRay cluster that
runs as the same uid) can run code here anyway. A storage path on a URI (s3://, gs://)
cannot be checked from the client, since the bucket's writers are set by its policies, not
file modes; sweeps refuse URI storage for now (`_sweep_storage`), and when that changes
`check_restorable` refuses a URI unless SPARSEBK_TRUST_SWEEP_STATE=1 says that only trusted
principals can write that prefix. The same variable overrides the local check, for a folder
that a trusted group shares on purpose.

ASHA measures a trial's progress by the training step of its reports ("step"), not by Tune's
`training_iteration`: a trial retried after a failure resumes its Train run from its latest
checkpoint while Tune counts its reports from 1 again, so by iteration ASHA would compare it
at a later step than its peers (and favour it). The sweep config's `asha.grace_period` and
`asha.max_t` count evaluations; they become steps with the training config's `eval_every`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from sparsebk.tune.cleanup import PlacementGroupReaper, settle_placement_groups
from sparsebk.tune.config import SweepConfig
from sparsebk.tune.results import STATE_GLOB, SWEEP_FILE
from sparsebk.tune.trial import apply_params, run_trial

logger = logging.getLogger(__name__)


@dataclass
class PreparedSweep:
    cfg: SweepConfig
    base_train: dict            # the training config every trial starts from
    keys: dict[str, str]        # parameter -> dotted training field
    sweep_dir: Path
    max_t: int                  # evaluations of a full-length trial (ASHA's horizon)
    eval_every: int             # training steps between evaluations (ASHA counts steps)
    num_workers: int
    cpus_per_worker: float
    use_gpu: bool
    ray_data: bool              # trials read through Ray Data (data.loader: ray)


def _where(cfg: SweepConfig) -> str:
    return cfg.source


def check_against_train(cfg: SweepConfig):
    """Load the training config and apply every parameter's extreme values to it, one at a
    time, so a value the trainer would reject fails now. Returns the base TrainConfig."""
    from sparsebk.train.config import TrainConfig, load_config

    where = _where(cfg)
    train_path = cfg.resolve_path(cfg.train_config)
    try:
        base = load_config(train_path, cfg.train_overrides)
    except ValueError as e:
        raise ValueError(f"{where}: train_config/train_overrides: {e}") from None
    base_d = base.to_dict()
    for p in cfg.space.values():
        for v in p.extremes():
            try:
                TrainConfig.from_dict(apply_params(base_d, {p.name: v}, {p.name: p.key}))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{where}: space.{p.name} (training field {p.key}) "
                                 f"value {v!r} is rejected by the training config: {e}") from None
    if cfg.asha.enabled and cfg.search.metric not in ("val_loss", "val_ppl", "sparsity"):
        raise ValueError(f"{where}: search.metric: {cfg.search.metric!r} is not reported by "
                         f"training (val_loss, val_ppl, sparsity)")
    return base


def _sweep_storage(cfg: SweepConfig, run_storage: str) -> Path:
    """The sweep's parent folder: `storage_path`, else the training runs' storage + /sweeps;
    a relative path lives under $SPARSEBK_HOME (sparsebk.storage.store.home), never under the current
    directory (under `ray job submit --working-dir` that is a copy Ray may delete)."""
    from sparsebk.storage.store import is_uri, join_location, resolve_location

    loc = cfg.storage_path or join_location(resolve_location(run_storage), "sweeps")
    if is_uri(loc):
        raise ValueError(f"{_where(cfg)}: storage_path: {loc!r}: a sweep keeps Tune's state and "
                         f"its report on a local or shared path for now (trials' checkpoints "
                         f"included); give a path")
    return Path(resolve_location(loc, "storage_path"))


def prepare_sweep(cfg: SweepConfig, *, check_data: bool = True) -> PreparedSweep:
    """Validate everything and resolve paths; starts nothing."""
    base = check_against_train(cfg)
    if check_data:
        from sparsebk.data.manifest import check_dataset
        from sparsebk.train.ray_train.driver import ensure_dataset

        try:
            manifest = check_dataset(ensure_dataset(base.data), block_len=base.data.block_len)
            base.resolve_vocab(manifest["vocab_size"])
        except ValueError as e:
            raise ValueError(f"{_where(cfg)}: training data/model: {e}") from None
    storage = _sweep_storage(cfg, base.run.storage_path)
    evals = math.ceil(base.optim.max_steps / base.run.eval_every)
    return PreparedSweep(cfg=cfg, base_train=base.to_dict(),
                         keys={n: p.key for n, p in cfg.space.items()},
                         sweep_dir=storage / cfg.name,
                         max_t=cfg.asha.max_t or evals, eval_every=base.run.eval_every,
                         num_workers=base.run.num_workers,
                         cpus_per_worker=base.run.cpus_per_worker, use_gpu=base.run.use_gpu,
                         ray_data=getattr(base.data, "loader", "ray") == "ray")


def _encode(p, v):
    return json.dumps(v) if p.encoded else v


def param_space(cfg: SweepConfig) -> dict:
    from ray import tune

    space = {}
    for n, p in cfg.space.items():
        values = [_encode(p, v) for v in p.values]
        if p.kind == "value":
            space[n] = p.values[0]
        elif p.kind == "choice":
            space[n] = tune.choice(values)
        elif p.kind == "grid":
            space[n] = tune.grid_search(values)
        elif p.kind == "uniform":
            space[n] = tune.uniform(p.low, p.high)
        elif p.kind == "loguniform":
            space[n] = tune.loguniform(p.low, p.high)
        elif p.kind == "randint":
            space[n] = tune.randint(int(p.low), int(p.high))
    return space


def search_algorithm(cfg: SweepConfig, max_concurrent_trials: int):
    """The searcher; random and grid take the concurrency limit themselves (Tune's
    TuneConfig.max_concurrent_trials only wraps a Searcher, not the variant generator)."""
    s = cfg.search
    points = [{n: _encode(cfg.space[n], v) for n, v in pt.items()}
              for pt in s.points_to_evaluate] or None
    if s.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        if s.multi_objective:  # the front itself: low validation loss, high sparsity
            return OptunaSearch(metric=["val_loss", "sparsity"], mode=["min", "max"],
                                seed=s.seed, points_to_evaluate=points)
        return OptunaSearch(metric=s.metric, mode=s.mode, seed=s.seed, points_to_evaluate=points)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=points, random_state=s.seed,
                                 max_concurrent=max_concurrent_trials)


def trial_scheduler(cfg: SweepConfig, max_t: int, eval_every: int):
    """FIFO, or ASHA over the training step each evaluation reports (`max_t`: evaluations
    of a full-length trial; the sweep's grace period also counts evaluations)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if not cfg.asha.enabled:
        return FIFOScheduler()
    # "step", not training_iteration: a retried trial resumes at its checkpoint's step while
    # Tune's iteration count restarts at 1 (module doc). Evaluation k is at step k * eval_every
    # (the last one at max_steps), so rungs at grace * rf^i evaluations stay at the same
    # evaluations. ASHA stops a trial when it reaches max_t; one step past the last evaluation
    # lets a full-length trial return from its Train run by itself (and record that it
    # completed).
    grace = cfg.asha.grace_period * eval_every
    return ASHAScheduler(time_attr="step", metric=cfg.search.metric, mode=cfg.search.mode,
                         max_t=max(max_t * eval_every, grace) + 1, grace_period=grace,
                         reduction_factor=cfg.asha.reduction_factor)


def max_concurrent(prep: PreparedSweep, resources: dict) -> int:
    """Trials that fit the cluster at once: each needs num_workers x cpus_per_worker CPUs
    (and a GPU per worker with use_gpu), plus one CPU for its Ray Data read tasks when it
    reads through Ray Data (measured: three trials sharing one spare CPU for their data
    pipelines made no progress in 7 minutes)."""
    if prep.cfg.max_concurrent_trials is not None:
        return prep.cfg.max_concurrent_trials
    per_trial = (prep.num_workers * prep.cpus_per_worker + prep.cfg.trial_cpus
                 + (1.0 if prep.ray_data else 0.0))
    cpus = float(resources.get("CPU", 0.0))
    n = math.floor(cpus / per_trial) if per_trial > 0 else 10**6
    if prep.use_gpu and prep.num_workers > 0:
        n = min(n, math.floor(float(resources.get("GPU", 0.0)) / prep.num_workers))
    return max(1, n)


def _trainable(prep: PreparedSweep):
    from ray import tune

    fn = tune.with_parameters(run_trial, base_train=prep.base_train, keys=prep.keys,
                              sweep_dir=str(prep.sweep_dir), sweep_name=prep.cfg.name,
                              encoded=[n for n, p in prep.cfg.space.items() if p.encoded])
    return tune.with_resources(fn, {"cpu": prep.cfg.trial_cpus})


def _check_stored_config(prep: PreparedSweep) -> bool:
    """True when SWEEP_DIR holds a sweep of this same config (resume); ValueError when it
    holds a different one (resuming would mix two sweeps)."""
    f = prep.sweep_dir / SWEEP_FILE
    if not f.is_file():
        return False
    stored = json.loads(f.read_text())
    now = json.loads(json.dumps(_sweep_record(prep), default=str))
    if stored.get("config") != now["config"]:
        raise ValueError(f"{_where(prep.cfg)}: {prep.sweep_dir} holds a sweep with a different "
                         f"config; pick another name (or storage_path) or move that folder")
    return True


def _sweep_record(prep: PreparedSweep) -> dict:
    return {"name": prep.cfg.name, "config": prep.cfg.to_dict(), "base_train": prep.base_train,
            "space": list(prep.cfg.space), "sparsity_levels": prep.cfg.sparsity_levels,
            "last_k": prep.cfg.last_k}


TRUST_ENV = "SPARSEBK_TRUST_SWEEP_STATE"  # "1": resume without checking who can write there


def _mode(st: os.stat_result) -> str:
    return f"{stat.filemode(st.st_mode)} {st.st_mode & 0o7777:04o}"


def _untrusted_path(path: Path, st: os.stat_result, me: int) -> str | None:
    """Why someone else could have written `path` (an entry of the sweep folder), or None."""
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link (to {os.readlink(path)})"
    if st.st_uid not in (me, 0):
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {me})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others ({_mode(st)})"
    return None


def untrusted_state(sweep_dir: Path) -> str | None:
    """Why a user other than this one (or root) could have written what resuming the sweep in
    `sweep_dir` reads (module doc), or None when nobody could."""
    me = os.geteuid()
    here = Path(os.path.abspath(sweep_dir))
    # the path as given and the path it resolves to: a symlinked parent is checked both ways
    for folder in dict.fromkeys([*here.parents, *here.resolve().parents]):
        st = folder.stat()
        if st.st_uid not in (me, 0):
            return (f"its parent folder {folder} is owned by uid {st.st_uid}, who can swap the "
                    f"sweep folder")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            return (f"its parent folder {folder} is writable by group or others without the "
                    f"sticky bit ({_mode(st)}), so they can swap the sweep folder")
    why = _untrusted_path(here, here.lstat(), me)
    if why:
        return why

    def unreadable(e: OSError):
        raise e

    for root, dirs, files in os.walk(here, onerror=unreadable):  # symlinks are not followed
        for name in [*dirs, *files]:
            path = Path(root) / name
            why = _untrusted_path(path, path.lstat(), me)
            if why:
                return why
    return None


def check_restorable(location: str | Path, where: str) -> None:
    """ValueError (one line: the folder, why, what to do) unless resuming the sweep stored at
    `location` reads only what this user wrote; see the module doc."""
    from sparsebk.storage.store import is_uri

    if os.environ.get(TRUST_ENV) == "1":
        logger.warning("%s=1: resuming the sweep in %s without checking who can write there",
                       TRUST_ENV, location)
        return
    if is_uri(str(location)):
        raise ValueError(f"{where}: refusing to resume the sweep at {location}: resuming "
                         f"unpickles its stored state, and who can write a bucket cannot be "
                         f"checked from here; set {TRUST_ENV}=1 if only trusted principals "
                         f"can write that prefix")
    try:
        why = untrusted_state(Path(location))
    except OSError as e:
        why = f"it cannot be checked ({e})"
    if why:
        raise ValueError(f"{where}: refusing to resume the sweep in {location}: {why}; "
                         f"resuming unpickles the sweep's state and checkpoints, so whoever "
                         f"can write there could run code here. If you trust what it holds, "
                         f"make it yours and private (chown; chmod go-w; chmod +t a shared "
                         f"parent) or set {TRUST_ENV}=1; otherwise start the sweep under "
                         f"another name")


def build_tuner(prep: PreparedSweep, *, callbacks=None, resume: bool = True):
    """A new Tuner, or the restored one when SWEEP_DIR holds this sweep's state (only after
    `check_restorable`: nothing there is read as a pickle before it)."""
    import ray
    from ray import tune

    # sweep.json is JSON and can_restore only looks for tuner.pkl: neither unpickles
    if resume and _check_stored_config(prep) and tune.Tuner.can_restore(str(prep.sweep_dir)):
        check_restorable(prep.sweep_dir, _where(prep.cfg))
        logger.info("resuming sweep from %s", prep.sweep_dir)
        return tune.Tuner.restore(str(prep.sweep_dir), trainable=_trainable(prep),
                                  resume_unfinished=True, resume_errored=False,
                                  restart_errored=False), True
    if any(prep.sweep_dir.glob(STATE_GLOB)):
        raise ValueError(f"{_where(prep.cfg)}: {prep.sweep_dir} already holds a sweep; resume it "
                         f"or pick another name (or storage_path)")
    trainable = _trainable(prep)
    prep.sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    # never group/world-writable, whatever the umask: a later resume checks it (module doc)
    prep.sweep_dir.mkdir(mode=0o755, exist_ok=True)
    tmp = prep.sweep_dir / (SWEEP_FILE + ".tmp")
    tmp.write_text(json.dumps(_sweep_record(prep), indent=2, default=str))
    tmp.replace(prep.sweep_dir / SWEEP_FILE)
    n = max_concurrent(prep, ray.cluster_resources())
    logger.info("sweep %s: up to %d concurrent trials", prep.cfg.name, n)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(prep.cfg),
        tune_config=tune.TuneConfig(search_alg=search_algorithm(prep.cfg, n),
                                    scheduler=trial_scheduler(prep.cfg, prep.max_t,
                                                              prep.eval_every),
                                    num_samples=prep.cfg.search.num_samples,
                                    max_concurrent_trials=n if prep.cfg.search.algorithm == "optuna" else None),
        run_config=tune.RunConfig(name=prep.sweep_dir.name,
                                  storage_path=str(prep.sweep_dir.parent),
                                  failure_config=tune.FailureConfig(max_failures=prep.cfg.max_retries),
                                  callbacks=[PlacementGroupReaper(), *(callbacks or [])],
                                  verbose=1),
    )
    return tuner, False


def run_sweep(cfg: SweepConfig, *, resume: bool = True, callbacks=None, report: bool = True,
              prepared: PreparedSweep | None = None) -> dict:
    """Run (or resume) the sweep to the end, then write tables, plots and report.md.

    Failed trials are recorded (after `max_retries` re-runs each) and never stop the sweep.
    Returns {"sweep_dir", "resumed", "trials": {status: count}, "report": {...paths}}.
    """
    prep = prepared or prepare_sweep(cfg)
    tuner, resumed = build_tuner(prep, callbacks=callbacks, resume=resume)
    grid = tuner.fit()
    # a stopped trial's Train workers hold a placement group until its controller is gone
    # and the group removed (sparsebk.tune.cleanup): none may outlive the sweep
    left = settle_placement_groups()
    if left:
        logger.warning("placement groups still live after the sweep: %s", left)
    statuses: dict[str, int] = {}
    for r in grid:
        key = "ERROR" if r.error is not None else "OK"
        statuses[key] = statuses.get(key, 0) + 1
    out = {"sweep_dir": str(prep.sweep_dir), "resumed": resumed, "trials": statuses,
           "placement_groups_left": left}
    if report:
        from sparsebk.tune.report import make_report

        out["report"] = {k: [str(x) for x in v] if isinstance(v, list) else str(v)
                         for k, v in make_report(prep.sweep_dir, cfg.report_path).items()}
    return out
