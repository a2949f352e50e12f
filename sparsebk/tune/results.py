"""Read a sweep's stored results back from disk and flatten them into one table.

Everything comes from files Tune and the trial function wrote, so a sweep can be reported
after its driver is gone: the newest `experiment_state-*.json` (trial status, retries, trial
folder), each trial folder's `params.json` (the sampled parameters) and `result.json` (one
line per `ray.train.report`), and `trial_status/<trial_id>.json`, which the trial function
writes only after its Train run returned — a TERMINATED trial without it was stopped early
by the scheduler.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

COMPLETED_DIR = "trial_status"
SWEEP_FILE = "sweep.json"


@dataclass
class TrialRecord:
    trial_id: str
    status: str                     # TERMINATED | ERROR | RUNNING | PENDING | PAUSED
    params: dict
    history: list[dict] = field(default_factory=list)   # evaluations, ascending step
    num_failures: int = 0           # failed attempts (Tune's count)
    attempts: int = 0               # starts of the trial function (its attempts log)
    error: str | None = None
    completed: bool = False         # the trial's Train run returned normally

    @property
    def stop_reason(self) -> str:
        if self.status == "ERROR":
            return "error"
        if self.status == "TERMINATED":
            # the final evaluation (step == max_steps) also carries the test loss
            reached_end = bool(self.history) and "test_loss" in self.history[-1]
            return "completed" if self.completed or reached_end else "early_stopped"
        return "unfinished"


def completion_marker(sweep_dir: str | Path, trial_id: str) -> Path:
    return Path(sweep_dir) / COMPLETED_DIR / f"{trial_id}.json"


def is_sweep_dir(path: str | Path) -> bool:
    return any(Path(path).glob("experiment_state-*.json"))


def _latest_state(sweep_dir: Path) -> dict:
    # newest session by the timestamp in the name (a restored run rewrites older files too,
    # so modification times do not order sessions)
    states = sorted(sweep_dir.glob("experiment_state-*.json"),
                    key=lambda p: (p.name, p.stat().st_mtime))
    if not states:
        raise ValueError(f"{sweep_dir}: no experiment_state-*.json; not a Tune sweep folder")
    return json.loads(states[-1].read_text())


def _history(result_file: Path) -> list[dict]:
    """Evaluation rows, one per training step. A retried trial logs its steps again; the
    latest row for a step wins (it belongs to the attempt that carried on)."""
    if not result_file.is_file():
        return []
    by_step: dict = {}
    for n, line in enumerate(result_file.read_text().splitlines()):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a dying driver
            continue
        row.pop("config", None)
        by_step[row.get("step", n)] = row
    return [by_step[k] for k in sorted(by_step)]


def _first_error_line(trial_dir: Path) -> str | None:
    err = trial_dir / "error.txt"
    if not err.is_file():
        return None
    lines = [ln.strip() for ln in err.read_text().splitlines() if ln.strip()]
    # the last "Type: message" line of the traceback names the root cause
    for ln in reversed(lines):
        if ":" in ln and not ln.startswith(("File ", "^", "~")):
            return ln[:300]
    return lines[-1][:300] if lines else "unknown error"


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def collect_trials(sweep_dir: str | Path) -> list[TrialRecord]:
    sweep_dir = Path(sweep_dir)
    state = _latest_state(sweep_dir)
    records = []
    for trial_json, meta in state["trial_data"]:
        trial = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
        meta = json.loads(meta) if isinstance(meta, str) else meta
        tid = trial["trial_id"]
        tdir = sweep_dir / trial["relative_logdir"]
        params_file = tdir / "params.json"
        params = json.loads(params_file.read_text()) if params_file.is_file() else {}
        records.append(TrialRecord(
            trial_id=tid,
            status=trial["status"],
            params=params,
            history=_history(tdir / "result.json"),
            num_failures=int(meta.get("num_failures", 0) or 0),
            error=_first_error_line(tdir) if trial["status"] == "ERROR" else None,
            completed=completion_marker(sweep_dir, tid).is_file(),
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
        })
        rows.append(row)
    return pd.DataFrame(rows)


def write_tables(df: pd.DataFrame, out_dir: str | Path, stem: str = "results") -> list[Path]:
    """CSV and Parquet side by side; columns of mixed Python types are stored as strings."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv, pq = out / f"{stem}.csv", out / f"{stem}.parquet"
    df.to_csv(csv, index=False)
    frame = df.copy()
    for c in frame.columns:
        if frame[c].dtype == object and frame[c].map(type).nunique() > 1:
            frame[c] = frame[c].map(lambda v: "" if v is None else str(v))
    frame.to_parquet(pq, index=False)
    return [csv, pq]
