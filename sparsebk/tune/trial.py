"""One Tune trial = one Ray Train run (the Train V2 pattern).

Under Ray Train V2 a Tuner cannot wrap a TorchTrainer. A trial is a plain function that
builds the trial's training config from the sampled parameters, creates its own schedule
actor, builds a TorchTrainer whose RunConfig carries a `TuneReportCallback` (made here,
inside the trial, where the Tune session exists) and fits it. Every `ray.train.report` of
rank 0 then reaches Tune as one trial result, which ASHA and the searcher see.

Isolation between trials: the schedule actor's name carries the trial id and a random
suffix; the Train run is named after the trial id under SWEEP_DIR/train_runs, so trials never
share checkpoints, and a retried trial (same id) resumes its own Train run from its latest
checkpoint. A trial whose training stopped on non-finite losses returns normally and is
recorded as stopped (its completion marker carries the reason): Ray's Result.metrics are the
latest *checkpoint's*, so the trial reads the stop marker its Train run wrote instead.

A trial stopped by the scheduler is killed with its actor process; the Train controller and
the schedule actor are owned by that process and end with it, but the workers' placement
group does not (the sweep's driver removes it: sparsebk/tune/cleanup.py).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import uuid
from pathlib import Path

from sparsebk.storage.store import open_store
from sparsebk.train.config import set_dotted
from sparsebk.tune.results import COMPLETED_DIR, STOPPED_FILE, TRAIN_RUNS_DIR, completion_marker

logger = logging.getLogger(__name__)



def apply_params(base_train: dict, params: dict, keys: dict[str, str]) -> dict:
    """The training-config dict of one trial: the base with each parameter at its key."""
    d = copy.deepcopy(base_train)
    for name, value in params.items():
        if name in keys:
            set_dotted(d, keys[name], copy.deepcopy(value))
    return d


def attempts_file(sweep_dir: str | os.PathLike, trial_id: str) -> Path:
    return Path(sweep_dir) / COMPLETED_DIR / f"{trial_id}.attempts"


def _append_attempt(sweep_dir: str, trial_id: str) -> int:
    f = attempts_file(sweep_dir, trial_id)
    f.parent.mkdir(parents=True, exist_ok=True)
    with open(f, "a") as fh:
        fh.write(f"{time.time():.3f} pid={os.getpid()}\n")
    return len(f.read_text().splitlines())


def run_trial(config: dict, *, base_train: dict, keys: dict[str, str], sweep_dir: str,
              sweep_name: str, encoded: list[str] = ()) -> None:
    """The Tune trainable: train one configuration; raise on failure (Tune records it)."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from sparsebk.train.ray_train.actor import create_schedule_actor
    from sparsebk.train.config import TrainConfig
    from sparsebk.train.ray_train.driver import build_trainer

    trial_id = tune.get_context().get_trial_id()
    attempt = _append_attempt(sweep_dir, trial_id)
    params = {n: json.loads(v) if n in encoded else v for n, v in config.items()}
    cfg = TrainConfig.from_dict(apply_params(base_train, params, keys))
    actor = create_schedule_actor(
        cfg.schedule, cfg.model.n_layers, name=f"sparsebk-sched-{sweep_name}-{trial_id}-{uuid.uuid4().hex[:8]}")
    logger.info("trial %s attempt %d: %s", trial_id, attempt, config)
    train_runs = str(Path(sweep_dir) / TRAIN_RUNS_DIR)
    run = open_store(train_runs).join(trial_id)
    run.delete(STOPPED_FILE)  # from an earlier attempt of this trial
    try:
        trainer = build_trainer(cfg, schedule_actor=actor, callbacks=[TuneReportCallback()],
                                run_name=trial_id, storage_path=train_runs,
                                where=f"trial {trial_id}")
        result = trainer.fit()
    finally:
        ray.kill(actor, no_restart=True)
    metrics = dict(result.metrics or {})  # the latest checkpoint's report, not the last one
    record = {"trial_id": trial_id, "attempt": attempt, "step": metrics.get("step"),
              "val_loss": metrics.get("val_loss"), "test_ppl": metrics.get("test_ppl")}
    if run.is_file(STOPPED_FILE):
        # rank 0 wrote why training stopped (non-finite losses): a finished trial that did
        # not complete; not retried (the same config diverges again), kept out of the front
        stopped = json.loads(run.read_text(STOPPED_FILE))
        record.update(stopped=stopped.get("reason", "stopped"), step=stopped.get("step"))
        logger.warning("trial %s: training stopped: %s", trial_id, record["stopped"])
    marker = completion_marker(sweep_dir, trial_id)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, default=str))
    tmp.replace(marker)
