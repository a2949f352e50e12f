"""The Trainer: one worker's training, as an object that owns its state.

    trainer = Trainer(cfg, model, device=..., rank=r, world=w, valid=blocks, run_dir=...)
    trainer.schedule = source            # where each step's Schedule comes from
    trainer.restore(directory)           # optional: a checkpoint written by `save`
    stop = trainer.fit(batches)          # batches(epoch, start) -> iterator of (B, T + 1) rows

The data position is kept in samples: `start` is the number of rows all workers together have
consumed in the epoch (the epoch's order depends only on run.seed and the epoch), so a run
resumed with another worker count, batch size or accumulation continues at the same sample.

Each `fit` step (`step`) is one optimizer step over optim.grad_accum_steps = N micro-batches:
    1. the step's Schedule (per-layer targets, loss weight) from `schedule` (under DDP the
       actor's answer broadcast from rank 0), set on the model;
    2. `train_step`: per micro-batch forward (bf16 autocast on GPU) and backward of loss / N,
       gradients summed locally (`gradient_sync`) and all-reduced (FSDP: reduce-scattered
       into each rank's shard) on the last micro-batch only;
       gradient clipping; the clipped norm is the same on every rank after the all-reduce, so
       all ranks agree on skipping a non-finite step without another collective; AdamW; LR;
    3. every `log_every` steps `log`: the running sums (loss, training-mode sparsity per layer)
       are all-reduced, rank 0 writes a progress line and a metrics record (metrics.jsonl and
       the run.tracking trackers: TensorBoard, MLflow);
    4. every `eval_every` steps (and at the last) `validate_and_save`: the all-reduced
       validation loss and eval-mode sparsity, the loss to the schedule, and the checkpoint
       handed to `reporter` (Ray Train's report, a barrier every rank calls);
    5. a step whose Schedule says `stop` (the driver was asked to stop) is the last: its
       checkpoint is saved (`save_for_stop`, which leaves the run's course unchanged) and
       `fit` returns.

The one host sync per step is the finiteness check of the gradient norm (step 2): skipping a
NaN step needs its answer before the optimizer runs. Nothing here imports Ray: the worker
function (sparsebk.train.ray_train.loop) plugs Ray in through `schedule` and `reporter`, and the plain
benchmark loops drive the same `train_step`. Beside this module: the DDP/FSDP differences
(sparsebk.parallel), the all-reduced validation and its record
(sparsebk.evaluation) and the run's position (sparsebk.train.run_state).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import tempfile
import time
import zlib
from contextlib import nullcontext
from typing import Callable, Iterator, Sequence

import torch

from sparsebk.storage.store import open_store
from sparsebk.storage.checkpoint import load_checkpoint, save_checkpoint
from sparsebk.train.config import TrainConfig
# evaluate, memory_stats and shuffle_seed are also imported from here (export, benchmarks,
# the worker loop, tests)
from sparsebk.evaluation import evaluate
from sparsebk.train.metrics import (MetricsWriter, eval_line, progress_line, safe_ppl,
                                    validation_metrics)
from sparsebk.parallel import (all_reduce_sum, gradient_sync, is_sharded,
                                     memory_stats, unwrap)
from sparsebk.train.run_state import RunState
from sparsebk.train.tracking import Tracking

logger = logging.getLogger("sparsebk.train")

Batches = Callable[[int, int], Iterator[torch.Tensor]]  # (epoch, start sample) -> (B, T + 1)


def row_ids(micro: Sequence[torch.Tensor]) -> list[int] | None:
    """The rows of a step's micro-batches, in order, as CRC-32s of their int64 token ids: which
    rows a rank trained on at a step (its schedule record keeps them). None for rows already on
    an accelerator (reading them back would cost a device sync)."""
    if any(m.device.type != "cpu" for m in micro):
        return None
    return [zlib.crc32(r.numpy().tobytes()) for m in micro for r in m.to(torch.int64)]


def lr_factor(step: int, optim_cfg, progress: float | None = None) -> float:
    """The LR multiplier at optimizer step `step` (0-based): a linear warmup (step + 1) / W over
    the first W = optim.warmup_steps steps, times a cosine from 1 down to optim.min_lr_ratio
    over the decay's `progress` (clipped to [0, 1]):

        warmup(step) * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 (1 + cos(pi progress)))

    `progress` defaults to the steps after warmup over the rest of optim.max_steps (the
    cosine then starts where the warmup ends); a loop whose budget is not a step count (a
    benchmark's wall-clock budget) passes the fraction of it spent."""
    warm = optim_cfg.warmup_steps
    if progress is None:
        progress = max(0, step - warm) / max(1, optim_cfg.max_steps - warm)
    ramp = 1.0 if step >= warm else (step + 1) / warm
    floor = optim_cfg.min_lr_ratio
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return ramp * (floor + (1.0 - floor) * cosine)


def lr_lambda(optim_cfg) -> Callable[[int], float]:
    """`lr_factor` of a training run as a function of the step (torch's LambdaLR)."""

    def f(step: int) -> float:
        return lr_factor(step, optim_cfg)

    return f


class _Window:
    """Running sums since the last log line, kept on the device (no per-step host sync)."""

    def __init__(self, n_layers: int, device):
        self.sums = torch.zeros(2 + n_layers, dtype=torch.float64, device=device)  # loss, n, spars
        self.restart()

    def restart(self) -> None:
        self.sums.zero_()
        self.t0, self.steps, self.wait_s, self.sched_s = time.perf_counter(), 0, 0.0, 0.0

    def add(self, loss: torch.Tensor, layer_sparsity: torch.Tensor | None) -> None:
        self.sums[0] += loss.detach().double()
        self.sums[1] += 1
        if layer_sparsity is not None:  # a dense baseline has none
            self.sums[2:] += layer_sparsity.detach().double()


def eval_rows(cfg, batches: int | None, world: int) -> int | None:
    """Rows an evaluation of `batches` batches takes over all ranks (None: the whole split)."""
    return None if batches is None else batches * cfg.data.eval_batch_size * max(1, world)


class Trainer:
    """Owns the model, optimizer, LR schedule and run state of one worker; see the module doc.

    `schedule`: an object with get(step, prefetch_next) -> Schedule, report_validation(loss)
    and checkpoint_state() (sparsebk.train.ray_train.schedule_client). `reporter(metrics, directory)`:
    hands an evaluation's metrics and its checkpoint directory (or None) on; without one, no
    checkpoint is written. `hooks`: before_step(step) and loss(step, loss) -> loss (fault
    injection). `run_dir`: where rank 0 writes metrics and each rank its schedule record;
    None writes no files. `meta`: more of what the weights are (e.g. the tokenizer's
    identity), stored with every checkpoint next to the training and model configs.
    """

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, *, device, rank: int = 0,
                 world: int = 1, valid: torch.Tensor | None = None,
                 test: Callable[[], torch.Tensor] | None = None, schedule=None,
                 reporter: Callable[[dict, str | None], None] | None = None, hooks=None,
                 run_dir: str | os.PathLike | None = None, autocast=nullcontext,
                 lr_fn: Callable[[int], float] | None = None, meta: dict | None = None):
        self.cfg, self.model, self.net = cfg, model, unwrap(model)
        self.device, self.rank, self.world = device, rank, world
        self.valid, self.test, self.schedule, self.reporter = valid, test, schedule, reporter
        self.hooks, self.autocast = hooks, autocast
        # what the weights are, stored with every checkpoint (configs, tokenizer identity)
        self.meta = {"train_config": cfg.to_dict(), "model_config": cfg.model.to_dict(),
                     **(meta or {})}
        o = cfg.optim
        self.optimizer = self.net.configure_optimizers(o.weight_decay, o.lr, o.betas)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_fn or lr_lambda(o))
        self.state = RunState()
        self.bad_in_row = 0
        self.window = _Window(self.net.config.n_layers, device)
        self.last_log: dict = {}
        self.current_schedule = None  # the Schedule of the latest step
        self.trained_steps = 0  # in this process
        self.stop_requested = False  # a Schedule said stop (the driver's SIGTERM / SIGINT)
        # a path or a URI: every file below goes through sparsebk.storage.store
        self.run_dir = str(run_dir) if run_dir is not None else None
        self.writer = MetricsWriter(self.run_dir) if self.run_dir and rank == 0 else None
        self.tracking: Tracking | None = None  # opened by the first record (rank 0)
        self.first_step = 1  # of this attempt: a resumed run's trackers drop later events
        self.sched_file = None
        if self.run_dir is not None:  # a file appended to, or parts put to an object store
            self.sched_file = open_store(self.run_dir).line_log(f"schedule/rank{rank}.jsonl")

    # --- state ---------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """This rank's part of a checkpoint (rank 0: the training state; all: their RNG)."""
        s = self.state
        sched = self.schedule.checkpoint_state() if self.schedule is not None else None
        save_checkpoint(directory, rank=self.rank, model=self.net, optimizer=self.optimizer,
                        sharded=is_sharded(self.model), world=self.world,
                        lr_scheduler=self.lr_sched, step=s.step,
                        data_position=s.data_position(self.cfg.run.seed),
                        schedule_state=sched, extra={"run_state": dataclasses.asdict(s)},
                        meta=self.meta)

    def restore(self, directory: str | os.PathLike) -> dict | None:
        """Load a checkpoint written by `save`; returns its schedule state."""
        ckpt = load_checkpoint(directory, rank=self.rank, model=self.net,
                               optimizer=self.optimizer, lr_scheduler=self.lr_sched,
                               map_location=self.device)
        self.state = self._run_state(ckpt)
        self.first_step = self.state.step + 1
        if not ckpt["rng_restored"]:  # another world size: a fresh, distinct stream per rank
            torch.manual_seed(self.cfg.run.seed * 1000 + self.rank + 7919 * self.state.step)
        if self.rank == 0:
            logger.info("resumed from checkpoint at step %d (epoch %d, sample %d)",
                        self.state.step, self.state.epoch, self.state.sample_in_epoch)
        return ckpt["schedule_state"]

    def _run_state(self, ckpt: dict) -> RunState:
        """The checkpoint's RunState in this run's terms (RunState.from_checkpoint)."""
        return RunState.from_checkpoint(ckpt, self.cfg.to_dict(), self.world,
                                        self.cfg.data.batch_size)

    # --- the loop ------------------------------------------------------------------------
    def is_eval_step(self, step: int) -> bool:
        return step % self.cfg.run.eval_every == 0 or step == self.cfg.optim.max_steps

    def fit(self, batches: Batches) -> str | None:
        """Train until optim.max_steps; returns why training stopped early, or None.

        Each step takes the next N = optim.grad_accum_steps batches of the epoch; an epoch's
        last group of fewer than N is dropped (as a partial batch is), so every step sees
        N * batch_size rows and a resumed run starts at the sample its epoch had reached."""
        s, max_steps, n = self.state, self.cfg.optim.max_steps, self.cfg.optim.grad_accum_steps
        self.model.train()
        while s.step < max_steps:
            it, got = batches(s.epoch, s.sample_in_epoch), False
            while s.step < max_steps:
                t = time.perf_counter()
                micro = list(itertools.islice(it, n))
                self.window.wait_s += time.perf_counter() - t
                if len(micro) < n:
                    break
                got = True
                stop = self.step(micro)
                if stop is not None:
                    return stop
            if not got and s.sample_in_epoch == 0:
                raise ValueError(f"rank {self.rank} got fewer than optim.grad_accum_steps={n} "
                                 f"training batches of {self.cfg.data.batch_size} rows in an "
                                 "epoch; lower data.batch_size, grad_accum_steps or the number "
                                 "of workers")
            if s.step < max_steps:
                s.epoch, s.sample_in_epoch, s.batch_in_epoch = s.epoch + 1, 0, 0
        return None

    def step(self, batch: torch.Tensor | Sequence[torch.Tensor]) -> str | None:
        """One scheduled optimizer step on a batch (B, T + 1) or a list of micro-batches, with
        its logging and evaluation; a stop reason if the run must stop (too many consecutive
        non-finite steps)."""
        micro = [batch] if isinstance(batch, torch.Tensor) else list(batch)
        s = self.state
        s.step += 1
        s.batch_in_epoch += len(micro)
        s.sample_in_epoch += self.world * sum(len(m) for m in micro)  # equal shares per rank
        if self.hooks is not None:
            self.hooks.before_step(s.step)
        t = time.perf_counter()
        sched = self.schedule.get(s.step, prefetch_next=not self.is_eval_step(s.step))
        self.net.set_sparsity_schedule(sched.targets, sched.weight)
        self.window.sched_s += time.perf_counter() - t
        self.current_schedule = sched
        if self.sched_file is not None:
            self.sched_file.write(json.dumps({"step": s.step, "targets": list(sched.targets),
                                              "weight": sched.weight, "pid": os.getpid(),
                                              "rows": row_ids(micro)}) + "\n")
        if self.train_step(micro) is None:
            max_bad = self.cfg.optim.max_bad_steps
            if self.rank == 0:
                logger.warning("step %d: non-finite loss/gradient, step skipped (%d in a row, "
                               "limit %d)", s.step, self.bad_in_row, max_bad)
            if self.bad_in_row >= max_bad:
                return (f"stopped at step {s.step}: {self.bad_in_row} consecutive non-finite "
                        f"steps (optim.max_bad_steps={max_bad})")
        if s.step % self.cfg.run.log_every == 0 or s.step == self.cfg.optim.max_steps:
            self.log()
        self.stop_requested = getattr(sched, "stop", False)  # the same on every rank
        if self.is_eval_step(s.step):
            self.validate_and_save()
            self.window.t0 = time.perf_counter()  # evaluation time is not training throughput
        elif self.stop_requested:
            self.save_for_stop()
        if self.stop_requested:
            return f"stopped at step {s.step} on request, with a checkpoint of that step"
        return None

    def train_step(self, batch: torch.Tensor | Sequence[torch.Tensor]) -> dict | None:
        """One optimizer step on a batch (B, T + 1) or a list of equal micro-batches: forward
        and backward of each (loss / N: the summed gradient is that of the mean loss over all
        N * B rows), clip, AdamW (skipped when the gradient is not finite), LR step. Returns
        the model's scalar outputs (loss, ce_loss, ..., layer_sparsity) averaged over the
        micro-batches and detached, or None when the step was skipped. The model's sparsity
        schedule must be set already (`step` does it)."""
        micro = [batch] if isinstance(batch, torch.Tensor) else list(batch)
        n = len(micro)
        self.optimizer.zero_grad(set_to_none=True)
        mean: dict[str, torch.Tensor] = {}
        for i, mb in enumerate(micro):
            mb = (mb.pin_memory() if self.device.type == "cuda" else mb).to(
                self.device, non_blocking=True)
            with gradient_sync(self.model, enabled=i == n - 1):
                with self.autocast():
                    out = self.model(mb[:, :-1], targets=mb[:, 1:])
                loss = out["loss"]
                if self.hooks is not None:
                    loss = self.hooks.loss(self.state.step, loss)
                (loss / n).backward()
            out = {k: v.detach() for k, v in out.items() if k != "logits"}
            out["loss"] = loss.detach()
            for k, v in out.items():
                mean[k] = mean[k] + v / n if k in mean else v / n
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.optim.grad_clip)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor, the norm over all shards
            norm = norm.full_tensor()
        finite = bool(torch.isfinite(norm))  # the one host sync per step (see module doc)
        if finite:
            self.optimizer.step()
            self.bad_in_row = 0
            self.window.add(mean["loss"], mean.get("layer_sparsity"))
        else:
            self.bad_in_row += 1
            self.state.bad_steps += 1
        self.lr_sched.step()
        self.window.steps += 1
        self.trained_steps += 1
        return mean if finite else None

    # --- reporting -----------------------------------------------------------------------
    def log(self) -> dict:
        """All-reduce the window, write the progress line and metrics record (rank 0)."""
        w, s, c = self.window, self.state, self.cfg
        sums = all_reduce_sum(w.sums.clone(), self.world).tolist()
        elapsed, n = time.perf_counter() - w.t0, max(w.steps, 1)
        good = max(sums[1], 1.0)
        tokens_per_step = (self.world * c.optim.grad_accum_steps * c.data.batch_size
                           * c.data.block_len)
        sched = self.current_schedule
        self.last_log = {
            "step": s.step, "epoch": s.epoch,
            "train_loss": sums[0] / good if sums[1] else float("nan"),
            "sparsity_layers": [x / good for x in sums[2:]],
            "target_layers": list(sched.targets), "loss_weight": sched.weight,
            "lr": self.lr_sched.get_last_lr()[0],
            "tokens_per_s": tokens_per_step * w.steps / max(elapsed, 1e-9),
            "step_s": elapsed / n, "data_wait_s": w.wait_s / n, "schedule_s": w.sched_s / n,
            "eta_s": (c.optim.max_steps - s.step) * elapsed / n, "bad_steps": s.bad_steps,
            **memory_stats(self.net, self.optimizer),
        }
        if self.writer is not None:
            logger.info(progress_line(self.last_log, c.optim.max_steps))
            self.record("train", self.last_log)
        if self.sched_file is not None:
            self.sched_file.flush()
        w.restart()
        return self.last_log

    def record(self, kind: str, rec: dict) -> None:
        """Rank 0: one metrics record to metrics.jsonl and to the run.tracking trackers."""
        self.writer.write(kind, rec)
        if self.cfg.run.tracking:
            if self.tracking is None:
                self.tracking = Tracking(self.cfg.run, self.run_dir, self.meta["train_config"],
                                         purge_step=self.first_step)
            self.tracking.log(kind, rec)

    def _eval_rows(self) -> int | None:
        return eval_rows(self.cfg, self.cfg.run.eval_batches, self.world)

    def evaluate(self, blocks: torch.Tensor, max_rows: int | None = None):
        return evaluate(self.model, blocks, batch_size=self.cfg.data.eval_batch_size,
                        device=self.device, rank=self.rank, world=self.world,
                        max_rows=max_rows, autocast=self.autocast)

    def validate_and_save(self) -> dict:
        """Validation (all-reduced), the schedule update, metrics, and the checkpoint handed
        to the reporter (every rank calls this: Ray's report is a barrier)."""
        s, c = self.state, self.cfg
        val_loss, spars = self.evaluate(self.valid, self._eval_rows())
        if math.isfinite(val_loss):
            self.schedule.report_validation(val_loss)
            s.best_val_loss = min(s.best_val_loss, val_loss)
        else:  # a non-finite loss would raise in the scheduler and crash every retry
            s.nonfinite_evals += 1
            logger.warning("step %d: validation loss is %s; not given to the schedule",
                           s.step, val_loss)
        s.last_val_loss = val_loss
        metrics = validation_metrics(s, val_loss, spars, self.current_schedule, self.last_log,
                                     self.lr_sched.get_last_lr()[0])
        if s.step == c.optim.max_steps and self.test is not None:
            test_loss, _ = self.evaluate(self.test(), eval_rows(c, c.run.test_batches, self.world))
            metrics.update(test_loss=test_loss, test_ppl=safe_ppl(test_loss))
        self._publish(metrics)
        return metrics

    def _publish(self, metrics: dict) -> None:
        """An evaluation's record (rank 0) and the checkpoint of this step, handed to the
        reporter with it (marked `stop_requested` when the run stops after this step)."""
        if self.stop_requested:
            metrics["stop_requested"] = True
        if self.writer is not None:
            logger.info(eval_line(metrics, self.cfg.optim.max_steps))
            self.record("eval", metrics)
        if self.reporter is not None:
            with tempfile.TemporaryDirectory(prefix="sparsebk-ckpt-") as tmp:
                self.save(tmp)
                self.reporter(metrics, tmp)

    def save_for_stop(self) -> dict:
        """The checkpoint of a step the driver asked the run to stop at, between evaluations.
        Its validation loss (Ray ranks checkpoints by it) is measured on a copy of the RNG,
        and given neither to the schedule nor to the run state, so a run resumed from this
        checkpoint continues exactly as one that never stopped."""
        s = self.state
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            val_loss, spars = self.evaluate(self.valid, self._eval_rows())
        metrics = validation_metrics(s, val_loss, spars, self.current_schedule, self.last_log,
                                     self.lr_sched.get_last_lr()[0])
        self._publish(metrics)
        return metrics

    def finish(self, stopped: str | None) -> None:
        """End of fit: a stopped run (or a finished run re-run, which trained nothing) reports
        its state without a checkpoint, so the last good checkpoint stays the latest. A run
        stopped on request reported the checkpoint of its last step already."""
        if self.stop_requested:
            if self.rank == 0:
                logger.warning(stopped)
            self.close(stopped=True)
            return
        if stopped is not None or self.trained_steps == 0:
            val_loss, spars = self.evaluate(self.valid, self._eval_rows())
            metrics = {"step": self.state.step, "val_loss": val_loss,
                       "val_ppl": safe_ppl(val_loss), "sparsity": sum(spars) / len(spars),
                       "bad_steps": self.state.bad_steps, "stopped": stopped or ""}
            if self.rank == 0 and stopped:
                logger.error(stopped)
                if self.run_dir is not None:
                    # the driver reads this (Ray's Result.metrics are the last checkpoint's)
                    open_store(self.run_dir).write_text(
                        "stopped.json", json.dumps({"step": self.state.step, "reason": stopped}))
            if self.reporter is not None:
                self.reporter(metrics, None)
        self.close(stopped=stopped is not None)

    def close(self, stopped: bool = False) -> None:
        if self.sched_file is not None:
            self.sched_file.close()
            self.sched_file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.tracking is not None:
            self.tracking.close(stopped=stopped)
            self.tracking = None
