"""`sparsebk bench training --out DIR`: what Ray Train and the schedule actor cost.

Same model, optimizer, batches and step count everywhere (the ptb-cpu preset by default):

  plain        the training step in this process, plain PyTorch, a fixed in-process schedule
  ray-1w            Ray Train, 1 worker, Ray Data shard (the preset's prefetch_batches),
                    schedule from the actor (prefetched)
  ray-1w-prefetch2  the same with Ray Data prefetching 2 batches
  ray-1w-local      Ray Train, 1 worker, the plain-Parquet loader (data.loader local)
  ray-2w            Ray Train, 2 workers (DDP over gloo), Ray Data shards
  ray-2w-local      Ray Train, 2 workers, the plain-Parquet loader

Per run, over 10-step windows after the first (warm-up) window: tokens/s at the median window
and at the best one (the least disturbed on a shared machine), step time,
the share of step time spent waiting for the next batch, and the share spent getting the
schedule (rank 0: take the prefetched actor answer, issue the next call, broadcast).
Also a micro-benchmark: one synchronous actor call vs one in-process scheduler step.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from sparsebk.bench.common import format_table, local_ray, time_call, write_result

CONFIGS = Path(__file__).resolve().parents[2] / "ray_jobs" / "configs"


def plain_run(cfg, dataset_dir, steps: int, window: int) -> dict:
    """The worker loop's step without Ray: the Trainer's own `train_step` (same model,
    optimizer, LR, clipping) on the same batches, with the schedule from an in-process
    scheduler instead of the actor."""
    from sparsebk.data.loading import load_blocks
    from sparsebk.model.lm import SparseBKLM
    from sparsebk.train.run_state import local_batches
    from sparsebk.train.schedule import LocalSchedule
    from sparsebk.train.trainer import Trainer

    torch.manual_seed(cfg.run.seed * 1000)
    trainer = Trainer(cfg, SparseBKLM(cfg.model), device=torch.device("cpu"))
    schedule = LocalSchedule(cfg.schedule, cfg.model.n_layers)
    batches = local_batches(load_blocks(dataset_dir, "train"), cfg, 0, 0, 0, 1)
    step_no = itertools.count(1)

    def step():
        values = schedule.get(next(step_no))
        trainer.net.set_sparsity_schedule(values.targets, values.weight)
        trainer.train_step(next(batches))

    def run_window():  # the same windows as the workers' log interval
        for _ in range(window):
            step()

    # the first window is the warm-up (as the first train record of a Ray run is dropped)
    timed = time_call(run_window, repeats=steps // window - 1, warmup=1, device="cpu")
    step_s = [w / window for w in timed["wall_s"]]
    tokens = cfg.data.batch_size * cfg.data.block_len
    return _row("plain", 1, step_s, tokens, [float("nan")] * len(step_s),
                [float("nan")] * len(step_s))


def _row(label, workers, step_s, tokens_per_step, data_s, sched_s) -> dict:
    """Per-window step times -> median and best (least disturbed) throughput."""
    med = statistics.median(step_s)
    return {"run": label, "workers": workers, "steps": len(step_s) * 10,
            "tokens_per_s_median": tokens_per_step / med,
            "tokens_per_s_best": tokens_per_step / min(step_s),
            "step_ms_median": 1e3 * med, "step_ms_best": 1e3 * min(step_s),
            "data_share_pct": 100 * statistics.median(d / t for d, t in zip(data_s, step_s)),
            "schedule_share_pct": 100 * statistics.median(c / t for c, t in zip(sched_s, step_s))}


def ray_run(cfg, label: str) -> dict:
    from sparsebk.train.ray_train.driver import run_training
    from sparsebk.train.metrics import read_metrics

    summary = run_training(cfg)
    recs = read_metrics(summary["run_dir"])["train"][1:]  # drop the warm-up window
    tokens = cfg.run.num_workers * cfg.data.batch_size * cfg.data.block_len
    row = _row(label, cfg.run.num_workers, [r["step_s"] for r in recs], tokens,
               [r["data_wait_s"] for r in recs], [r["schedule_s"] for r in recs])
    row.update(actor_calls=summary["actor_served"], run_dir=summary["run_dir"])
    return row


def actor_latency(cfg, n_layers: int) -> dict:
    import ray

    from sparsebk.train.ray_train.actor import create_schedule_actor
    from sparsebk.train.schedule import ScheduleState

    actor = create_schedule_actor(cfg.schedule, n_layers)
    ray.get(actor.reset.remote())
    remote_step, local_step = itertools.count(1), itertools.count(1)
    sync = time_call(lambda: ray.get(actor.values.remote(next(remote_step))), repeats=200, warmup=20,
                     device="cpu")
    local = ScheduleState(cfg.schedule, n_layers)
    local.reset()
    inproc = time_call(lambda: local.values(next(local_step)), repeats=200, warmup=20, device="cpu")
    ray.kill(actor)
    return {"actor_call_sync_ms": 1e3 * sync["median_s"],
            "inprocess_step_ms": 1e3 * inproc["median_s"]}


WARMUP = 10  # steps of the warm-up window, and of every timed window (the log interval)
RAY_RUNS = (("ray-1w", ["run.num_workers=1"]),
            ("ray-1w-prefetch2", ["run.num_workers=1", "data.prefetch_batches=2"]),
            ("ray-1w-local", ["run.num_workers=1", "data.loader=local"]),
            ("ray-2w", ["run.num_workers=2"]),
            ("ray-2w-local", ["run.num_workers=2", "data.loader=local"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparsebk bench training", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--config", default=str(CONFIGS / "ptb-cpu.yaml"))
    p.add_argument("--steps", type=int, default=60, help="steps per run (first 10 are warm-up)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    if args.steps < 20:
        p.error(f"--steps={args.steps}: needs >= 20 (a 10-step warm-up window, then windows "
                "of 10 steps)")
    logging.basicConfig(level=logging.WARNING)
    from sparsebk.data.manifest import check_dataset
    from sparsebk.train.ray_train.driver import ensure_dataset

    out = Path(args.out).resolve()
    configs = _RunConfigs(args, out)
    base = configs("plain", "run.num_workers=1")
    dataset_dir = ensure_dataset(base.data)
    base = base.resolve_vocab(check_dataset(dataset_dir)["vocab_size"])
    rows = [plain_run(base, dataset_dir, args.steps, WARMUP)]
    print(f"plain: {rows[-1]['tokens_per_s_median']:.0f} tokens/s", flush=True)
    ray_rows, micro = ray_runs(configs, base)
    rows += ray_rows
    for r in rows:
        r["vs_plain_median"] = r["tokens_per_s_median"] / rows[0]["tokens_per_s_median"]
        r["vs_plain_best"] = r["tokens_per_s_best"] / rows[0]["tokens_per_s_best"]
    goals = goal_figures(rows, micro)
    cols = ["run", "workers", "steps", "tokens_per_s_median", "tokens_per_s_best",
            "vs_plain_median", "vs_plain_best", "step_ms_median", "data_share_pct",
            "schedule_share_pct"]
    print(f"\nconfig {args.config}, {args.steps} steps per run ({WARMUP} warm-up), "
          f"{os.cpu_count()} cores")
    print(format_table(rows, cols))
    print()
    print(format_table([{"measure": k, "value": v} for k, v in goals.items()]))
    path = write_result(out, "training", {"config": args.config, "steps": args.steps,
                                          "warmup_steps": WARMUP, "rows": rows,
                                          "summary": goals, "micro": micro})
    print(f"\nwrote {path}")
    return 0


class _RunConfigs:
    """configs(name, *overrides): the training config of one run of the benchmark (its own
    run folder under OUT/training_runs, the step budget, one evaluation at the end)."""

    def __init__(self, args, out: Path):
        self.args, self.out, self.stamp = args, out, time.strftime("%Y%m%d-%H%M%S")

    def __call__(self, name: str, *extra: str):
        from sparsebk.train.config import load_config

        a = self.args
        return load_config(a.config, [
            f"run.storage_path={self.out / 'training_runs'}", f"run.name={name}-{self.stamp}",
            f"optim.max_steps={a.steps}", f"run.eval_every={a.steps}",
            f"run.log_every={WARMUP}", "run.eval_batches=1", "run.plots=false",
            *a.overrides, *extra])


def ray_runs(configs: _RunConfigs, base) -> tuple[list[dict], dict]:
    """(a row per Ray Train run of RAY_RUNS, the actor-call micro-benchmark) on a local Ray."""
    import ray

    # at least 4 CPUs: the 2-worker runs and their Ray Data reads
    local_ray(max(os.cpu_count() or 1, 4), workers=2)
    rows = []
    try:
        micro = actor_latency(base, base.model.n_layers)
        for label, extra in RAY_RUNS:
            rows.append(ray_run(configs(label, *extra), label))
            print(f"{label}: {rows[-1]['tokens_per_s_median']:.0f} tokens/s", flush=True)
    finally:
        ray.shutdown()
    return rows, micro


def goal_figures(rows: list[dict], micro: dict) -> dict:
    """The figures the goals are about, each labelled with its goal."""
    one = next(r for r in rows if r["run"] == "ray-1w")
    two = next(r for r in rows if r["run"] == "ray-2w")
    return {
        "ray_1w_vs_plain median (goal >= 0.95)": one["vs_plain_median"],
        "ray_1w_vs_plain best (goal >= 0.95)": one["vs_plain_best"],
        "schedule_share_pct ray-1w (goal <= 1)": one["schedule_share_pct"],
        "schedule_share_pct ray-2w (goal <= 1)": two["schedule_share_pct"],
        "data_share_pct ray-1w (goal <= 5)": one["data_share_pct"],
        "data_share_pct ray-2w (goal <= 5)": two["data_share_pct"],
        "2w_vs_1w tokens/s median": two["tokens_per_s_median"] / one["tokens_per_s_median"],
        "2w_vs_1w tokens/s best": two["tokens_per_s_best"] / one["tokens_per_s_best"],
        "load average (1 min) at the end": os.getloadavg()[0],
        "actor call, synchronous (ms)": micro["actor_call_sync_ms"],
        "in-process scheduler step (ms)": micro["inprocess_step_ms"],
    }
