"""`sparsebk bench data --out DIR`: how fast the data path delivers blocks for the `small` preset.

Measures, on PTB (word level) at the small preset's block length:
  prepare   first preparation (tokenise + write Parquet) and the idempotent reuse the training
            job pays on every start (manifest + checksum verification);
  plain     `load_blocks` of the train split into a LongTensor (pyarrow), with and without
            checksum verification;
  ray       one pass of `ray_datasets(...)["train"].iter_torch_batches(batch_size=B)`, as a
            Ray Train worker consumes it (local Ray), plus the time to its first batch.
Rates are blocks/s and tokens/s (block_len input tokens per block). The model's tokens/s
for the same preset comes from `sparsebk bench training`; the loader must be far faster.
"""

from __future__ import annotations

import argparse
import tempfile
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
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    block_len = args.block_len or _small_block_len()
    tmp = tempfile.TemporaryDirectory(prefix="sparsebk-bench-data-") if args.data_dir is None else None
    root = Path(args.data_dir or tmp.name) / f"ptb-word-{block_len}"
    rows, n_train = prepare_and_load_rows(root, block_len, args.repeats)
    if not args.no_ray:
        rows += ray_pass_rows(root, args, n_train, block_len)
    shares = []
    if not args.no_model:
        step = _model_step_seconds(args.batch_size, block_len, args.repeats)
        rows.append(_row("model train step (small)", step, args.batch_size, block_len,
                         "forward + backward + AdamW, one process"))
        shares = loader_shares(rows, args.batch_size, step)

    print(f"PTB word level, block_len {block_len} (small preset), {n_train} train blocks")
    print(format_table(rows, ["path", "seconds", "blocks", "blocks_per_s", "tokens_per_s", "note"]))
    if shares:
        print("\nloader time per batch next to one training step of the small model (serial worst case)")
        print(format_table(shares))
    path = write_result(args.out, "data", {"block_len": block_len, "batch_size": args.batch_size,
                                           "train_blocks": n_train, "rows": rows, "shares": shares,
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
