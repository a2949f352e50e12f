"""Resume checks what changed, keeps its data position in samples, survives a truncated
latest checkpoint; the pre-flight check fails fast naming the node and the path.

Single-process parts first (the classifier, the sample position through the Trainer), then
real Ray runs of the `tiny` preset (one local Ray for the module)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from sparsebk.train.config import TrainConfig, load_config
from sparsebk.train.run_state import local_batches
from sparsebk.train.resume import (ResumeRefused, classify, compare, config_changes,
                                   list_checkpoints, read_state, restoring_overrides)
from sparsebk.train.schedule import LocalSchedule
from sparsebk.train.trainer import Trainer

TINY = Path(__file__).resolve().parents[1] / "ray_jobs" / "configs" / "tiny.yaml"


def small_cfg(tmp_path: Path, **over) -> TrainConfig:
    d = {"model": {"preset": "debug", "vocab_size": 50},
         "data": {"batch_size": 4, "block_len": 16, "eval_batch_size": 8, "loader": "local",
                  "shuffle_buffer": 1, "dir": str(tmp_path / "data")},
         "optim": {"lr": 3e-3, "warmup_steps": 3, "max_steps": 10},
         "schedule": {"initial_sparsity": 0.1, "final_sparsity": 0.4, "warmup_steps": 5},
         "run": {"log_every": 5, "eval_every": 5, "num_workers": 1,
                 "storage_path": str(tmp_path / "runs")}}
    for key, value in over.items():
        section, name = key.split("__")
        d[section][name] = value
    return TrainConfig.from_dict(d)


# --- what may change ----------------------------------------------------------------------
def test_step_budget_intervals_workers_and_batch_size_may_change(tmp_path):
    old = small_cfg(tmp_path).to_dict()
    new = small_cfg(tmp_path, optim__max_steps=60, run__num_workers=3, data__batch_size=2,
                    run__log_every=1, run__eval_every=2, run__keep_checkpoints=5,
                    optim__grad_accum_steps=2).to_dict()
    safe, refused = classify(config_changes(old, new))
    assert refused == []
    assert {k for k, _, _ in safe} == {"optim.max_steps", "run.num_workers", "data.batch_size",
                                       "run.log_every", "run.eval_every",
                                       "run.keep_checkpoints", "optim.grad_accum_steps"}
    assert ("optim.max_steps", 10, 60) in safe


def test_model_data_schedule_optimizer_and_seed_changes_are_refused(tmp_path):
    old = small_cfg(tmp_path).to_dict()
    new = small_cfg(tmp_path, model__n_layers=3, data__block_len=8, optim__lr=1e-3,
                    run__seed=1, optim__max_steps=20).to_dict()
    new["schedule"]["final_sparsity"] = 0.5
    safe, refused = classify(config_changes(old, new))
    assert [k for k, _, _ in safe] == ["optim.max_steps"]
    assert {k: (a, b) for k, a, b in refused} == {
        "model.n_layers": (2, 3), "data.block_len": (16, 8), "optim.lr": (3e-3, 1e-3),
        "run.seed": (0, 1), "schedule.final_sparsity": (0.4, 0.5)}


def test_a_field_added_since_the_checkpoint_counts_only_when_not_default(tmp_path):
    old = small_cfg(tmp_path).to_dict()
    del old["run"]["placement_strategy"], old["optim"]["grad_accum_steps"]
    new = small_cfg(tmp_path).to_dict()
    meta = {"train_config": old}
    assert compare(meta, new, None, None) == []
    new["optim"]["grad_accum_steps"] = 2
    assert compare(meta, new, None, None) == [("optim.grad_accum_steps", "<absent>", 2)]


def test_another_tokenizer_vocabulary_is_refused(tmp_path):
    cfg = small_cfg(tmp_path).to_dict()
    meta = {"train_config": cfg, "tokenizer": {"name": "word", "checksum": "aa"},
            "dataset_dir": "/d"}
    changes = compare(meta, cfg, {"name": "word", "checksum": "bb"}, "/d")
    assert classify(changes) == ([], [("tokenizer.checksum", "aa", "bb")])


def test_the_refusal_flags_put_the_checkpoint_values_back():
    """A run of ptb-cpu.yaml trained before the `small` preset's gates changed, before the
    file took the adaptive head and before the light FFN widened (docs/resume.md's example):
    the refused fields' restoring `--set` flags, applied to the same config, give a run that
    resumes."""
    ptb = TINY.with_name("ptb-cpu.yaml")
    old_gates = ["model.gate_weight=false", "model.gate_train_noise=random",
                 "model.gate_eval_mode=quasi", "model.skip_output=carry",
                 "model.head_cutoff=0", "model.moe_aux_weight=0.01", "model.light_d_ff=null"]
    old = load_config(ptb, old_gates).to_dict()
    now = load_config(ptb).to_dict()
    safe, refused = classify(compare({"train_config": old}, now, None, None))
    assert safe == [] and {k for k, _, _ in refused} == {
        "model.gate_weight", "model.gate_train_noise", "model.gate_eval_mode", "model.skip_output",
        "model.head_cutoff", "model.moe_aux_weight", "model.light_d_ff"}
    flags = restoring_overrides(refused).split()
    assert flags[::2] == ["--set"] * 7 and "model.light_d_ff=null" in flags
    resumed = load_config(ptb, flags[1::2]).to_dict()
    assert compare({"train_config": old}, resumed, None, None) == []


# --- the data position is a sample position -------------------------------------------------
def indexed_rows(n: int = 40) -> torch.Tensor:
    """Rows whose first token is their index, the rest random."""
    rows = torch.randint(0, 50, (n, 17), generator=torch.Generator().manual_seed(0))
    rows[:, 0] = torch.arange(n)
    return rows


def test_each_step_of_all_ranks_consumes_a_stretch_of_one_order(tmp_path):
    cfg = small_cfg(tmp_path)
    rows = indexed_rows()
    order = [int(b[0, 0]) for b in local_batches(rows, small_cfg(tmp_path, data__batch_size=1),
                                                 0, 0, 0, 1)]
    assert sorted(order) == list(range(40)) and order != list(range(40))  # shuffled
    # two workers of 4 rows: each step takes the next 8 of the order, whoever holds them
    ranks = [list(local_batches(rows, cfg, 0, 0, r, 2)) for r in range(2)]
    for step, (a, b) in enumerate(zip(*ranks)):
        assert sorted(a[:, 0].tolist() + b[:, 0].tolist()) == sorted(order[8 * step:8 * step + 8])
    # resumed at sample 16 on one worker of 3 rows: the same order from sample 16 on
    cfg3 = small_cfg(tmp_path, data__batch_size=3)
    seen = [i for b in local_batches(rows, cfg3, 0, 16, 0, 1) for i in b[:, 0].tolist()]
    assert seen == order[16:16 + len(seen)] and len(seen) == 24


def test_ray_loader_skips_its_share_of_the_samples_across_batch_boundaries():
    from sparsebk.train.ray_train.loop import _rebatch

    stream = (torch.arange(i, i + 4)[:, None] for i in range(0, 20, 4))  # batches of 4 rows
    out = list(_rebatch(stream, 6, 3))  # skip 6 rows, batches of 3, the short last one dropped
    assert [b[:, 0].tolist() for b in out] == [[6, 7, 8], [9, 10, 11], [12, 13, 14],
                                               [15, 16, 17]]


def test_a_checkpoint_from_before_sample_positions_converts_its_batch_count(tmp_path):
    """Old checkpoints counted one worker's batches of their own shape: 3 batches of 8 rows
    on 2 workers are sample 48, whatever this run's shape."""
    from sparsebk.model.lm import SparseBKLM

    old = small_cfg(tmp_path, data__batch_size=8, run__num_workers=2).to_dict()
    t = Trainer(small_cfg(tmp_path), SparseBKLM(small_cfg(tmp_path).model),
                device=torch.device("cpu"))
    ckpt = {"extra": {"run_state": {"step": 3, "epoch": 1, "batch_in_epoch": 3}},
            "meta": {"train_config": old}}
    state = t._run_state(ckpt)
    assert (state.step, state.epoch, state.sample_in_epoch, state.batch_in_epoch) == (3, 1, 48, 12)


def fit_recording(cfg, rows, valid, resume_from=None) -> tuple[Trainer, list, list]:
    """A Trainer fit on `rows`; returns it, the sample ids of each step and its checkpoints."""
    torch.manual_seed(0)
    from sparsebk.model.lm import SparseBKLM

    saved, seen = [], []

    def reporter(metrics, directory):
        if directory is not None:
            dst = Path(cfg.run.run_dir) / f"ckpt-{metrics['step']}-{len(saved)}"
            import shutil

            shutil.copytree(directory, dst)
            saved.append(dst)

    t = Trainer(cfg, SparseBKLM(cfg.model), device=torch.device("cpu"), valid=valid,
                reporter=reporter)
    sched = t.restore(resume_from) if resume_from is not None else None
    t.schedule = LocalSchedule(cfg.schedule, cfg.model.n_layers, sched)

    def batches(epoch, start):
        for b in local_batches(rows, cfg, epoch, start, 0, 1):
            seen.append((epoch, b[:, 0].tolist()))
            yield b

    assert t.fit(batches) is None
    return t, seen, saved


@pytest.mark.usefixtures("one_torch_thread")
def test_a_resume_with_another_batch_size_continues_at_the_same_sample(tmp_path):
    rows, valid = indexed_rows(), indexed_rows(16)
    a, seen_a, saved_a = fit_recording(small_cfg(tmp_path), rows, valid)  # 10 steps of 4 rows
    assert (a.state.epoch, a.state.sample_in_epoch) == (0, 40)  # 40 rows: one whole epoch
    step5 = read_state(*_local(saved_a[0]))
    assert step5["step"] == 5 and step5["data_position"]["sample_in_epoch"] == 20
    # resumed at step 5 with batches of 2 rows: steps 6..15 take the 20 rows A took in 6..10
    cfg_b = small_cfg(tmp_path, data__batch_size=2, optim__max_steps=15)
    b, seen_b, _ = fit_recording(cfg_b, rows, valid, resume_from=saved_a[0])
    after = [i for e, ids in seen_a[5:] for i in ids]
    assert [i for e, ids in seen_b for i in ids] == after and len(after) == 20
    assert (b.state.step, b.state.epoch, b.state.sample_in_epoch) == (15, 0, 40)


def _local(path):
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem(), str(path)


# --- real runs ------------------------------------------------------------------------------
def tiny(workdir: Path, name: str, *overrides: str):
    return load_config(TINY, [f"data.dir={workdir / 'data' / 'tiny'}",
                              f"run.storage_path={workdir / 'runs'}", f"run.name={name}",
                              "run.plots=false", "optim.warmup_steps=1", *overrides])


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_resume_fewer_workers_truncated_latest_then_a_refused_shape(tmp_path, ray_local, caplog):
    """2 workers to step 4 (checkpoints at 2 and 4); the step-4 state.pt cut in half; the run
    again with 1 worker and 6 steps: the driver and the worker fall back to step 2 with a
    warning naming the bad one, the diff is logged, the data position continues in samples;
    then a changed model shape is refused before any worker starts."""
    from sparsebk.train.ray_train.driver import run_training

    base = ("run.eval_every=2", "run.log_every=2")
    run_training(tiny(tmp_path, "r", "optim.max_steps=4", *base))
    fs, run_path = _local(tmp_path / "runs" / "r")
    newest = list_checkpoints(fs, run_path)[0]
    assert read_state(fs, newest)["step"] == 4
    state_file = Path(newest) / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[: state_file.stat().st_size // 2])

    caplog.set_level("INFO", logger="sparsebk.train")
    summary = run_training(tiny(tmp_path, "r", "optim.max_steps=6", "run.num_workers=1", *base))
    assert summary["steps"] == 6
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(os.path.basename(newest) in m and "unreadable" in m for m in warned), warned
    info = "\n".join(r.getMessage() for r in caplog.records)
    assert "run.num_workers: 2 -> 1" in info and "optim.max_steps: 4 -> 6" in info
    latest = read_state(fs, list_checkpoints(fs, run_path)[0])
    # step 2 on 2 workers of 8 rows (32 samples), then 4 steps on 1 worker (32 more)
    assert latest["step"] == 6 and latest["data_position"]["sample_in_epoch"] == 64

    before = list_checkpoints(fs, run_path)
    t0 = time.perf_counter()
    with pytest.raises(ResumeRefused) as err:
        run_training(tiny(tmp_path, "r", "optim.max_steps=8", "model.n_layers=3", *base))
    assert time.perf_counter() - t0 < 120
    msg = str(err.value)
    assert "model.n_layers: 2 -> 3" in msg and "run.name=r-2" in msg
    assert "(--set model.n_layers=2)" in msg  # what puts the checkpoint's value back
    assert "optim.max_steps" not in msg.split("Settings that may change")[0]
    assert list_checkpoints(fs, run_path) == before  # no worker trained


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_preflight_fails_fast_naming_the_node_and_the_path(tmp_path, ray_local):
    import ray

    from sparsebk.data.prepare import prepare_dataset
    from sparsebk.train.ray_train.preflight import PreflightError, check_nodes

    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"a b c d e f g {i}\n" for i in range(200)))  # distinct lines: every split gets some
    data = prepare_dataset(tmp_path / "data", corpus="text", text=str(text), tokenizer="word",
                           block_len=4)
    storage = tmp_path / "runs"
    assert check_nodes(str(storage), str(data)) == 1
    assert not any((storage / ".sparsebk-preflight").iterdir())  # the probe object deleted
    node = ray.nodes()[0]["NodeID"][:12]

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for storage_path, data_dir, bad in ((str(storage), str(tmp_path / "missing"), "missing"),
                                        (str(blocker / "runs"), str(data), "a-file/runs")):
        t0 = time.perf_counter()
        with pytest.raises(PreflightError) as err:
            check_nodes(storage_path, data_dir)
        assert time.perf_counter() - t0 < 30
        msg = str(err.value)
        assert node in msg and bad in msg, msg


# --- ranks that read different checkpoints agree on one -----------------------------------------

class _Reader:
    """The worker side of a Trainer, as restore_with_fallback sees it (rank, world, device,
    restore): restores the step written in the checkpoint, except the steps this rank is told
    cannot be read (a store that fails one worker's read under load)."""

    def __init__(self, rank: int, world: int, unreadable: set[int]):
        self.rank, self.world, self.device, self.unreadable = rank, world, torch.device("cpu"), unreadable

    def restore(self, directory) -> dict:
        step = int((Path(directory) / "step.txt").read_text())
        if step in self.unreadable:
            raise OSError(f"PytorchStreamReader failed reading step {step} (simulated on rank {self.rank})")
        return {"step": step}


def _agree_worker(rank: int, world: int, init_file: str, cases: list, out: str):
    """Every case in one process group: each case is (run_dir, unreadable per rank)."""
    import json

    import torch.distributed as dist
    from ray.train import Checkpoint

    from sparsebk.parallel import leave_worker
    from sparsebk.train.ray_train.restore import restore_with_fallback

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for i, (run_dir, unreadable) in enumerate(cases):
            newest = Checkpoint(list_checkpoints(*_local(run_dir))[0])
            try:
                got = restore_with_fallback(_Reader(rank, world, set(unreadable[rank])), newest)
            except RuntimeError as e:
                got = {"error": str(e)}
            Path(out, f"case{i}-rank{rank}.json").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()
    leave_worker()


AGREE_CASES = [
    ([[], [3]], {"step": 2}),  # rank 1 cannot read the newest: both restore step 2
    ([[3, 2], [1]], None),  # no step both can read: both stop with the same error, no hang
]


def test_ranks_that_read_different_checkpoints_restore_the_same_one(tmp_path):
    """Both cases in one pair of spawned processes (each spawn costs seconds of imports)."""
    import json

    import torch.multiprocessing as mp

    cases = []
    for i, (unreadable, _) in enumerate(AGREE_CASES):
        run = tmp_path / f"run{i}"
        for step in (1, 2, 3):  # checkpoint names sort by time, as Ray's
            d = run / f"checkpoint_2026-11-30_00-00-0{step}.000000"
            d.mkdir(parents=True)
            (d / "step.txt").write_text(str(step))
        cases.append((str(run), unreadable))
    mp.start_processes(_agree_worker, args=(2, str(tmp_path / "pg"), cases, str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    for i, (unreadable, want) in enumerate(AGREE_CASES):
        got = [json.loads((tmp_path / f"case{i}-rank{r}.json").read_text()) for r in range(2)]
        if want is not None:
            assert got == [want, want], (unreadable, got)
        else:
            # each rank names the oldest checkpoint and its own last error
            assert all("no readable checkpoint on every worker" in g["error"]
                       and "00-00-01.000000" in g["error"] for g in got), (unreadable, got)
