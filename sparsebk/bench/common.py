"""Shared helpers for the benchmarks: timing, machine description, tables, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence


def time_call(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1,
              min_time: float = 0.0) -> dict:
    """Median wall time of `fn()` in seconds over `repeats` runs (after `warmup` runs).

    With `min_time`, repeats continue until their total reaches it (noisy shared machines).
    """
    import torch

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    total = 0.0
    while len(times) < repeats or total < min_time:
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}


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
