"""What a person follows: progress lines, a metrics JSONL per run, PNG plots, a final summary.

Rank 0 writes `metrics.jsonl` in the run directory: one record per log interval
({"kind": "train", ...}) and per evaluation ({"kind": "eval", ...}). After a restart the
records of the re-run steps are appended again; readers keep the last record per (kind, step).
The run directory is a local path or a URI (sparsebk.storage.store): on an object store, which cannot
append, the records go to part objects under `metrics.jsonl.parts/`, put at every evaluation
and at most every 30 s between them, and `read_metrics` reads them back from the store.
"""

from __future__ import annotations

import json
import logging
import math
import io
import os
from pathlib import Path

from sparsebk.evaluation import safe_ppl
from sparsebk.train.run_state import RunState  # noqa: F401 (annotation)
from sparsebk.storage.store import open_store

logger = logging.getLogger("sparsebk.train")


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(rec: dict, max_steps: int) -> str:
    """One line per log interval: step/total, loss, ppl, sparsity vs target per layer, weight,
    tokens/s, ETA."""
    layers = " ".join(f"{s:.2f}/{t:.2f}" for s, t in zip(rec["sparsity_layers"],
                                                          rec["target_layers"]))
    return (f"step {rec['step']}/{max_steps} loss {rec['train_loss']:.4f} "
            f"ppl {safe_ppl(rec['train_loss']):.2f} train sparsity(measured/target) [{layers}] "
            f"weight {rec['loss_weight']:.4g} lr {rec['lr']:.3g} "
            f"tok/s {rec['tokens_per_s']:.0f} ETA {_fmt_duration(rec['eta_s'])}")


def eval_line(rec: dict, max_steps: int) -> str:
    """Validation loss, and per layer the eval-mode/training-mode sparsity (they should agree)."""
    n = sum(1 for k in rec if k.startswith("sparsity_layer_"))
    layers = " ".join(f"{rec[f'sparsity_layer_{i}']:.2f}/{rec.get(f'train_sparsity_layer_{i}', math.nan):.2f}"
                      for i in range(n))
    return (f"eval step {rec['step']}/{max_steps} val_loss {rec['val_loss']:.4f} "
            f"val_ppl {rec['val_ppl']:.2f} sparsity {rec['sparsity']:.3f} "
            f"target {rec['target_sparsity']:.3f} sparsity(eval/train) [{layers}]")


class MetricsWriter:
    """Appends JSON records to RUN_DIR/metrics.jsonl (rank 0 only), a path or a URI."""

    def __init__(self, run_dir: str | os.PathLike):
        self.store = open_store(run_dir)
        self.path = self.store.location("metrics.jsonl")
        self._log = self.store.line_log("metrics.jsonl")

    def write(self, kind: str, rec: dict) -> None:
        self._log.write(json.dumps({"kind": kind, **rec}, default=float) + "\n")
        if kind == "eval":  # with the checkpoint: what a restart keeps, the driver can read
            self._log.flush(force=True)

    def close(self) -> None:
        self._log.close()


def read_metrics(run_dir: str | os.PathLike) -> dict[str, list[dict]]:
    """{kind: records sorted by step}, keeping the last record written for each step.

    A last line cut by a crash (the writer died mid-line) is skipped with a warning; a bad
    line anywhere else means the file was damaged otherwise, and is an error naming it."""
    store = open_store(run_dir)
    path = store.location("metrics.jsonl")
    by_kind: dict[str, dict[int, dict]] = {}
    lines = store.read_lines("metrics.jsonl")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                logger.warning("%s: last line is cut (%s); skipped", path, e)
                continue
            raise ValueError(f"{path}: line {i + 1} is not a JSON record: {e}") from None
        by_kind.setdefault(rec["kind"], {})[rec["step"]] = rec
    return {k: [v[s] for s in sorted(v)] for k, v in by_kind.items()}


def _save(fig, store, name: str, paths: list[str]) -> None:
    """Render to PNG bytes and write them through the store (a path or a bucket alike)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    store.write_bytes(f"plots/{name}", buf.getvalue())
    where = store.location(f"plots/{name}")
    paths.append(Path(where) if store.is_local else where)


def write_plots(run_dir: str | os.PathLike) -> list[Path | str]:
    """PNG plots next to the run (RUN_DIR/plots/, a path or a URI): loss/ppl curves,
    sparsity vs target per layer, weight. Returns their locations (Paths for a local run,
    URIs otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(run_dir)
    train, evals = recs.get("train", []), recs.get("eval", [])
    if not train:
        return []
    store = open_store(run_dir)
    paths: list[Path | str] = []
    _save(_loss_ppl_figure(plt, train, evals), store, "loss_ppl.png", paths)
    _save(_sparsity_figure(plt, train, evals), store, "sparsity.png", paths)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train], [r["loss_weight"] for r in train])
    ax.set(xlabel="step", ylabel="sparsity loss weight", title="weight schedule")
    fig.tight_layout()
    _save(fig, store, "weight.png", paths)
    return paths


def _loss_ppl_figure(plt, train: list[dict], evals: list[dict]):
    """Training and validation loss, and their perplexities."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train")
    if evals:
        ax1.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="valid")
        ax2.plot([r["step"] for r in evals], [r["val_ppl"] for r in evals], "o-", label="valid")
    ax2.plot([r["step"] for r in train], [safe_ppl(r["train_loss"]) for r in train],
             label="train")
    ax1.set(xlabel="step", ylabel="loss (total)", title="loss")
    ax2.set(xlabel="step", ylabel="perplexity", title="perplexity", yscale="log")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    return fig


def _sparsity_figure(plt, train: list[dict], evals: list[dict]):
    """Per layer: training-mode sparsity, its target, and the eval-mode sparsity."""
    n_layers = len(train[0]["sparsity_layers"])
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in train]
    for i in range(n_layers):
        line, = ax.plot(steps, [r["sparsity_layers"][i] for r in train], label=f"train {i}")
        ax.plot(steps, [r["target_layers"][i] for r in train], "--", color=line.get_color(),
                label=f"target {i}")
        ev = [r for r in evals if f"sparsity_layer_{i}" in r]
        if ev:
            ax.plot([r["step"] for r in ev], [r[f"sparsity_layer_{i}"] for r in ev], "o",
                    color=line.get_color(), label=f"eval {i}")
    ax.set(xlabel="step", ylabel="sparsity", title="measured sparsity (train: sampled masks, "
           "eval: deterministic) vs target", ylim=(0, 1))
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    return fig


def summary_lines(summary: dict) -> list[str]:
    """The final summary a person reads at the end of a run."""
    return [
        f"run {summary['run_name']} finished: {summary['steps']} steps in "
        f"{_fmt_duration(summary['wall_s'])}; run folder {summary['run_dir']}",
        f"  best valid ppl {summary['best_val_ppl']:.2f} (step {summary['best_step']}), "
        f"its test ppl {summary.get('best_test_ppl', math.nan):.2f}; the last model's test ppl "
        f"{summary['test_ppl']:.2f}",
        f"  achieved sparsity {summary['sparsity']:.3f} (target {summary['target_sparsity']:.3f}), "
        f"per layer {[round(s, 3) for s in summary['sparsity_layers']]}",
        f"  non-finite steps skipped {summary['bad_steps']}, schedule actor calls "
        f"{summary['actor_calls']}",
        f"  checkpoint (latest) {summary['checkpoint']}",
        f"  checkpoint (best)   {summary['best_checkpoint']}",
        f"  metrics {summary['metrics_file']}, plots {summary['plots_dir']}",
    ]


def validation_metrics(state: "RunState", val_loss: float, spars: list[float], sched,
                       last_log: dict, lr: float) -> dict:
    """The record of an evaluation step: validation loss and eval-mode sparsity (per layer and
    their mean), the training-mode sparsity and loss of the last log interval (`last_log`,
    all-reduced there), the step's Schedule (per-layer targets, loss weight) and the LR."""
    # training-mode (sampled-mask) sparsity: the mean over the last log interval; the
    # eval-mode values come from the deterministic gate
    train_spars = last_log.get("sparsity_layers") or [float("nan")] * len(spars)
    return {
        "step": state.step, "epoch": state.epoch, "val_loss": val_loss,
        "val_ppl": safe_ppl(val_loss),
        "sparsity": sum(spars) / len(spars),
        **{f"sparsity_layer_{i}": x for i, x in enumerate(spars)},
        "train_sparsity": sum(train_spars) / len(train_spars),
        **{f"train_sparsity_layer_{i}": x for i, x in enumerate(train_spars)},
        **{f"target_layer_{i}": t for i, t in enumerate(sched.targets)},
        "target_sparsity": sum(sched.targets) / len(sched.targets),
        "loss_weight": sched.weight,
        "train_loss": last_log.get("train_loss", float("nan")),
        "tokens_per_s": last_log.get("tokens_per_s", float("nan")),
        "lr": lr, "bad_steps": state.bad_steps,
    }
