"""`sparsebk bench decode --out DIR`: per-token decoding cost against the context length.

For every context length C, batch size B and model: the median latency of one decode step at
position C (`model.step`), its tokens/s (B / latency), the decoding state's memory, and the
prefill rate (tokens/s of `model.prefill` over C tokens, in chunks of --prefill-chunk).

Models, all of one width and depth (an LMConfig preset, --d-model/--n-layers overriding):
- "bk" at each --sparsities s: SparseBKLM with pos_emb="none" and the threshold eval gate,
  its importance predictors random with each layer's bias calibrated (on random tokens,
  layer by layer: `forced_gates` "calibrated") so that a fraction s of tokens is skipped;
  s = 0 computes every token (logits pinned open). The measured eval sparsity is reported.
  Tokens are random ids: an untrained model's cost does not depend on what it reads, only
  on how many tokens compute.
- "bk-all-skipped": every token skipped (logits pinned closed: no expert, no projection; the
  light FFN of skip_output "light" runs): with the dense step it gives the skippable share
  of a step, 1 - t(all skipped) / t(dense), hence the latency sparsity s should reach,
  t(dense) (1 - share s), printed beside the measured one.
- "transformer": the KV-cached TransformerLM of sparsebk.model.baselines (TransformerConfig.matching:
  same width, depth, vocabulary; learned positions over C + steps), its cache allocated to
  that length.

State at position C without decoding C tokens first: the Transformer's cache holds C random
keys and values (attention costs the same whatever they are); the BK state is the one after a
64-token prefill with its position set to C (a step's work is the same at every position;
the threshold gate and pos_emb="none" read no position). Memory: DecodeState.nbytes() and
KVCache.nbytes() (the filled positions). A step is timed at the same position each call
(the Transformer's cache position is reset before each). Prefill is measured where
B * C <= --max-prefill-tokens and the KV cache where its size <= --max-cache-gb.

Prints the tables, writes DIR/decode.json and DIR/decode.png (latency and memory against C).
Numbers from a loaded or shared machine are not the architecture's: run it on an idle one.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from sparsebk.model.baselines import TransformerConfig, TransformerLM
from sparsebk.bench.common import format_table, model_overrides, time_call, write_result
from sparsebk.model.forcing import forced_gates
from sparsebk.model.lm import DecodeState, LMConfig, SparseBKLM

QUICK = dict(preset="debug", d_model=64, n_layers=2, vocab=1000, contexts="256,1024",
             batches="1,4", steps=8, max_prefill_tokens=4096, prefill_chunk=512)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def random_gate_bk(cfg: LMConfig, device, seed: int = 0, batch: int = 16,
                   length: int = 256) -> tuple[SparseBKLM, torch.Tensor]:
    """(a BK model whose importance predictors are random, random tokens (batch, length) to
    calibrate its gates on)."""
    torch.manual_seed(seed)
    model = SparseBKLM(cfg).to(device).eval()
    tokens = torch.randint(0, cfg.vocab_size, (batch, length), device=device)
    with torch.no_grad():
        for layer in model.layers:
            layer.sparse_bk_core.importance_predictor.weight.normal_(std=1.0 / math.sqrt(cfg.d_model))
    return model, tokens


def gates_at(model: SparseBKLM, sparsity: float, tokens: torch.Tensor):
    """`forced_gates` of a row: every token computed at sparsity 0 and skipped at 1 (logits
    pinned: no method replaced on the step path), else the threshold gates calibrated to skip
    a fraction `sparsity` of `tokens` (each token still decided by its own logit)."""
    if sparsity <= 0:
        return forced_gates(model, "pinned_open")
    if sparsity >= 1:
        return forced_gates(model, "pinned_closed")
    return forced_gates(model, "calibrated", rate=sparsity, tokens=tokens)


def bk_rows(model: SparseBKLM, label: str, target: float | None, args, device) -> list[dict]:
    rows = []
    with torch.no_grad():
        probe = torch.randint(0, model.config.vocab_size, (16, 256), device=device)
        measured = float(model(probe)["layer_sparsity"].mean())
    for b in _ints(args.batches):
        _, warm = model.prefill(torch.randint(0, model.config.vocab_size, (b, 64), device=device))
        tok = torch.randint(0, model.config.vocab_size, (b,), device=device)
        for c in _ints(args.contexts):
            state = DecodeState(warm.layers, c)
            t = time_call(lambda: model.step(tok, state), repeats=args.steps, warmup=3,
                          device=device, clock=args.clock)
            rows.append(_row(label, target, measured, b, c, t, state.nbytes(),
                             _prefill_rate(model, b, c, args, device, bk=True)))
    return rows


def transformer_rows(model: TransformerLM, args, device) -> list[dict]:
    rows = []
    cfg = model.config
    for b in _ints(args.batches):
        tok = torch.randint(0, cfg.vocab_size, (b,), device=device)
        for c in _ints(args.contexts):
            cache_bytes = 2 * cfg.n_layers * b * c * cfg.d_model * 4
            if cache_bytes > args.max_cache_gb * 2 ** 30:
                rows.append(_row("transformer", None, None, b, c, None, cache_bytes, None,
                                 note=f"skipped: cache > {args.max_cache_gb} GB"))
                continue
            cache = model.init_cache(b, max_len=c + 1)
            for k, v in zip(cache.keys, cache.values):
                k[:, :, :c].normal_()
                v[:, :, :c].normal_()
            cache.pos = c

            def one_step():
                cache.pos = c  # every call decodes position c
                model.step(tok, cache)

            t = time_call(one_step, repeats=args.steps, warmup=3, device=device, clock=args.clock)
            cache.pos = c
            rows.append(_row("transformer", None, None, b, c, t, cache.nbytes(),
                             _prefill_rate(model, b, c, args, device, bk=False)))
            del cache
    return rows


def _prefill_rate(model, b: int, c: int, args, device, *, bk: bool) -> float | None:
    """Tokens/s of prefilling C tokens in chunks (None where B C exceeds the budget)."""
    if b * c > args.max_prefill_tokens:
        return None
    tokens = torch.randint(0, model.config.vocab_size, (b, c), device=device)
    chunks = tokens.split(args.prefill_chunk, dim=1)

    def run():
        state = None if bk else model.init_cache(b, max_len=c)
        for chunk in chunks:
            _, state = model.prefill(chunk, state)

    t = time_call(run, repeats=2 if b * c <= 65536 else 1, warmup=1, device=device,
                  clock=args.clock)
    return b * c / t["median_s"]


def _row(model, target, measured, b, c, timing, nbytes, prefill, note="") -> dict:
    lat = None if timing is None else timing["median_s"]
    return {"model": model, "target_sparsity": target, "measured_sparsity": measured,
            "batch": b, "context": c, "step_ms": None if lat is None else 1e3 * lat,
            "step_ms_min": None if lat is None else 1e3 * timing["min_s"],
            "decode_tokens_per_s": None if lat is None else b / lat,
            "state_MB": nbytes / 2 ** 20, "prefill_tokens_per_s": prefill, "note": note}


def summary(rows: list[dict], contexts: list[int], batches: list[int]) -> list[dict]:
    """The issue's goals, measured: flatness 256 -> largest context, speed-up over the
    Transformer at the largest common context, sparse vs dense against the skippable share."""
    get = {(r["model"], r["batch"], r["context"]): r for r in rows}
    lo, hi = min(contexts), max(contexts)
    out = []
    for b in batches:
        dense = get.get(("bk-s0", b, lo))
        skipped = get.get(("bk-all-skipped", b, lo))
        share = (1 - skipped["step_ms"] / dense["step_ms"]) if dense and skipped else None
        for name in sorted({r["model"] for r in rows}):
            a, z = get.get((name, b, lo)), get.get((name, b, hi))
            if not a or not z or a["step_ms"] is None or z["step_ms"] is None:
                continue
            tr = get.get(("transformer", b, hi))
            s = a["measured_sparsity"]
            out.append({
                "model": name, "batch": b,
                f"step_ms@{lo}": a["step_ms"], f"step_ms@{hi}": z["step_ms"],
                "latency_ratio": z["step_ms"] / a["step_ms"],
                "memory_ratio": z["state_MB"] / a["state_MB"],
                f"x_transformer@{hi}": (tr["step_ms"] / z["step_ms"]
                                        if tr and tr["step_ms"] and name != "transformer" else None),
                f"x_dense@{lo}": (dense["step_ms"] / a["step_ms"]
                                  if dense and name.startswith("bk") else None),
                "x_dense_expected": (1 / (1 - share * s) if share is not None and s is not None
                                     and name.startswith("bk") and share * s < 1 else None),
                "skippable_share": share if name.startswith("bk") else None})
    return out


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    models = list(dict.fromkeys(r["model"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    styles = ["-", "--", ":", "-."]
    for mi, model in enumerate(models):  # colour: the model; line style: the batch size
        for bi, b in enumerate(batches):
            pts = sorted(((r["context"], r) for r in rows
                          if r["model"] == model and r["batch"] == b), key=lambda t: t[0])
            kw = dict(color=f"C{mi}", linestyle=styles[bi % len(styles)], marker="o",
                      label=f"{model} B={b}")
            lat = [(c, r["step_ms"]) for c, r in pts if r["step_ms"] is not None]
            if lat:
                ax1.plot(*zip(*lat), **kw)
            if pts:
                ax2.plot([c for c, _ in pts], [r["state_MB"] for _, r in pts], **kw)
    for ax, title, unit in ((ax1, "decode step latency", "ms per step"),
                            (ax2, "decoding state memory", "MB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsebk bench decode", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--preset", default="small", help="LMConfig preset (width, depth, experts)")
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: preset's)")
    p.add_argument("--contexts", default="256,1024,4096,16384,65536")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--sparsities", default="0,0.5,0.7")
    p.add_argument("--steps", type=int, default=32, help="timed steps per point (median)")
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--max-prefill-tokens", type=int, default=16 * 16384,
                   help="prefill is measured where batch * context <= this")
    p.add_argument("--max-cache-gb", type=float, default=16.0,
                   help="Transformer points whose KV cache exceeds this are skipped")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="what a latency is: wall time, or this process's CPU time (a shared "
                        "CPU box, one thread: the work done)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="LMConfig override of the BK model, e.g. --set bk_heads=8 (repeatable)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    return p


def bk_config(args) -> LMConfig:
    """The BK model of the run: the preset with the size flags and --set overrides, decoding
    past n_seq (pos_emb "none") with the threshold eval gate and no dropout."""
    over = {k: v for k, v in (("d_model", args.d_model), ("n_layers", args.n_layers),
                              ("vocab_size", args.vocab)) if v is not None}
    over.update(model_overrides(args.set))
    if over.get("pos_emb", "none") != "none":
        raise ValueError("--set pos_emb: decoding past n_seq needs pos_emb=none")
    return LMConfig.preset(args.preset, **{**over, "pos_emb": "none"},
                           gate_eval_mode="threshold", dropout_p=0.0)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    contexts, batches = _ints(args.contexts), _ints(args.batches)
    cfg = bk_config(args)

    rows = []
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    for s, label in [(s, f"bk-s{s:g}") for s in sorted(set(sparsities) | {0.0})] + [
            (1.0, "bk-all-skipped")]:
        model, tokens = random_gate_bk(cfg, dev)
        with gates_at(model, s, tokens):
            rows += bk_rows(model, label, s, args, dev)
    torch.manual_seed(0)
    tcfg = TransformerConfig.matching(cfg, n_seq=max(contexts) + 1, dropout_p=0.0)
    rows += transformer_rows(TransformerLM(tcfg).to(dev).eval(), args, dev)

    print(f"decode: preset {args.preset}, d_model {cfg.d_model}, {cfg.n_layers} layers, "
          f"vocab {cfg.vocab_size}, {cfg.num_experts} experts top-{cfg.top_k}; transformer "
          f"{tcfg.n_heads} heads, d_ff {tcfg.d_ff}; device {dev}, threads "
          f"{torch.get_num_threads()}, {args.steps} timed steps per point, {args.clock} clock")
    print(format_table(rows, ["model", "target_sparsity", "measured_sparsity", "batch", "context",
                              "step_ms", "step_ms_min", "decode_tokens_per_s", "state_MB",
                              "prefill_tokens_per_s", "note"]))
    summ = summary(rows, contexts, batches)
    print(f"\ngoals: latency and memory ratio from context {min(contexts)} to {max(contexts)}; "
          "speed-up over the KV-cached transformer; sparse vs dense against the skippable share")
    print(format_table(summ))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot(rows, out / "decode.png")
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update(model_config=cfg.to_dict(), transformer_config=tcfg.to_dict(),
                  threads=torch.get_num_threads())
    path = write_result(out, "decode", {"config": config, "rows": rows, "summary": summ})
    print(f"wrote {path} and {png}")
    return 0
