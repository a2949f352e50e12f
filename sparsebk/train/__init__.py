"""Distributed training on Ray Train: config, schedule actor, per-worker loop, driver.

    from sparsebk.train import load_config, run_training
    summary = run_training(load_config("ray_jobs/configs/tiny.yaml", ["optim.max_steps=40"]))

Names are imported lazily: `import sparsebk.train` does not start or import Ray.
"""

from __future__ import annotations

from sparsebk._lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": "sparsebk.train.config",
    "DataConfig": "sparsebk.train.config",
    "OptimConfig": "sparsebk.train.config",
    "RunConfig": "sparsebk.train.config",
    "load_config": "sparsebk.train.config",
    "ScheduleActor": "sparsebk.train.ray_train.actor",
    "ScheduleState": "sparsebk.train.schedule",
    "LocalSchedule": "sparsebk.train.schedule",
    "create_schedule_actor": "sparsebk.train.ray_train.actor",
    "train_loop_per_worker": "sparsebk.train.ray_train.loop",
    "build_trainer": "sparsebk.train.ray_train.driver",
    "run_training": "sparsebk.train.ray_train.driver",
    "ensure_dataset": "sparsebk.train.ray_train.driver",
    "save_checkpoint": "sparsebk.storage.checkpoint",
    "load_checkpoint": "sparsebk.storage.checkpoint",
    "read_metrics": "sparsebk.train.metrics",
    "write_plots": "sparsebk.train.metrics",
    "main": "sparsebk.train.ray_train.cli",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
