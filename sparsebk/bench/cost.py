"""`sparsebk bench cost --out DIR`: when does sparsity pay? The cost of a step against width.

For each width (`--widths`, d_model) one LM, built by a recipe from the presets (below), is
timed on this machine with its gates forced (`sparsebk.model.forcing.forced_gates`):

- a training step (forward, backward, AdamW) on --batch x n_seq random tokens drawn by Zipf's
  law over the ids (`zipf_tokens`: the word tokenizer orders ids by frequency, and an adaptive
  head's cost depends on how many targets fall past its cutoff), and a decode
  step (`SparseBKLM.step`, eval mode, --decode-batch sequences after a 16-token prefill; one
  timed call is --decode-steps steps);
- with every gate open (the dense work), every gate closed (every position skipped: under the
  presets' `skip_output: light` the light FFN runs in place of the experts) and at each
  --sparsities s (a fresh random mask per layer and call, each position skipped with
  probability s), round-robin (one call of each per round, so that load drifting on the
  machine hits all alike), the median of --repeats rounds after --warmup rounds.

From the times: the saved share = (t_open - t_closed) / t_open, the most that skipping can
remove; the ideal speed-up at sparsity s, 1 / (1 - s share); the measured one, t_open / t_s;
and the sparsity the forced masks gave (counted from the masks themselves). Beside them, the
counted share: the same ratio of forward multiply-adds per position (`position_macs`: the
matmuls of the tied output head, the BK mixer, the experts and the light FFN, and an estimate
for the BK chain), what a machine running every multiply-add at one speed would measure. A
backward costs two multiply-adds per forward one in every matmul, so a training step's
counted share is the forward's; AdamW (per parameter, every expert's) and the elementwise
ops are not counted. Each row carries the machine probe (`machine_probe`, seconds: see
BENCHMARKS.md, "Compare rows of the same hour") and the 1-minute load average at its start
and end.

The recipe (`--recipe`) scales a width as the presets do: experts 4 d_model wide (the
presets' default), their count and top-k interpolated geometrically on log2(width) between
the `small` (d_model 128: 4 experts, top-1) and `large` (1024: 8 experts, top-2) presets,
rounded, and so the light FFN's width over d_model (small: 128 of 128, large: D / 4)
("experts", the default: depth, vocabulary and context stay the small preset's, this
machine's PTB setting); "presets" interpolates the depth too (4 to 16 layers). `--set
FIELD=VALUE` overrides a field at every width (e.g. `--set vocab_size=50257 --set
n_seq=1024` for the large preset's head and context on a GPU).

Prints the tables, the widths at which 0.5 sparsity buys 1.3x and 1.5x tokens/s (linear
between the two measured widths around it), and a prediction for the `large` preset from its
counted share; writes DIR/cost.json and DIR/cost.png. A loaded machine's numbers are not the
architecture's: run it alone on an idle one.
"""

from __future__ import annotations

import argparse
import math
import os
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import torch

from sparsebk.bench.common import (format_table, machine_probe, model_overrides, time_calls,
                                   write_result)
from sparsebk.model.config import PRESETS, LMConfig, light_width
from sparsebk.model.forcing import forced_gates
from sparsebk.model.lm import SparseBKLM

# Real multiply-adds of the BK chain per head and position (an estimate, not a matmul): two
# complex reciprocals (about 5 each) and k_{i-1} times one of them (2), the causal forward
# recurrence alpha_i = s_i - k_{i-1} / alpha_{i-1} and g_i = 1 / alpha_i.
BK_CHAIN_MACS = 12
PARTS = ("head", "bk_mixer", "experts", "light")
TARGETS = (1.3, 1.5)  # the tokens/s speed-ups asked for at 0.5 sparsity
PREFILL = 16  # tokens prefilled before the timed decode steps
# the `large` preset on a GPU (width 1024 under the "presets" recipe is the large preset once
# its vocabulary and context are set): prepared, to run where a GPU is lent
GPU_CHECK = ("sparsebk bench cost --device cuda --widths 1024 --recipe presets "
             "--set vocab_size=50257 --set n_seq=1024 --batch 8 --out bench_out/cost-gpu")
QUICK = dict(widths="32,64", batch=2, decode_batch=4, decode_steps=2, repeats=2, warmup=1,
             probe_rows=128, quick_set=["vocab_size=256", "n_seq=32", "n_layers=2"])


# --- counted work ----------------------------------------------------------------------------

def position_macs(cfg: LMConfig, phase: str = "train") -> dict[str, dict[str, int]]:
    """Forward multiply-adds of one position by part ("head": the tied output head D x V, the
    embedding lookup being free; "bk_mixer": the gate's predictor, potentials, couplings,
    output projection and BK chain of every layer; "experts": router and top-k expert FFNs;
    "light": the light FFN), for a "computed" and a "skipped" position of the sparse path.
    Per-call terms are left out (under "carry", the one projected zero row per layer call).
    An adaptive head (`head_cutoff`) costs its first level and, for the share of targets past
    the cutoff under Zipf's law, its second in "train" (the loss reads no other), and forms
    every log-probability in "decode"."""
    D, H, L = cfg.d_model, cfg.bk_heads, cfg.n_layers
    d_ff = cfg.d_ff or 4 * D
    light_ff = light_width(D, cfg.light_d_ff)
    potentials = D * H + (D * H if cfg.bk_input_couplings else 0)  # v_proj, coupling_proj
    project = 2 * H * D  # output_proj of the features
    every = D + BK_CHAIN_MACS * H + (D * H if cfg.skip_output == "mix" else 0)  # gate, chain, W_s
    skipped_mixer = every + {"light": potentials + project, "own": project, "mix": project,
                             "carry": 0, "zero": 0}[cfg.skip_output]
    head = D * cfg.vocab_size
    if cfg.head_cutoff:  # the first level; the second (with P) where it is read
        c = cfg.head_cutoff
        read = 1.0 if phase == "decode" else zipf_rest_share(cfg.vocab_size, c)
        head = D * (c + 1) + read * (D * D + D * (cfg.vocab_size - c))
    return {"computed": {"head": head, "bk_mixer": L * (every + potentials + project),
                         "experts": L * (D * cfg.num_experts + cfg.top_k * 2 * D * d_ff),
                         "light": 0},
            "skipped": {"head": head, "bk_mixer": L * skipped_mixer, "experts": 0,
                        "light": L * 2 * D * light_ff if cfg.skip_output == "light" else 0}}


def zipf_rest_share(vocab: int, cutoff: int) -> float:
    """The mass of ids >= cutoff under Zipf's law p(i) = (1 / (i + 1)) / H_vocab."""
    harmonic = lambda n: sum(1.0 / k for k in range(1, n + 1))  # noqa: E731
    return 1.0 - harmonic(cutoff) / harmonic(vocab)


def zipf_tokens(shape: tuple[int, ...], vocab: int, gen: torch.Generator) -> torch.Tensor:
    """int64 ids of `shape` drawn independently with p(i) proportional to 1 / (i + 1): text's
    rank-frequency law, for a vocabulary ordered by frequency (on PTB the 2,000 most frequent
    of 10,000 ids are 87% of the tokens; under this law 84%)."""
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    n = math.prod(shape)
    return torch.multinomial(weights, n, replacement=True, generator=gen).reshape(shape)


def counted_macs(cfg: LMConfig, sparsity: float, phase: str = "train") -> dict[str, float]:
    """Forward multiply-adds per position by part when a fraction `sparsity` is skipped."""
    per = position_macs(cfg, phase)
    return {p: (1 - sparsity) * per["computed"][p] + sparsity * per["skipped"][p] for p in PARTS}


def counted_share(cfg: LMConfig, phase: str = "train") -> float:
    """The share of a position's multiply-adds that skipping it removes."""
    per = position_macs(cfg, phase)
    return 1.0 - sum(per["skipped"].values()) / sum(per["computed"].values())


def ideal_speedup(share: float, sparsity: float) -> float:
    """Tokens/s against dense when a fraction `sparsity` of positions saves `share` each."""
    return 1.0 / (1.0 - sparsity * share)


# --- the models --------------------------------------------------------------------------------

def _geometric(a: int, b: int, t: float) -> int:
    return max(1, round(a * (b / a) ** t))


def _light_share(preset: dict) -> float:
    """A preset's light FFN width over its d_model (D / 4 when it names none)."""
    return light_width(preset["d_model"], preset.get("light_d_ff")) / preset["d_model"]


def width_config(width: int, recipe: str = "experts", overrides: dict | None = None) -> LMConfig:
    """The small preset at d_model `width`, experts scaled as the presets scale them (module
    docstring); "presets" scales the depth too; `overrides` last."""
    small, large = PRESETS["small"], PRESETS["large"]
    t = math.log2(width / small["d_model"]) / math.log2(large["d_model"] / small["d_model"])
    t = min(1.0, max(0.0, t))  # below small: small's experts; above large: large's
    fields = {"d_model": width, "num_experts": _geometric(small["num_experts"],
                                                          large["num_experts"], t)}
    fields["top_k"] = min(fields["num_experts"], _geometric(small["top_k"], large["top_k"], t))
    # the light FFN's width as a share of d_model, geometric between the presets' (small: 128
    # of 128, large: D / 4); None where it comes out at the default D / 4
    ratio = _light_share(small) * (_light_share(large) / _light_share(small)) ** t
    light = max(1, round(width * ratio))
    fields["light_d_ff"] = None if light == light_width(width, None) else light
    if recipe == "presets":
        fields["n_layers"] = _geometric(small["n_layers"], large["n_layers"], t)
    return LMConfig.preset("small", **{**fields, **(overrides or {})})


def _gates(model, sparsity: float, generator: torch.Generator):
    if sparsity <= 0.0:
        return forced_gates(model, "open")
    if sparsity >= 1.0:
        return forced_gates(model, "closed")
    return forced_gates(model, "rate", rate=sparsity, generator=generator)


# --- timing ------------------------------------------------------------------------------------

def _precision(device, autocast: str):
    """The context a timed call runs in: bf16 autocast (how the training loop runs on a GPU)
    or none (float32)."""
    if autocast == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def time_training(model, batch: int, cases: Sequence[float], *, repeats: int, warmup: int,
                  device, seed: int = 0, autocast: str = "none") -> dict[float, dict]:
    """Per sparsity s of `cases` (0: every gate open, 1: every gate closed): `time_calls`'s
    timing of one training step (forward, backward, AdamW), round-robin, plus "sparsity" (the
    fraction of the step's gate decisions that skipped, over every call) and "decisions"."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    tokens = zipf_tokens((batch, cfg.n_seq + 1), cfg.vocab_size, gen).to(device)
    opt = model.configure_optimizers(weight_decay=0.1, lr=1e-4, betas=(0.9, 0.95))
    model.train()
    seen: dict[float, list] = {s: [] for s in cases}

    def step(s: float) -> None:
        with _gates(model, s, gen):
            with _precision(device, autocast):
                out = model(tokens[:, :-1], tokens[:, 1:])
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
        seen[s].append(out["layer_sparsity"])  # (L,): 1 - mean of each layer's forced mask

    timed = time_calls({s: partial(step, s) for s in cases}, repeats=repeats, warmup=warmup,
                       device=device)
    per_call = batch * cfg.n_seq * cfg.n_layers
    return {s: {**timed[s], "sparsity": float(torch.stack(seen[s]).mean()),
                "decisions": per_call * len(seen[s])} for s in cases}


@contextmanager
def kept_decisions(model, kept: list) -> Iterator[None]:
    """Inside the block each layer's decoding decision (`decide`, forced or not) also appends
    its keep mask to `kept`; on exit each layer's own `decide` comes back."""
    cores = [layer.sparse_bk_core for layer in model.layers]
    held = [core.__dict__.get("decide") for core in cores]
    for core in cores:
        def decide(x, start, inner=core.decide):
            keep, logits = inner(x, start)
            kept.append(keep)
            return keep, logits

        core.decide = decide
    try:
        yield
    finally:
        for core, before in zip(cores, held):
            core.__dict__.pop("decide", None)
            if before is not None:
                core.decide = before


def time_decode(model, batch: int, cases: Sequence[float], *, steps: int, repeats: int,
                warmup: int, device, seed: int = 0, autocast: str = "none") -> dict[float, dict]:
    """Per sparsity s of `cases`: `time_calls`'s timing of `steps` decode steps (eval mode, one
    token per sequence, every call from the same state after a PREFILL-token prompt),
    round-robin, with "step_s" (the median per step); "sparsity" and "decisions" counted over
    `steps x repeats` more steps under the same forcing."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    prompt = zipf_tokens((batch, min(PREFILL, cfg.n_seq - 1)), cfg.vocab_size, gen)
    tok = zipf_tokens((batch,), cfg.vocab_size, gen).to(device)
    with _precision(device, autocast):
        _, state = model.prefill(prompt.to(device))

    def run(s: float) -> None:
        with _gates(model, s, gen), _precision(device, autocast):
            for _ in range(steps):
                model.step(tok, state)

    timed = time_calls({s: partial(run, s) for s in cases}, repeats=repeats, warmup=warmup,
                       device=device)
    out = {}
    for s in cases:
        kept: list = []
        with _gates(model, s, gen), kept_decisions(model, kept), _precision(device, autocast):
            for _ in range(steps * repeats):
                model.step(tok, state)
        kept_all = torch.cat([k.reshape(-1) for k in kept])
        out[s] = {**timed[s], "step_s": timed[s]["median_s"] / steps,
                  "sparsity": 1.0 - float(kept_all.float().mean()), "decisions": kept_all.numel()}
    return out


# --- rows and summary --------------------------------------------------------------------------

def _experts(cfg: LMConfig) -> str:
    light = (f", light {light_width(cfg.d_model, cfg.light_d_ff)}"
             if cfg.skip_output == "light" else "")
    return f"{cfg.num_experts}x{cfg.d_ff or 4 * cfg.d_model} top-{cfg.top_k}{light}"


def phase_row(cfg: LMConfig, phase: str, timed: dict, step_key: str, tokens: int,
              sparsities: Sequence[float], probe_s: float, load: tuple[float, float]) -> dict:
    """One table row: a width's phase ("train" or "decode") at every forced sparsity."""
    t = {s: timed[s][step_key] for s in timed}
    share = (t[0.0] - t[1.0]) / t[0.0]
    row = {"width": cfg.d_model, "layers": cfg.n_layers, "experts": _experts(cfg),
           "phase": phase, "tokens_per_step": tokens, "open_ms": 1e3 * t[0.0],
           "closed_ms": 1e3 * t[1.0], "open_tok_s": tokens / t[0.0], "saved_share": share,
           "counted_share": counted_share(cfg, phase)}
    for s in sparsities:
        row[f"ideal@{s:g}"] = ideal_speedup(share, s)
        row[f"measured@{s:g}"] = t[0.0] / t[s]
        row[f"counted@{s:g}"] = ideal_speedup(row["counted_share"], s)
        row[f"sparsity@{s:g}"] = timed[s]["sparsity"]
    row.update(probe_s=probe_s, load_1m=f"{load[0]:.2f}/{load[1]:.2f}", load_1m_start=load[0],
               load_1m_end=load[1])
    return row


def split_row(cfg: LMConfig, label: str) -> dict:
    """The counted forward multiply-adds per position of a dense model, by part (millions),
    their shares, and the light FFN a skipped position runs instead of the experts."""
    dense = counted_macs(cfg, 0.0)
    total = sum(dense.values())
    row = {"model": label, "width": cfg.d_model, "layers": cfg.n_layers,
           "experts": _experts(cfg), "vocab": cfg.vocab_size}
    row.update({f"{p}_MMAC": dense[p] / 1e6 for p in ("head", "bk_mixer", "experts")})
    row["light_MMAC_skipped"] = counted_macs(cfg, 1.0)["light"] / 1e6
    row["total_MMAC"] = total / 1e6
    row.update({f"{p}_%": 100 * dense[p] / total for p in ("head", "bk_mixer", "experts")})
    row["counted_share"] = counted_share(cfg)
    return row


def width_reaching(points: Sequence[tuple[float, float]], target: float) -> dict:
    """The width at which the speed-up first reaches `target`, from (width, speed-up) points:
    linear between the last width below it and the first at or above it. "width" is None when
    no width reaches it, or when the narrowest one already does ("at_or_below" then)."""
    pts = sorted(points)
    for i, (w, x) in enumerate(pts):
        if x >= target:
            if i == 0:
                return {"width": None, "at_or_below": w,
                        "text": f"at or below width {w:g}, the narrowest measured ({x:.2f}x)"}
            w0, x0 = pts[i - 1]
            width = w0 + (target - x0) * (w - w0) / (x - x0)
            text = f"about width {width:.0f} (between {w0:g}: {x0:.2f}x and {w:g}: {x:.2f}x)"
            return {"width": width, "between": [w0, w], "text": text}
    return {"width": None, "text": "not within the widths measured"}


def large_prediction(train_rows: list[dict], sparsities: Sequence[float]) -> dict:
    """The `large` preset's counted share and ideal speed-ups, and the same scaled by this
    machine's measured / counted share at the widest width measured: a prediction."""
    cfg = LMConfig.preset("large")
    share = counted_share(cfg)
    widest = max(train_rows, key=lambda r: r["width"])
    ratio = widest["saved_share"] / widest["counted_share"]
    return {"label": "a prediction from its counted multiply-adds, not measured",
            "preset": "large", "config": cfg.to_dict(), "counted_share": share,
            "ideal": {f"{s:g}": ideal_speedup(share, s) for s in sparsities},
            "measured_over_counted_share": ratio, "at_width": widest["width"],
            "scaled": {f"{s:g}": ideal_speedup(min(share * ratio, 1.0), s) for s in sparsities}}


def summary(rows: list[dict], s: float, sparsities: Sequence[float]) -> dict:
    """Per phase and target: the width where s sparsity reaches it, measured and counted."""
    out: dict = {"sparsity": s}
    for phase in ("train", "decode"):
        mine = [r for r in rows if r["phase"] == phase]
        for kind in ("measured", "counted"):
            pts = [(r["width"], r[f"{kind}@{s:g}"]) for r in mine]
            out[f"{phase}_{kind}"] = {f"{x:g}x": width_reaching(pts, x) for x in TARGETS}
    out["large"] = large_prediction([r for r in rows if r["phase"] == "train"], sparsities)
    return out


def print_summary(summ: dict) -> None:
    s = summ["sparsity"]
    for phase in ("train", "decode"):
        for x in TARGETS:
            m = summ[f"{phase}_measured"][f"{x:g}x"]["text"]
            c = summ[f"{phase}_counted"][f"{x:g}x"]["text"]
            print(f"{phase}: {s:g} sparsity buys {x:g}x tokens/s: measured {m}; counted {c}")
    big = summ["large"]
    ideal = ", ".join(f"{v:.2f}x at {k}" for k, v in big["ideal"].items())
    scaled = ", ".join(f"{v:.2f}x at {k}" for k, v in big["scaled"].items())
    print(f"PREDICTION for the `large` preset, {big['label']}: counted share "
          f"{big['counted_share']:.3f}, ideal {ideal}; scaled by this machine's measured/counted "
          f"share at width {big['at_width']} ({big['measured_over_counted_share']:.2f}): {scaled}. "
          f"To measure it on a GPU: {GPU_CHECK}")


# --- the run -----------------------------------------------------------------------------------

def measure_width(cfg: LMConfig, args, sparsities: list[float], device) -> tuple[list[dict], dict]:
    """(the train and decode rows of one width, their raw timings)."""
    cases = [0.0, *sparsities, 1.0]
    rows, raw = [], {}
    torch.manual_seed(0)
    model = SparseBKLM(cfg).to(device)
    for phase in ("train", "decode"):
        load0, probe_s = os.getloadavg()[0], machine_probe(rows=args.probe_rows)
        if phase == "train":
            timed = time_training(model, args.batch, cases, repeats=args.repeats,
                                  warmup=args.warmup, device=device, autocast=args.autocast)
            key, tokens = "median_s", args.batch * cfg.n_seq
        else:
            with torch.no_grad():
                timed = time_decode(model, args.decode_batch, cases, steps=args.decode_steps,
                                    repeats=args.repeats, warmup=args.warmup, device=device,
                                    autocast=args.autocast)
            key, tokens = "step_s", args.decode_batch
        rows.append(phase_row(cfg, phase, timed, key, tokens, sparsities, probe_s,
                              (load0, os.getloadavg()[0])))
        raw[phase] = {f"{s:g}": timed[s] for s in cases}
    return rows, raw


def plot(rows: list[dict], sparsities: Sequence[float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, phase in zip(axes, ("train", "decode")):
        mine = sorted((r for r in rows if r["phase"] == phase), key=lambda r: r["width"])
        widths = [r["width"] for r in mine]
        for i, s in enumerate(sparsities):
            for kind, style in (("measured", "-o"), ("ideal", "--"), ("counted", ":")):
                ax.plot(widths, [r[f"{kind}@{s:g}"] for r in mine], style, color=f"C{i}",
                        label=f"{kind}, sparsity {s:g}")
        for x in TARGETS:
            ax.axhline(x, color="grey", linewidth=0.8, alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
        ax.set_xlabel("width (d_model)")
        ax.set_title(f"{phase} step: tokens/s against every gate open")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speed-up (x)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsebk bench cost", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--widths", default="128,256,512,768", help="comma list of d_model values")
    p.add_argument("--recipe", choices=("experts", "presets"), default="experts",
                   help="experts: count and top-k scaled with the width as the presets do; "
                        "presets: the depth too")
    p.add_argument("--sparsities", default="0.5,0.75", help="forced rates in (0, 1), besides "
                   "every gate open and every gate closed")
    p.add_argument("--batch", type=int, default=16, help="training rows of n_seq tokens")
    p.add_argument("--decode-batch", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=8, help="decode steps per timed call")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--probe-rows", type=int, default=2048, help="machine_probe's rows")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="LMConfig override at every width, e.g. --set n_layers=8 (repeatable)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--autocast", choices=("none", "bf16"), default="none",
                   help="bf16: forward passes under bf16 autocast, as training runs on a GPU "
                        "(default none: float32)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[int], list[float], dict]:
    """(args, widths, sparsities, LMConfig overrides), each checked with a one-line error."""
    p = _parser()
    args = p.parse_args(argv)
    args.quick_set = []
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    try:
        widths = [int(w) for w in args.widths.split(",") if w.strip()]
        sparsities = sorted({float(s) for s in args.sparsities.split(",") if s.strip()})
    except ValueError as e:
        p.error(f"--widths / --sparsities: comma lists of numbers ({e})")
    if not widths or min(widths) < 2:
        p.error(f"--widths {args.widths!r}: one or more d_model values >= 2")
    if not sparsities or not all(0.0 < s < 1.0 for s in sparsities):
        p.error(f"--sparsities {args.sparsities!r}: rates strictly between 0 and 1")
    for name in ("batch", "decode_batch", "decode_steps", "repeats", "probe_rows"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    over = model_overrides([*args.quick_set, *args.set])
    if "d_model" in over:
        p.error("--set d_model: the widths are --widths")
    return args, widths, sparsities, over


def main(argv: list[str] | None = None) -> int:
    args, widths, sparsities, over = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configs = [width_config(w, args.recipe, over) for w in widths]  # every bad field first
    rows, raw = [], {}
    for cfg in configs:
        width_rows, raw[str(cfg.d_model)] = measure_width(cfg, args, sparsities, device)
        rows += width_rows
        print(f"width {cfg.d_model}: " + "; ".join(
            f"{r['phase']} saved share {r['saved_share']:.3f}" for r in width_rows), flush=True)
    s = 0.5 if 0.5 in sparsities else sparsities[0]
    summ = summary(rows, s, sparsities)
    split = [split_row(c, f"width {c.d_model}") for c in configs]
    split.append(split_row(LMConfig.preset("large"), "large preset (counted only)"))
    precision = "bf16 autocast" if args.autocast == "bf16" else "float32"
    print(f"\ncost of a step: recipe {args.recipe}, {args.device}, {precision}, "
          f"{torch.get_num_threads()} threads; train batch {args.batch} x n_seq, decode batch "
          f"{args.decode_batch}; median of {args.repeats} rounds; speed-ups against every gate open")
    cols = ["width", "layers", "experts", "phase", "tokens_per_step", "open_ms", "closed_ms",
            "open_tok_s", "saved_share", "counted_share",
            *[f"{k}@{x:g}" for x in sparsities for k in ("ideal", "measured", "sparsity")],
            "probe_s", "load_1m"]
    print(format_table(rows, cols))
    print("\ncounted forward multiply-adds per position (millions), every gate open")
    print(format_table(split))
    print()
    print_summary(summ)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot(rows, sparsities, out / "cost.png")
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update(threads=torch.get_num_threads(), model_configs=[c.to_dict() for c in configs],
                  bk_chain_macs=BK_CHAIN_MACS)
    path = write_result(out, "cost", {"config": config, "rows": rows, "split": split,
                                      "summary": summ, "raw": raw})
    print(f"wrote {path} and {png}")
    return 0
