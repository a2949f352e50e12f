"""A sweep folder is data, never code (issue 26), and ASHA compares trials by training step.

`sparsebk report` reads a crafted sweep folder whose every pickle (Tune's experiment
snapshot, tuner.pkl, the searcher's state, a trial's params.pkl/error.pkl) would write a
marker file when unpickled: the report is written and the marker never appears. Resuming a
sweep whose folder others could have written is refused before anything is unpickled.
No Ray cluster is started here.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from sparsebk.tune.config import SweepConfig, load_sweep_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "ray_jobs" / "configs" / "tiny.yaml"
FALLBACK = "CLOUDPICKLE_FALLBACK"  # Tune's marker of a pickle embedded in its JSON


class _Payload:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


def payload(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker))


def embedded(marker: Path) -> dict:
    return {"_type": FALLBACK, "value": payload(marker).hex()}


def trial_entry(marker: Path, trial_id: str, status: str, config: dict, folder: str | None,
                failures: int = 0, error_file: str | None = None) -> list[str]:
    """One `trial_data` item as Tune 2.60 writes it (Trial.get_json_state): the trial's state
    and its run metadata, each a JSON document; the fields Tune cannot store as JSON are
    cloudpickle, hex-encoded or as an embedded fallback object (all payloads here)."""
    hexed = payload(marker).hex()
    state = {"trainable_name": "run_trial", "trial_id": trial_id, "status": status,
             "config": config, "relative_logdir": folder, "storage": embedded(marker),
             "results": hexed, "extra_arg": hexed, "placement_group_factory": hexed,
             "_resources": hexed, "_default_placement_group_factory": hexed}
    meta = {"num_failures": failures, "error_filename": error_file,
            "pickled_error_filename": "error.pkl" if error_file else None,
            "last_result": {}, "checkpoint_manager": embedded(marker)}
    return [json.dumps(state), json.dumps(meta)]


def write_snapshot(sweep: Path, marker: Path, entries: list) -> Path:
    f = sweep / "experiment_state-2026-12-01_00-00-00.json"
    f.write_text(json.dumps({"trial_data": entries, "stats": {},
                             "runner_data": {"_stopper": embedded(marker)}}))
    return f


def result_rows(*rows: dict) -> str:
    return "".join(json.dumps({**r, "config": {"lr": 1.0}, "training_iteration": i + 1}) + "\n"
                   for i, r in enumerate(rows))


def evaluation(step: int, val_loss: float, sparsity: float, **extra) -> dict:
    return {"step": step, "val_loss": val_loss, "val_ppl": math.exp(val_loss),
            "sparsity": sparsity, "target_sparsity": sparsity, "tokens_per_s": 100.0, **extra}


@pytest.fixture
def crafted_sweep(tmp_path):
    """A sweep folder of four trials (completed, early-stopped, failed, never started) plus
    one whose snapshot points outside the folder; every pickle in it is a payload."""
    marker = tmp_path / "payload-ran"
    sweep = tmp_path / "sweeps" / "crafted"
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps(
        {"name": "crafted", "space": ["lr"], "sparsity_levels": [0.2, 0.5], "last_k": 1}))
    for name in ("tuner.pkl", "basic-variant-state-2026-12-01_00-00-00.json",
                 "searcher-state-2026-12-01_00-00-00.pkl"):
        (sweep / name).write_bytes(payload(marker))
    trials = {  # id: (status, lr, folder, failures, error file, reports)
        "t_00000": ("TERMINATED", 1e-3, "run_trial_t_00000", 0, None,
                    [evaluation(5, 3.0, 0.25), evaluation(10, 2.5, 0.3, test_loss=2.6)]),
        "t_00001": ("TERMINATED", 1e-7, "run_trial_t_00001", 0, None, [evaluation(5, 5.0, 0.1)]),
        "t_00002": ("ERROR", 3e-3, "run_trial_t_00002", 2, "error.txt", []),
        "t_00003": ("PENDING", 2e-3, None, 0, None, []),
        "t_00004": ("TERMINATED", 5e-3, "../outside", 0, "../outside/error.txt", []),
    }
    outside = tmp_path / "sweeps" / "outside"
    outside.mkdir()
    (outside / "result.json").write_text(result_rows(evaluation(5, 0.1, 0.9)))
    entries = []
    for tid, (status, lr, folder, failures, err, reports) in trials.items():
        entries.append(trial_entry(marker, tid, status, {"lr": lr}, folder, failures, err))
        if folder is None or "/" in folder:
            continue
        d = sweep / folder
        d.mkdir()
        (d / "params.json").write_text(json.dumps({"lr": lr}))
        (d / "params.pkl").write_bytes(payload(marker))
        (d / "result.json").write_text(result_rows(*reports))
        if err:
            (d / err).write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                                 "RuntimeError: injected failure at step 3\n")
            (d / "error.pkl").write_bytes(payload(marker))
    status_dir = sweep / "trial_status"
    status_dir.mkdir()
    (status_dir / "t_00000.json").write_text(json.dumps({"trial_id": "t_00000", "step": 10}))
    for tid, n in (("t_00000", 1), ("t_00001", 1), ("t_00002", 2)):
        (status_dir / f"{tid}.attempts").write_text("1.0 pid=1\n" * n)
    write_snapshot(sweep, marker, entries)
    return sweep, marker


def test_payloads_are_live(crafted_sweep):
    """The control: Tune's own reader of a sweep folder runs the snapshot's payload."""
    from ray.tune import ExperimentAnalysis

    sweep, marker = crafted_sweep
    try:
        ExperimentAnalysis(str(sweep))
    except Exception:  # noqa: BLE001 - the stub trials need not load: the payload ran first
        pass
    assert marker.is_file()


def test_report_of_a_crafted_sweep_unpickles_nothing(crafted_sweep, capsys):
    from sparsebk.tune.report import main as report_main

    sweep, marker = crafted_sweep
    assert report_main([str(sweep)]) == 0
    assert not marker.exists()
    assert "# Sweep report: crafted" in capsys.readouterr().out
    df = pd.read_csv(sweep / "report" / "results.csv").set_index("trial_id")
    assert df["stop_reason"].to_dict() == {
        "t_00000": "completed", "t_00001": "early_stopped", "t_00002": "error",
        "t_00003": "unfinished", "t_00004": "early_stopped"}
    assert df.loc["t_00000", "best_val_loss"] == 2.5 and df.loc["t_00000", "last_step"] == 10
    assert df.loc["t_00000", "evaluations"] == 2 and df.loc["t_00001", "evaluations"] == 1
    assert df.loc["t_00002", "error"] == "RuntimeError: injected failure at step 3"
    assert df.loc["t_00002", "failures"] == 2 and df.loc["t_00002", "attempts"] == 2
    assert df["lr"].to_dict()["t_00003"] == 2e-3  # the sampled config of a trial never started
    # a folder or error file named outside the sweep folder is not read
    assert df.loc["t_00004", "evaluations"] == 0 and pd.isna(df.loc["t_00004", "error"])
    md = (sweep / "report" / "report.md").read_text()
    assert "Densest trial (baseline): `t_00000`" in md and "| 0.50 | none reached it |" in md


def test_report_refuses_a_trial_id_that_is_a_path(tmp_path, capsys):
    from sparsebk.tune.report import main as report_main

    marker = tmp_path / "payload-ran"
    sweep = tmp_path / "crafted"
    sweep.mkdir()
    f = write_snapshot(sweep, marker, [trial_entry(marker, "../../x", "TERMINATED", {}, None)])
    assert report_main([str(sweep)]) == 2
    out = capsys.readouterr().out
    assert str(f) in out and "'../../x' is not a Tune trial id" in out, out
    assert not marker.exists() and not (sweep / "report").exists()


# ---------------------------------------------------------------- resuming a sweep

SWEEP = f"""
name: ok
train_config: {TINY}
train_overrides: [optim.max_steps=20, run.eval_every=5]
storage_path: STORE
space:
  loss_type: {{choice: [l2, adaptive]}}
"""


@pytest.fixture
def stored_sweep(tmp_path):
    """A prepared sweep whose folder holds this sweep's sweep.json (so a run resumes it) and
    Tune state that runs a payload when unpickled; nobody else can write any of it."""
    from sparsebk.tune.sweep import _sweep_record, prepare_sweep

    f = tmp_path / "ok.yaml"
    f.write_text(SWEEP.replace("STORE", str(tmp_path / "store")))
    prep = prepare_sweep(load_sweep_config(f), check_data=False)
    marker = tmp_path / "payload-ran"
    sweep = prep.sweep_dir
    sweep.mkdir(parents=True, mode=0o755)
    (sweep / "sweep.json").write_text(json.dumps(_sweep_record(prep), indent=2, default=str))
    (sweep / "tuner.pkl").write_bytes(payload(marker))
    write_snapshot(sweep, marker, [trial_entry(marker, "t_00000", "RUNNING", {}, "run_t")])
    ckpt = sweep / "train_runs" / "t_00000" / "checkpoint_1"
    ckpt.mkdir(parents=True)
    (ckpt / ".metadata").write_bytes(payload(marker))  # torch DCP reads it with pickle
    for p in [sweep, *sweep.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    tmp_path.joinpath("store").chmod(0o755)
    return prep, marker


def _make_foreign(path: Path):
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    os.chown(path, 4242, 4242)


def _symlink(path: Path):
    path.unlink()
    path.symlink_to(path.parent / "experiment_state-2026-12-01_00-00-00.json")


CRAFTS = {  # name: (edit of the stored sweep, the path named, why)
    "world-writable state file": (
        lambda s: (s / "experiment_state-2026-12-01_00-00-00.json").chmod(0o666),
        "experiment_state-2026-12-01_00-00-00.json", "is writable by group or others"),
    "group-writable checkpoint folder": (
        lambda s: (s / "train_runs" / "t_00000" / "checkpoint_1").chmod(0o775),
        "checkpoint_1", "is writable by group or others (drwxrwxr-x 0775)"),
    "world-writable sweep folder": (lambda s: s.chmod(0o777), "ok", "is writable by group"),
    "tuner.pkl owned by another user": (
        lambda s: _make_foreign(s / "tuner.pkl"), "tuner.pkl", "is owned by uid 4242"),
    "tuner.pkl a symbolic link": (lambda s: _symlink(s / "tuner.pkl"), "tuner.pkl",
                                  "is a symbolic link"),
    "parent writable by all, not sticky": (
        lambda s: s.parent.chmod(0o777), "store", "without the sticky bit (drwxrwxrwx 0777)"),
}


@pytest.mark.parametrize("craft", list(CRAFTS))
def test_resume_is_refused_before_anything_is_unpickled(stored_sweep, craft):
    from sparsebk.tune.sweep import run_sweep

    prep, marker = stored_sweep
    edit, named, why = CRAFTS[craft]
    edit(prep.sweep_dir)
    with pytest.raises(ValueError) as e:
        run_sweep(prep.cfg, prepared=prep)
    msg = str(e.value)
    assert not marker.exists()
    assert "\n" not in msg and msg.startswith(f"{prep.cfg.source}: refusing to resume the "
                                              f"sweep in {prep.sweep_dir}: "), msg
    assert named in msg and why in msg and "SPARSEBK_TRUST_SWEEP_STATE=1" in msg, msg


def test_a_private_folder_passes_and_a_sticky_parent_too(stored_sweep, monkeypatch):
    from sparsebk.tune.sweep import check_restorable, untrusted_state

    prep, marker = stored_sweep
    assert untrusted_state(prep.sweep_dir) is None
    prep.sweep_dir.parent.chmod(0o1777)  # as /tmp and the launcher's shared mount
    assert untrusted_state(prep.sweep_dir) is None
    prep.sweep_dir.chmod(0o777)
    monkeypatch.setenv("SPARSEBK_TRUST_SWEEP_STATE", "1")  # the explicit opt-in
    check_restorable(prep.sweep_dir, "w")
    assert not marker.exists()


def test_resume_from_a_uri_needs_the_opt_in(monkeypatch):
    from sparsebk.tune.sweep import check_restorable

    monkeypatch.delenv("SPARSEBK_TRUST_SWEEP_STATE", raising=False)
    with pytest.raises(ValueError, match="who can write a bucket cannot be checked"):
        check_restorable("s3://bucket/sweeps/x", "sweep.yaml")
    monkeypatch.setenv("SPARSEBK_TRUST_SWEEP_STATE", "1")
    check_restorable("s3://bucket/sweeps/x", "sweep.yaml")


# ---------------------------------------------------------------- ASHA by training step

def _cfg(grace: int = 1, rf: int = 2) -> SweepConfig:
    return SweepConfig.from_dict({
        "name": "s", "train_config": "t.yaml", "space": {"loss_type": {"choice": ["l2", "kl"]}},
        "asha": {"enabled": True, "grace_period": grace, "reduction_factor": rf}})


def _rungs(sched) -> list[int]:
    return sorted(m for m, _ in sched._brackets[0]._rungs)


@pytest.mark.parametrize("eval_every", [1, 5, 7])
@pytest.mark.parametrize("rf", [2, 3, 4])
@pytest.mark.parametrize("grace", [1, 2, 3])
def test_asha_rungs_in_steps_are_the_same_evaluations(grace, rf, eval_every):
    """Rungs that a trial can reach (evaluation k at step k * eval_every) sit at the same
    evaluations as the former count of reports did, for every horizon up to 12."""
    from ray.tune.schedulers import ASHAScheduler

    from sparsebk.tune.sweep import trial_scheduler

    for evals in range(1, 13):
        new = trial_scheduler(_cfg(grace, rf), evals, eval_every)
        assert new._time_attr == "step"
        assert new._max_t == max(evals, grace) * eval_every + 1
        by_count = ASHAScheduler(time_attr="training_iteration", max_t=max(evals, grace) + 1,
                                 grace_period=grace, reduction_factor=rf)
        assert [m for m in _rungs(new) if m <= evals * eval_every] == \
            [m * eval_every for m in _rungs(by_count) if m <= evals]


def test_asha_compares_a_retried_trial_at_its_real_step():
    """A trial fails after its step-5 evaluation and is retried: its Train run resumes from
    the step-5 checkpoint and reports step 10 while Tune counts that report as iteration 1
    again. ASHA records it at the step-10 rung, beside its peers' step-10 values."""
    from sparsebk.tune.sweep import trial_scheduler

    sched = trial_scheduler(_cfg(), 4, 5)  # evaluations at steps 5, 10, 15, 20
    assert _rungs(sched) == [5, 10, 20]
    peer, retried = SimpleNamespace(trial_id="peer"), SimpleNamespace(trial_id="retried")
    for t in (peer, retried):
        sched.on_trial_add(None, t)

    def report(t, step, it, loss):
        return sched.on_trial_result(None, t, {"step": step, "training_iteration": it,
                                               "val_loss": loss})

    assert report(peer, 5, 1, 3.0) == "CONTINUE"
    assert report(retried, 5, 1, 2.9) == "CONTINUE"
    # the retry: the Train run resumes at step 5; Tune's iteration restarts at 1
    assert report(retried, 10, 1, 2.5) == "CONTINUE"
    rungs = {m: r for m, r in sched._brackets[0]._rungs}
    assert rungs[5] == {"peer": -3.0, "retried": -2.9} and rungs[10] == {"retried": -2.5}
    # the peer's step-10 value meets the retried trial's step-10 value, not a later one
    assert report(peer, 10, 2, 2.7) == "STOP"
    assert rungs[10] == {"retried": -2.5, "peer": -2.7}


def test_prepared_sweep_gives_asha_its_evaluation_spacing(tmp_path):
    from sparsebk.tune.sweep import prepare_sweep, trial_scheduler

    f = tmp_path / "ok.yaml"
    f.write_text(SWEEP.replace("STORE", str(tmp_path / "store")))
    prep = prepare_sweep(load_sweep_config(f), check_data=False)
    assert (prep.max_t, prep.eval_every) == (4, 5)  # max_steps 20, an evaluation every 5
    sched = trial_scheduler(prep.cfg, prep.max_t, prep.eval_every)
    assert sched._time_attr == "step" and sched._max_t == 21 and _rungs(sched) == [5, 10, 20]
