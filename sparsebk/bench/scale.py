"""`sparsebk bench scale --out DIR`: what the scaling knobs buy and cost, on 2 workers.

Each variant runs the training package's `Trainer.train_step` in 2 processes over a gloo
(CPU) or NCCL (CUDA: one GPU per process, 1 process on a 1-GPU machine) process group, wrapped as the Ray worker wraps the model
(sparsebk.parallel: `compile_blocks`, `shard`; DDP as the worker loop applies it), on random token batches (no data
loading in the timing). One factor changes at a time against the baseline (DDP, no
checkpointing, eager, no accumulation):

  ddp         the baseline
  fsdp        run.parallel fsdp (parameters, gradients, optimizer state sharded)
  ckpt        model.activation_checkpointing (each block recomputed in backward)
  compile     run.compile (the experts' FFNs compiled; compile time is in the warm-up)
  accum4      optim.grad_accum_steps 4 (4 micro-batches of the same size per step)

Per variant and model size: tokens/s (all workers, all micro-batches, median of the timed
steps), step time, and per worker (the larger of the two): parameter + gradient + optimizer
bytes held, activation bytes (what one micro-batch's forward keeps for backward: the
process's heap growth over that forward on CPU, measured with glibc's mallinfo2; allocated
CUDA memory on GPU), the part of it the blocks hold (the growth up to the final norm; the
rest is the head's (B, T, V) logits and their cross-entropy, which checkpointing the blocks
does not touch), and the process's peak RSS (on CPU it includes ~0.3-0.5 GB of
libraries, and the warm-up; on GPU the CUDA peak allocated).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from sparsebk.bench.common import format_table, write_result

VARIANTS = {
    "ddp": {},
    "fsdp": {"run.parallel": "fsdp"},
    "ckpt": {"model.activation_checkpointing": True},
    "compile": {"run.compile": True},
    "accum4": {"optim.grad_accum_steps": 4},
}
# model sizes: LMConfig preset plus overrides; "wide" is the widest that fits comfortably in
# 2 CPU workers' memory here (4x small's width: ~40M parameters)
SIZES = {
    "debug": ("debug", {"vocab_size": 256}),
    "small": ("small", {"vocab_size": 10000}),
    "wide": ("small", {"vocab_size": 10000, "d_model": 512}),
}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]


def heap_bytes() -> int:
    """Bytes malloc has handed out and not taken back (all arenas, mmapped chunks included):
    torch's CPU tensors live there. glibc only."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd


def _cfg(size: str, variant: str, batch: int):
    from sparsebk.train.config import TrainConfig, set_dotted

    preset, model = SIZES[size]
    d = {"model": {"preset": preset, **model, "dropout_p": 0.0},
         "data": {"batch_size": batch, "loader": "local", "dir": tempfile.gettempdir()},
         "optim": {"warmup_steps": 1, "max_steps": 1000},
         "run": {"num_workers": 2, "eval_every": 1000, "storage_path": tempfile.gettempdir()}}
    for key, value in VARIANTS[variant].items():
        set_dotted(d, key, value)
    return TrainConfig.from_dict(d)


def _worker(rank: int, world: int, init_file: str, size: str, variant: str, batch: int,
            warmup: int, steps: int, threads: int, out: str) -> None:
    """One process of a variant: its timed steps, memory and activation bytes to
    OUT/rank<r>.pt."""
    import torch.distributed as dist

    from sparsebk.parallel import leave_worker
    from sparsebk.train.trainer import memory_stats

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(threads)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    try:
        cfg = _cfg(size, variant, batch)
        t, autocast = _trainer(cfg, rank, world, device)
        gen = torch.Generator().manual_seed(rank)
        V, T, n = cfg.model.vocab_size, cfg.model.n_seq, cfg.optim.grad_accum_steps

        def micro():
            return [torch.randint(0, V, (batch, T + 1), generator=gen) for _ in range(n)]

        step_s = _timed_steps(t, micro, warmup, steps)
        mem = memory_stats(t.net, t.optimizer)
        t.optimizer.zero_grad(set_to_none=True)
        held, blocks = _activation_bytes(t, micro()[0].to(device), autocast)
        torch.save({"step_s": step_s, "activation_mb": held / 2**20,
                    "block_act_mb": blocks / 2**20, **mem}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    leave_worker()


def _trainer(cfg, rank: int, world: int, device: torch.device):
    """(Trainer, autocast) of one worker: the model wrapped as the Ray worker wraps it
    (compiled blocks, FSDP or DDP), a fixed sparsity schedule, training mode."""
    from sparsebk.model.lm import SparseBKLM
    from sparsebk.parallel import compile_blocks, shard
    from sparsebk.train.trainer import Trainer

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = SparseBKLM(cfg.model)
    if cfg.run.compile:
        compile_blocks(model)
    if cfg.run.parallel == "fsdp":
        model = shard(model, world, device)
    else:
        model = torch.nn.parallel.DistributedDataParallel(
            model.to(device), device_ids=[rank] if cuda else None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    t = Trainer(cfg, model, device=device, rank=rank, world=world, autocast=autocast)
    t.net.set_sparsity_schedule(0.5, 0.1)
    t.model.train()
    return t, autocast


def _timed_steps(t, micro, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` training steps after `warmup` untimed ones; the workers
    start every timed step together (a barrier before it)."""
    import torch.distributed as dist

    for _ in range(warmup):
        t.train_step(micro())
    step_s = []
    for _ in range(steps):
        x = micro()
        dist.barrier()
        t0 = time.perf_counter()
        t.train_step(x)
        if t.device.type == "cuda":
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - t0)
    return step_s


def _activation_bytes(t, x: torch.Tensor, autocast) -> tuple[int, int]:
    """(bytes one micro-batch x's forward keeps alive for its backward, the part held when
    the final norm starts: the blocks'); then its backward runs."""
    cuda = t.device.type == "cuda"

    def allocated() -> int:
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return heap_bytes()

    gc.collect()
    before = torch.cuda.memory_allocated() if cuda else heap_bytes()
    at_head = []
    hook = t.net.norm_f.register_forward_pre_hook(lambda m, a: at_head.append(allocated()))
    with autocast():
        loss = t.model(x[:, :-1], targets=x[:, 1:])["loss"]
    held = allocated() - before
    hook.remove()
    loss.backward()
    return held, at_head[0] - before


def workers() -> int:
    return min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2


def run_variant(size: str, variant: str, *, batch: int, warmup: int, steps: int,
                threads: int) -> dict:
    import torch.multiprocessing as mp

    world = workers()
    with tempfile.TemporaryDirectory(prefix="sparsebk-scale-") as tmp:
        mp.start_processes(_worker, args=(world, f"{tmp}/pg", size, variant, batch, warmup,
                                          steps, threads, tmp), nprocs=world, join=True,
                           start_method="spawn")
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(world)]
    cfg = _cfg(size, variant, batch)
    # a step ends for all workers at its last collective: the slowest rank's time
    step_s = statistics.median(max(ts) for ts in zip(*(r["step_s"] for r in ranks)))
    tokens = world * cfg.optim.grad_accum_steps * batch * cfg.model.n_seq
    peak = "cuda_peak_mb" if "cuda_peak_mb" in ranks[0] else "peak_rss_mb"
    return {"size": size, "variant": variant, "workers": world, "tokens_per_s": tokens / step_s,
            "step_ms": 1e3 * step_s,
            "param_optim_mb": max(r["param_optim_mb"] for r in ranks),
            "activation_mb": max(r["activation_mb"] for r in ranks),
            "block_act_mb": max(r["block_act_mb"] for r in ranks),
            "peak_mb": max(r[peak] for r in ranks), "peak_kind": peak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparsebk bench scale", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--sizes", default="small,wide", help=f"comma list of {list(SIZES)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--batch", type=int, default=8, help="rows per micro-batch per worker")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation included)")
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: cores // 2)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: the debug model, batch 4, 1 warm-up and 3 timed steps")
    args = p.parse_args(argv)
    sizes, variants = args.sizes.split(","), args.variants.split(",")
    if args.quick:
        sizes, args.batch, args.warmup, args.steps = ["debug"], 4, 1, 3
    for name, known in ((sizes, SIZES), (variants, VARIANTS)):
        bad = [x for x in name if x not in known]
        if bad:
            p.error(f"unknown {bad}; choose from {list(known)}")
    threads = args.threads or max(1, (os.cpu_count() or 2) // 2)
    rows = []
    for size in sizes:
        for variant in variants:
            rows.append(run_variant(size, variant, batch=args.batch, warmup=args.warmup,
                                    steps=args.steps, threads=threads))
            print(f"{size} {variant}: {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    for row in rows:  # against the same size's baseline
        base = next(r for r in rows if r["size"] == row["size"] and r["variant"] == "ddp") \
            if "ddp" in variants else row
        row["speed_vs_ddp"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["param_optim_vs_ddp"] = row["param_optim_mb"] / base["param_optim_mb"]
        row["activation_vs_ddp"] = row["activation_mb"] / max(base["activation_mb"], 1e-9)
        row["block_act_vs_ddp"] = row["block_act_mb"] / max(base["block_act_mb"], 1e-9)
    print()
    print(f"{workers()} workers, {threads} torch threads each, micro-batch {args.batch} rows; "
          f"median of {args.steps} steps after {args.warmup} warm-up; memory per worker (max)")
    print(format_table(rows, ["size", "variant", "tokens_per_s", "speed_vs_ddp", "step_ms",
                              "param_optim_mb", "param_optim_vs_ddp", "activation_mb",
                              "activation_vs_ddp", "block_act_mb", "block_act_vs_ddp",
                              "peak_mb"]))
    write_result(args.out, "scale", {"args": vars(args), "threads": threads, "rows": rows,
                                     "load_avg": os.getloadavg()})
    return 0
