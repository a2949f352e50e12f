"""run.tracking: what rank 0 writes to metrics.jsonl reaches TensorBoard and MLflow, read back
with their own readers (TensorBoard's event accumulator; the MLflow client on a real local
SQLite store), value for value; the config is the MLflow run's params and the plots its
artifacts; a resumed run's TensorBoard keeps one value per step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sparsebk.model.lm import SparseBKLM
from sparsebk.train.config import TrainConfig
from sparsebk.train.run_state import local_batches
from sparsebk.train.metrics import read_metrics, write_plots
from sparsebk.train.schedule import LocalSchedule
from sparsebk.train.tracking import flatten, log_plots, mlflow_location, mlflow_run_id, scalars
from sparsebk.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCHEDULE = dict(initial_sparsity=0.1, final_sparsity=0.4, initial_weight=0.1, final_weight=1.0,
                warmup_steps=12, schedule_type="linear")


def make_cfg(tmp_path: Path, max_steps: int = 10, **run) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"preset": "debug", "vocab_size": 50},
        "data": {"batch_size": 4, "block_len": 16, "eval_batch_size": 8, "loader": "local",
                 "dir": str(tmp_path / "data")},
        "optim": {"lr": 3e-3, "warmup_steps": 3, "max_steps": max_steps},
        "schedule": SCHEDULE,
        "run": {"log_every": 2, "eval_every": 5, "num_workers": 1, "name": "tracked",
                "storage_path": str(tmp_path / "runs"), "tracking": ["tensorboard", "mlflow"],
                **run},
    })


def train(cfg: TrainConfig, restore: Path | None = None, saved: list | None = None,
          data_seed: int = 0) -> Trainer:
    g = torch.Generator().manual_seed(data_seed)
    rows, valid = torch.randint(0, 50, (40, 17), generator=g), torch.randint(0, 50, (16, 17), generator=g)
    torch.manual_seed(0)

    def reporter(metrics, directory):
        if directory is not None and saved is not None:
            import shutil

            dst = Path(cfg.run.run_dir) / f"ckpt-{metrics['step']}"
            shutil.copytree(directory, dst, dirs_exist_ok=True)
            saved.append(dst)

    t = Trainer(cfg, SparseBKLM(cfg.model), device=torch.device("cpu"), valid=valid,
                reporter=reporter, run_dir=cfg.run.run_dir)
    state = t.restore(restore) if restore is not None else None
    t.schedule = LocalSchedule(cfg.schedule, cfg.model.n_layers, state)
    t.finish(t.fit(lambda e, skip: local_batches(rows, cfg, e, skip, 0, 1)))
    return t


def expected(run_dir: Path) -> dict[str, dict[int, float]]:
    """{scalar name: {step: value}} from metrics.jsonl (the last record per step)."""
    out: dict[str, dict[int, float]] = {}
    for kind, recs in read_metrics(run_dir).items():
        for rec in recs:
            for name, v in scalars(kind, rec).items():
                out.setdefault(name, {})[rec["step"]] = v
    return out


def assert_same(got: dict[int, float], want: dict[int, float], name: str, rel: float) -> None:
    assert sorted(got) == sorted(want), name
    for step, v in want.items():
        if math.isnan(v):
            assert math.isnan(got[step]), (name, step)
        else:
            assert got[step] == pytest.approx(v, rel=rel, abs=rel), (name, step)


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_trackers_receive_the_metrics_file_values(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = make_cfg(tmp_path)
    run_dir = Path(cfg.run.run_dir)
    train(cfg)
    want = expected(run_dir)
    assert {"train/train_loss", "train/sparsity_layer_1", "train/target_layer_0", "train/lr",
            "train/tokens_per_s", "eval/val_loss", "eval/val_ppl", "eval/loss_weight",
            "eval/sparsity_layer_0"} <= set(want)
    assert sorted(want["train/train_loss"]) == [2, 4, 6, 8, 10]

    tb = tensorboard_scalars(run_dir)
    assert set(tb) == set(want)
    for name in want:  # TensorBoard stores float32
        assert_same(tb[name], want[name], name, rel=1e-6)

    uri, _ = mlflow_location(cfg.run, run_dir)
    assert uri.startswith("sqlite:///") and str(run_dir) in uri
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(mlflow_run_id(run_dir))
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params == flatten(cfg.to_dict())
    assert run.data.params["optim.lr"] == "0.003"
    assert set(run.data.metrics) == set(want)
    for name in want:
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert_same(got, want[name], name, rel=1e-12)

    # the driver's plots, as artifacts of the same run
    plots = write_plots(run_dir)
    log_plots(cfg.run, run_dir, plots)
    names = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    assert names == {p.name for p in plots} == {"loss_ppl.png", "sparsity.png", "weight.png"}
    assert json.loads(Path(client.download_artifacts(run.info.run_id, "config.json",
                                                     str(tmp_path))).read_text()) == cfg.to_dict()


def test_resumed_run_continues_its_tracking_run(tmp_path):
    """A resumed attempt writes to the same MLflow run, and TensorBoard drops the first
    attempt's events after the checkpoint: one value per step, the resumed run's."""
    saved: list = []
    cfg = make_cfg(tmp_path, max_steps=10, tracking=["tensorboard"])
    first = train(cfg, saved=saved)  # checkpoints at 5 and 10
    run_dir = Path(cfg.run.run_dir)
    first_values = tensorboard_scalars(run_dir)["train/train_loss"]
    # Resume from step 5 on other data: the values of steps 6..10 change.
    train(cfg, restore=saved[0], data_seed=1)
    tb = tensorboard_scalars(run_dir)["train/train_loss"]
    assert sorted(tb) == [2, 4, 6, 8, 10]
    assert tb[2] == first_values[2] and tb[4] == first_values[4]
    assert tb[8] != first_values[8]
    assert_same(tb, expected(run_dir)["train/train_loss"], "train_loss", rel=1e-6)
    assert first.state.step == 10


def test_tracking_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"run.tracking='wandb': choose one of"):
        make_cfg(tmp_path, tracking=["wandb"])
    with pytest.raises(ValueError, match="lists a tracker twice"):
        make_cfg(tmp_path, tracking=["mlflow", "mlflow"])
    with pytest.raises(ValueError, match="refuses new file stores"):
        make_cfg(tmp_path, mlflow_uri="file:///tmp/x")
    with pytest.raises(ValueError, match="only used with mlflow"):
        make_cfg(tmp_path, tracking=["tensorboard"], mlflow_uri="sqlite:///x.db")
