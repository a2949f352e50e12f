"""Ray Tune sweeps of the `tiny` preset (1 worker per trial) on a local Ray.

Two sweeps, each started once per module: an ASHA sweep whose points include a trial that
raises (retried once, then recorded), a trial that fails once after its first evaluation
(retried: it resumes from its checkpoint and completes) and two slow learners for ASHA to
stop; and a sweep that is interrupted after its first trial and resumed. Results are checked
against what the trials' own Train runs wrote (metrics.jsonl) and the Pareto definition, not
against the sweep's own numbers.
"""

from __future__ import annotations

import json
import math
import os
import signal
import warnings
from pathlib import Path

import pandas as pd
import pytest
from ray import tune

from sparsebk.tune.config import load_sweep_config
from sparsebk.tune.pareto import dominates
from sparsebk.tune.results import collect_trials
from sparsebk.tune.sweep import run_sweep
from sparsebk.tune.trial import attempts_file

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "ray_jobs" / "configs" / "tiny.yaml"
TRAIN_OVERRIDES = ["run.num_workers=1", "run.max_failures=0", "run.plots=false",
                   "run.eval_batches=1", "data.loader=local",
                   f"data.dir={REPO / 'data' / 'tiny-bytes'}"]


def write_sweep(tmp: Path, name: str, text: str) -> Path:
    f = tmp / f"{name}.yaml"
    f.write_text(text)
    return f


@pytest.fixture(scope="module")
def ray_fast(ray_local):
    """The module's local Ray (its Train controller polls workers every 0.2 s: conftest)."""
    return ray_local


# ---------------------------------------------------------------- bad configs (no Ray)

def _bad(tmp_path, body: str, *match: str):
    from sparsebk.tune import cli

    f = write_sweep(tmp_path, "bad", body)
    store = tmp_path / "store"
    with pytest.raises(ValueError) as e:
        load_and_prepare(f)
    for m in (str(f), *match):
        assert m in str(e.value), str(e.value)
    assert cli.main(["--config", str(f)]) == 2
    assert not store.exists()  # nothing started, nothing written


def load_and_prepare(f):
    from sparsebk.tune.sweep import prepare_sweep

    return prepare_sweep(load_sweep_config(f), check_data=False)


GOOD = f"""
name: ok
train_config: {TINY}
storage_path: STORE
space:
  loss_type: {{choice: [l2, adaptive]}}
"""


@pytest.mark.parametrize("edit, match", [
    (("storage_path: STORE", "storage_path: STORE\nsurprise: 1"), ["unknown field", "surprise"]),
    (("space:", "search: {algorithm: bayes}\nspace:"), ["search.algorithm", "bayes"]),
    (("{choice: [l2, adaptive]}", "{choice: [l2, l3]}"),
     ["space.loss_type", "model.sparsity_loss_type", "'l3'"]),
    (("{choice: [l2, adaptive]}", "{loguniform: [0.0, 0.1]}"), ["space.loss_type.loguniform", "> 0"]),
    (("  loss_type:", "  final_sparsity: {uniform: [0.2, 1.5]}\n  loss_type:"),
     ["space.final_sparsity", "schedule.final_sparsity", "1.5"]),
    (("  loss_type:", "  accuracy_weight: {choice: [-0.5, 1.0]}\n  loss_type:"),
     ["space.accuracy_weight", "model.accuracy_weight", "-0.5"]),
    (("  loss_type:", "  dropout: {uniform: [0.0, 0.2]}\n  loss_type:"),
     ["space.dropout", "key:"]),
    (("space:", "search: {algorithm: grid}\nspace:"), ["space.loss_type", "grid"]),
    (("storage_path: STORE", "storage_path: STORE\nreport_path: ftp://host/reports"),
     ["report_path", "ftp"]),
    (("storage_path: STORE", "storage_path: STORE\ntrain_overrides: [optim.lr=-1]"),
     ["train_config/train_overrides", "optim.lr"]),
    (("  loss_type:", "  window: {key: data.shuffle_window, choice: [0, 64]}\n  loss_type:"),
     ["space.window", "data.shuffle_window", "0"]),
])
def test_bad_sweep_config_fails_before_any_trial(tmp_path, edit, match):
    body = GOOD.replace(*edit).replace("STORE", str(tmp_path / "store"))
    _bad(tmp_path, body, *match)


# ---------------------------------------------------------------- the ASHA sweep

ASHA_SWEEP = f"""
name: asha
train_config: {TINY}
train_overrides: {json.dumps(TRAIN_OVERRIDES + ["optim.max_steps=20", "run.eval_every=5",
                                                 "optim.max_bad_steps=1"])}
storage_path: STORE
search:
  algorithm: random
  num_samples: 5
  points_to_evaluate:
    - {{lr: 3.0e-3, loss_type: l2, inject_faults: ["raise@7"]}}
    - {{lr: 3.0e-3, loss_type: adaptive, inject_faults: ["raise@2", "raise@3"]}}
    - {{lr: 1.0e-7, loss_type: l2, inject_faults: []}}
    - {{lr: 1.0e-7, loss_type: adaptive, inject_faults: []}}
    - {{lr: 2.0e-3, loss_type: l2, inject_faults: ["nan@3"]}}
space:
  lr: {{choice: [3.0e-3, 2.0e-3, 1.0e-7]}}
  loss_type: {{choice: [l2, adaptive]}}
  inject_faults: {{key: run.inject_faults, choice: [[], ["raise@2", "raise@3"], ["nan@3"], ["raise@7"]]}}
  tau: 1.0
asha: {{enabled: true, grace_period: 1, reduction_factor: 2}}
max_concurrent_trials: null
max_retries: 1
sparsity_levels: [0.1, 0.2, 0.9]
last_k: 2
"""


@pytest.fixture(scope="module")
def asha_sweep(ray_fast, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("asha")
    f = write_sweep(tmp, "asha", ASHA_SWEEP.replace("STORE", str(tmp / "store")))
    summary = run_sweep(load_sweep_config(f))
    df = pd.read_csv(Path(summary["sweep_dir"]) / "report" / "results.csv")
    by_key = {(r.lr, r.loss_type): r for r in df.itertuples()}
    return summary, df, by_key


def _train_evals(sweep_dir: Path, trial_id: str) -> list[dict]:
    """The evaluations the trial's own Train run wrote (last record per step)."""
    recs = {}
    for line in (sweep_dir / "train_runs" / trial_id / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "eval":
            recs[r["step"]] = r
    return [recs[k] for k in sorted(recs)]


def _error_trace(sweep_dir: Path, trial_id: str) -> str:
    """The text trace Tune stored for the trial's last failed attempt ('' when none failed)."""
    found = [f.read_text(errors="replace")
             for f in sweep_dir.glob(f"run_trial_{trial_id}_*/error.txt")]
    return "\n".join(found)


def test_asha_sweep_finishes_and_stops_a_trial_early(asha_sweep):
    summary, df, by_key = asha_sweep
    sweep_dir = Path(summary["sweep_dir"])
    assert len(df) == 5 and summary["resumed"] is False
    good = by_key[(3e-3, "l2")]
    assert good.stop_reason == "completed" and good.evaluations == 4 and good.last_step == 20
    slow = [by_key[(1e-7, "l2")], by_key[(1e-7, "adaptive")]]
    stopped = [r for r in slow if r.stop_reason == "early_stopped"]
    assert stopped, df[["trial_id", "lr", "stop_reason", "evaluations"]]
    assert all(r.evaluations < 4 and r.best_val_loss > good.best_val_loss for r in stopped)
    # each trial ran its own Train run; the table agrees with what that run wrote
    for r in df.itertuples():
        if r.stop_reason in ("error", "stopped"):
            continue
        evals = _train_evals(sweep_dir, r.trial_id)
        assert len(evals) >= r.evaluations
        seen = evals[:r.evaluations]
        assert r.best_val_loss == pytest.approx(min(e["val_loss"] for e in seen))
        assert r.achieved_sparsity == pytest.approx(
            sum(e["sparsity"] for e in seen[-2:]) / len(seen[-2:]))
        assert r.target_sparsity_final == pytest.approx(seen[-1]["target_sparsity"])


def test_nan_trial_is_recorded_as_stopped_and_kept_out_of_the_front(asha_sweep):
    summary, df, by_key = asha_sweep
    nan = by_key[(2e-3, "l2")]
    # Tune saw a trial that returned (TERMINATED); its Train run stopped on the NaN loss
    assert nan.status == "TERMINATED" and nan.stop_reason == "stopped"
    assert "non-finite" in nan.stop_detail and nan.attempts == 1 and nan.failures == 0
    stopped = json.loads((Path(summary["sweep_dir"]) / "train_runs" / nan.trial_id
                          / "stopped.json").read_text())
    assert stopped["step"] == 3 and stopped["reason"] == nan.stop_detail
    out = Path(summary["sweep_dir"]) / "report"
    assert nan.trial_id not in set(pd.read_csv(out / "pareto.csv")["trial_id"])
    assert all(r.stop_detail == "" or pd.isna(r.stop_detail)
               for r in df.itertuples() if r.trial_id != nan.trial_id)


def test_sweep_leaves_no_placement_group_behind(asha_sweep):
    """More trials than the module's 4 CPUs hold at once (5 x 1 worker + ASHA stops): the
    stopped trials' worker groups were removed while the sweep ran (it finished), and none
    is live afterwards (GCS's own table: this module's Ray runs without a dashboard)."""
    import ray

    summary, df, _ = asha_sweep
    assert (df["stop_reason"] == "early_stopped").any()
    assert summary["placement_groups_left"] == []
    live = {k: v["state"] for k, v in ray.util.placement_group_table().items()
            if v["state"] in ("CREATED", "PENDING", "PREPARED", "RESCHEDULING")}
    assert live == {}, live


def test_failing_trial_is_retried_then_recorded(asha_sweep):
    summary, df, by_key = asha_sweep
    bad = by_key[(3e-3, "adaptive")]
    assert bad.status == "ERROR" and bad.stop_reason == "error"
    assert "injected failure at step 3" in bad.error  # the retry got past step 2, then failed
    assert bad.failures == 2 and bad.attempts == 2  # max_retries: 1 -> two attempts, both failed
    assert len(attempts_file(summary["sweep_dir"], bad.trial_id).read_text().splitlines()) == 2
    good = by_key[(3e-3, "l2")]  # failed once at step 7, after its step-5 evaluation
    assert good.failures == 1 and good.attempts == 2 and good.stop_reason == "completed"
    # No injected fault reached another trial. One of them may still have been retried for a
    # cause outside this test (CI once saw one retried, cause not recorded): that is what
    # max_retries is for, so it warns with the cause rather than failing, provided the
    # attempts log and Tune's count agree and the trial finished.
    for r in df.itertuples():
        if r.trial_id in (bad.trial_id, good.trial_id):
            continue
        trace = _error_trace(Path(summary["sweep_dir"]), r.trial_id)
        assert "injected failure" not in trace, (r.trial_id, trace[-2000:])
        assert r.attempts == r.failures + 1 and r.status == "TERMINATED", \
            (r.trial_id, r.status, r.attempts, r.failures, trace[-2000:])
        if r.failures:
            warnings.warn(f"trial {r.trial_id} (lr {r.lr}, {r.loss_type}) was retried "
                          f"{r.failures} time(s), not by this test: {trace[-1500:]}")
    assert summary["trials"] == {"OK": 4, "ERROR": 1}  # the sweep went on and finished


def test_retried_trial_reports_its_real_step(asha_sweep):
    """The retried trial's Train run resumed from its step-5 checkpoint: the reports Tune
    logged go on at step 10 while Tune's own count restarted at 1 (ASHA uses the step)."""
    summary, df, by_key = asha_sweep
    good = by_key[(3e-3, "l2")]
    [trial_dir] = Path(summary["sweep_dir"]).glob(f"run_trial_{good.trial_id}_*")
    rows = [json.loads(x) for x in (trial_dir / "result.json").read_text().splitlines()]
    assert [(r["step"], r["training_iteration"]) for r in rows] == \
        [(5, 1), (10, 1), (15, 2), (20, 3)]
    assert [e["step"] for e in _train_evals(Path(summary["sweep_dir"]), good.trial_id)] == \
        [5, 10, 15, 20]


def test_sweep_writes_tables_front_plots_and_report(asha_sweep):
    summary, df, _ = asha_sweep
    out = Path(summary["sweep_dir"]) / "report"
    pq = pd.read_parquet(out / "results.parquet")
    assert list(pq["trial_id"]) == list(df["trial_id"])
    assert pq["best_val_ppl"].tolist() == pytest.approx(df["best_val_ppl"].tolist(), nan_ok=True)
    for png in ("pareto.png", "sparsity_vs_target.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the front is exactly the non-dominated full-length trials (quadratic definition)
    ok = df[df["stop_reason"] == "completed"]
    assert len(ok) >= 1
    pts = {r.trial_id: (r.best_val_ppl, r.achieved_sparsity) for r in ok.itertuples()}
    want = {t for t, p in pts.items() if not any(dominates(q, p) for u, q in pts.items() if u != t)}
    front = pd.read_csv(out / "pareto.csv")
    assert set(front["trial_id"]) == want and set(pd.read_parquet(out / "pareto.parquet")
                                                  ["trial_id"]) == want
    md = (out / "report.md").read_text()
    dense = ok.loc[ok["achieved_sparsity"].idxmin()]
    assert f"Densest trial (baseline): `{dense.trial_id}`" in md
    lvl = ok[ok["achieved_sparsity"] >= 0.1]
    if len(lvl):
        best = lvl.loc[lvl["best_val_ppl"].idxmin()]
        cost = best.best_val_ppl - dense.best_val_ppl
        assert f"| 0.10 | `{best.trial_id}` |" in md and f"{cost:+.2f}" in md
    assert "| 0.90 | none reached it |" in md
    # `sparsebk report DIR` regenerates the same table from the stored results
    from sparsebk.tune.report import main as report_main

    assert report_main([summary["sweep_dir"], "--out", str(out.parent / "again")]) == 0
    again = pd.read_csv(out.parent / "again" / "results.csv")
    pd.testing.assert_frame_equal(again, df)


def test_sweep_report_written_to_a_bucket_and_read_back(asha_sweep, s3_bucket, capsys):
    """`sparsebk report SWEEP --out s3://...`: tables, front, plots and report.md go to a
    real S3 server through sparsebk.storage.store, and read back equal to the local report."""
    import io

    from sparsebk.storage.store import open_store
    from sparsebk.tune.report import main as report_main

    summary, df, _ = asha_sweep
    uri = s3_bucket("sweeps/asha/report")
    capsys.readouterr()
    assert report_main([summary["sweep_dir"], "--out", uri]) == 0
    printed = capsys.readouterr().out
    bucket = open_store(uri)
    pd.testing.assert_frame_equal(pd.read_csv(io.BytesIO(bucket.read_bytes("results.csv"))), df)
    local = Path(summary["sweep_dir"]) / "report"
    front = pd.read_parquet(io.BytesIO(bucket.read_bytes("pareto.parquet")))
    assert list(front["trial_id"]) == list(pd.read_csv(local / "pareto.csv")["trial_id"])
    for png in ("pareto.png", "sparsity_vs_target.png"):
        assert bucket.read_bytes(png)[:8] == b"\x89PNG\r\n\x1a\n"
    md = bucket.read_text("report.md")
    assert md == (local / "report.md").read_text() and md.strip() in printed
    assert f"report_md: {bucket.location('report.md')}" in printed


# ---------------------------------------------------------------- interrupt and resume

class InterruptOnce(tune.Callback):
    """Interrupts the driver (SIGUSR1: Tune saves its state and returns) when the first
    trial completes; a marker file keeps the restored copy of this callback quiet."""

    def __init__(self, marker: str):
        self.marker = marker

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGUSR1)


RESUME_SWEEP = f"""
name: resume
train_config: {TINY}
train_overrides: {json.dumps(TRAIN_OVERRIDES + ["optim.max_steps=10", "run.eval_every=5"])}
storage_path: STORE
search: {{algorithm: grid}}
space:
  lr: {{grid: [3.0e-3, 2.0e-3]}}
asha: {{enabled: false}}
max_concurrent_trials: 1
"""


def test_interrupted_sweep_resumes_and_runs_only_the_rest(ray_fast, tmp_path):
    f = write_sweep(tmp_path, "resume", RESUME_SWEEP.replace("STORE", str(tmp_path / "store")))
    cfg = load_sweep_config(f)
    marker = tmp_path / "interrupted"
    first = run_sweep(cfg, callbacks=[InterruptOnce(str(marker))], report=False)
    sweep_dir = Path(first["sweep_dir"])
    done_first = marker.read_text()
    before = {r.trial_id: r for r in collect_trials(sweep_dir)}
    assert before[done_first].stop_reason == "completed"
    assert sum(r.stop_reason == "completed" for r in before.values()) == 1

    second = run_sweep(cfg)
    assert second["resumed"] is True
    after = collect_trials(sweep_dir)
    assert len(after) == 2 and all(r.stop_reason == "completed" for r in after)
    assert {r.params["lr"] for r in after} == {3e-3, 2e-3}
    # the trial finished before the interruption did not run again
    assert len(attempts_file(sweep_dir, done_first).read_text().splitlines()) == 1
    for r in after:
        assert [e["step"] for e in _train_evals(sweep_dir, r.trial_id)] == [5, 10]
    assert (sweep_dir / "report" / "report.md").is_file()


# ---------------------------------------------------------------- pieces without trials

def test_max_concurrent_from_resources_and_workers_per_trial(tmp_path):
    from sparsebk.tune.sweep import max_concurrent

    prep = load_and_prepare(write_sweep(tmp_path, "c", GOOD.replace("STORE", str(tmp_path))))
    prep.num_workers, prep.cpus_per_worker, prep.use_gpu, prep.ray_data = 2, 1.0, False, True
    # 9 CPUs / (2 workers x 1 CPU + 0.01 for the trial + 1 for its Ray Data reads) = 2.99 -> 2
    assert max_concurrent(prep, {"CPU": 9.0}) == 2
    prep.ray_data = False  # data.loader: local reads in the workers: 9 / 2.01 -> 4
    assert max_concurrent(prep, {"CPU": 9.0}) == 4
    assert max_concurrent(prep, {"CPU": 1.0}) == 1  # never below one
    prep.num_workers, prep.cpus_per_worker, prep.use_gpu = 4, 2.0, True
    assert max_concurrent(prep, {"CPU": 100.0, "GPU": 8.0}) == 2  # GPUs bound it
    prep.cfg.max_concurrent_trials = 5
    assert max_concurrent(prep, {"CPU": 1.0}) == 5  # an explicit limit wins


def test_only_trials_reading_through_ray_data_reserve_a_cpu_for_it(tmp_path):
    """data.loader stream and local read in the workers; ray needs a CPU beside them."""
    for loader, ray_data in (("ray", True), ("local", False), ("stream", False)):
        body = GOOD.replace("STORE", str(tmp_path / "store")) + \
            f"train_overrides: [data.loader={loader}]\n"
        assert load_and_prepare(write_sweep(tmp_path, loader, body)).ray_data is ray_data


def test_optuna_multi_objective_suggests_inside_the_space(tmp_path):
    from sparsebk.tune.sweep import param_space, search_algorithm

    body = GOOD.replace("STORE", str(tmp_path)).replace("space:", "search: {algorithm: optuna}\nspace:")
    body += ("  sparsity_weight: {loguniform: [1.0e-3, 1.0e-1]}\n"
             "  faults: {key: run.inject_faults, choice: [[], [\"raise@2\"]]}\n")
    cfg = load_and_prepare(write_sweep(tmp_path, "o", body)).cfg
    alg = search_algorithm(cfg, 2)
    assert alg.metric == ["val_loss", "sparsity"] and alg.mode == ["min", "max"]
    assert alg.set_search_properties(None, None, param_space(cfg))
    for i in range(6):
        s = alg.suggest(f"t{i}")
        assert s["loss_type"] in ("l2", "adaptive")
        assert 1e-3 <= s["sparsity_weight"] <= 1e-1
        assert json.loads(s["faults"]) in ([], ["raise@2"])  # lists travel as JSON
        alg.on_trial_complete(f"t{i}", {"val_loss": 3.0 + i, "sparsity": 0.1 * i})
