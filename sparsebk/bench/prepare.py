"""`sparsebk bench prepare --out DIR`: preparation throughput and memory against corpus size.

Corpora: this environment's own Python sources (site-packages/**/*.py), cycled into files of
16 MB until each size of `--sizes` (MB) is reached, kept under `--corpus-dir` for reuse. Per
size and engine, one `prepare_dataset` in a fresh process (so each peak RSS is that run's):

  local   the in-process engine (one process, one CPU)
  ray1    Ray Data on a 1-node Ray started here (head with --cpus-per-node CPUs)
  ray2    Ray Data on 2 nodes of this machine (the head plus a second raylet with as many CPUs)

The Ray nodes are started with `ray.cluster_utils.Cluster` (each node its own raylet on
127.0.0.1, as `ray start --address` makes them) and only they are stopped afterwards.
Per row: seconds (the whole call: the streamed plan pass and the parts), tokens, tokens/s
and tokens/s per CPU, the driver's peak RSS, the largest peak RSS of a process that made
parts, and that over the text size (the old whole-corpus preparation peaked at ~8x).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from sparsebk.bench.common import format_table, write_result

MB = 1 << 20
FILE_BYTES = 16 * MB
ENGINES = ("local", "ray1", "ray2")

# one preparation in a fresh interpreter: prints its stats as one JSON line
_RUNNER = """
import json, sys, time
from sparsebk.data.parts import peak_rss
from sparsebk.data.prepare import run_preparation
kw = json.loads(sys.argv[1])
t0 = time.perf_counter()
out, stats = run_preparation(kw.pop("out"), **kw)
stats["wall_s"] = time.perf_counter() - t0
stats["driver_peak_rss_bytes"] = peak_rss()
print("RESULT " + json.dumps(stats))
"""


def python_sources() -> list[Path]:
    root = sysconfig.get_paths()["purelib"]
    files = sorted(Path(p) for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    if not files:
        raise SystemExit(f"sparsebk bench prepare: no *.py files under {root}")
    return files


def make_corpus(root: Path, size_mb: float) -> Path:
    """A folder of .txt files of FILE_BYTES holding `size_mb` MB of Python sources (each
    source whole, UTF-8 ones only, cycling through them); made once, then reused."""
    target = root / f"py-{size_mb:g}MB"
    if (target / ".complete").exists():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    want, total, index, buf = int(size_mb * MB), 0, 0, []
    sources = python_sources()
    while total < want:
        for src in sources:
            try:
                data = src.read_bytes()
                data.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            data = data[: want - total]
            buf.append(data)
            total += len(data)
            if sum(map(len, buf)) >= FILE_BYTES or total >= want:
                (tmp / f"part-{index:05d}.txt").write_bytes(b"".join(buf))
                buf, index = [], index + 1
            if total >= want:
                break
    (tmp / ".complete").write_text(str(total))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def run_one(corpus: Path | str, out: Path | str, args, engine: str, address: str | None,
            keep: bool = False) -> dict:
    kw = {"out": str(out), "corpus": "text", "text": str(corpus), "tokenizer": args.tokenizer,
          "block_len": args.block_len, "rows_per_file": 4096, "valid_fraction": 0.05,
          "test_fraction": 0.05, "max_vocab": None, "engine": "local" if engine == "local" else "ray",
          "part_bytes": int(args.part_mb * MB), "doc_bytes": None}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if address:
        env["RAY_ADDRESS"] = address
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(kw)], env=env, capture_output=True,
                          text=True, timeout=args.timeout_s)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"sparsebk bench prepare: {engine} on {corpus} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _row(size_mb: float, engine: str, nodes: int, s: dict) -> dict:
    cpus = s["cpus"] if engine != "local" else 1
    worker = s["worker_peak_rss_bytes"] if engine != "local" else s["driver_peak_rss_bytes"]
    return {"text_mb": size_mb, "engine": engine, "nodes": nodes, "cpus": cpus, "parts": s["parts"],
            "seconds": s["wall_s"], "tokens": s["tokens"], "tokens_per_s": s["tokens"] / s["wall_s"],
            "tokens_per_s_per_cpu": s["tokens"] / s["wall_s"] / cpus,
            "driver_rss_mb": s["driver_peak_rss_bytes"] / MB, "worker_rss_mb": worker / MB,
            "worker_rss_over_text": worker / (s["bytes"] or 1)}


class _Nodes:
    """The Ray nodes this benchmark starts (and alone stops): a head, then a second node."""

    def __init__(self, cpus: int, temp: str):
        from ray.cluster_utils import Cluster

        self.cpus, self.temp = cpus, temp
        self.cluster = Cluster(initialize_head=False)
        self.count = 0

    def grow(self, nodes: int) -> str:
        while self.count < nodes:
            extra = {"include_dashboard": False} if self.count == 0 else {}
            self.cluster.add_node(num_cpus=self.cpus, object_store_memory=256 * MB, temp_dir=self.temp, **extra)
            self.count += 1
        self.cluster.wait_for_nodes()
        return self.cluster.address

    def stop(self) -> None:
        self.cluster.shutdown()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsebk bench prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out", help="directory for prepare.json")
    p.add_argument("--sizes", default="50,267,2048", help="corpus sizes in MB (default 50,267,2048)")
    p.add_argument("--engines", default=",".join(ENGINES), help="of local, ray1, ray2 (default all)")
    p.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "byte", "word"])
    p.add_argument("--block-len", type=int, default=256)
    p.add_argument("--part-mb", type=float, default=16.0)
    p.add_argument("--cpus-per-node", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--corpus-dir", default=None, help="where the corpora are made and kept "
                   "(default: a temporary directory, removed afterwards)")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per preparation")
    p.add_argument("--quick", action="store_true", help="a 2 MB corpus, the local engine only (seconds)")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.sizes, args.engines, args.part_mb = "2", "local", 0.5
    sizes = [float(s) for s in args.sizes.split(",") if s]
    chosen = [e for e in args.engines.split(",") if e]
    bad = [e for e in chosen if e not in ENGINES]
    if bad:
        print(f"sparsebk bench prepare: --engines {bad[0]!r}: choose from {', '.join(ENGINES)}", file=sys.stderr)
        return 2
    chosen = sorted(set(chosen), key=ENGINES.index)  # ray1 before ray2: the second node is added
    tmp = tempfile.mkdtemp(prefix="sparsebk-bench-prepare-")
    corpus_root = Path(args.corpus_dir or tmp)
    corpus_root.mkdir(parents=True, exist_ok=True)
    rows, nodes = [], None
    try:
        corpora = {size: make_corpus(corpus_root, size) for size in sizes}
        for engine in chosen:
            address = None
            if engine != "local":
                nodes = nodes or _Nodes(args.cpus_per_node, tempfile.mkdtemp(prefix="rbp", dir="/tmp"))
                address = nodes.grow(2 if engine == "ray2" else 1)
            for size in sizes:
                stats = run_one(corpora[size], Path(tmp) / f"ds-{engine}-{size:g}", args, engine, address)
                rows.append(_row(size, engine, 2 if engine == "ray2" else 1, stats))
                print(f"{engine} {size:g} MB: {rows[-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr, flush=True)
    finally:
        if nodes is not None:
            nodes.stop()
            shutil.rmtree(nodes.temp, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"prepare-data throughput and peak RSS ({args.tokenizer}, block_len {args.block_len}, "
          f"parts of {args.part_mb:g} MB, {args.cpus_per_node} CPUs per Ray node)")
    print(format_table(rows))
    path = write_result(args.out, "prepare", {"rows": rows, "tokenizer": args.tokenizer,
                                              "block_len": args.block_len, "part_mb": args.part_mb,
                                              "cpus_per_node": args.cpus_per_node,
                                              "command": "sparsebk bench prepare " + " ".join(argv)})
    print(f"wrote {path}")
    return 0
