"""`sparsebk bench data --out DIR`: how fast the data path delivers blocks for the `small` preset.

Measures, on PTB (word level) at the small preset's block length:
  prepare   first preparation (tokenise + write Parquet) and the idempotent reuse the training
            job pays on every start (manifest + checksum verification);
  plain     `load_blocks` of the train split into a LongTensor (pyarrow), with and without
            checksum verification;
  ray       one pass of `ray_datasets(...)["train"].iter_torch_batches(batch_size=B)`, as a
            Ray Train worker consumes it (local Ray), plus the time to its first batch.
  train     training tokens/s of one process (the Trainer's own train_step, one model and
            one dataset: --train-data, default the PTB above) fed by data.loader local (the
            split in memory), stream (shards read a window of --window rows at a time, the
            next window read by a background thread) and stream without that thread; calls
            round-robin; the stream / local ratio (goal >= 0.95) and each loader's share of
            step time spent waiting for its batch;
  first     with --bucket-data URI (a prepared dataset in a bucket): the time to the first
            training step, from nothing loaded to a step done, for loader stream (one window
            read) and local (the whole split read first, skipped above --local-max-rows),
            and the driver's dataset checks (footers only, as loader stream needs, or every
            file's SHA-256).
Rates are blocks/s and tokens/s (block_len input tokens per block). The model's tokens/s
for the same preset comes from `sparsebk bench training`; the loader must be far faster.
`--quick` (the test's run): the debug model, few steps, no Ray Data pass.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from sparsebk.bench.common import Stopwatch, format_table, local_ray, time_call, write_result


def _small_block_len() -> int:
    from sparsebk.model.lm import LMConfig

    return LMConfig.preset("small").n_seq


def _row(name: str, seconds: float, blocks: int, block_len: int, note: str = "") -> dict:
    return {"path": name, "seconds": seconds, "blocks": blocks,
            "blocks_per_s": blocks / seconds if seconds > 0 else float("inf"),
            "tokens_per_s": blocks * block_len / seconds if seconds > 0 else float("inf"), "note": note}


def _model_step_seconds(batch_size: int, block_len: int, repeats: int) -> float:
    """Median seconds of one training step of the small preset on random ids (CPU or GPU)."""
    import torch

    from sparsebk.model.lm import LMConfig, SparseBKLM

    cfg = LMConfig.preset("small")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SparseBKLM(cfg).to(device)
    # the training optimizer's groups (decay on ndim >= 2); AdamW's default decay and betas
    opt = model.configure_optimizers(weight_decay=0.01, lr=1e-3, betas=(0.9, 0.999))
    x = torch.randint(0, cfg.vocab_size, (batch_size, block_len + 1), device=device)

    def step():
        out = model(x[:, :-1], x[:, 1:])
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_call(step, repeats=repeats, warmup=1, device=device)["median_s"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsebk bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out", help="directory for data.json")
    p.add_argument("--data-dir", default=None, help="where to prepare PTB (default: a temporary directory)")
    p.add_argument("--block-len", type=int, default=None, help="default: the small preset's n_seq")
    p.add_argument("--batch-size", type=int, default=16, help="Ray Data batch size (blocks)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--no-ray", action="store_true", help="skip the Ray Data measurement")
    p.add_argument("--no-model", action="store_true",
                   help="skip timing one training step of the small model (for the loader's share)")
    p.add_argument("--no-prepare", action="store_true",
                   help="skip preparing and loading PTB (needs --train-data or --no-train)")
    p.add_argument("--no-train", action="store_true", help="skip the loaders' training tokens/s")
    p.add_argument("--train-data", default=None,
                   help="dataset (path or URI) for the training comparison (default: the PTB above)")
    p.add_argument("--train-preset", default="small", help="model preset of the training comparison")
    p.add_argument("--train-steps", type=int, default=20, help="timed steps per loader and round")
    p.add_argument("--window", type=int, default=16384, help="data.shuffle_window of loader stream (rows)")
    p.add_argument("--bucket-data", default=None,
                   help="a prepared dataset in a bucket (s3://...): time to the first training step")
    p.add_argument("--local-max-rows", type=int, default=2_000_000,
                   help="skip loader local's first step on a bucket split larger than this")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: debug model, 4 steps, 1 repeat, no Ray Data pass")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.repeats, args.no_ray, args.train_steps = 1, True, 4
        args.train_preset = "debug" if args.train_preset == "small" else args.train_preset
    if args.no_prepare and not args.train_data and not args.no_train:
        raise SystemExit("sparsebk bench data: --no-prepare needs --train-data (or --no-train)")
    block_len = args.block_len or _small_block_len()
    tmp = tempfile.TemporaryDirectory(prefix="sparsebk-bench-data-") if args.data_dir is None else None
    root = Path(args.data_dir or tmp.name) / f"ptb-word-{block_len}"
    rows, n_train, shares, train, first = [], 0, [], [], []
    if not args.no_prepare:
        rows, n_train = prepare_and_load_rows(root, block_len, args.repeats)
    if not args.no_ray and not args.no_prepare:
        rows += ray_pass_rows(root, args, n_train, block_len)
    if not args.no_model and not args.quick:
        step = _model_step_seconds(args.batch_size, block_len, args.repeats)
        rows.append(_row("model train step (small)", step, args.batch_size, block_len,
                         "forward + backward + AdamW, one process"))
        shares = loader_shares(rows, args.batch_size, step)
    if not args.no_train:
        train = loader_training_rows(args.train_data or str(root), args)
    if args.bucket_data:
        first = first_step_rows(args.bucket_data, args)

    if rows:
        print(f"PTB word level, block_len {block_len} (small preset), {n_train} train blocks")
        print(format_table(rows, ["path", "seconds", "blocks", "blocks_per_s", "tokens_per_s", "note"]))
    if shares:
        print("\nloader time per batch next to one training step of the small model (serial worst case)")
        print(format_table(shares))
    if train:
        print(f"\ntraining tokens/s by loader (one process, model {args.train_preset}, "
              f"batch {args.batch_size}, window {args.window} rows; ratio: against local)")
        print(format_table(train))
    if first:
        print(f"\ntime to the first training step, dataset {args.bucket_data}")
        print(format_table(first))
    path = write_result(args.out, "data", {"block_len": block_len, "batch_size": args.batch_size,
                                           "train_blocks": n_train, "rows": rows, "shares": shares,
                                           "training": train, "first_step": first,
                                           "window": args.window,
                                           "command": "sparsebk bench data " + " ".join(argv)})
    print(f"wrote {path}")
    if tmp is not None:
        tmp.cleanup()
    return 0


def prepare_and_load_rows(root: Path, block_len: int, repeats: int) -> tuple[list[dict], int]:
    """(rows, train blocks): the first preparation of PTB at `root` (or its reuse), the
    idempotent reuse every training start pays, and `load_blocks` of the train split with and
    without checksum verification."""
    from sparsebk.data.loading import load_blocks
    from sparsebk.data.manifest import load_manifest
    from sparsebk.data.prepare import prepare_dataset

    fresh = not (root / "manifest.json").exists()
    first = time_call(lambda: prepare_dataset(root, block_len=block_len), repeats=1, warmup=0,
                      device="cpu")["median_s"]
    splits = load_manifest(root)["splits"]
    n_train, n_all = splits["train"]["rows"], sum(s["rows"] for s in splits.values())
    rows = [_row("prepare (first)" if fresh else "prepare (existing dir)", first, n_all, block_len,
                 "tokenise + write all splits" if fresh else "reused")]
    reuse = time_call(lambda: prepare_dataset(root, block_len=block_len), repeats=repeats,
                      device="cpu")["median_s"]
    rows.append(_row("prepare (reuse)", reuse, n_all, block_len, "manifest + sha256 check"))
    for verify in (True, False):
        t = time_call(lambda: load_blocks(root, "train", verify_checksums=verify), repeats=repeats,
                      device="cpu")
        rows.append(_row("load_blocks train", t["median_s"], n_train, block_len,
                         "with sha256" if verify else "no sha256"))
    return rows, n_train


def ray_pass_rows(root: Path, args, n_train: int, block_len: int) -> list[dict]:
    """`args.repeats` passes of the train split through Ray Data as a Train worker consumes it
    (local Ray): each pass whole (with the time to its first batch) and after its first batch."""
    import ray

    from sparsebk.data.loading import ray_datasets

    started_here = not ray.is_initialized()
    local_ray(args.ray_cpus, workers=0)  # Ray Data's reads only, no Train workers
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    try:
        for rep in range(args.repeats):
            ds = ray_datasets(root, ("train",))["train"]
            first_batch, first_n, n = None, 0, 0
            with Stopwatch("cpu") as sw:
                for batch in ds.iter_torch_batches(batch_size=args.batch_size):
                    n += batch["tokens"].shape[0]
                    if first_batch is None:
                        first_batch, first_n = sw.lap(), n
            total = sw.wall_s
            assert n == n_train, (n, n_train)
            rows.append(_row(f"ray pass #{rep + 1} (whole)", total, n, block_len,
                             f"batch {args.batch_size}; includes {first_batch:.2f} s to the first batch"))
            # after the first batch: the rate a training step sees once the pipeline runs
            rows.append(_row(f"ray pass #{rep + 1} (after 1st batch)", total - first_batch, n - first_n,
                             block_len, "steady streaming"))
    finally:
        if started_here:
            ray.shutdown()
    return rows


def loader_shares(rows: list[dict], batch_size: int, step: float) -> list[dict]:
    """Per loader row: its seconds per training batch beside one model step of `step` s."""
    shares = []
    for r in rows:
        if r["path"].startswith(("load_blocks", "ray pass")):
            per_batch = batch_size / r["blocks_per_s"]  # loader seconds per training batch
            shares.append({"loader": f"{r['path']} ({r['note'].split(';')[0]})",
                           "loader_s_per_batch": per_batch, "model_step_s": step,
                           "share_of_step": per_batch / (per_batch + step)})
    return shares


# --- training tokens/s by loader, and the time to the first step ---------------------------------
def _train_config(dataset: str, args, loader: str):
    """One worker's training config on `dataset` with model `args.train_preset` (its
    vocabulary and n_seq from the dataset) and data.loader `loader`."""
    from sparsebk.data.manifest import load_manifest
    from sparsebk.train.config import TrainConfig

    m = load_manifest(dataset)
    return TrainConfig.from_dict({
        "model": {"preset": args.train_preset, "vocab_size": m["vocab_size"],
                  "n_seq": m["block_len"]},
        "data": {"dir": dataset, "block_len": m["block_len"], "batch_size": args.batch_size,
                 "loader": loader, "shuffle_buffer": 1, "shuffle_window": args.window},
        "optim": {"max_steps": 10 ** 9, "warmup_steps": 10},
        "run": {"num_workers": 1, "eval_every": 10 ** 9}})


class _LoaderRun:
    """A Trainer of its own (the same initial weights for every loader) fed by one loader,
    epoch after epoch; `steps(k)` trains k steps and records the seconds spent waiting for
    batches."""

    def __init__(self, dataset: str, args, loader: str, prefetch: bool = True):
        import torch

        from sparsebk.data.loading import load_blocks
        from sparsebk.model.lm import SparseBKLM
        from sparsebk.train.schedule import LocalSchedule
        from sparsebk.train.trainer import Trainer

        self.cfg = cfg = _train_config(dataset, args, loader)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(0)
        model = SparseBKLM(cfg.model).to(self.device)
        self.trainer = Trainer(cfg, model, device=self.device)
        self.schedule = LocalSchedule(cfg.schedule, cfg.model.n_layers)
        self.rows = load_blocks(dataset, "train") if loader == "local" else None
        self.dataset, self.loader, self.prefetch = dataset, loader, prefetch
        self.batches, self.step_no, self.waits = self._epochs(), 0, []

    def _epochs(self):
        import itertools

        from sparsebk.train.run_state import local_batches, stream_batches

        for epoch in itertools.count():
            if self.rows is not None:
                yield from local_batches(self.rows, self.cfg, epoch, 0, 0, 1)
            else:
                yield from stream_batches(self.dataset, self.cfg, epoch, 0, 0, 1,
                                          prefetch=self.prefetch)

    def steps(self, k: int) -> None:
        wait = 0.0
        for _ in range(k):
            t = time.perf_counter()
            batch = next(self.batches)
            wait += time.perf_counter() - t
            self.step_no += 1
            values = self.schedule.get(self.step_no)
            self.trainer.net.set_sparsity_schedule(values.targets, values.weight)
            self.trainer.train_step(batch)
        self.waits.append(wait)


def loader_training_rows(dataset: str, args) -> list[dict]:
    """Training tokens/s of the same model on the same data with loader local, stream, and
    stream without its background thread: windows of args.train_steps steps, round-robin
    (load drifting on a shared machine hits all alike), the first round a warm-up."""
    from sparsebk.bench.common import time_calls

    runs = {"local (in memory)": _LoaderRun(dataset, args, "local"),
            "stream": _LoaderRun(dataset, args, "stream"),
            "stream, no prefetch thread": _LoaderRun(dataset, args, "stream", prefetch=False)}
    k = args.train_steps
    timed = time_calls({name: (lambda r=r: r.steps(k)) for name, r in runs.items()},
                       repeats=args.repeats, warmup=1, device=runs["stream"].device)
    cfg = runs["stream"].cfg
    tokens = k * cfg.data.batch_size * cfg.data.block_len
    base = tokens / timed["local (in memory)"]["median_s"]
    out = []
    for name, r in runs.items():
        t = timed[name]
        wait = sorted(r.waits[1:])[len(r.waits[1:]) // 2]  # the median timed window's wait
        out.append({"loader": name, "tokens_per_s": tokens / t["median_s"],
                    "ratio_to_local": tokens / t["median_s"] / base,
                    "step_ms": 1e3 * t["median_s"] / k, "data_wait_pct": 100 * wait / t["median_s"],
                    "windows": t["runs"], "device": str(r.device)})
    return out


def first_step_rows(uri: str, args) -> list[dict]:
    """From nothing loaded to one training step done on the dataset at `uri`: loader stream
    (its first window), loader stream resumed mid-epoch, loader local (the whole split; skipped
    above args.local_max_rows); and the driver's dataset checks."""
    from sparsebk.data.manifest import check_dataset, load_manifest

    n = load_manifest(uri)["splits"]["train"]["rows"]
    out = []
    for label, verify in (("driver check_dataset, footers (loader stream)", False),
                          ("driver check_dataset, every SHA-256", True)):
        t0 = time.perf_counter()
        check_dataset(uri, verify_checksums=verify)
        out.append({"what": label, "first_batch_s": float("nan"),
                    "first_step_s": time.perf_counter() - t0, "train_rows": n})
    cases = [("loader stream", "stream", 0), ("loader stream, resumed mid-epoch", "stream", n // 2)]
    if n <= args.local_max_rows:
        cases.append(("loader local (whole split)", "local", 0))
    for label, loader, start in cases:
        t0 = time.perf_counter()
        run = _LoaderRun(uri, args, loader)
        if start:
            from sparsebk.train.run_state import stream_batches

            run.batches = stream_batches(uri, run.cfg, 0, start, 0, 1)
        batch = next(run.batches)
        first_batch = time.perf_counter() - t0
        values = run.schedule.get(1)
        run.trainer.net.set_sparsity_schedule(values.targets, values.weight)
        run.trainer.train_step(batch)
        out.append({"what": label, "first_batch_s": first_batch,
                    "first_step_s": time.perf_counter() - t0, "train_rows": n})
    return out
