"""Read a sweep's stored results back from disk and flatten them into one table.

Everything comes from files Tune and the trial function wrote, so a sweep can be reported
after its driver is gone (no Ray needed). Tune's side is read through its public analysis
API, `ray.tune.ExperimentAnalysis(sweep_dir)`: it loads the newest experiment snapshot and
gives each trial's status, sampled config, failure count, folder and error, and its full
result history (`trial_dataframes`: one row per `ray.train.report`). The trial function's own
files add what Tune does not know: `trial_status/<trial_id>.json`, written only after the
trial's Train run returned (a TERMINATED trial without it was stopped early by the
scheduler), and `trial_status/<trial_id>.attempts`, one line per start of the trial function.

(`Tuner.restore(path, trainable).get_results()` would give the same data as a ResultGrid, but
it needs the sweep's trainable, whose `tune.with_parameters` needs a running Ray, and its
`Result`s carry no trial status or failure count; ExperimentAnalysis needs neither.)
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

COMPLETED_DIR = "trial_status"
TRAIN_RUNS_DIR = "train_runs"    # each trial's Train run: SWEEP_DIR/train_runs/<trial_id>
STOPPED_FILE = "stopped.json"    # rank 0 writes it when training stops on non-finite losses
SWEEP_FILE = "sweep.json"
# Tune's experiment snapshot file, as named in ExperimentAnalysis's own error message
_STATE_GLOB = "experiment_state-*.json"
_RESULT_FILE = "result.json"  # Tune's per-trial result log (ray.air.constants.EXPR_RESULT_FILE)


@dataclass
class TrialRecord:
    trial_id: str
    status: str                     # TERMINATED | ERROR | RUNNING | PENDING | PAUSED
    params: dict
    # evaluations, ascending step; NaN values are left out (as keys a report did not have),
    # nested metrics come flattened as "outer/inner" (Tune's dataframes)
    history: list[dict] = field(default_factory=list)
    num_failures: int = 0           # failed attempts (Tune's count)
    attempts: int = 0               # starts of the trial function (its attempts log)
    error: str | None = None
    completed: bool = False         # the trial's Train run returned normally
    stopped: str | None = None      # why training stopped early by itself (non-finite losses)

    @property
    def stop_reason(self) -> str:
        if self.status == "ERROR":
            return "error"
        if self.status == "TERMINATED":
            if self.stopped:
                return "stopped"
            # the final evaluation (step == max_steps) also carries the test loss
            reached_end = bool(self.history) and "test_loss" in self.history[-1]
            return "completed" if self.completed or reached_end else "early_stopped"
        return "unfinished"


def completion_marker(sweep_dir: str | Path, trial_id: str) -> Path:
    return Path(sweep_dir) / COMPLETED_DIR / f"{trial_id}.json"


def is_sweep_dir(path: str | Path) -> bool:
    """Whether `path` holds a Tune experiment snapshot (what ExperimentAnalysis loads)."""
    return any(Path(path).glob(_STATE_GLOB))


def _analysis(sweep_dir: Path):
    """ExperimentAnalysis of the newest snapshot (the newest session: Tune picks the highest
    timestamp in the file name). Its warning for trials without results (never started, or
    a result log it could not parse) is silenced: `_history` handles both."""
    from ray.tune import ExperimentAnalysis

    if not is_sweep_dir(sweep_dir):
        raise ValueError(f"{sweep_dir}: no {_STATE_GLOB}; not a Tune sweep folder")
    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return ExperimentAnalysis(str(sweep_dir))
    finally:
        quiet.setLevel(level)


def _rows(frame: pd.DataFrame) -> list[dict]:
    """A trial dataframe back to its reported rows: Tune's copy of the config (flattened to
    `config/...` columns) dropped, and NaN cells dropped: the frame fills a key that only
    another report had with NaN, and a reported NaN is no measurement either (every reader
    of the history skips non-finite values), so a row keeps what its report measured."""
    keep = [c for c in frame.columns if c != "config" and not str(c).startswith("config/")]
    return [{k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
            for row in frame[keep].to_dict("records")]


def _torn_log_rows(result_file: Path) -> list[dict]:
    """The rows of a result log Tune's reader rejected as a whole because one line was cut
    by a dying driver (a restored sweep appends after it): every complete line."""
    rows = []
    for line in result_file.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        row.pop("config", None)
        rows.append(row)
    return rows


def _trial_dir(trial) -> Path | None:
    try:
        return Path(trial.path)
    except RuntimeError:  # Tune had not named its folder yet (never started)
        return None


def _history(frame: pd.DataFrame | None, trial_dir: Path | None) -> list[dict]:
    """Evaluation rows, one per training step. A retried trial logs its steps again; the
    latest row for a step wins (it belongs to the attempt that carried on)."""
    if frame is not None and len(frame):
        rows = _rows(frame)
    else:
        # Tune returns an empty frame both for a trial that never reported and for a result
        # log with a torn line; only the second has rows to recover, from its own file
        # (the one place this module reads a Tune file itself).
        log = trial_dir / _RESULT_FILE if trial_dir else None
        rows = _torn_log_rows(log) if log and log.is_file() and log.stat().st_size else []
    by_step: dict = {}
    for n, row in enumerate(rows):
        by_step[row.get("step", n)] = row
    return [by_step[k] for k in sorted(by_step)]


def _first_error_line(trace: str | None) -> str | None:
    if trace is None:
        return None
    lines = [ln.strip() for ln in trace.splitlines() if ln.strip()]
    # the last "Type: message" line of the traceback names the root cause
    for ln in reversed(lines):
        if ":" in ln and not ln.startswith(("File ", "^", "~")):
            return ln[:300]
    return lines[-1][:300] if lines else "unknown error"


def _stopped(sweep_dir: Path, trial_id: str) -> str | None:
    """The reason a trial's training stopped by itself (non-finite losses): from its Train
    run's stop marker, which rank 0 writes *before* its last report, so it is there even when
    the scheduler ends the trial on that report before the trial function returns."""
    f = sweep_dir / TRAIN_RUNS_DIR / trial_id / STOPPED_FILE
    if not f.is_file():
        return None
    return json.loads(f.read_text()).get("reason") or "stopped"


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def collect_trials(sweep_dir: str | Path) -> list[TrialRecord]:
    sweep_dir = Path(sweep_dir)
    analysis = _analysis(sweep_dir)
    frames = analysis.trial_dataframes
    records = []
    for trial in analysis.trials:
        tid = trial.trial_id
        records.append(TrialRecord(
            trial_id=tid,
            status=trial.status,
            params=dict(trial.config or {}),
            history=_history(frames.get(tid), _trial_dir(trial)),
            num_failures=int(trial.num_failures or 0),
            # the text trace Tune stored for the trial's last failure (its error.txt)
            error=_first_error_line(trial.get_error()) if trial.status == "ERROR" else None,
            completed=completion_marker(sweep_dir, tid).is_file(),
            stopped=_stopped(sweep_dir, tid),
            attempts=_count_lines(sweep_dir / COMPLETED_DIR / f"{tid}.attempts"),
        ))
    records.sort(key=lambda r: r.trial_id)
    return records


def _col(history: list[dict], key: str) -> list[float]:
    out = []
    for row in history:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def results_table(records: list[TrialRecord], *, last_k: int = 3) -> pd.DataFrame:
    """One row per trial: parameters, best validation ppl/loss, achieved sparsity (mean over
    the last `last_k` evaluations, and the final one), target, tokens/s, status, stop reason.
    Parameter columns keep their names; measured columns never reuse a parameter's name."""
    param_names = sorted({k for r in records for k in r.params})
    rows = []
    for r in records:
        losses = _col(r.history, "val_loss")
        ppls = _col(r.history, "val_ppl") or [math.exp(x) for x in losses]
        sp = _col(r.history, "sparsity")
        tgt = _col(r.history, "target_sparsity")
        tps = _col(r.history, "tokens_per_s")
        steps = _col(r.history, "step")
        row = {"trial_id": r.trial_id}
        row.update({p: r.params.get(p) for p in param_names})
        row.update({
            "status": r.status,
            "stop_reason": r.stop_reason,
            "evaluations": len(r.history),
            "last_step": int(steps[-1]) if steps else None,
            "best_val_loss": min(losses) if losses else math.nan,
            "best_val_ppl": min(ppls) if ppls else math.nan,
            "achieved_sparsity": sum(sp[-last_k:]) / len(sp[-last_k:]) if sp else math.nan,
            "achieved_sparsity_final": sp[-1] if sp else math.nan,
            "target_sparsity_final": tgt[-1] if tgt else math.nan,
            "tokens_per_s": sum(tps) / len(tps) if tps else math.nan,
            "attempts": r.attempts,
            "failures": r.num_failures,
            "error": r.error or "",
            "stop_detail": r.stopped or "",  # why a "stopped" trial's training stopped
        })
        rows.append(row)
    return pd.DataFrame(rows)


def write_tables(df: pd.DataFrame, out_dir, stem: str = "results") -> list[str]:
    """CSV and Parquet side by side in `out_dir` (a path, a URI or a sparsebk Store), each
    written whole (atomically) through sparsebk.storage.store; returns their locations. Columns of
    mixed Python types are stored as strings in the Parquet file."""
    import io

    from sparsebk.storage.store import Store, open_store

    out = out_dir if isinstance(out_dir, Store) else open_store(out_dir)
    out.write_text(f"{stem}.csv", df.to_csv(index=False))
    frame = df.copy()
    for c in frame.columns:
        if frame[c].dtype == object and frame[c].map(type).nunique() > 1:
            frame[c] = frame[c].map(lambda v: "" if v is None else str(v))
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    out.write_bytes(f"{stem}.parquet", buf.getvalue())
    return [out.location(f"{stem}.csv"), out.location(f"{stem}.parquet")]
