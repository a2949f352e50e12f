"""Read a sweep's stored results back from disk and flatten them into one table.

Everything comes from files Tune and the trial function wrote, so a sweep can be reported
after its driver is gone (no Ray needed), and no pickle is read: a sweep folder lives on
shared storage, and whoever can write an unpickled file there runs code in whoever reads it
(DESIGN.md §3). Tune's own readers (`ExperimentAnalysis`, `Tuner.restore`) unpickle the
experiment state, so this module reads Tune's files itself, as JSON and text only:

- the newest experiment snapshot `experiment_state-<time>.json` (the newest session: the
  highest timestamp in the name, as Tune picks it). Its `trial_data` holds, per trial, two
  JSON documents: the trial's state and its run metadata. Their plain fields give the trial
  id, status, sampled config, folder (`relative_logdir`), failure count and error file name;
  everything else is cloudpickle (hex strings, and `{"_type": "CLOUDPICKLE_FALLBACK"}`
  objects), never decoded here: `_json` turns each fallback object into None and leaves hex
  strings as they are;
- in each trial's folder, `result.json` (one JSON line per `ray.train.report`) and the error
  file (`error.txt`, the text trace of the last failure); `params.json` gives the config when
  the snapshot's is not plain JSON;
- the trial function's own files: `trial_status/<trial_id>.json`, written only after the
  trial's Train run returned (a TERMINATED trial without it was stopped early by the
  scheduler), `trial_status/<trial_id>.attempts` (one line per start of the trial function)
  and the Train run's `stopped.json`.

Names read from the snapshot become paths only when they are one plain path component, so a
crafted snapshot cannot point the reader outside the sweep folder.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

COMPLETED_DIR = "trial_status"
TRAIN_RUNS_DIR = "train_runs"    # each trial's Train run: SWEEP_DIR/train_runs/<trial_id>
STOPPED_FILE = "stopped.json"    # rank 0 writes it when training stops on non-finite losses
SWEEP_FILE = "sweep.json"
STATE_GLOB = "experiment_state-*.json"  # Tune's snapshot (TuneController.CKPT_FILE_TMPL)
_RESULT_FILE = "result.json"  # Tune's per-trial result log (ray.air.constants.EXPR_RESULT_FILE)
_PARAMS_FILE = "params.json"  # the trial's config (ray.air.constants.EXPR_PARAM_FILE)
_PICKLED = "CLOUDPICKLE_FALLBACK"  # Tune's marker of an embedded pickle (TuneFunctionEncoder)
_TRIAL_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass
class TrialRecord:
    trial_id: str
    status: str                     # TERMINATED | ERROR | PENDING | PAUSED
    params: dict
    # evaluations, ascending step; NaN values are left out (as keys a report did not have),
    # nested metrics come flattened as "outer/inner" (as Tune's dataframes do)
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
    """Whether `path` holds a Tune experiment snapshot."""
    return any(Path(path).glob(STATE_GLOB))


def _no_pickle(obj: dict):
    # an object Tune could only store pickled: left unread
    return None if obj.get("_type") == _PICKLED else obj


def _json(text: str):
    """JSON as Tune writes it (NaN allowed), with every embedded pickle replaced by None."""
    return json.loads(text, object_hook=_no_pickle)


def _name(value) -> str | None:
    """`value` when it is one plain path component (a folder or file name), else None."""
    ok = isinstance(value, str) and value not in ("", ".", "..") and "/" not in value \
        and "\\" not in value and "\0" not in value
    return value if ok else None


@dataclass
class _TuneTrial:
    """What the snapshot says of one trial (its plain JSON fields)."""

    trial_id: str
    status: str
    config: dict | None
    folder: str | None           # relative_logdir: the trial's folder in the sweep folder
    num_failures: int
    error_file: str | None


def _snapshot(sweep_dir: Path) -> list[_TuneTrial]:
    files = sorted(sweep_dir.glob(STATE_GLOB))
    if not files:
        raise ValueError(f"{sweep_dir}: no {STATE_GLOB}; not a Tune sweep folder")
    f = files[-1]
    try:
        state = _json(f.read_text())
        entries = state["trial_data"]
        trials = []
        for n, entry in enumerate(entries):
            if not (isinstance(entry, list) and len(entry) == 2
                    and all(isinstance(x, str) for x in entry)):
                raise ValueError(f"trial_data[{n}] is not a pair of JSON documents")
            trial, meta = _json(entry[0]), _json(entry[1])
            tid = trial.get("trial_id")
            if not (isinstance(tid, str) and _TRIAL_ID.fullmatch(tid)) or tid in (".", ".."):
                raise ValueError(f"trial_data[{n}]: trial_id {tid!r} is not a Tune trial id")
            status = str(trial.get("status"))
            failures = meta.get("num_failures") or 0
            trials.append(_TuneTrial(
                trial_id=tid,
                # a snapshot's RUNNING trial is not running once the driver is gone: Tune's
                # own loader reads it as PENDING (Trial.__setstate__)
                status="PENDING" if status == "RUNNING" else status,
                config=trial.get("config") if isinstance(trial.get("config"), dict) else None,
                folder=_name(trial.get("relative_logdir")),
                num_failures=failures if isinstance(failures, int) else 0,
                error_file=_name(meta.get("error_filename"))))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{f}: not a Tune experiment snapshot this reader understands: "
                         f"{e}") from None
    return trials


def _flatten(row: dict, prefix: str = "") -> dict:
    """Nested metrics as "outer/inner" keys; NaN values left out (a reported NaN is no
    measurement: every reader of the history skips non-finite values)."""
    out = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}/"))
        elif not (isinstance(v, float) and math.isnan(v)):
            out[key] = v
    return out


def _result_rows(result_file: Path) -> list[dict]:
    """The reports in a trial's result log, Tune's copy of the config left out. A line cut
    by a dying driver (a restored sweep appends after it) is skipped."""
    rows = []
    if not result_file.is_file():
        return rows
    for line in result_file.read_text().splitlines():
        try:
            row = _json(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            row.pop("config", None)
            rows.append(_flatten(row))
    return rows


def _history(trial_dir: Path | None) -> list[dict]:
    """Evaluation rows, one per training step. A retried trial logs its steps again; the
    latest row for a step wins (it belongs to the attempt that carried on)."""
    rows = _result_rows(trial_dir / _RESULT_FILE) if trial_dir else []
    by_step: dict = {}
    for n, row in enumerate(rows):
        by_step[row.get("step", n)] = row
    return [by_step[k] for k in sorted(by_step)]


def _params(t: _TuneTrial, trial_dir: Path | None) -> dict:
    if t.config is not None:
        return dict(t.config)
    f = trial_dir / _PARAMS_FILE if trial_dir else None
    if f is not None and f.is_file():
        try:
            d = _json(f.read_text())
        except json.JSONDecodeError:
            return {}
        return d if isinstance(d, dict) else {}
    return {}


def _first_error_line(trace: str | None) -> str | None:
    if trace is None:
        return None
    lines = [ln.strip() for ln in trace.splitlines() if ln.strip()]
    # the last "Type: message" line of the traceback names the root cause
    for ln in reversed(lines):
        if ":" in ln and not ln.startswith(("File ", "^", "~")):
            return ln[:300]
    return lines[-1][:300] if lines else "unknown error"


def _error(t: _TuneTrial, trial_dir: Path | None) -> str | None:
    """The first line of the text trace Tune stored for the trial's last failure."""
    if t.status != "ERROR":
        return None
    f = trial_dir / t.error_file if trial_dir and t.error_file else None
    if f is None or not f.is_file():
        return None
    return _first_error_line(f.read_text(errors="replace"))


def _stopped(sweep_dir: Path, trial_id: str) -> str | None:
    """The reason a trial's training stopped by itself (non-finite losses): from its Train
    run's stop marker, which rank 0 writes *before* its last report, so it is there even when
    the scheduler ends the trial on that report before the trial function returns."""
    f = sweep_dir / TRAIN_RUNS_DIR / trial_id / STOPPED_FILE
    if not f.is_file():
        return None
    d = _json(f.read_text())
    return (d.get("reason") if isinstance(d, dict) else None) or "stopped"


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def collect_trials(sweep_dir: str | Path) -> list[TrialRecord]:
    sweep_dir = Path(sweep_dir)
    records = []
    for t in _snapshot(sweep_dir):
        trial_dir = sweep_dir / t.folder if t.folder else None  # None: never started
        records.append(TrialRecord(
            trial_id=t.trial_id,
            status=t.status,
            params=_params(t, trial_dir),
            history=_history(trial_dir),
            num_failures=t.num_failures,
            error=_error(t, trial_dir),
            completed=completion_marker(sweep_dir, t.trial_id).is_file(),
            stopped=_stopped(sweep_dir, t.trial_id),
            attempts=_count_lines(sweep_dir / COMPLETED_DIR / f"{t.trial_id}.attempts"),
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
