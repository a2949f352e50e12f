"""`sparsebk bench bucket --out DIR`: a multi-GB corpus prepared into a bucket and trained on.

Each step timed, in this order:
  prepare  `prepare_dataset` of the text into `<bucket>/<name>` (a fresh process, so its peak
           RSS is its own): seconds, tokens, tokens/s, peak RSS of the driver and the part makers;
  reuse    what a training start pays to find the dataset ready: the driver's `ensure_dataset`
           rule (text files unchanged by size and time, so not read; shards' footers only)
           against the rule before it (the text read and hashed again, every shard's SHA-256);
  train    a real `sparsebk train` (a subprocess, its own local Ray, one worker, data.loader
           stream) on the bucket dataset: seconds from launch to its first metrics record (the
           time to the first training step), to the end of --steps steps, and its tokens/s.
The text is --text (a file, folder or glob, local or in a bucket), else this environment's own
Python sources cycled into --size-mb MB (as `sparsebk bench prepare`, kept in --corpus-dir).
The bucket is --bucket (credentials from the environment), else a SeaweedFS server started
on 127.0.0.1 for the run (sparsebk.bench.s3server; needs the test extra's `weed`).
`--quick`: a 2 MB corpus, engine local, the debug model, 3 steps (the test adds --no-train).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sparsebk.bench.common import format_table, machine_info, machine_probe, write_result
from sparsebk.bench.prepare import MB, make_corpus, run_one

BLOCK_LEN = 256
COLUMNS = ["step", "seconds", "first_step_s", "text_mb", "dataset_mb", "tokens", "tokens_per_s", "text_read",
           "driver_rss_mb", "worker_rss_mb"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsebk bench bucket", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out", help="directory for bucket.json")
    p.add_argument("--bucket", default=None, help="s3://bucket/prefix?...: where the dataset goes "
                   "(default: a local SeaweedFS server for the run)")
    p.add_argument("--text", default=None, help="the corpus (default: Python sources, --size-mb)")
    p.add_argument("--size-mb", type=float, default=2048.0)
    p.add_argument("--corpus-dir", default=None, help="where the generated corpus is kept")
    p.add_argument("--engine", default="ray", choices=["local", "ray"])
    p.add_argument("--part-mb", type=float, default=16.0)
    p.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "byte", "word"])
    p.add_argument("--preset", default="small", help="the model trained (default small)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--timeout-s", type=float, default=3600.0)
    p.add_argument("--no-train", action="store_true", help="prepare and reuse only")
    p.add_argument("--quick", action="store_true", help="2 MB, debug model, 3 steps, engine local")
    return p


def prepare_row(text: str, uri: str, args) -> dict:
    """One preparation into the bucket, in a fresh process (bench prepare's runner)."""
    s = run_one(text, uri, args, args.engine, None, keep=True)
    worker = s["worker_peak_rss_bytes"] if args.engine == "ray" else s["driver_peak_rss_bytes"]
    return {"step": f"prepare into the bucket (engine {args.engine})", "seconds": s["wall_s"],
            "text_mb": s["bytes"] / MB, "dataset_mb": _dataset_bytes(uri) / MB, "tokens": s["tokens"], "tokens_per_s": s["tokens"] / s["wall_s"],
            "driver_rss_mb": s["driver_peak_rss_bytes"] / MB, "worker_rss_mb": worker / MB}


def _dataset_bytes(uri: str) -> int:
    """The bytes of every object of the dataset at `uri`."""
    import pyarrow.fs as pafs

    from sparsebk.storage.store import open_store

    store = open_store(uri)
    sel = pafs.FileSelector(store.path(), recursive=True)
    return sum(i.size for i in store.fs.get_file_info(sel) if i.type == pafs.FileType.File)


def reuse_rows(text: str, uri: str, args) -> list[dict]:
    """The reuse a training start pays: now (`run_preparation(verify=False)`, as
    ensure_dataset: the text files' sizes and times compared, the shards' footers checked),
    and the rule before it (the text read and hashed again, every shard's SHA-256: timed as
    those two steps, so the text files are left untouched)."""
    from sparsebk.data import corpora
    from sparsebk.data.manifest import check_dataset, load_manifest
    from sparsebk.data.prepare import run_preparation

    kw = dict(text=text, tokenizer=args.tokenizer, block_len=BLOCK_LEN, part_bytes=int(args.part_mb * MB),
              engine="local")
    t0 = time.perf_counter()
    _, stats = run_preparation(uri, verify=False, **kw)
    now = time.perf_counter() - t0
    m = load_manifest(uri)
    t0 = time.perf_counter()
    scan = corpora.scan_text(corpora.text_files(text), doc_bytes=m["source"]["doc_bytes"],
                             valid_fraction=m["args"]["valid_fraction"],
                             test_fraction=m["args"]["test_fraction"])
    check_dataset(uri, verify_checksums=True)
    before = time.perf_counter() - t0
    assert scan.sha256 == m["source"]["sha256"], "the text changed during the benchmark"
    return [{"step": "reuse at a training start: text unchanged, shards' footers", "seconds": now,
             "text_read": stats["text_read"]},
            {"step": "reuse as before: text read again, every shard's SHA-256", "seconds": before,
             "text_read": True}]


def _train_config(uri: str, text: str, args, storage: str) -> dict:
    from sparsebk.data.manifest import load_manifest

    vocab = load_manifest(uri)["vocab_size"]
    return {"model": {"preset": args.preset, "vocab_size": vocab, "n_seq": BLOCK_LEN},
            "data": {"dir": uri, "corpus": "text", "text": text, "tokenizer": args.tokenizer,
                     "block_len": BLOCK_LEN, "batch_size": args.batch_size, "loader": "stream"},
            "optim": {"max_steps": args.steps, "warmup_steps": 2},
            "run": {"name": "bucket-bench", "storage_path": storage, "num_workers": 1,
                    "log_every": 1, "eval_every": args.steps, "eval_batches": 2, "test_batches": 2}}


def train_row(uri: str, text: str, args, tmp: Path) -> dict:
    """`sparsebk train` on the bucket dataset: the time to its first metrics record."""
    import yaml

    cfg = tmp / "train.yaml"
    cfg.write_text(yaml.safe_dump(_train_config(uri, text, args, str(tmp / "runs"))))
    metrics = tmp / "runs" / "bucket-bench" / "metrics.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp / "train.log", "w")
    t0, first = time.perf_counter(), None
    proc = subprocess.Popen([sys.executable, "-m", "sparsebk.cli", "train", "--config", str(cfg)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    while proc.poll() is None and time.perf_counter() - t0 < args.timeout_s:
        if first is None and metrics.is_file() and metrics.stat().st_size > 0:
            first = time.perf_counter() - t0
        time.sleep(0.05)
    total = time.perf_counter() - t0
    log.close()
    if proc.poll() is None:
        proc.kill()
    if proc.returncode != 0:
        raise SystemExit(f"sparsebk bench bucket: sparsebk train failed:\n"
                         f"{(tmp / 'train.log').read_text()[-3000:]}")
    recs = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    train = [r for r in recs if r.get("kind", "train") == "train" and "tokens_per_s" in r]
    return {"step": f"sparsebk train, loader stream, {args.steps} steps ({args.preset})",
            "seconds": total, "first_step_s": first,
            "tokens_per_s": train[-1]["tokens_per_s"] if train else float("nan")}


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    args.block_len = BLOCK_LEN  # what bench prepare's runner reads
    if args.quick:
        args.size_mb, args.preset, args.steps, args.part_mb, args.engine = 2.0, "debug", 3, 0.5, "local"
    tmp = Path(tempfile.mkdtemp(prefix="sparsebk-bench-bucket-"))
    corpus_dir = Path(args.corpus_dir or tmp)
    corpus_dir.mkdir(parents=True, exist_ok=True)
    text = args.text or str(make_corpus(corpus_dir, args.size_mb))
    load, probe = os.getloadavg()[0], machine_probe()
    try:
        if args.bucket:
            rows = _measure(args.bucket.rstrip("/"), text, args, tmp)
        else:
            from sparsebk.bench.s3server import local_s3

            with local_s3(tmp / "s3") as bucket:
                rows = _measure(bucket(f"bench/{args.tokenizer}-{BLOCK_LEN}"), text, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the server's data and a generated corpus too
    print(f"a {rows[0]['text_mb']:.0f} MB corpus prepared into a bucket and trained on "
          f"(load {load:.2f} at the start, machine probe {probe:.3f} s)")
    print(format_table(rows, COLUMNS))
    path = write_result(args.out, "bucket", {"rows": rows, "text": text, "load_at_start": load, "machine_probe_s": probe,
                                             "machine": machine_info(),
                                             "command": "sparsebk bench bucket " + " ".join(argv)})
    print(f"wrote {path}")
    return 0


def _measure(uri: str, text: str, args, tmp: Path) -> list[dict]:
    rows = [prepare_row(text, uri, args)]
    print(f"prepared: {rows[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    rows += reuse_rows(text, uri, args)
    if not args.no_train:
        rows.append(train_row(uri, text, args, tmp))
    return rows
