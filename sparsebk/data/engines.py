"""Where the parts of a preparation run: in this process, or as Ray Data tasks.

Both call the same functions of `sparsebk.data.parts` on the same part items, so they write
the same files. `engine(name)` is a context manager giving `run(task, items, ctx, on_result)`;
on_result gets each part's result as it finishes (in any order on Ray).

The Ray engine maps over the plan's parts with Ray Data: `ray.data.from_items(items)` (one
block per part) `.map(ray_row)`, each part one task with one CPU, so a worker process holds
one part's buffers at a time. It uses the Ray this process is connected to, else connects to
RAY_ADDRESS, else starts a local one (and shuts down what it started).
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

from sparsebk.data.parts import TASKS, ray_row

ENGINES = ("auto", "local", "ray")
RAY_BYTES = 256 << 20  # auto picks Ray for a text larger than this, or when a cluster is there


def pick_engine(engine: str, text_bytes: int, part_bytes: int, connected: bool | None = None) -> str:
    """auto: local when the text fits in one part (nothing to spread); else Ray when this
    process is connected to Ray (`connected`; None: ask Ray, if it is imported), RAY_ADDRESS
    names a cluster, or the text is over RAY_BYTES; else local."""
    if engine != "auto":
        return engine
    if text_bytes <= part_bytes:
        return "local"
    if connected is None:
        ray = sys.modules.get("ray")
        connected = ray is not None and ray.is_initialized()
    return "ray" if connected or os.environ.get("RAY_ADDRESS") or text_bytes > RAY_BYTES else "local"


def run_local(task: str, items: list[dict], ctx: dict, on_result) -> None:
    fn = TASKS[task]
    for item in items:
        on_result(fn(item, ctx))


def run_ray(task: str, items: list[dict], ctx: dict, on_result) -> None:
    import ray.data

    if not items:
        return
    data_ctx = ray.data.DataContext.get_current()
    bars = data_ctx.enable_progress_bars
    data_ctx.enable_progress_bars = False  # our own progress line instead
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map(ray_row, fn_kwargs={"task": task, "ctx": ctx}, num_cpus=1)
        for row in ds.iter_rows():
            result = json.loads(row["result"])
            if "error" in result:
                raise ValueError(result["error"])
            if "oserror" in result:
                err = OSError(result["oserror"][1])  # the worker's message as it was
                err.errno = result["oserror"][0]
                raise err
            on_result(result)
    finally:
        data_ctx.enable_progress_bars = bars


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 0))


@contextmanager
def engine(name: str):
    """`run` of the engine `name` ("local" or "ray"), connected for the block's duration."""
    if name == "local":
        yield run_local
        return
    import ray

    started = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        extra = {} if address else {"include_dashboard": False}
        ray.init(address=address, log_to_driver=False, configure_logging=False, **extra)
        started = True
    try:
        yield run_ray
    finally:
        if started:
            ray.shutdown()
