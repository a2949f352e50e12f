"""Shared helpers for the benchmarks: timing, machine description, tables, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Hashable, Mapping, Sequence

# benchmark name -> module exposing main(argv) -> int
BENCHMARKS = {
    "bk-core": "sparsebk.bench.bk_core",
    "layer": "sparsebk.bench.layer",
    "data": "sparsebk.bench.data",
    "prepare": "sparsebk.bench.prepare",
    "training": "sparsebk.bench.training",
    "quality": "sparsebk.bench.quality",
    "gates": "sparsebk.bench.gates",
    "decode": "sparsebk.bench.decode",
    "scale": "sparsebk.bench.scale",
    "cost": "sparsebk.bench.cost",
    "bucket": "sparsebk.bench.bucket",
}


def _syncer(device) -> Callable[[], None]:
    """A no-op, or torch.cuda.synchronize when `device` is CUDA (None: when CUDA is available),
    so that a timed call includes the kernels it queued."""
    import torch

    if device is None:
        cuda = torch.cuda.is_available()
    else:
        cuda = torch.device(device).type == "cuda"
    return torch.cuda.synchronize if cuda else (lambda: None)


class Stopwatch:
    """Wall (perf_counter) and CPU (this process's process_time) time of a block, with a CUDA
    sync at the end (see `_syncer`). `lap()` reads the wall time so far, e.g. to the first
    batch of a pass.

        with Stopwatch("cpu") as sw:
            ...
        sw.wall_s, sw.cpu_s
    """

    def __init__(self, device=None):
        self.sync = _syncer(device)
        self.wall_s = self.cpu_s = float("nan")

    def __enter__(self) -> "Stopwatch":
        self._c0, self._w0 = time.process_time(), time.perf_counter()
        return self

    def lap(self) -> float:
        return time.perf_counter() - self._w0

    def __exit__(self, *exc) -> None:
        self.sync()
        self.wall_s = time.perf_counter() - self._w0
        self.cpu_s = time.process_time() - self._c0


def time_calls(fns: Mapping[Hashable, Callable[[], object]], *, repeats: int = 5, warmup: int = 1,
               min_time: float = 0.0, device=None, clock: str = "wall") -> dict[Hashable, dict]:
    """The one step timer of the benchmarks: wall and CPU time of each call of each `fns[key]()`.

    Calls go round-robin (one call of every function per round) so that load drifting on a
    shared machine hits all of them alike; `warmup` untimed rounds come first (allocator,
    kernels, thread pools). Rounds continue until there are `repeats` of them and, with
    `min_time`, until every function's calls add up to `min_time` seconds on `clock` (noisy
    shared machines). With a CUDA `device` (None: whenever CUDA is available) each timed call
    ends with a synchronize.

    `clock` picks what `median_s`/`min_s` report: "wall" (perf_counter) or "cpu" (process CPU
    time: on a shared box with one torch thread, the work the call did; it adds up over
    threads). Per key: median_s, min_s, runs, wall_median_s, cpu_median_s, and the raw
    per-call wall_s and cpu_s lists.
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock={clock!r}: choose 'wall' or 'cpu'")
    sw = Stopwatch(device)  # reused: entering it restarts both clocks
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sw.sync()
    wall: dict = {k: [] for k in fns}
    cpu: dict = {k: [] for k in fns}
    on_clock = wall if clock == "wall" else cpu
    while (min(map(len, wall.values()), default=repeats) < repeats
           or min((sum(t) for t in on_clock.values()), default=min_time) < min_time):
        for key, fn in fns.items():
            with sw:
                fn()
            wall[key].append(sw.wall_s)
            cpu[key].append(sw.cpu_s)
    out = {}
    for key in fns:
        w, c = wall[key], cpu[key]
        chosen = on_clock[key]
        out[key] = {"median_s": statistics.median(chosen), "min_s": min(chosen), "runs": len(w),
                    "wall_median_s": statistics.median(w), "cpu_median_s": statistics.median(c),
                    "wall_s": w, "cpu_s": c}
    return out


def time_call(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1,
              min_time: float = 0.0, device=None, clock: str = "wall") -> dict:
    """`time_calls` of one function: median_s/min_s on `clock` over `repeats` calls (after
    `warmup` calls; with `min_time`, until their total on `clock` reaches it), plus
    wall_median_s, cpu_median_s and the raw wall_s/cpu_s lists."""
    return time_calls({0: fn}, repeats=repeats, warmup=warmup, min_time=min_time,
                      device=device, clock=clock)[0]


def machine_probe(rows: int = 2048, width: int = 128, vocab: int = 10000, repeats: int = 5) -> float:
    """Median wall seconds of one fixed workload: the forward and backward of an LM head
    (rows x width) @ (width x vocab) with its log-sum-exp, the largest part of a `small`
    training step, on this process's torch threads and fixed data.

    The machine's speed drifts from hour to hour with no trace in load or CPU time
    (BENCHMARKS.md, "Compare rows of the same hour"). A benchmark row that runs the
    probe during itself (`bench quality`: before training and at every curve point, clock
    paused) records the machine speed it ran at: between two rows, tokens/s x the median probe
    seconds compares the models, not the hours. One sample is noisy (about +-13% within a
    row); the median of a row's samples is the figure to use."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=gen).requires_grad_()
    w = (torch.randn(width, vocab, generator=gen) * 0.02).requires_grad_()

    def head() -> None:
        torch.logsumexp(x @ w, dim=-1).sum().backward()

    return time_call(head, repeats=repeats, warmup=1)["median_s"]


def local_ray(num_cpus: int, workers: int) -> None:
    """A local Ray for a benchmark, set up as `sparsebk train` sets up its local Ray
    (`sparsebk.train.ray_train.cli.connect_ray`: 127.0.0.1 dashboard, pinned GCS address). A benchmark
    measures this machine, so it never attaches to a cluster named by RAY_ADDRESS; no-op
    when this process is already connected."""
    import ray

    from sparsebk.train.ray_train.cli import connect_ray

    if ray.is_initialized():
        return
    os.environ.pop("RAY_ADDRESS", None)
    connect_ray(None, num_cpus, workers)


def machine_info() -> dict:
    """What a reader needs to compare numbers: cores, versions, device."""
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:  # the benchmarks that need Ray import it themselves
        info["ray"] = None
    return info


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A markdown table (readable in a terminal too) of a list of dicts."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def write_result(out_dir: str | os.PathLike, name: str, result: dict) -> Path:
    """Write `result` (plus the machine description) to OUT_DIR/NAME.json atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "machine": machine_info(), **result}
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(path)
    return path


def model_overrides(items: Sequence[str]) -> dict:
    """LMConfig overrides from `--set FIELD=VALUE` items (values parsed as YAML, as the training
    CLI's --set); LMConfig itself names a bad field or value."""
    from sparsebk.train.config import apply_override

    out: dict = {}
    for item in items:
        apply_override(out, item)
    return out
