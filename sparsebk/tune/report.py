"""Tables, plots and the markdown report of a sweep; `sparsebk report DIR` regenerates them
(for a single training run folder: its evaluation table and the run's plots).

Outputs under DIR/report/: results.csv/.parquet (one row per trial), pareto.csv/.parquet
(the front of best validation perplexity against achieved sparsity), pareto.png (every trial,
coloured by loss_type, the front drawn), sparsity_vs_target.png (measured sparsity and its
target over steps for the front's trials) and report.md (per asked sparsity level: the best
configuration and its perplexity cost against the densest trial).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import pandas as pd

from sparsebk.tune.pareto import best_at_levels, pareto_front
from sparsebk.tune.results import (SWEEP_FILE, TrialRecord, collect_trials, is_sweep_dir,
                                   results_table, write_tables)

logger = logging.getLogger(__name__)

SPARSITY_COL = "achieved_sparsity"  # mean over the last evaluations   # achieved sparsity used for the front and the levels
PPL_COL = "best_val_ppl"


def _sweep_meta(sweep_dir: Path) -> dict:
    f = sweep_dir / SWEEP_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def _usable(df: pd.DataFrame) -> pd.Series:
    """Trials that count for the front and the levels: evaluated, not failed, and trained to
    full length. An early-stopped trial was measured after fewer steps (its gates barely
    trained), so it is compared only when no trial completed. A trial whose training stopped
    on non-finite losses never counts: its last measurements are not of a working model."""
    ok = (df[PPL_COL].notna() & df[SPARSITY_COL].notna() & (df["status"] != "ERROR")
          & (df["stop_reason"] != "stopped"))
    full = ok & (df["stop_reason"] == "completed")
    return full if full.any() else ok


def front_table(df: pd.DataFrame) -> pd.DataFrame:
    ok = df[_usable(df)].reset_index(drop=True)
    idx = pareto_front(ok[PPL_COL].tolist(), ok[SPARSITY_COL].tolist())
    return ok.iloc[idx].reset_index(drop=True)


def _save_png(fig, out, name: str) -> str:
    """The figure as PNG bytes into the store `out`; returns its location."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    out.write_bytes(name, buf.getvalue())
    return out.location(name)


def plot_pareto(df: pd.DataFrame, front: pd.DataFrame, out, name: str = "pareto.png") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ok = df[df[PPL_COL].notna() & df[SPARSITY_COL].notna()]
    groups = ok.groupby("loss_type", dropna=False) if "loss_type" in ok else [("all", ok)]
    for group, g in groups:
        ax.scatter(g[SPARSITY_COL], g[PPL_COL], label=str(group), alpha=0.8, s=36)
    if len(front):
        # staircase: the best ppl reachable at sparsity >= x
        ax.step(front[SPARSITY_COL], front[PPL_COL], where="pre", color="k", lw=1.2,
                label="Pareto front")
        ax.scatter(front[SPARSITY_COL], front[PPL_COL], facecolors="none", edgecolors="k", s=90)
    ax.set_xlabel(f"achieved sparsity ({SPARSITY_COL})")
    ax.set_ylabel("best validation perplexity")
    ax.set_title("Sweep: perplexity vs achieved sparsity")
    ax.legend(title="loss_type", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_png(fig, out, name)


def plot_sparsity_curves(records: list[TrialRecord], trial_ids: list[str], out,
                         name: str = "sparsity_vs_target.png") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    by_id = {r.trial_id: r for r in records}
    for k, tid in enumerate(trial_ids):
        h = by_id[tid].history
        steps = [row.get("step", i) for i, row in enumerate(h)]
        colour = f"C{k % 10}"
        ax.plot(steps, [row.get("sparsity", math.nan) for row in h], color=colour,
                marker="o", ms=3, label=f"{tid} measured")
        ax.plot(steps, [row.get("target_sparsity", math.nan) for row in h], color=colour,
                ls="--", label=f"{tid} target")
    ax.set_xlabel("step")
    ax.set_ylabel("sparsity (mean over layers)")
    ax.set_title("Pareto-front trials: measured sparsity vs target")
    ax.grid(alpha=0.3)
    if trial_ids:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_png(fig, out, name)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _md_table(df: pd.DataFrame, cols: list[str]) -> str:
    cols = [c for c in cols if c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def markdown_report(df: pd.DataFrame, front: pd.DataFrame, levels: list[float],
                    param_names: list[str], name: str) -> str:
    counts = df["stop_reason"].value_counts().to_dict()
    out = [f"# Sweep report: {name}", "",
           f"{len(df)} trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".",
           f"Achieved sparsity = mean measured sparsity over the last evaluations "
           f"(`{SPARSITY_COL}`); perplexity = best validation perplexity. The front and the levels "
           f"use the trials trained to full length (all evaluated ones if none was); failed, "
           f"stopped (non-finite losses) and early-stopped trials are listed below.", ""]
    valid = df[_usable(df)].reset_index(drop=True)
    out.append("## Best configuration per sparsity level")
    out.append("")
    if valid.empty:
        out.append("No trial reached an evaluation.")
    else:
        choices = best_at_levels(valid[PPL_COL].tolist(), valid[SPARSITY_COL].tolist(), levels)
        dense = valid.iloc[choices[0].dense_index]
        out.append(f"Densest trial (baseline): `{dense['trial_id']}`, sparsity "
                   f"{dense[SPARSITY_COL]:.3f}, perplexity {dense[PPL_COL]:.2f}.")
        out.append("")
        out.append("| level | trial | sparsity | ppl | ppl cost | cost % | configuration |")
        out.append("|---|---|---|---|---|---|---|")
        for c in choices:
            if c.index is None:
                out.append(f"| {c.level:.2f} | none reached it | | | | | |")
                continue
            row = valid.iloc[c.index]
            conf = ", ".join(f"{p}={_fmt(row[p])}" for p in param_names if p in row)
            out.append(f"| {c.level:.2f} | `{row['trial_id']}` | {c.sparsity:.3f} | {c.ppl:.2f} "
                       f"| {c.ppl_cost:+.2f} | {100 * c.ppl_cost_rel:+.1f}% | {conf} |")
    out += ["", "## Pareto front", "",
            _md_table(front, ["trial_id", *param_names, SPARSITY_COL, PPL_COL, "stop_reason"]),
            "", "## All trials", "",
            _md_table(df, ["trial_id", *param_names, "stop_reason", "evaluations",
                           PPL_COL, SPARSITY_COL, "achieved_sparsity_final", "target_sparsity_final", "tokens_per_s", "attempts", "failures",
                           "error"]),
            "", "Plots: `pareto.png`, `sparsity_vs_target.png`.", ""]
    return "\n".join(out)


def make_report(sweep_dir: str | Path, out_dir: str | Path | None = None, *,
                levels: list[float] | None = None, last_k: int | None = None) -> dict:
    """Regenerate every table and plot of a sweep from its stored results; returns their
    locations. `out_dir` (default SWEEP_DIR/report) is a path or a URI (s3://, gs://):
    everything is written through sparsebk.storage.store."""
    from sparsebk.storage.store import open_store

    sweep_dir = Path(sweep_dir)
    meta = _sweep_meta(sweep_dir)
    levels = levels or meta.get("sparsity_levels") or [0.3, 0.5, 0.7]
    last_k = last_k or meta.get("last_k") or 3
    out = open_store(str(out_dir) if out_dir else str(sweep_dir / "report"))

    records = collect_trials(sweep_dir)
    df = results_table(records, last_k=last_k)
    param_names = [c for c in (meta.get("space") or {}) if c in df.columns] or \
        sorted({k for r in records for k in r.params})
    front = front_table(df) if len(df) else df
    paths = {
        "results": write_tables(df, out, "results"),
        "pareto": write_tables(front, out, "pareto"),
        "pareto_png": plot_pareto(df, front, out),
        "curves_png": plot_sparsity_curves(records, front["trial_id"].tolist() if len(front) else [],
                                           out),
    }
    out.write_text("report.md", markdown_report(df, front, list(levels), param_names,
                                                meta.get("name", sweep_dir.name)))
    paths["report_md"] = out.location("report.md")
    logger.info("report of %d trials written to %s", len(df), out.uri)
    return paths


def make_run_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """A single training run: its evaluations as a table (CSV + Parquet) and the run's
    plots (loss/ppl, measured sparsity vs target per layer, weight), from metrics.jsonl."""
    from sparsebk.train.metrics import read_metrics, write_plots

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "report"
    evals = read_metrics(run_dir).get("eval", [])
    df = pd.DataFrame([{k: v for k, v in r.items() if k != "kind"} for r in evals])
    return {"evaluations": write_tables(df, out, "evaluations"), "plots": write_plots(run_dir)}


def read_back(location: str) -> str:
    """A written file read back through the store (a path or a URI)."""
    from sparsebk.storage.store import open_store

    parent, _, name = location.partition("?")[0].rpartition("/")
    query = location.partition("?")[2]
    return open_store(parent + (f"?{query}" if query else "")).read_text(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sparsebk report",
                                 description="Regenerate the tables, Pareto front, plots and "
                                             "markdown report of a sweep from its stored results.")
    ap.add_argument("dir", help="a sweep folder (STORAGE/NAME, holding experiment_state-*.json) "
                                "or a training run folder (holding metrics.jsonl)")
    ap.add_argument("--out", help="output folder, a path or a URI such as "
                                  "s3://bucket/reports/NAME (default DIR/report)")
    ap.add_argument("--levels", type=float, nargs="+", help="sparsity levels to answer for")
    args = ap.parse_args(argv)
    d = Path(args.dir).expanduser()
    if not is_sweep_dir(d) and (d / "metrics.jsonl").is_file():
        for k, v in make_run_report(d, args.out).items():
            print(f"{k}: {', '.join(map(str, v)) or '(none: no training records)'}")
        return 0
    if not is_sweep_dir(d):
        runs = sorted(p.parent for p in d.glob("*/experiment_state-*.json"))
        hint = f"; sweep folders inside it: {[str(r) for r in runs]}" if runs else ""
        print(f"sparsebk report: {d} is neither a sweep folder (experiment_state-*.json) nor a "
              f"run folder (metrics.jsonl){hint}")
        return 2
    try:
        paths = make_report(d, args.out, levels=args.levels)
    except ValueError as e:  # a snapshot this reader cannot use: say which file and why
        print(f"sparsebk report: {e}")
        return 2
    print(read_back(paths["report_md"]))
    for k, v in paths.items():
        print(f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}")
    return 0
