"""`sparsebk bench gates --out DIR`: what a trained gate decides, and what its decisions are worth.

Trains one sparse model the way `sparsebk bench quality` trains its rows (the same step,
sparsity schedule, LR schedule and data order; a step budget by default, so every figure is
per token and does not depend on the machine's load), then measures in eval mode on the
validation split:

- per layer, the gate logits' spread and how decisive the training draw is at those logits:
  mean |2 sigmoid(l) - 1| (0: a coin flip per token; 1: the same decision every time);
- the loss with the learned masks, with random masks of the same per-layer rate, and with
  every gate open: does the gate choose tokens, or only a rate?
- the skip rate by token frequency (the 100 most frequent words of the training split, the
  next 900, the rest) and by position in the block;
- at the end of training (train mode, the final schedule), the gradient reaching the gate's
  parameters from the LM loss and from the weighted sparsity loss: their norms and cosine.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os

import torch
import torch.nn.functional as F

from sparsebk.bench.common import model_overrides, write_result
from sparsebk.bench.quality import QualitySettings, setup, sparse_schedule, train_one
from sparsebk.evaluation import evaluate
from sparsebk.model.forcing import forced_gates

log = logging.getLogger("sparsebk.bench.gates")
FREQ_BUCKETS = ((0, 100), (100, 1000), (1000, None))  # frequency ranks in the training split
POS_BUCKETS = ((0, 8), (8, 32), (32, None))
CPU = torch.device("cpu")  # where `bench quality` trains


def train_sparse(s: QualitySettings, target: float):
    """(model, blocks, record): one sparse model trained as a `bench quality` row."""
    from sparsebk.model.lm import LMConfig, SparseBKLM

    cfg, _, blocks, train_cfg = setup(s)
    torch.manual_seed(s.seed)
    model = SparseBKLM(LMConfig.from_dict({**cfg.to_dict(), "target_sparsity": target}))
    record = train_one(f"bk-sparse-{target:g}", model, blocks, s, target=target,
                       train_cfg=train_cfg, schedule=sparse_schedule(s, target))
    return model, blocks, record


@contextlib.contextmanager
def gate_logits(model):
    """Collects each layer's gate logits (B, N) of every forward inside the block."""
    seen: list[list[torch.Tensor]] = [[] for _ in model.layers]
    hooks = [layer.sparse_bk_core.importance_predictor.register_forward_hook(
        lambda _m, _i, out, k=k: seen[k].append(out.detach().squeeze(-1)))
        for k, layer in enumerate(model.layers)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _bucket_rates(skip: torch.Tensor, key: torch.Tensor, buckets) -> dict:
    """Skip rate of the positions whose key (same shape) falls in each [lo, hi) bucket."""
    out = {}
    for lo, hi in buckets:
        sel = (key >= lo) & (key < (hi if hi is not None else math.inf))
        out[f"{lo}-{hi if hi is not None else 'end'}"] = (
            skip[sel].float().mean().item() if sel.any() else None)
    return out


def decisions(model, blocks: torch.Tensor, train: torch.Tensor, batch_size: int) -> dict:
    """Eval-mode gate statistics per layer, and the loss of learned vs random vs open masks
    (`forced_gates` "rate" and "open": the learned gate's logits, the mask forced)."""
    counts = torch.bincount(train[:, :-1].reshape(-1), minlength=int(blocks.max()) + 1)
    rank = torch.empty_like(counts)
    rank[counts.argsort(descending=True)] = torch.arange(len(counts))
    tokens = blocks[:, :-1]
    model.eval()  # the eval mask is recomputed below from the logits, by the eval-mode gate
    with gate_logits(model) as seen:
        learned, sparsity = evaluate(model, blocks, batch_size=batch_size, device=CPU)
    layers = []
    for k, chunks in enumerate(seen):
        logits = torch.cat(chunks)  # (R, N): eval-mode logits of every validation position
        p = torch.sigmoid(logits)
        skip = model.layers[k].sparse_bk_core.gate(logits) < 0.5  # the eval mask, recomputed
        layers.append({
            "layer": k, "sparsity": sparsity[k], "logit_mean": logits.mean().item(),
            "logit_std": logits.std().item(), "decisiveness": (2 * p - 1).abs().mean().item(),
            "skip_by_frequency_rank": _bucket_rates(skip, rank[tokens], FREQ_BUCKETS),
            "skip_by_position": _bucket_rates(
                skip, torch.arange(tokens.shape[1]).expand_as(tokens), POS_BUCKETS)})
    with forced_gates(model, "rate", rate=sparsity, generator=torch.Generator().manual_seed(0)):
        random_loss, random_sp = evaluate(model, blocks, batch_size=batch_size, device=CPU)
    with forced_gates(model, "open"):
        open_loss, _ = evaluate(model, blocks, batch_size=batch_size, device=CPU)
    return {"layers": layers, "valid_loss": {"learned": learned, "random_same_rate": random_loss,
                                             "all_open": open_loss},
            "random_sparsity": random_sp}


def gradient_share(model, train: torch.Tensor, batch_size: int, batches: int = 4) -> list[dict]:
    """Per layer: |grad| of the gate parameters from the LM loss and from the weighted
    sparsity loss (train mode, the schedule the model holds), and their cosine."""
    model.train()
    gen = torch.Generator().manual_seed(1)
    per = [{"ce": [], "sparsity": [], "cos": []} for _ in model.layers]
    with torch.random.fork_rng():  # the same gate noise and dropout at every call
        torch.manual_seed(1)
        _gradients(model, train, batch_size, batches, gen, per)
    mean = lambda xs: sum(xs) / len(xs)
    return [{"layer": k, "grad_norm_ce": mean(v["ce"]), "grad_norm_sparsity": mean(v["sparsity"]),
             "cosine": mean(v["cos"])} for k, v in enumerate(per)]


def _gradients(model, train, batch_size, batches, gen, per) -> None:
    for _ in range(batches):
        b = train[torch.randint(len(train), (batch_size,), generator=gen)]
        out = model(b[:, :-1], b[:, 1:])
        for k, layer in enumerate(model.layers):
            params = list(layer.sparse_bk_core.importance_predictor.parameters())
            g_ce = torch.autograd.grad(model.config.accuracy_weight * out["ce_loss"], params,
                                       retain_graph=True, allow_unused=True)
            g_sp = torch.autograd.grad(out["sparsity_loss"], params, retain_graph=True, allow_unused=True)
            flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                         for g, p in zip(gs, params)])
            a, c = flat(g_ce), flat(g_sp)
            per[k]["ce"].append(a.norm().item())
            per[k]["sparsity"].append(c.norm().item())
            per[k]["cos"].append(F.cosine_similarity(a, c, dim=0).item() if a.norm() * c.norm() > 0 else 0.0)


def table(r: dict) -> str:
    loss = r["decisions"]["valid_loss"]
    lines = [f"valid loss (ppl): learned masks {loss['learned']:.4f} ({math.exp(loss['learned']):.1f}), "
             f"random masks at the same rates {loss['random_same_rate']:.4f} "
             f"({math.exp(loss['random_same_rate']):.1f}), all gates open {loss['all_open']:.4f} "
             f"({math.exp(loss['all_open']):.1f})", "",
             "| layer | sparsity | logit mean ± std | decisiveness | skip by freq rank (<100 / <1000 / rest) "
             "| skip by position (<8 / <32 / rest) | |grad| LM | |grad| sparsity | cos |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d, g in zip(r["decisions"]["layers"], r["gradient_share"]):
        f = lambda rates: " / ".join("-" if v is None else f"{v:.2f}" for v in rates.values())
        lines.append(f"| {d['layer']} | {d['sparsity']:.3f} | {d['logit_mean']:+.2f} ± {d['logit_std']:.2f} "
                     f"| {d['decisiveness']:.2f} | {f(d['skip_by_frequency_rank'])} "
                     f"| {f(d['skip_by_position'])} | {g['grad_norm_ce']:.2e} "
                     f"| {g['grad_norm_sparsity']:.2e} | {g['cosine']:+.2f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sparsebk bench gates", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--budget-steps", type=int, default=300)
    p.add_argument("--preset", default="small")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dataset", default=None)
    p.add_argument("--eval-blocks", type=int, default=None,
                   help="validation and test blocks evaluated and analysed (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--sparsity-weight", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="smoke run: 5 steps, 8 validation blocks")
    a = p.parse_args(argv)
    if a.quick:
        a.budget_steps, a.eval_blocks = 5, 8
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    s = QualitySettings(preset=a.preset, targets=(a.target,), budget_steps=a.budget_steps,
                        data_dir=a.data_dir, dataset=a.dataset, transformer=False,
                        sparsity_weight=a.sparsity_weight, model_overrides=model_overrides(a.set),
                        eval_blocks=a.eval_blocks,
                        **(dict(curve_points=2, curve_eval_blocks=4) if a.quick else {}))
    if not 0.0 < a.target < 1.0:
        p.error(f"--target {a.target}: a target sparsity in (0, 1)")
    model, blocks, record = train_sparse(s, a.target)
    valid = blocks["valid"][: a.eval_blocks]
    result = {"settings": {**vars(a), "set": model_overrides(a.set)}, "train": record,
              "decisions": decisions(model, valid, blocks["train"], s.batch_size),
              "gradient_share": gradient_share(model, blocks["train"], s.batch_size),
              "load_avg_1m": os.getloadavg()[0]}
    print(table(result))
    print(f"\nwrote {write_result(a.out, 'gates', result)}")
    return 0
