"""The report of `sparsebk bench quality`: tables, plots and the goal check of its record.

    print(tables(record)); plots(record, out_dir)     # one run's quality.json record
    tradeoff_plot(["a/quality.json", ...], out_png)   # several runs on one plot (--tradeoff)

The record is what sparsebk.bench.quality writes to quality.json: its settings, model config,
dataset and one result per model (named DENSE, "bk-sparse-<target>" and TRANSFORMER). Everything
here reads that record only, so a stored quality.json can be reported again without training.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from sparsebk.bench.common import format_table

# test perplexity on PTB (Mikolov splits) from the literature, printed beside our numbers
ANCHORS = {"Kneser-Ney 5-gram": 141.2, "small LSTM (Zaremba et al. 2014)": 114.5,
           "medium LSTM (Zaremba et al. 2014)": 82.7}
DENSE = "bk-dense"
TRANSFORMER = "transformer"


def budget_words(s) -> str:
    """The budget in words, from settings or their dict."""
    get = s.get if isinstance(s, dict) else lambda k: getattr(s, k)
    steps = get("budget_steps")
    return f"{get('budget_s'):g} s" if steps is None else f"{steps} steps"


def goal_check(results: list[dict]) -> dict | None:
    """The issue's goal at 0.5: test ppl within 3% of dense, and faster per token."""
    by = {r["model"]: r for r in results}
    dense, half = by.get(DENSE), by.get("bk-sparse-0.5")
    if dense is None or half is None:
        return None
    ppl_ratio = half["test_ppl"] / dense["test_ppl"]
    train_speedup = half["train_tokens_per_s"] / dense["train_tokens_per_s"]
    eval_speedup = half["eval_tokens_per_s"] / dense["eval_tokens_per_s"]
    return {"test_ppl_ratio": ppl_ratio, "train_speedup": train_speedup,
            "eval_speedup": eval_speedup, "achieved_sparsity": half["achieved_sparsity"],
            "ppl_within_3pct": ppl_ratio <= 1.03, "faster_per_token": train_speedup > 1.0}


def probe_columns(r: dict) -> dict:
    """The machine probe's seconds during a row (`common.machine_probe`: median, min-max) and
    the row's tokens/s x the median: comparable between rows run at different machine speeds.
    Empty for records from before the probe."""
    if not r.get("probe_s"):
        return {}
    probe = statistics.median(r["probe_s"])
    return {"probe s (min-max)": f"{probe:.3f} ({min(r['probe_s']):.3f}-{max(r['probe_s']):.3f})",
            "tok/s x probe s": round(r["train_tokens_per_s"] * probe)}


def tables(record: dict) -> str:
    """The record as text: one row per model (perplexity, sparsity in eval and training, speed,
    the machine's load), the literature anchors, and the goal at target 0.5."""
    rows = []
    dense = next((r for r in record["results"] if r["model"] == DENSE), None)
    for r in record["results"]:
        sp = r["layer_sparsity"]
        rows.append({
            "model": r["model"], "target": "-" if r["target_sparsity"] is None else r["target_sparsity"],
            "eval sparsity": "-" if r["achieved_sparsity"] is None else f"{r['achieved_sparsity']:.3f}",
            "eval per layer": "-" if sp is None else " ".join(f"{x:.2f}" for x in sp),
            "train sparsity": "-" if not r["train_layer_sparsity"] else
            f"{sum(r['train_layer_sparsity']) / len(r['train_layer_sparsity']):.3f}",
            "valid ppl": r["valid_ppl"], "test ppl": r["test_ppl"],
            "test vs dense": "-" if dense is None else f"{r['test_ppl'] / dense['test_ppl']:.3f}",
            **({f"test ppl, stride {r['eval_stride']}": r["test_ppl_strided"]}
               if "test_ppl_strided" in r else {}),
            **({"EMA test ppl": r["ema_test_ppl"]} if "ema_test_ppl" in r else {}),
            "train tok/s": round(r["train_tokens_per_s"]), "eval tok/s": round(r["eval_tokens_per_s"]),
            "tokens seen": r["tokens_seen"], "steps": r["steps"], "params": r["params"],
            "cpu s / wall s": f"{r['train_cpu_s'] / r['train_s']:.2f}",
            "load 1m start/end": f"{r['load_avg_1m_start']:.1f}/{r['load_avg_1m_end']:.1f}",
            **probe_columns(r)})
    s = record["settings"]
    out = [f"PTB word-level quality, {budget_words(s)} of training per model (seed {s['seed']}, "
           f"batch {s['batch_size']}x{record['dataset']['block_len']}):", format_table(rows), "",
           "Literature anchors (PTB test perplexity):",
           format_table([{"model": k, "test ppl": v} for k, v in ANCHORS.items()])]
    by_pos = [r for r in record["results"] if "test_loss_by_position" in r]
    if by_pos:
        out += ["", "Test perplexity by the context a prediction had (ids seen):",
                format_table([_position_row(r["model"], r["test_loss_by_position"])
                              for r in by_pos]
                             + [_position_row(f"{r['model']} (EMA)", r["ema_test_loss_by_position"])
                                for r in by_pos if "ema_test_loss_by_position" in r])]
    by_ctx = [(name, r[key]) for r in record["results"]
              for name, key in ((r["model"], "test_loss_by_context"),
                                (f"{r['model']} (EMA)", "ema_test_loss_by_context")) if key in r]
    if by_ctx:
        from sparsebk.evaluation import safe_ppl

        c0 = by_ctx[0][1]
        out += ["", f"Test perplexity of the same {c0['targets']} targets (every {c0['every']}-th "
                "id) from exactly c ids of context, and the gain of each c over the c before "
                "(millinats, +- its paired standard error):",
                format_table([{"model": name, **{str(c): round(safe_ppl(x), 1)
                                                 for c, x in zip(t["contexts"], t["loss"])}}
                              for name, t in by_ctx]),
                format_table([{"model": name, **{
                    str(c): f"{1000 * g:.0f} +- " + ("-" if se is None else f"{1000 * se:.0f}")
                    for c, g, se in zip(t["contexts"][1:], t["gain"][1:], t["gain_se"][1:])}}
                    for name, t in by_ctx])]
    shifts = [r for r in record["results"] if "bk_shifts" in r]
    if shifts:
        out += ["", "BK memory lengths after training (1 / Im z of each layer's heads, positions: "
                "longest and shortest):",
                format_table([{"model": r["model"], **{
                    f"layer {i}": f"{1 / min(im for _, im in layer):.1f} .. "
                                  f"{1 / max(im for _, im in layer):.2f}"
                    for i, layer in enumerate(r["bk_shifts"])}} for r in shifts])]
    g = record["goal"]
    if g:
        out += ["", "Goal at target 0.5 (test ppl within 3% of dense; faster per token):",
                format_table([{"test ppl / dense": f"{g['test_ppl_ratio']:.3f}",
                               "within 3%": "yes" if g["ppl_within_3pct"] else "no",
                               "train speed-up": f"{g['train_speedup']:.2f}x",
                               "eval speed-up": f"{g['eval_speedup']:.2f}x",
                               "achieved sparsity": g["achieved_sparsity"]}])]
    return "\n".join(out)


def _position_row(model: str, by_pos: list[float]) -> dict:
    from sparsebk.evaluation import position_table, safe_ppl

    return {"model": model, **{(str(lo) if lo == hi else f"{lo}-{hi}"): round(safe_ppl(x), 1)
                               for lo, hi, x in position_table(by_pos)}}


def plots(record: dict, out_dir: Path) -> list[Path]:
    """Two PNGs in `out_dir`: perplexity against achieved sparsity (anchors as lines), and the
    training curves (valid-subset and train perplexity, train-mode sparsity against target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for draw, name in ((lambda: _ppl_vs_sparsity(plt, record), "quality_ppl_vs_sparsity.png"),
                       (lambda: _curves(plt, record["results"]), "quality_curves.png")):
        fig = draw()
        fig.tight_layout()
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def _ppl_vs_sparsity(plt, record: dict):
    res = record["results"]
    bk = [r for r in res if r["model"] != TRANSFORMER]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs = [r["achieved_sparsity"] or 0.0 for r in bk]
    ax.plot(xs, [r["test_ppl"] for r in bk], "o-", label="sparse BK (test)")
    ax.plot(xs, [r["valid_ppl"] for r in bk], "s--", alpha=0.6, label="sparse BK (valid)")
    for r, x in zip(bk, xs):
        ax.annotate(f"target {r['target_sparsity']:g}", (x, r["test_ppl"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    for r in res:
        if r["model"] == TRANSFORMER:
            ax.plot([0.0], [r["test_ppl"]], "r*", markersize=12, label="Transformer (test)")
    for (k, v), style in zip(ANCHORS.items(), (":", "-.", "--")):
        ax.axhline(v, color="gray", linestyle=style, linewidth=0.8, label=k)
    ax.set_yscale("log")
    ax.set_xlabel("achieved sparsity (eval, mean over layers)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"PTB, {budget_words(record['settings'])} per model")
    ax.legend(fontsize=7)
    return fig


def _curves(plt, res: list[dict]):
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in res:
        c = r["curve"]
        line, = a1.plot([p["train_s"] for p in c], [p["valid_subset_ppl"] for p in c], "o-", ms=3,
                        label=r["model"])
        a2.plot([p["tokens"] for p in c], [math.exp(min(p["train_ce"], 30)) for p in c], "o-", ms=3,
                label=r["model"])
        if c and c[0].get("train_layer_sparsity") is not None:
            t = [p["train_s"] for p in c]
            a3.plot(t, [sum(p["train_layer_sparsity"]) / len(p["train_layer_sparsity"]) for p in c],
                    "o-", ms=3, color=line.get_color(), label=r["model"])
            a3.plot(t, [p["target"] for p in c], ":", color=line.get_color())
    a1.set_xlabel("training seconds")
    a1.set_ylabel("valid-subset perplexity")
    a2.set_xlabel("tokens seen")
    a2.set_ylabel("train perplexity (mean since last point)")
    a3.set_xlabel("training seconds")
    a3.set_ylabel("train-mode sparsity, layer mean (dotted: target)")
    a3.set_ylim(-0.02, 1.02)
    for a in (a1, a2):
        a.set_yscale("log")
    for a in (a1, a2, a3):
        a.legend(fontsize=7)
    return fig


def tradeoff_points(paths: list[str]) -> dict[str, list[tuple[float, float, str]]]:
    """(tokens/s, test ppl, label) of every row of these `quality.json` files, by series:
    "dense" (sorted by speed: the dense curve), "sparse" and "transformer". A dense label names
    the size (d_model, layers, BK heads, expert width F when not 4 d_model); a sparse one its target, what its skipped positions
    output, and "weighted" for a weighted gate."""
    dense, sparse, other = [], [], []
    for path in paths:
        rec = json.loads(Path(path).read_text())
        over = rec["settings"].get("model_overrides", {})
        mc = rec["model_config"]
        for r in rec["results"]:
            x, y = r["train_tokens_per_s"], r["test_ppl"]
            if r["model"] == TRANSFORMER:
                other.append((x, y, "Transformer"))
            elif not r["target_sparsity"]:
                ff = f" F{mc['d_ff']}" if mc.get("d_ff") else ""  # expert width when not 4D
                dense.append((x, y, f"d{mc['d_model']} L{mc['n_layers']} H{mc.get('bk_heads', 1)}{ff}"))
            else:
                skip = over.get("skip_output", mc.get("skip_output", "carry"))
                weighted = over.get("gate_weight", mc.get("gate_weight", False))
                sparse.append((x, y, f"{r['target_sparsity']:g} {skip}" + (" weighted" if weighted else "")))
    return {"dense": sorted(dense), "sparse": sparse, "transformer": other}


def tradeoff_plot(paths: list[str], out: Path) -> Path:
    """One plot from several `quality.json` files of the same protocol (`tradeoff_points`):
    test perplexity against training tokens/s, dense models as one series, each sparse model
    a labelled point. Sparsity pays where a sparse point lies below the dense series (better
    perplexity at the same speed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    pts_by = tradeoff_points(paths)
    dense, sparse, other = pts_by["dense"], pts_by["sparse"], pts_by["transformer"]
    for pts, style, name in ((dense, "o-", "BK dense"), (sparse, "^", "BK sparse"),
                             (other, "r*", "Transformer")):
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, markersize=8)
        for x, y, label in pts:
            ax.annotate(label, (x, y), fontsize=7, textcoords="offset points", xytext=(4, 3))
    ax.set_xlabel("training tokens/s")
    ax.set_ylabel("test perplexity")
    ax.set_title("PTB: perplexity against training speed (same wall-clock budget)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
