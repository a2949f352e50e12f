"""The Trainer in one process (no Ray): resume equals an uninterrupted run, bit for bit; the
schedule reaches the layers; non-finite steps are skipped, counted and stop the run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sparsebk.model.lm import SparseBKLM
from sparsebk.scheduler import AdaptiveSparsityScheduler
from sparsebk.train.config import TrainConfig
from sparsebk.train.run_state import local_batches
from sparsebk.train.schedule import LocalSchedule
from sparsebk.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCHEDULE = dict(initial_sparsity=0.1, final_sparsity=0.4, initial_weight=0.1, final_weight=1.0,
                warmup_steps=12, schedule_type="linear")


def make_cfg(tmp_path: Path, **optim) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"preset": "debug", "vocab_size": 50},
        "data": {"batch_size": 4, "block_len": 16, "eval_batch_size": 8, "loader": "local",
                 "shuffle_buffer": 1, "dir": str(tmp_path / "data")},
        "optim": {"lr": 3e-3, "warmup_steps": 3, "max_steps": 20, **optim},
        "schedule": SCHEDULE,
        "run": {"log_every": 5, "eval_every": 10, "num_workers": 1,
                "storage_path": str(tmp_path / "runs")},
    })


def rows() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 50, (40, 17), generator=g), torch.randint(0, 50, (16, 17), generator=g)


def build(cfg, valid, saved: list, hooks=None, run_dir=None, label="a") -> Trainer:
    torch.manual_seed(0)
    model = SparseBKLM(cfg.model)

    def reporter(metrics, directory):
        if directory is not None:  # keep a copy: the trainer's folder is temporary
            dst = Path(cfg.run.run_dir) / f"{label}-ckpt-{metrics['step']}"
            shutil.copytree(directory, dst)
            saved.append((metrics, dst))

    t = Trainer(cfg, model, device=torch.device("cpu"), valid=valid, reporter=reporter,
                hooks=hooks, run_dir=run_dir)
    t.schedule = LocalSchedule(cfg.schedule, cfg.model.n_layers)
    return t


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    cfg = make_cfg(tmp_path)
    train, valid = rows()
    batches = lambda e, skip: local_batches(train, cfg, e, skip, 0, 1)  # noqa: E731

    saved_a: list = []
    a = build(cfg, valid, saved_a, run_dir=tmp_path / "a")
    assert a.fit(batches) is None
    a.finish(None)
    # 10 batches of 4 rows per epoch: the second epoch (0-based 1) ends with step 20
    assert (a.state.step, a.state.epoch, a.state.batch_in_epoch) == (20, 1, 10)
    assert [m["step"] for m, _ in saved_a] == [10, 20]

    # Resume from A's step-10 checkpoint in a fresh trainer (fresh weights, other RNG).
    saved_b: list = []
    b = build(cfg, valid, saved_b, label="b")
    torch.manual_seed(123)
    sched_state = b.restore(saved_a[0][1])
    b.schedule = LocalSchedule(cfg.schedule, cfg.model.n_layers, sched_state)
    assert b.state.step == 10 and b.state.best_val_loss == saved_a[0][0]["val_loss"]
    assert b.fit(batches) is None
    assert b.state == a.state
    for (name, pa), pb in zip(a.net.named_parameters(), b.net.parameters()):
        assert torch.equal(pa, pb), name
    assert saved_b[-1][0]["val_loss"] == saved_a[-1][0]["val_loss"]
    # A checkpoint says what its weights are: the configs it was trained with.
    meta = torch.load(saved_a[0][1] / "state.pt", weights_only=True)["meta"]
    assert TrainConfig.from_dict(meta["train_config"]) == cfg
    assert meta["model_config"] == cfg.model.to_dict()

    # The layers ran on the scheduler's values: the step-20 targets, as the scheduler says.
    ref = AdaptiveSparsityScheduler(**SCHEDULE).state_at(20, saved_a[0][0]["val_loss"])
    assert [layer.sparse_bk_core.target_sparsity for layer in a.net.layers] == pytest.approx(
        [ref["sparsity_target"]] * cfg.model.n_layers)
    # ... and every step was recorded with them, on the run's file.
    lines = (tmp_path / "a" / "schedule" / "rank0.jsonl").read_text().splitlines()
    assert len(lines) == 20


class NaNAt:
    def __init__(self, steps):
        self.steps = set(steps)

    def before_step(self, step):
        pass

    def loss(self, step, loss):
        return loss * float("nan") if step in self.steps else loss


def test_non_finite_steps_are_skipped_counted_and_stop(tmp_path):
    cfg = make_cfg(tmp_path, max_bad_steps=2)
    train, valid = rows()
    batches = lambda e, skip: local_batches(train, cfg, e, skip, 0, 1)  # noqa: E731

    t = build(cfg, valid, [], hooks=NaNAt({3}))
    before = None
    for step in range(1, 5):
        if step == 3:
            before = [p.detach().clone() for p in t.net.parameters()]
        t.step(next(batches(0, (step - 1) * 4)))
        if step == 3:  # the NaN step changed no weight
            assert all(torch.equal(x, p) for x, p in zip(before, t.net.parameters()))
    assert t.state.bad_steps == 1 and t.bad_in_row == 0

    t2 = build(cfg, valid, [], hooks=NaNAt({7, 8}))
    reason = t2.fit(batches)
    assert reason == "stopped at step 8: 2 consecutive non-finite steps (optim.max_bad_steps=2)"
    assert t2.state.bad_steps == 2
    assert all(torch.isfinite(p).all() for p in t2.net.parameters())


def test_a_non_finite_validation_loss_never_reaches_the_schedule(tmp_path):
    """The scheduler refuses a non-finite loss; handing it one would raise at every retry."""
    cfg = make_cfg(tmp_path)
    train, valid = rows()
    saved: list = []
    t = build(cfg, valid, saved)
    t.step(train[:4])  # the schedule's first values
    finite = t.validate_and_save()["val_loss"]
    assert t.schedule.state.last_val_loss == finite
    t.evaluate = lambda blocks, max_rows=None: (float("nan"), [0.0] * cfg.model.n_layers)
    t.step(train[4:8])
    metrics = t.validate_and_save()
    assert metrics["val_loss"] != metrics["val_loss"]  # NaN reported as measured
    assert t.schedule.state.last_val_loss == finite  # ... but not given to the schedule
    assert t.state.nonfinite_evals == 1 and t.state.best_val_loss == finite
    assert len(saved) == 2  # the checkpoint was still written and reported


@pytest.mark.parametrize("test_batches", [None, 1])
def test_the_final_test_evaluation_takes_run_test_batches(tmp_path, test_batches):
    """The last step evaluates the test split: all of it by default, its first
    run.test_batches x eval_batch_size rows when set (a large corpus's split is hours of CPU)."""
    from sparsebk.evaluation import evaluate

    cfg = make_cfg(tmp_path, max_steps=10)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "run": {**cfg.to_dict()["run"], "test_batches": test_batches}})
    train, valid = rows()
    test = torch.randint(0, 50, (24, 17), generator=torch.Generator().manual_seed(1))
    saved: list = []
    t = build(cfg, valid, saved)
    t.test = lambda: test
    assert t.fit(lambda e, skip: local_batches(train, cfg, e, skip, 0, 1)) is None
    final = saved[-1][0]
    taken = test if test_batches is None else test[:8]  # eval_batch_size 8
    ref, _ = evaluate(t.model, taken, batch_size=8, device=torch.device("cpu"))
    assert final["step"] == 10 and final["test_loss"] == ref
    other, _ = evaluate(t.model, test[8:] if test_batches else test[:8], batch_size=8, device=torch.device("cpu"))
    assert other != ref  # the rows left out would have changed it
