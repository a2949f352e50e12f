"""Ray Train runs of the `tiny` preset on CPU with 2 workers (one local Ray for the module).

Scenarios are combined into few TorchTrainer runs to keep the module fast:
  1. a clean run (DDP lowers the loss; ranks saw identical schedules; one actor call per step;
     the distributed validation loss equals a single-process one), exported and evaluated
     (tests/test_export.py's feature), then the same run name again with a larger budget (it
     resumes);
  2. a run with injected faults: a worker raising, a worker hard-exiting, the schedule actor
     killed, a NaN step -> it finishes with a continuous step sequence and schedule (and its
     validation over run.eval_batches' rows equals a single-process one);
  3. consecutive NaN steps -> a clear error, the last good checkpoint intact;
  4. bad configs fail before any worker starts;
  5. another module's feature on a Ray Train run (a Ray start costs seconds; one per module):
     run.parallel fsdp with a fault (tests/test_scale.py).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparsebk.scheduler import AdaptiveSparsityScheduler
from sparsebk.train.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

TINY = Path(__file__).resolve().parents[1] / "ray_jobs" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


def tiny(workdir: Path, name: str, *overrides: str):
    return load_config(TINY, [f"data.dir={workdir / 'data' / 'tiny'}",
                              f"run.storage_path={workdir / 'runs'}", f"run.name={name}",
                              *overrides])


def schedule_records(run_dir: Path) -> dict[int, list[dict]]:
    out = {}
    for f in sorted((run_dir / "schedule").glob("rank*.jsonl")):
        out[int(f.stem[4:])] = [json.loads(line) for line in f.read_text().splitlines()]
    return out


def attempts(records: list[dict]) -> list[list[int]]:
    """Step sequences per worker process (attempt), in order."""
    seqs: dict[int, list[int]] = defaultdict(list)
    for r in records:
        seqs[r["pid"]].append(r["step"])
    return list(seqs.values())


def assert_schedule_matches_reference(cfg, records: dict[int, list[dict]], n_layers: int):
    ref = AdaptiveSparsityScheduler.from_config(cfg.schedule)  # no accuracy_threshold: state_at is exact
    for rank, recs in records.items():
        for r in recs:
            expect = ref.state_at(r["step"])
            assert r["targets"] == pytest.approx([expect["sparsity_target"]] * n_layers), (rank, r)
            assert r["weight"] == pytest.approx(expect["loss_weight"]), (rank, r)


def reference_val_loss(state_dict, lm_cfg, blocks: torch.Tensor) -> float:
    """Single-process token-mean cross-entropy of a model in eval mode."""
    from sparsebk.model.lm import SparseBKLM

    model = SparseBKLM(lm_cfg)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.eval()
    with torch.no_grad():
        logits = model(blocks[:, :-1])["logits"]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                               blocks[:, 1:].reshape(-1)).item()


def latest_state(run_dir: Path) -> dict:
    snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    name = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
    return torch.load(run_dir / name / "state.pt", weights_only=True)


@pytest.fixture(scope="module")
def clean_run(ray_local, workdir):
    """The clean 20-step DDP run (Ray Data loader, every validation row), run once for the
    tests that read it: the first to ask runs it."""
    from sparsebk.train.ray_train.driver import run_training

    cfg = tiny(workdir, "clean", "optim.max_steps=20", "run.eval_every=10",
               "run.eval_batches=null")
    return cfg, run_training(cfg)


def test_a_ray_train_run_exports_and_evaluates(clean_run, tmp_path, capsys):
    """(sparsebk.inference.export, tests/test_export.py) A real Ray Train run folder (2 workers): --run finds the best checkpoint in Ray's own
    snapshot, and its single-process eval matches the DDP validation loss (same rows, summed
    in another order). The clean run's folder; before the resume test continues it, and
    correct after it too (every checkpoint's validation covers every row)."""
    from sparsebk.cli import main

    cfg, _ = clean_run
    run_dir = Path(cfg.run.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())  # the latest run_training's
    snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    best = min(snap["checkpoint_results"], key=lambda r: r["metrics"]["val_loss"])
    assert Path(summary["best_checkpoint"]).name == best["checkpoint_dir_name"]

    store = ["--storage-path", cfg.run.storage_path]
    assert main(["export", "--run", "clean", *store, "--out", str(tmp_path / "model")]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "model"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["step"] == best["metrics"]["step"]
    assert r["loss"] == pytest.approx(best["metrics"]["val_loss"], rel=1e-5)
    assert r["sparsity_layers"] == pytest.approx(
        [best["metrics"][f"sparsity_layer_{i}"] for i in range(2)], abs=1e-6)


def test_ddp_run_lowers_loss_ranks_agree_then_resumes(clean_run, workdir):
    from sparsebk.data.loading import load_blocks
    from sparsebk.data.manifest import load_manifest
    from sparsebk.model.lm import SparseBKLM
    from sparsebk.train.ray_train.driver import run_training

    cfg, summary = clean_run
    run_dir = Path(cfg.run.run_dir)
    assert summary["steps"] == 20
    # One actor call per step, whatever the world size.
    assert summary["actor_served"] == 20 and summary["actor_calls"] == 20

    records = schedule_records(run_dir)
    assert sorted(records) == [0, 1]
    as_tuples = {r: [(x["step"], x["targets"], x["weight"]) for x in recs]
                 for r, recs in records.items()}
    assert as_tuples[0] == as_tuples[1]  # every rank used the same values at every step
    assert [x[0] for x in as_tuples[0]] == list(range(1, 21))
    lm_cfg = cfg.resolve_vocab(load_manifest(cfg.data.dir)["vocab_size"]).model
    assert_schedule_matches_reference(cfg, records, lm_cfg.n_layers)

    # The all-reduced validation loss (every row: run.eval_batches null) equals a
    # single-process evaluation of the same weights, and training lowered it well below the
    # initial model's. (A limited run.eval_batches: the faults test.)
    state = latest_state(run_dir)
    assert state["step"] == 20
    valid = load_blocks(cfg.data.dir, "valid")
    final = reference_val_loss(state["model"], lm_cfg, valid)
    assert summary["best_val_loss"] == pytest.approx(final, rel=1e-4, abs=1e-4)
    torch.manual_seed(cfg.run.seed * 1000)  # rank 0's seed: DDP starts from rank 0's weights
    initial = reference_val_loss(SparseBKLM(lm_cfg).state_dict(), lm_cfg, valid)
    assert final < initial - 1.0, (initial, final)
    assert {p.name for p in (run_dir / "plots").glob("*.png")} == {
        "loss_ppl.png", "sparsity.png", "weight.png"}
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 20
    # The summary's test perplexity is the best checkpoint's, measured on every test row.
    best = torch.load(Path(summary["best_checkpoint"]) / "state.pt", weights_only=True)
    test_rows = load_blocks(cfg.data.dir, "test")
    assert summary["best_test_loss"] == pytest.approx(
        reference_val_loss(best["model"], lm_cfg, test_rows), rel=1e-4, abs=1e-4)

    # The same command with the same run name resumes from step 20.
    cfg2 = tiny(workdir, "clean", "optim.max_steps=30", "run.eval_every=10",
                "run.eval_batches=null")
    summary2 = run_training(cfg2)
    assert summary2["steps"] == 30
    assert summary2["actor_served"] == 10  # only the new steps were scheduled
    records = schedule_records(run_dir)
    for rank in (0, 1):
        assert attempts(records[rank]) == [list(range(1, 21)), list(range(21, 31))]
    assert_schedule_matches_reference(cfg2, records, lm_cfg.n_layers)


def test_faults_worker_raise_exit_actor_kill_and_nan_step(ray_local, workdir):
    from sparsebk.train.ray_train.driver import run_training

    # The plain-Parquet loader here (exact data position; no Ray Data actors to restart).
    cfg = tiny(workdir, "faults", "optim.max_steps=20", "run.eval_every=5", "data.loader=local",
               "run.max_failures=3", "run.inject_faults=[raise@7, kill_actor@9, nan@11, exit@14]")
    summary = run_training(cfg)
    run_dir = Path(cfg.run.run_dir)
    assert summary["steps"] == 20
    assert sorted(p.name for p in (run_dir / "faults").iterdir()) == [
        "exit@14", "kill_actor@9", "raise@7"]
    assert summary["bad_steps"] >= 1  # the NaN step was skipped and counted

    records = schedule_records(run_dir)
    n_layers = len(records[0][0]["targets"])
    assert_schedule_matches_reference(cfg, records, n_layers)
    for rank in (0, 1):
        seqs = attempts(records[rank])
        assert len(seqs) == 3  # two worker-group restarts; the actor kill needed none
        for seq in seqs:  # each attempt: consecutive steps from a checkpoint (multiple of 5)
            assert seq == list(range(seq[0], seq[0] + len(seq)))
            assert (seq[0] - 1) % cfg.run.eval_every == 0
        assert seqs[0][0] == 1 and seqs[-1][-1] == 20
        assert seqs[1][0] <= 7 and seqs[2][0] <= 14  # resumed at or before the failure
    # Identical values on both ranks wherever both recorded a step.
    by_step = [{x["step"]: (x["targets"], x["weight"]) for x in records[r]} for r in (0, 1)]
    for step in set(by_step[0]) & set(by_step[1]):
        assert by_step[0][step] == by_step[1][step]
    # The schedule timeline continued across the actor restart: one call per scheduled step.
    assert summary["actor_calls"] == 20

    # run.eval_batches=2 (the preset's): the all-reduced validation loss covers the split's
    # first eval_batches * eval_batch_size * num_workers rows, and equals a single-process
    # evaluation of the latest weights on those rows.
    from sparsebk.data.loading import load_blocks
    from sparsebk.data.manifest import load_manifest

    lm_cfg = cfg.resolve_vocab(load_manifest(cfg.data.dir)["vocab_size"]).model
    rows = cfg.run.eval_batches * cfg.data.eval_batch_size * cfg.run.num_workers
    valid = load_blocks(cfg.data.dir, "valid")
    assert rows < len(valid)
    snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    state = latest_state(run_dir)
    assert state["step"] == snap["latest_checkpoint_result"]["metrics"]["step"] == 20
    assert snap["latest_checkpoint_result"]["metrics"]["val_loss"] == pytest.approx(
        reference_val_loss(state["model"], lm_cfg, valid[:rows]), rel=1e-4, abs=1e-4)


def test_consecutive_non_finite_steps_stop_with_clear_error(ray_local, workdir):
    from sparsebk.train.ray_train.driver import run_training

    cfg = tiny(workdir, "nan", "optim.max_steps=20", "run.eval_every=5", "run.num_workers=1",
               "data.loader=local",
               "optim.max_bad_steps=2", "run.inject_faults=[nan@7, nan@8]", "run.max_failures=0")
    with pytest.raises(RuntimeError, match=r"stopped at step 8: 2 consecutive non-finite steps"):
        run_training(cfg)
    state = latest_state(Path(cfg.run.run_dir))
    assert state["step"] == 5  # the last good checkpoint is the latest
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_bad_configs_fail_before_workers_start(ray_local, workdir):
    from sparsebk.train.ray_train.driver import build_trainer

    # The dataset has a byte vocabulary (> 256 ids); a smaller model vocabulary is refused.
    with pytest.raises(ValueError, match="model.vocab_size=64"):
        build_trainer(tiny(workdir, "bad1", "model.vocab_size=64"), where="tiny.yaml")
    with pytest.raises(ValueError, match="data.batch_size=100000"):
        build_trainer(tiny(workdir, "bad2", "data.batch_size=100000"), where="tiny.yaml")
    with pytest.raises(ValueError, match="data.block_len=64 is longer than the model's n_seq=32"):
        build_trainer(tiny(workdir, "bad3", "data.block_len=64",
                           f"data.dir={workdir / 'data' / 'tiny64'}"), where="tiny.yaml")
    # an adaptive head's cutoff must lie inside the dataset's vocabulary (257 byte ids)
    with pytest.raises(ValueError, match=r"tiny.yaml: the model does not fit the dataset .*"
                                         r"head_cutoff=300 must be below vocab_size=257"):
        build_trainer(tiny(workdir, "bad4", "model.head_cutoff=300"), where="tiny.yaml")
    assert not (workdir / "runs" / "bad1").exists()
    assert not (workdir / "runs" / "bad4").exists()


# --- Ray Train runs of other modules' features: here for this module's one local Ray

def test_fsdp_on_ray_keeps_schedule_actor_broadcast_and_fault_recovery(ray_local, tmp_path):
    """(run.parallel fsdp, tests/test_scale.py) The `tiny` preset under run.parallel fsdp on 2 Ray workers, a worker raising at step
    7: the run restarts from the sharded step-5 checkpoint and finishes; every rank used
    the scheduler's values; one actor call per scheduled step."""
    from sparsebk.train.ray_train.driver import run_training

    cfg = load_config(TINY, [f"data.dir={tmp_path / 'data'}", f"run.storage_path={tmp_path}",
                             "run.name=fsdp", "run.parallel=fsdp", "data.loader=local",
                             "optim.max_steps=10", "run.eval_every=5", "run.plots=false",
                             "run.inject_faults=[raise@7]"])
    summary = run_training(cfg)
    assert summary["steps"] == 10 and summary["actor_calls"] == 10
    run_dir = Path(summary["run_dir"])
    ref = AdaptiveSparsityScheduler.from_config(cfg.schedule)
    for rank in (0, 1):
        lines = (run_dir / "schedule" / f"rank{rank}.jsonl").read_text().splitlines()
        recs = [json.loads(x) for x in lines]
        pids = list(dict.fromkeys(r["pid"] for r in recs))
        steps = [[r["step"] for r in recs if r["pid"] == pid] for pid in pids]
        assert len(steps) == 2 and steps[0][0] == 1 and steps[0][-1] in (6, 7)
        assert steps[1] == list(range(6, 11))  # restarted from the step-5 checkpoint
        for r in recs:
            assert r["targets"][0] == pytest.approx(ref.state_at(r["step"])["sparsity_target"])
    ckpt = Path(summary["checkpoint"])
    assert {p.name for p in (ckpt / "shards").glob("__*.distcp")} == {"__0_0.distcp",
                                                                      "__1_0.distcp"}
