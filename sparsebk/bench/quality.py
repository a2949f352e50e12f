"""`sparsebk bench quality --out DIR [--budget-s S]`: what sparsity costs and buys on PTB.

Trains the `small` LM preset on Penn Treebank (word level, 10k vocabulary) once per target
sparsity, plus a causal Transformer of the same width and depth, each for the same fixed
wall-clock budget of training time on this machine, with the same seed (same initial weights
for every BK variant) and the same data order; then reports valid and test perplexity,
achieved sparsity per layer, training and evaluation tokens/s, and tokens seen.

Why a compact single-process loop here and not Ray Train: the question is model quality per
unit of compute, and a wall-clock budget is only fair when nothing else shares the clock (no
actor calls, no data pipeline threads, no DDP). The loop reuses the training package's
optimizer settings (`OptimConfig`: AdamW, warmup + cosine, clipping), its LR function
(`lr_factor`) and drives the seed's `AdaptiveSparsityScheduler` exactly as the schedule actor
does, with one difference forced by the budget: the number of steps is unknown in advance, so
the scheduler's step and the cosine LR decay are indexed by the fraction of the budget spent
(see `_schedule_step`).

The dense point is the same model with every gate pinned open
(`sparsebk.model.forcing.forced_gates(model, "pinned_open")`, for its training and its
evaluation: each importance predictor frozen at weight 0 and bias +30, so the mask is exactly
1 everywhere, noise or not, and the gate weight is 1). Two other candidates are not dense
in this model: `use_sparse_computation=False` evaluates every
position and then applies the learned mask by selection (the sparse path's reference: same
outputs at full cost), and "target 0" leaves the learned gate free, which with the preset's
sparsity loss weight still skips about half of the positions (measure it with
`--dense-mode target0`).

Each row records its machine's state: the 1-minute load average and CPU seconds per wall
second (contention), and the seconds of a fixed workload before training and at every curve point
(`common.machine_probe`, clock paused: the machine's own speed, which drifts between hours
unseen by the other two). Between rows run at different hours, compare tokens/s x the
median probe seconds.

Evaluation (`sparsebk.evaluation.evaluate`, the training runs' own) scores every token of the
split once, in independent windows of `block_len` tokens (no state carried across windows), in
eval mode (no gate noise, no dropout). With `--eval-stride S` each row is also scored the
sliding-window way (`sparsebk.evaluation.evaluate_strided`: windows of `block_len` every S ids,
each token scored once with at least block_len - S tokens before it), recorded beside the
independent-window figures as `valid_ppl_strided` / `test_ppl_strided`: the protocol nearer to
the literature's recurrent models, which carry their state through the whole split.

With `--random-offsets` every epoch cuts the training stream into windows at a new random
offset (one per epoch, from the seed), so a window boundary does not fall on the same tokens in
every epoch; without it every epoch shuffles the prepared blocks, as before.

With `--ema-decay d` the loop also keeps an exponential moving average of the weights (decay
min(d, (1 + t) / (10 + t)) at step t, so the first steps' weights fade fast), updated after
every step inside the timed budget, and each row is scored twice: its final weights (the
row's usual figures) and the average (`ema_valid_ppl`, `ema_test_ppl`, and strided when asked):
two models of one training run, a comparison the machine's speed cannot bias.

With `--by-position` each row also records its test loss at each position of the window
(`test_loss_by_position`, entry t predicted from t + 1 ids; `sparsebk.evaluation.
loss_by_position`): where more context stops helping, the model's usable memory. A model
with learnt BK shifts (`bk_learn_z`) also records them as `bk_shifts` (each layer's
[Re z, Im z] per head after training; memory lengths of about 1 / Im z positions), which the
report prints as each layer's longest and shortest memory: the memory the training chose.
With `--by-context EVERY` the same test targets (every EVERY-th id) are scored from exactly
1, 2, 4, ..., block_len ids of context (`test_loss_by_context`: the mean loss at each and the
gain of each over the one before, with its paired standard error): the context a model uses,
measured on the same tokens at every length. `--save-weights` keeps each row's trained
model (final and EMA weights) as OUT/weights/NAME.pt (`load_weights`), for analyses after the
budget.

The report (tables, plots, the goal check, `--tradeoff`) is sparsebk.bench.quality_report.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from contextlib import contextmanager, nullcontext

import torch

from sparsebk.bench.common import machine_probe, model_overrides, write_result
from sparsebk.bench.quality_report import (ANCHORS, DENSE, TRANSFORMER, budget_words, goal_check,
                                           plots, tables, tradeoff_plot)
from sparsebk.evaluation import (context_scores, evaluate, evaluate_strided, loss_by_position,
                                 safe_ppl, token_streams)
from sparsebk.model.forcing import forced_gates
from sparsebk.scheduler import AdaptiveSparsityScheduler, SchedulerConfig

log = logging.getLogger(__name__)

DENSE_MODES = ("pinned", "target0")


@dataclass
class QualitySettings:
    preset: str = "small"
    targets: tuple = (0.0, 0.3, 0.5, 0.7)
    budget_s: float = 300.0  # training wall-clock per model (evaluation not counted)
    # a step budget instead: every model trains the same number of steps (the same tokens),
    # so rows compare quality per token and do not depend on the machine's load
    budget_steps: int | None = None
    seed: int = 0
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01  # AdamW's, on the matrices (OptimConfig's default)
    warmup_steps: int = 100  # linear LR warmup (OptimConfig's default), then cosine over the budget
    ramp_frac: float = 0.3  # sparsity target ramps from 0 to its final value over this budget fraction
    curve_points: int = 10  # validation-subset evaluations during training (clock paused)
    curve_eval_blocks: int = 32
    eval_blocks: int | None = None  # None = whole valid/test split
    eval_stride: int | None = None  # also score with windows every this many ids (None: not)
    random_offsets: bool = False  # each epoch's training windows at a new random offset
    ema_decay: float | None = None  # also score an exponential moving average of the weights
    by_position: bool = False  # also record the test loss at each position of the window
    # also score every this-many-th test id from exactly 1, 2, 4, ..., block_len ids (None: not)
    by_context_every: int | None = None
    save_weights: str | None = None  # a directory: each row's trained model as NAME.pt
    transformer: bool = True
    data_dir: str | None = None  # where PTB is prepared; None -> data/ptb-word-<block_len>
    dataset: str | None = None  # an already prepared dataset dir (skips preparing PTB)
    model_overrides: dict = field(default_factory=dict)
    dense_mode: str = "pinned"  # target 0 as: "pinned" (gates pinned open) or "target0" (gate learned)
    # the sparsity loss weight ramps from a tenth of this to this, as in the training presets
    # (ray_jobs/configs/*.yaml: initial_weight 0.1, final_weight 1.0), so a quality row
    # trains the way a training run does (the LMConfig default 0.01 is too weak to track)
    sparsity_weight: float = 1.0

    def __post_init__(self):
        self.targets = tuple(float(t) for t in self.targets)
        if not self.targets or any(not 0.0 <= t < 1.0 for t in self.targets):
            raise ValueError(f"targets={list(self.targets)}: each target sparsity must be in [0, 1)")
        for name in ("budget_s", "lr", "ramp_frac", "sparsity_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v!r} must be a positive number")
        if self.ramp_frac > 1:
            raise ValueError(f"ramp_frac={self.ramp_frac} must be in (0, 1]")
        wd = self.weight_decay
        if not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0):
            raise ValueError(f"weight_decay={wd!r} must be a non-negative number")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be a non-negative integer")
        for name in ("batch_size", "curve_points", "curve_eval_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if self.dense_mode not in DENSE_MODES:
            raise ValueError(f"dense_mode={self.dense_mode!r}: choose one of {DENSE_MODES}")
        if self.budget_steps is not None and (not isinstance(self.budget_steps, int)
                                              or self.budget_steps < 1):
            raise ValueError(f"budget_steps={self.budget_steps!r} must be a positive integer or None")
        if self.eval_blocks is not None and self.eval_blocks < 1:
            raise ValueError(f"eval_blocks={self.eval_blocks!r} must be a positive integer or None")
        for name in ("eval_stride", "by_context_every"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name}={v!r} must be a positive integer or None")
        d = self.ema_decay
        if d is not None and not (isinstance(d, (int, float)) and not isinstance(d, bool)
                                  and 0.0 < d < 1.0):
            raise ValueError(f"ema_decay={d!r} must be a number in (0, 1) or None")
        for name in ("random_offsets", "by_position"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")


def load_data(s: QualitySettings, block_len: int) -> tuple[dict, dict]:
    """(manifest, {split: LongTensor (R, block_len + 1)}); prepares PTB on first use."""
    from sparsebk.data.manifest import check_dataset
    from sparsebk.data.loading import load_blocks
    from sparsebk.data.prepare import prepare_dataset

    path = Path(s.dataset) if s.dataset else prepare_dataset(
        s.data_dir or f"data/ptb-word-{block_len}", corpus="ptb", tokenizer="word", block_len=block_len)
    manifest = check_dataset(path, block_len=block_len)
    blocks = {split: load_blocks(path, split) for split in ("train", "valid", "test")}
    manifest["path"] = str(path)
    return manifest, blocks


def _schedule_step(frac: float, s: QualitySettings, warmup_steps: int) -> int:
    """Scheduler step for the fraction of the budget spent: the ramp ends at `ramp_frac`."""
    return min(warmup_steps, int(warmup_steps * frac / s.ramp_frac))


def evaluate_timed(model, blocks: torch.Tensor, batch_size: int) -> dict:
    """`sparsebk.evaluation.evaluate` of `blocks` (every token once, eval mode) as a row
    records it: loss, ppl, per-layer sparsity (None for the Transformer), tokens, tokens/s."""
    t0 = time.perf_counter()
    loss, layer_sparsity = evaluate(model, blocks, batch_size=batch_size, device=torch.device("cpu"))
    seconds = time.perf_counter() - t0
    tokens = blocks.shape[0] * (blocks.shape[1] - 1)
    return {"loss": loss, "ppl": safe_ppl(loss), "tokens": tokens, "tokens_per_s": tokens / seconds,
            "layer_sparsity": layer_sparsity}


def train_one(name: str, model, blocks: dict, s: QualitySettings, *, target: float | None,
              train_cfg, schedule: SchedulerConfig | None) -> dict:
    """Train `model` for the budget (`s.budget_s` seconds of training time, or
    `s.budget_steps` steps); evaluate; return the record. The step is the training package's
    (`Trainer.train_step`), the LR its `lr_factor`; only the budget-driven LR decay and
    schedule and the fixed data order are this benchmark's."""
    torch.manual_seed(s.seed + 1)  # gate noise and dropout: the same stream for every variant
    run = _BudgetRun(name, model, blocks, s, train_cfg, schedule)
    run.train()
    row = run.record(target)
    if s.save_weights is not None:
        row["weights_file"] = str(save_weights(run, Path(s.save_weights) / f"{name}.pt"))
    return row


def save_weights(run: "_BudgetRun", path: Path) -> Path:
    """The row's trained model to `path` (written whole, then renamed): its config
    (`config`: the LMConfig or TransformerConfig as a dict, `kind`: which), its final weights
    (`state_dict`) and, with `--ema-decay`, the average (`ema_state_dict`), for analyses after
    the budget (`load_weights`). A dense row's gates are saved pinned open, as it trained."""
    model = run.model
    cfg = model.config
    blob = {"kind": type(model).__name__, "name": run.name,
            "config": cfg.to_dict() if hasattr(cfg, "to_dict") else asdict(cfg),
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    if run.ema is not None:
        with run.ema.swapped_in():
            blob["ema_state_dict"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


def load_weights(path: str | os.PathLike, ema: bool = False):
    """The model `save_weights` wrote (eval mode), with its final weights or (`ema`) the
    average."""
    from sparsebk.model.baselines import TransformerConfig, TransformerLM
    from sparsebk.model.lm import LMConfig, SparseBKLM

    blob = torch.load(path, map_location="cpu", weights_only=True)
    key = "ema_state_dict" if ema else "state_dict"
    if key not in blob:
        raise ValueError(f"{path}: has no {key} (saved without --ema-decay?)")
    if blob["kind"] == "SparseBKLM":
        model = SparseBKLM(LMConfig.from_dict(blob["config"]))
    else:
        model = TransformerLM(TransformerConfig(**blob["config"]))
    model.load_state_dict(blob[key])
    return model.eval()


class _Order:
    """The fixed data order: one generator's permutation per epoch, the same for every row.
    With `random_offsets` each epoch first draws an offset in [0, block_len) from the same
    generator and cuts the training stream (each part's, `token_streams`) into windows from
    there (a tail shorter than a window is left out of that epoch)."""

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int, random_offsets: bool = False):
        self.blocks, self.rows, self.batch_size = rows, rows, batch_size
        self.block_len = rows.shape[1] - 1
        self.streams = token_streams(rows) if random_offsets else None
        self.gen = torch.Generator().manual_seed(seed)
        self.offsets = []  # each epoch's, with random_offsets
        self._new_epoch()

    def _new_epoch(self) -> None:
        if self.streams is not None:
            L = self.block_len
            r = int(torch.randint(L, (1,), generator=self.gen))
            cut = [st[r:r + (len(st) - 1 - r) // L * L + 1].unfold(0, L + 1, L)
                   for st in self.streams if len(st) - 1 - r >= L]
            self.rows = torch.cat(cut) if cut else self.blocks  # no stream is long enough
            self.offsets.append(r)
        self.perm, self.pos = torch.randperm(len(self.rows), generator=self.gen), 0

    def next(self) -> torch.Tensor:
        """The next batch (B, block_len + 1); a new epoch's order when this one runs out."""
        if self.pos + self.batch_size > len(self.perm):
            self._new_epoch()
        batch = self.rows[self.perm[self.pos:self.pos + self.batch_size]]
        self.pos += self.batch_size
        return batch


class _Ema:
    """An exponential moving average of a model's parameters: after update t (0-based) each
    average moves to decay_t * avg + (1 - decay_t) * p with decay_t = min(decay, (1 + t) /
    (10 + t)). Inside `with ema.swapped_in():` the model holds the averages; its own weights
    come back on leaving, exception or not."""

    def __init__(self, model, decay: float):
        self.params = list(model.parameters())
        self.avg = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.avg, [p.detach() for p in self.params], 1.0 - d)
        self.updates += 1

    @contextmanager
    def swapped_in(self):
        own = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, a in zip(self.params, self.avg):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, o in zip(self.params, own):
                    p.copy_(o)


class _Window:
    """Training CE and training-mode sparsity summed since the last curve point (kept as
    tensors: no host sync per step)."""

    def __init__(self):
        self.ce, self.sparsity, self.steps = torch.zeros(()), None, 0

    def add(self, out: dict) -> None:
        self.ce += out["ce_loss"].detach()
        if "layer_sparsity" in out:
            sp = out["layer_sparsity"].detach()
            self.sparsity = sp if self.sparsity is None else self.sparsity + sp
        self.steps += 1

    def means(self) -> tuple[float, list[float] | None]:
        ce = (self.ce / max(self.steps, 1)).item()
        return ce, None if self.sparsity is None else (self.sparsity / self.steps).tolist()


class _BudgetRun:
    """One row's training: the state its steps, curve points and record share."""

    def __init__(self, name: str, model, blocks: dict, s: QualitySettings, train_cfg,
                 schedule: SchedulerConfig | None):
        from sparsebk.train.trainer import Trainer, lr_factor

        self.name, self.model, self.blocks, self.s = name, model, blocks, s
        self.order = _Order(blocks["train"], s.batch_size, s.seed, s.random_offsets)
        self.frac = 0.0  # of the budget spent at this step: the LR's decay progress
        optim = train_cfg.optim
        self.trainer = Trainer(train_cfg, model, device=torch.device("cpu"),
                               lr_fn=lambda step: lr_factor(step, optim, self.frac))
        self.scheduler = AdaptiveSparsityScheduler.from_config(schedule) if schedule else None
        self.ema = _Ema(model, s.ema_decay) if s.ema_decay is not None else None
        self.state = {"sparsity_target": 0.0, "loss_weight": 0.0}
        self.step, self.spent, self.cpu_spent = 0, 0.0, 0.0
        self.window, self.curve, self.next_point = _Window(), [], 1
        # contention is visible in these: other processes' load, and CPU seconds per wall
        # second; the machine's own speed (which drifts unseen by both): a probe before
        # training and at every curve point
        self.probes = [machine_probe()]
        self.load_start = self.load_end = os.getloadavg()[0]

    def fraction(self) -> float:
        """Of the budget spent: seconds, or steps."""
        s = self.s
        return self.spent / s.budget_s if s.budget_steps is None else self.step / s.budget_steps

    def tokens_seen(self) -> int:
        return self.step * self.s.batch_size * (self.blocks["train"].shape[1] - 1)

    def train(self) -> None:
        self.model.train()
        while self.fraction() < 1.0:
            lr = self.train_step()
            if self.fraction() >= self.next_point / self.s.curve_points or self.fraction() >= 1.0:
                self.curve_point(lr)
        self.load_end = os.getloadavg()[0]

    def train_step(self) -> float:
        """One timed step (wall and CPU): the schedule of the budget fraction spent, the next
        batch, `Trainer.train_step`. Returns the LR the step ran at."""
        t0, c0 = time.perf_counter(), time.process_time()
        self.frac = self.fraction()
        if self.scheduler is not None:
            self.state = self.scheduler.state_at(
                _schedule_step(self.frac, self.s, self.scheduler.config.warmup_steps))
            self.model.set_sparsity_schedule(self.state["sparsity_target"], self.state["loss_weight"])
        lr = self.trainer.optimizer.param_groups[0]["lr"]
        out = self.trainer.train_step(self.order.next())
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        if out is not None:
            self.window.add(out)
        self.spent += time.perf_counter() - t0
        self.cpu_spent += time.process_time() - c0
        return lr

    def curve_point(self, lr: float) -> None:
        """The validation subset's loss (clock paused: not in `spent`), a machine probe, and
        the training means since the last point."""
        s = self.s
        loss, _ = evaluate(self.model, self.blocks["valid"][: s.curve_eval_blocks],
                           batch_size=s.batch_size, device=torch.device("cpu"))
        self.probes.append(machine_probe())
        train_ce, train_sparsity = self.window.means()
        point = {"step": self.step, "train_s": self.spent, "tokens": self.tokens_seen(),
                 "train_ce": train_ce, "valid_subset_loss": loss, "valid_subset_ppl": safe_ppl(loss),
                 "lr": lr, "target": self.state["sparsity_target"],
                 "loss_weight": self.state["loss_weight"], "probe_s": self.probes[-1]}
        if train_sparsity is not None:
            point["train_layer_sparsity"] = train_sparsity
        self.curve.append(point)
        log.info("%s step %d %.0fs train_ce %.3f valid_subset_ppl %.1f", self.name, self.step,
                 self.spent, train_ce, point["valid_subset_ppl"])
        self.window = _Window()
        self.next_point = int(self.fraction() * s.curve_points) + 1

    def record(self, target: float | None) -> dict:
        """The row: training figures, the valid and test evaluations, the curve."""
        s, model = self.s, self.model
        valid, test = (evaluate_timed(model, self.split(k), s.batch_size) for k in ("valid", "test"))
        layer_sp, tokens_seen = test["layer_sparsity"], self.tokens_seen()
        extra = self.extra_scores()
        if self.ema is not None:  # the averaged weights, scored the same ways
            with self.ema.swapped_in():
                for k in ("valid", "test"):
                    loss, _ = evaluate(model, self.split(k), batch_size=s.batch_size,
                                       device=torch.device("cpu"))
                    extra.update({f"ema_{k}_loss": loss, f"ema_{k}_ppl": safe_ppl(loss)})
                extra.update({f"ema_{k}": v for k, v in self.extra_scores().items()
                              if k != "eval_stride"})
            log.info("%s test ppl %.2f, of the weights' moving average (decay %g) %.2f",
                     self.name, test["ppl"], s.ema_decay, extra["ema_test_ppl"])
        return {
            "model": self.name, "target_sparsity": target,
            "params": sum(p.numel() for p in model.parameters()),
            "steps": self.step, "tokens_seen": tokens_seen, "train_s": self.spent,
            "train_tokens_per_s": tokens_seen / self.spent, "train_cpu_s": self.cpu_spent,
            "load_avg_1m_start": self.load_start, "load_avg_1m_end": self.load_end,
            "probe_s": self.probes,
            "valid_loss": valid["loss"], "valid_ppl": valid["ppl"],
            "test_loss": test["loss"], "test_ppl": test["ppl"],
            "eval_tokens_per_s": test["tokens_per_s"], "valid_tokens": valid["tokens"],
            "test_tokens": test["tokens"],
            "achieved_sparsity": None if layer_sp is None else sum(layer_sp) / len(layer_sp),
            # with gate noise, over the last curve interval (eval above is noise-free)
            "train_layer_sparsity": self.curve[-1].get("train_layer_sparsity") if self.curve else None,
            "layer_sparsity": layer_sp, "curve": self.curve, **extra,
            **_shift_fields(model),
        }

    def split(self, k: str) -> torch.Tensor:
        """The rows a final evaluation scores: the whole split, or its first eval_blocks."""
        return self.blocks[k][: self.s.eval_blocks] if self.s.eval_blocks else self.blocks[k]

    def extra_scores(self) -> dict:
        """With eval_stride: the model's sliding-window loss and ppl on valid and test; with
        by_position: its test loss at each position of the window; with by_context_every:
        the same test targets scored from 1, 2, 4, ... ids of context (`context_scores`)."""
        s, out = self.s, {}
        if s.by_position:
            out["test_loss_by_position"] = loss_by_position(
                self.model, self.split("test"), batch_size=s.batch_size).tolist()
        if s.by_context_every is not None:
            out["test_loss_by_context"] = context_scores(
                self.model, self.split("test"), every=s.by_context_every, batch_size=s.batch_size)
        if s.eval_stride is None:
            return out
        out["eval_stride"] = stride = min(s.eval_stride, self.blocks["test"].shape[1] - 1)
        for k in ("valid", "test"):
            loss, _ = evaluate_strided(self.model, self.split(k), stride=stride,
                                       batch_size=s.batch_size, device=torch.device("cpu"))
            out.update({f"{k}_loss_strided": loss, f"{k}_ppl_strided": safe_ppl(loss)})
        log.info("%s test ppl with stride %d: %.2f", self.name, stride, out["test_ppl_strided"])
        return out


def _shift_fields(model) -> dict:
    """`bk_shifts`: each layer's learnt BK shifts as [Re z, Im z] per head (memory lengths of
    about 1 / Im z positions), for a BK model with `bk_learn_z`; nothing otherwise."""
    shifts = model.bk_shifts() if hasattr(model, "bk_shifts") else None
    return {} if shifts is None else {"bk_shifts": [[[z.real, z.imag] for z in layer]
                                                    for layer in shifts]}


def setup(s: QualitySettings):
    """(model config with the dataset's vocabulary, manifest, blocks, TrainConfig): what every
    row of a run shares (also `sparsebk bench gates`)."""
    from sparsebk.model.lm import LMConfig
    from sparsebk.train.config import TrainConfig

    base = LMConfig.preset(s.preset, **s.model_overrides)
    manifest, blocks = load_data(s, base.n_seq)
    cfg = LMConfig.from_dict({**base.to_dict(), "vocab_size": manifest["vocab_size"]})
    # the training package's optimizer settings (AdamW, warmup, clipping) at this lr
    train_cfg = TrainConfig(model=cfg, optim={"lr": s.lr, "warmup_steps": s.warmup_steps,
                                              "weight_decay": s.weight_decay},
                            data={"batch_size": s.batch_size})
    return cfg, manifest, blocks, train_cfg


def sparse_schedule(s: QualitySettings, target: float) -> SchedulerConfig:
    """The schedule of a sparse row: the target ramps from 0, the loss weight from a tenth of
    `s.sparsity_weight` to it (as the training presets)."""
    return SchedulerConfig(initial_sparsity=0.0, final_sparsity=target,
                           initial_weight=s.sparsity_weight / 10, final_weight=s.sparsity_weight,
                           warmup_steps=1000, schedule_type="cosine")


def run_quality(s: QualitySettings) -> dict:
    from sparsebk.model.baselines import TransformerConfig, TransformerLM
    from sparsebk.model.lm import LMConfig, SparseBKLM

    cfg, manifest, blocks, train_cfg = setup(s)
    results = []
    for target in s.targets:
        torch.manual_seed(s.seed)  # the same initial weights for every BK variant
        name = f"bk-sparse-{target:g}"
        model = SparseBKLM(LMConfig.from_dict({**cfg.to_dict(), "target_sparsity": target}))
        schedule = sparse_schedule(s, target)
        pinned = target == 0.0 and s.dense_mode == "pinned"
        if pinned:
            name, schedule = DENSE, None
        log.info("training %s for %s", name, budget_words(s))
        with forced_gates(model, "pinned_open") if pinned else nullcontext():
            results.append(train_one(name, model, blocks, s, target=target,
                                     train_cfg=train_cfg, schedule=schedule))
    if s.transformer:
        torch.manual_seed(s.seed)
        tcfg = TransformerConfig.matching(cfg)
        if cfg.head_cutoff:
            log.warning("the Transformer row keeps a full softmax head (head_cutoff=%d is the BK "
                        "model's): its speed is not the same head's", cfg.head_cutoff)
        log.info("training %s for %s", TRANSFORMER, budget_words(s))
        results.append(train_one(TRANSFORMER, TransformerLM(tcfg), blocks, s, target=None,
                                 train_cfg=train_cfg, schedule=None))
    return {"settings": asdict(s), "model_config": cfg.to_dict(),
            "dataset": {"path": manifest["path"], "vocab_size": manifest["vocab_size"],
                        "block_len": manifest["block_len"],
                        "tokenizer": manifest.get("tokenizer", {}).get("name")},
            "anchors_test_ppl": ANCHORS, "results": results, "goal": goal_check(results)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sparsebk bench quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--budget-s", type=float, default=None, help="training seconds per model (default 300)")
    p.add_argument("--budget-steps", type=int, default=None,
                   help="train every model this many steps instead (quality per token: load-independent)")
    p.add_argument("--targets", default="0,0.3,0.5,0.7", help="comma-separated target sparsities; 0 = dense")
    p.add_argument("--preset", default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=100, help="linear LR warmup steps (default 100)")
    p.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay of the weight matrices (default 0.01, as the training presets)")
    p.add_argument("--data-dir", default=None, help="where PTB is prepared and reused (default data/ptb-word-<n_seq>)")
    p.add_argument("--dataset", default=None, help="an already prepared dataset dir instead of PTB")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="LMConfig override, e.g. --set d_model=128 (repeatable)")
    p.add_argument("--no-transformer", action="store_true")
    p.add_argument("--sparsity-weight", type=float, default=1.0,
                   help="final sparsity loss weight of the ramp (default 1.0, as the training presets)")
    p.add_argument("--dense-mode", choices=DENSE_MODES, default="pinned",
                   help="target 0 as the model with gates pinned open (default) or the learned gate at target 0")
    p.add_argument("--eval-stride", type=int, default=None, metavar="S",
                   help="also score valid/test in sliding windows every S ids (each token once, with "
                        "at least block_len - S tokens of context); recorded as *_ppl_strided")
    p.add_argument("--random-offsets", action="store_true",
                   help="cut each epoch's training windows at a new random offset (default: the prepared blocks)")
    p.add_argument("--ema-decay", type=float, default=None, metavar="D",
                   help="also score an exponential moving average of the weights (e.g. 0.999), "
                        "recorded as ema_*_ppl beside the final weights' figures")
    p.add_argument("--by-position", action="store_true",
                   help="also record the test loss at each position of the window (the context "
                        "a prediction had) as test_loss_by_position")
    p.add_argument("--by-context", type=int, default=None, metavar="EVERY",
                   help="also score every EVERY-th test id from exactly 1, 2, 4, ..., block_len ids "
                        "of context (the same targets at each), as test_loss_by_context")
    p.add_argument("--save-weights", action="store_true",
                   help="also save each row's trained model (and its EMA) as OUT/weights/NAME.pt")
    p.add_argument("--quick", action="store_true", help="smoke run: 10 s per model, 16 eval blocks")
    p.add_argument("--tradeoff", nargs="+", metavar="QUALITY_JSON",
                   help="only plot these runs' test ppl against tokens/s into OUT/quality_tradeoff.png")
    a = p.parse_args(argv)
    if a.tradeoff:
        print(f"wrote {tradeoff_plot(a.tradeoff, Path(a.out) / 'quality_tradeoff.png')}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = model_overrides(a.set)
    s = QualitySettings(
        preset=a.preset, targets=tuple(float(t) for t in a.targets.split(",")),
        budget_s=a.budget_s or (10.0 if a.quick else 300.0), seed=a.seed, batch_size=a.batch_size,
        lr=a.lr, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
        budget_steps=a.budget_steps, data_dir=a.data_dir, dataset=a.dataset,
        transformer=not a.no_transformer, eval_stride=a.eval_stride, random_offsets=a.random_offsets,
        ema_decay=a.ema_decay, by_position=a.by_position, by_context_every=a.by_context,
        save_weights=str(Path(a.out) / "weights") if a.save_weights else None,
        dense_mode=a.dense_mode, sparsity_weight=a.sparsity_weight,
        model_overrides=overrides, **(dict(curve_points=3, curve_eval_blocks=4, eval_blocks=16)
                                      if a.quick else {}))
    record = run_quality(s)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    record["plots"] = [p.name for p in plots(record, out)]
    print(tables(record))
    write_result(out, "quality", record)
    print(f"\nwrote {out / 'quality.json'}, {', '.join(record['plots'])}")
    return 0
