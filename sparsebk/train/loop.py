"""The per-worker training function: one plain loop, its Ray touch points marked `# [ray]`.

Each step:
    1. rank 0 takes the prefetched (per-layer targets, weight) from the schedule actor and
       issues the call for the next step; the values are broadcast to every rank (gloo);
    2. forward (bf16 autocast on GPU), backward (DDP all-reduces the gradients);
    3. gradient clipping; the clipped norm is the same on every rank after the all-reduce, so
       all ranks agree on skipping a non-finite step without another collective;
    4. AdamW + LR schedule (linear warmup, cosine decay).
Every `log_every` steps the running sums (loss, training-mode sparsity per layer) are
all-reduced and rank 0 logs a progress line and writes a metrics record; every `eval_every`
steps (and at the last step) the validation loss and eval-mode sparsity are all-reduced, the
loss goes to the actor, and all ranks call `ray.train.report` with a checkpoint (a barrier).
The report carries both sparsities: "sparsity_layer_{i}" (eval mode, deterministic gate) and
"train_sparsity_layer_{i}" (sampled masks, mean over the last log interval).

The one host sync per step is the finiteness check of the gradient norm (step 3): skipping a
NaN step needs its answer before the optimizer runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from sparsebk.data import load_blocks
from sparsebk.lm import LMConfig, SparseBKLM
from sparsebk.train.checkpoint import load_checkpoint, save_checkpoint
from sparsebk.train.config import TrainConfig
from sparsebk.train.metrics import MetricsWriter, eval_line, progress_line, safe_ppl
from sparsebk.train.schedule_client import ScheduleClient, broadcast_schedule

logger = logging.getLogger("sparsebk.train")


class NonFiniteLossError(RuntimeError):
    pass


def lr_lambda(optim_cfg):
    """LR multiplier at a step: linear warmup to 1, then cosine decay to min_lr_ratio."""
    warm, total, floor = optim_cfg.warmup_steps, optim_cfg.max_steps, optim_cfg.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, *, batch_size: int, device, rank: int, world: int,
             max_rows: int | None, autocast) -> tuple[float, list[float]]:
    """Token-weighted mean cross-entropy over this split (rows strided across ranks, sums
    all-reduced) and the measured per-layer sparsity (eval mode: no gate noise)."""
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    rows = blocks if max_rows is None else blocks[:max_rows]
    mine = rows[rank::world]
    n_layers = net.config.n_layers
    acc = torch.zeros(2 + n_layers, dtype=torch.float64, device=device)  # loss sum, tokens, sparsity sums
    for i in range(0, len(mine), batch_size):
        b = mine[i:i + batch_size].to(device, non_blocking=True)
        with autocast():
            out = net(b[:, :-1], targets=b[:, 1:])
        n_tok = b[:, 1:].numel()
        acc[0] += out["ce_loss"].double() * n_tok
        acc[1] += n_tok
        acc[2:] += out["layer_sparsity"].double() * n_tok
    _all_reduce_sum(acc, world)
    if was_training:
        net.train()
    tokens = max(acc[1].item(), 1.0)
    return acc[0].item() / tokens, (acc[2:] / tokens).tolist()


def _local_batches(rows: torch.Tensor, cfg: TrainConfig, epoch: int, skip: int, rank: int,
                   world: int):
    """data.loader local: this rank's batches of one epoch from all rows (R, block_len + 1)."""
    n = len(rows) // world * world  # equal shares: every rank runs the same number of steps
    if cfg.data.shuffle_buffer:
        g = torch.Generator().manual_seed(cfg.run.seed * 100_003 + epoch)
        order = torch.randperm(len(rows), generator=g)[:n]
    else:
        order = torch.arange(n)
    mine = order[rank::world]
    b = cfg.data.batch_size
    for i in range(skip * b, len(mine) - b + 1, b):
        yield rows[mine[i:i + b]]


def _batches(shard, cfg: TrainConfig, epoch: int, skip: int):
    """This rank's training batches for one epoch, (B, block_len + 1) int64, after `skip`."""
    kw = {}
    if cfg.data.shuffle_buffer:
        kw = {"local_shuffle_buffer_size": cfg.data.shuffle_buffer,
              "local_shuffle_seed": cfg.run.seed * 100_003 + epoch}
    it = shard.iter_batches(batch_size=cfg.data.batch_size, batch_format="numpy",
                            drop_last=True, prefetch_batches=cfg.data.prefetch_batches, **kw)
    for i, batch in enumerate(it):
        if i < skip:
            continue
        yield torch.from_numpy(np.stack(batch["tokens"]).astype(np.int64))


class _FaultInjector:
    """Testing aid (run.inject_faults): fail once at a given step, remembered by a marker file."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, actor):
        self.faults = cfg.run.faults()
        self.run_dir = Path(cfg.run.run_dir)
        self.rank, self.world, self.actor = rank, world, actor

    def _once(self, mode: str, step: int) -> bool:
        marker = self.run_dir / "faults" / f"{mode}@{step}"
        if marker.exists():
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))
        return True

    def before_step(self, step: int) -> None:
        for mode, at in self.faults:
            if at != step:
                continue
            if mode in ("raise", "exit") and self.rank == self.world - 1 and self._once(mode, step):
                logger.warning("fault injection: %s on rank %d at step %d", mode, self.rank, step)
                if mode == "raise":
                    raise RuntimeError(f"injected failure at step {step} (run.inject_faults)")
                os._exit(1)
            if mode == "kill_actor" and self.rank == 0 and self._once(mode, step):
                logger.warning("fault injection: killing the schedule actor at step %d", step)
                ray.kill(self.actor, no_restart=False)

    def poison(self, step: int) -> bool:
        return self.rank == 0 and ("nan", step) in self.faults


def train_loop_per_worker(config: dict) -> None:
    """Run by every Ray Train worker. `config`: {"cfg": TrainConfig.to_dict(), "lm":
    LMConfig.to_dict(), "dataset_dir": str, "schedule_actor": ActorHandle}."""

    cfg = TrainConfig.from_dict(config["cfg"])
    lm_cfg = LMConfig.from_dict(config["lm"])
    actor = config["schedule_actor"]
    dataset_dir = config["dataset_dir"]
    ctx = ray.train.get_context()  # [ray]
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = Path(cfg.run.run_dir)
    use_gpu = cfg.run.use_gpu
    if use_gpu and not torch.cuda.is_available():
        # Never fall back to CPU silently: the NCCL group would then fail obscurely.
        raise RuntimeError(f"run.use_gpu is true but worker rank {rank} sees no CUDA device "
                           f"(torch {torch.__version__}); install a CUDA build of torch on the "
                           "GPU nodes or set run.use_gpu=false")
    if use_gpu and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"worker rank {rank}: {torch.cuda.get_device_name()} has no bf16 "
                           "support, which the GPU path's autocast uses")
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")  # [ray]
    if not use_gpu:
        threads = cfg.run.torch_threads or max(1, (os.cpu_count() or 1) // max(1, world))
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.run.seed * 1000 + rank)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_gpu else nullcontext)
    # The schedule travels on a CPU group even when the default group is NCCL: the values are
    # Python floats on the host, and a gloo broadcast needs no device sync.
    sched_group = None
    if world > 1:
        sched_group = (dist.new_group(backend="gloo") if dist.get_backend() != "gloo"
                       else dist.group.WORLD)

    model = SparseBKLM(lm_cfg)
    model = ray.train.torch.prepare_model(model) if world > 1 or use_gpu else model  # [ray]
    net = _unwrap(model)
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in net.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr, betas=cfg.optim.betas)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim))

    step, epoch, batch_in_epoch, bad_total = 0, 0, 0, 0
    sched_state, last_val = None, None
    best_val = float("inf")
    ckpt = ray.train.get_checkpoint()  # [ray]
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(d, rank=rank, model=net, optimizer=optimizer,
                                    lr_scheduler=lr_sched, map_location=device)
        step = state["step"]
        epoch = state["data_position"]["epoch"]
        batch_in_epoch = state["data_position"]["batch_in_epoch"]
        sched_state = state["schedule_state"]
        last_val = state["extra"].get("val_loss")
        best_val = state["extra"].get("best_val_loss", best_val)
        bad_total = state["extra"].get("bad_steps", 0)
        if not state["rng_restored"]:
            torch.manual_seed(cfg.run.seed * 1000 + rank + 7919 * step)
        if rank == 0:
            logger.info("resumed from checkpoint at step %d (epoch %d, batch %d)",
                        step, epoch, batch_in_epoch)

    n_layers = lm_cfg.n_layers
    max_steps = cfg.optim.max_steps
    client = ScheduleClient(actor, sched_state, last_val) if rank == 0 else None
    faults = _FaultInjector(cfg, rank, world, actor)
    writer = MetricsWriter(run_dir) if rank == 0 else None
    sched_log = run_dir / "schedule" / f"rank{rank}.jsonl"
    sched_log.parent.mkdir(parents=True, exist_ok=True)
    sched_file = open(sched_log, "a", buffering=1)  # line-buffered: a crash loses no line
    valid = load_blocks(dataset_dir, "valid")
    if cfg.data.loader == "ray":
        shard = ray.train.get_dataset_shard("train")  # [ray]
        epoch_batches = lambda e, skip: _batches(shard, cfg, e, skip)  # noqa: E731
    else:
        train_rows = load_blocks(dataset_dir, "train")
        epoch_batches = lambda e, skip: _local_batches(  # noqa: E731
            train_rows, cfg, e, skip, rank, world)

    # Running sums since the last log line, kept on the device (no per-step host sync).
    win = torch.zeros(2 + n_layers, dtype=torch.float64, device=device)  # loss, steps, sparsity
    win_t0, win_steps, wait_s, sched_s = time.perf_counter(), 0, 0.0, 0.0
    bad_in_row = 0
    targets, weight = [0.0] * n_layers, 0.0
    tokens_per_step = world * cfg.data.batch_size * cfg.data.block_len
    last_rec: dict = {}
    stopped = None

    model.train()
    while step < max_steps and stopped is None:
        got_batch = False
        batches = epoch_batches(epoch, batch_in_epoch)
        while step < max_steps:
            t_wait = time.perf_counter()
            batch = next(batches, None)
            wait_s += time.perf_counter() - t_wait
            if batch is None:
                break
            got_batch = True
            step += 1
            batch_in_epoch += 1
            faults.before_step(step)
            t_sched = time.perf_counter()
            values = client.get(step, prefetch=step < max_steps) if rank == 0 else None
            targets, weight = broadcast_schedule(values, n_layers, sched_group, world)
            net.set_sparsity_schedule(targets, weight)
            sched_s += time.perf_counter() - t_sched
            sched_file.write(json.dumps({"step": step, "targets": targets, "weight": weight,
                                         "pid": os.getpid()}) + "\n")

            batch = (batch.pin_memory() if use_gpu else batch).to(device, non_blocking=True)
            with autocast():
                out = model(batch[:, :-1], targets=batch[:, 1:])
            loss = out["loss"]
            if faults.poison(step):
                loss = loss * float("nan")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip)
            if bool(torch.isfinite(norm)):  # the one host sync per step (see module doc)
                optimizer.step()
                bad_in_row = 0
                win[0] += loss.detach().double()
                win[1] += 1
                win[2:] += out["layer_sparsity"].detach().double()
            else:
                bad_in_row += 1
                bad_total += 1
                if rank == 0:
                    logger.warning("step %d: non-finite loss/gradient, step skipped "
                                   "(%d in a row, limit %d)", step, bad_in_row,
                                   cfg.optim.max_bad_steps)
                if bad_in_row >= cfg.optim.max_bad_steps:
                    stopped = (f"stopped at step {step}: {bad_in_row} consecutive non-finite "
                               f"steps (optim.max_bad_steps={cfg.optim.max_bad_steps})")
                    break
            lr_sched.step()
            win_steps += 1

            if step % cfg.run.log_every == 0 or step == max_steps:
                sums = _all_reduce_sum(win.clone(), world).tolist()
                elapsed = time.perf_counter() - win_t0
                good = max(sums[1], 1.0)
                last_rec = {
                    "step": step, "epoch": epoch,
                    "train_loss": sums[0] / good if sums[1] else float("nan"),
                    "sparsity_layers": [s / good for s in sums[2:]],
                    "target_layers": list(targets), "loss_weight": weight,
                    "lr": lr_sched.get_last_lr()[0],
                    "tokens_per_s": tokens_per_step * win_steps / max(elapsed, 1e-9),
                    "step_s": elapsed / win_steps, "data_wait_s": wait_s / win_steps,
                    "schedule_s": sched_s / win_steps,
                    "eta_s": (max_steps - step) * elapsed / win_steps, "bad_steps": bad_total,
                }
                if rank == 0:
                    logger.info(progress_line(last_rec, max_steps))
                    writer.write("train", last_rec)
                sched_file.flush()
                win.zero_()
                win_t0, win_steps, wait_s, sched_s = time.perf_counter(), 0, 0.0, 0.0

            if step % cfg.run.eval_every == 0 or step == max_steps:
                best_val = _evaluate_and_report(
                    cfg=cfg, model=model, net=net, valid=valid, device=device, rank=rank,
                    world=world, step=step, targets=targets, weight=weight, last_rec=last_rec,
                    client=client, writer=writer, optimizer=optimizer, lr_sched=lr_sched,
                    epoch=epoch, batch_in_epoch=batch_in_epoch, bad_total=bad_total,
                    best_val=best_val, dataset_dir=dataset_dir, autocast=autocast)
                win_t0 = time.perf_counter()  # evaluation time is not training throughput
        if not got_batch and batch_in_epoch == 0:
            raise ValueError(f"{dataset_dir}: rank {rank} got no training batch of "
                             f"{cfg.data.batch_size} rows; lower data.batch_size or workers")
        if step < max_steps and stopped is None:
            epoch, batch_in_epoch = epoch + 1, 0

    if stopped is not None or ckpt is not None and step >= max_steps and not last_rec:
        # Nothing trained in this attempt (a finished run re-run) or a NaN stop: report the
        # state without a checkpoint, so the last good checkpoint stays the latest.
        val_loss, spars = evaluate(model, valid, batch_size=cfg.data.eval_batch_size,
                                   device=device, rank=rank, world=world,
                                   max_rows=_eval_rows(cfg), autocast=autocast)
        metrics = {"step": step, "val_loss": val_loss, "val_ppl": safe_ppl(val_loss),
                   "sparsity": sum(spars) / len(spars), "bad_steps": bad_total,
                   "stopped": stopped or ""}
        if rank == 0 and stopped:
            logger.error(stopped)
            # The driver reads this (Ray's Result.metrics are the last checkpoint's).
            (run_dir / "stopped.json").write_text(json.dumps({"step": step, "reason": stopped}))
        ray.train.report(metrics)  # [ray]
    sched_file.close()
    if writer is not None:
        writer.close()


def _eval_rows(cfg: TrainConfig) -> int | None:
    if cfg.run.eval_batches is None:
        return None
    return cfg.run.eval_batches * cfg.data.eval_batch_size * max(1, cfg.run.num_workers)


def _evaluate_and_report(*, cfg, model, net, valid, device, rank, world, step, targets, weight,
                         last_rec, client, writer, optimizer, lr_sched, epoch, batch_in_epoch,
                         bad_total, best_val, dataset_dir, autocast) -> float:
    """Validation (all-reduced), the actor update, metrics, and the checkpoint report (all
    ranks call it: ray.train.report is a barrier). Returns the best validation loss so far."""
    max_steps = cfg.optim.max_steps

    val_loss, spars = evaluate(model, valid, batch_size=cfg.data.eval_batch_size, device=device,
                               rank=rank, world=world, max_rows=_eval_rows(cfg),
                               autocast=autocast)
    if rank == 0:
        client.report_validation(val_loss)
    # training-mode (sampled-mask) sparsity: the mean over the last log interval, all-reduced
    # there; the eval-mode values above come from the deterministic gate
    train_spars = last_rec.get("sparsity_layers") or [float("nan")] * len(spars)
    metrics = {
        "step": step, "epoch": epoch, "val_loss": val_loss, "val_ppl": safe_ppl(val_loss),
        "sparsity": sum(spars) / len(spars),
        **{f"sparsity_layer_{i}": s for i, s in enumerate(spars)},
        "train_sparsity": sum(train_spars) / len(train_spars),
        **{f"train_sparsity_layer_{i}": s for i, s in enumerate(train_spars)},
        **{f"target_layer_{i}": t for i, t in enumerate(targets)},
        "target_sparsity": sum(targets) / len(targets), "loss_weight": weight,
        "train_loss": last_rec.get("train_loss", float("nan")),
        "tokens_per_s": last_rec.get("tokens_per_s", float("nan")),
        "lr": lr_sched.get_last_lr()[0], "bad_steps": bad_total,
    }
    if step == max_steps:
        test_loss, _ = evaluate(model, load_blocks(dataset_dir, "test"),
                                batch_size=cfg.data.eval_batch_size, device=device, rank=rank,
                                world=world, max_rows=None, autocast=autocast)
        metrics.update(test_loss=test_loss, test_ppl=safe_ppl(test_loss))
    best = min(best_val, val_loss)
    if rank == 0:
        logger.info(eval_line(metrics, max_steps))
        writer.write("eval", metrics)
    with tempfile.TemporaryDirectory(prefix="sparsebk-ckpt-") as tmp:
        save_checkpoint(
            tmp, rank=rank, model=net, optimizer=optimizer, lr_scheduler=lr_sched, step=step,
            data_position={"epoch": epoch, "batch_in_epoch": batch_in_epoch},
            schedule_state=client.held if rank == 0 else None,
            extra={"val_loss": val_loss, "best_val_loss": best, "bad_steps": bad_total})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))  # [ray]
    return best
