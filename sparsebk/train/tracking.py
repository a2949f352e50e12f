"""Experiment tracking: the scalars of metrics.jsonl, as they are written, in TensorBoard and
MLflow (`run.tracking: [tensorboard, mlflow]`; rank 0 only).

Every record the trainer writes to metrics.jsonl ({"kind": "train" | "eval", "step": s, ...})
becomes one scalar per number, named `<kind>/<key>` at step s; a per-layer list becomes one
scalar per layer (`train/sparsity_layer_0`, `train/target_layer_0`, ...). So a chart in either
tool is a column of metrics.jsonl.

- TensorBoard: event files in RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`).
  A resumed attempt purges the events after its checkpoint's step, so re-run steps are not
  drawn twice.
- MLflow: `run.mlflow_uri`, by default a SQLite store inside the run folder
  (sqlite:///RUN_DIR/mlflow/mlflow.db, artifacts in RUN_DIR/mlflow/artifacts; MLflow >= 3.7
  refuses new `file:` stores), or a tracking server (http://...). Experiment
  `run.mlflow_experiment` (default: the run name); the config, flattened to dotted keys, as
  the run's params. The MLflow run id is kept in RUN_DIR/mlflow/run_id, so a restarted worker
  and the driver (`log_plots`, the PNGs as artifacts at the end) write to the same run.

With a URI run folder (s3://, gs://) only MLflow on a tracking server works (config load
refuses TensorBoard and the default SQLite store there); the run id goes through
sparsebk.storage.store, and the plots are copied to a temporary file for MLflow to log.

The packages are the `tracking` extra (`pip install -e ".[tracking]"`, which `.[test]`
includes); asking for a tracker whose package is missing fails at config load.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
import time
from pathlib import Path
from typing import Iterable

from sparsebk.storage.store import open_store
from sparsebk.validation import flatten as dotted

logger = logging.getLogger("sparsebk.train")

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # name -> module it needs
_LIST_KEYS = {"sparsity_layers": "sparsity_layer", "target_layers": "target_layer"}


def scalars(kind: str, rec: dict) -> dict[str, float]:
    """The numbers of one metrics record as {"<kind>/<name>": value} (the step excluded)."""
    out = {}
    for key, value in rec.items():
        if key in ("kind", "step") or isinstance(value, (str, bool)) or value is None:
            continue
        if isinstance(value, (list, tuple)):
            stem = _LIST_KEYS.get(key, key)
            out.update({f"{kind}/{stem}_{i}": float(x) for i, x in enumerate(value)})
        else:
            out[f"{kind}/{key}"] = float(value)
    return out


def flatten(d: dict) -> dict[str, str]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": "0.001"}: MLflow params are flat strings."""
    return {name: json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            for name, value in dotted(d).items()}


def mlflow_location(run_cfg, run_dir: str | os.PathLike) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None: the server decides)."""
    if run_cfg.mlflow_uri is not None:
        return run_cfg.mlflow_uri, None
    root = Path(run_dir) / "mlflow"
    return f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts")


def mlflow_run_id(run_dir: str | os.PathLike) -> str | None:
    store = open_store(run_dir)
    return store.read_text("mlflow/run_id").strip() if store.is_file("mlflow/run_id") else None


def _mlflow_client(run_cfg, run_dir):
    from mlflow.tracking import MlflowClient

    uri, artifacts = mlflow_location(run_cfg, run_dir)
    if artifacts is not None:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri), artifacts


class Tracking:
    """Rank 0's trackers for one run attempt: `log(kind, rec)` per metrics record, `close`."""

    def __init__(self, run_cfg, run_dir: str | os.PathLike, params: dict, *,
                 purge_step: int | None = None):
        """`params`: the training config (to_dict); `purge_step`: the first step this attempt
        trains (a resumed run: checkpoint step + 1), from which older events are dropped."""
        self.kinds = list(run_cfg.tracking)
        self.run_dir = run_dir  # a path, or a URI (then only MLflow on a server: see config)
        self.tb = self.mlflow = None
        if "tensorboard" in self.kinds:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(self.run_dir) / "tensorboard"),
                                    purge_step=purge_step)
        if "mlflow" in self.kinds:
            self.mlflow, artifacts = _mlflow_client(run_cfg, run_dir)
            self.run_id = mlflow_run_id(run_dir)
            if self.run_id is None:  # the run's first attempt
                name = run_cfg.mlflow_experiment or run_cfg.name
                exp = self.mlflow.get_experiment_by_name(name)
                exp_id = (exp.experiment_id if exp is not None else
                          self.mlflow.create_experiment(name, artifact_location=artifacts))
                self.run_id = self.mlflow.create_run(exp_id, run_name=run_cfg.name).info.run_id
                from mlflow.entities import Param

                items = [Param(k, v) for k, v in flatten(params).items()]
                for i in range(0, len(items), 100):  # MLflow takes at most 100 per batch
                    self.mlflow.log_batch(self.run_id, params=items[i:i + 100])
                open_store(run_dir).write_text("mlflow/run_id", self.run_id)
            else:  # a restarted attempt continues the run
                self.mlflow.update_run(self.run_id, status="RUNNING")
            # the config this attempt runs (params are immutable: a resumed run may differ)
            self.mlflow.log_dict(self.run_id, params, "config.json")

    def log(self, kind: str, rec: dict) -> None:
        values, step = scalars(kind, rec), int(rec["step"])
        if self.tb is not None:
            for name, v in values.items():
                self.tb.add_scalar(name, v, step)
            self.tb.flush()
        if self.mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.mlflow.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                        for k, v in values.items()])

    def close(self, stopped: bool = False) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.run_id, status="FAILED" if stopped else "FINISHED")
            self.mlflow = None


def log_plots(run_cfg, run_dir: str | os.PathLike, paths: Iterable[str | os.PathLike]) -> None:
    """The driver's PNGs as artifacts ("plots/") of the run's MLflow run; nothing without
    mlflow in run.tracking. Call after `write_plots`."""
    paths = list(paths)
    if "mlflow" not in run_cfg.tracking or not paths:
        return
    run_id = mlflow_run_id(run_dir)
    if run_id is None:
        logger.warning("run.tracking has mlflow but %s has no MLflow run id; plots not logged",
                       run_dir)
        return
    client, _ = _mlflow_client(run_cfg, run_dir)
    with tempfile.TemporaryDirectory(prefix="sparsebk-plots-") as tmp:
        for p in paths:
            if "://" in str(p):  # in a bucket: MLflow logs local files
                parent, name = _split_uri(str(p))
                p = Path(tmp) / name
                p.write_bytes(open_store(parent).read_bytes(name))
            client.log_artifact(run_id, str(p), "plots")


def _split_uri(uri: str) -> tuple[str, str]:
    """"s3://b/run/plots/x.png?opts" -> ("s3://b/run/plots?opts", "x.png")."""
    from urllib.parse import urlsplit, urlunsplit

    s = urlsplit(uri)
    return (urlunsplit((s.scheme, s.netloc, posixpath.dirname(s.path), s.query, "")),
            posixpath.basename(s.path))

