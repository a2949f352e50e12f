"""Pre-flight checks, before any worker starts: can the run be placed, and can every node
that may host a worker reach the run's storage and data?

    check_fit(cfg)                         # CPUs, GPUs and memory of the nodes as they are
    check_nodes(storage_path, data_dir)    # driver, once, before any training step

`check_fit` counts the workers each alive node can hold (its CPUs, GPUs and memory against a
worker's request and its estimated training state), and the CPU Ray Data's read tasks need
beside the workers (`data.loader: ray`). A run that cannot be placed fails in seconds with the
numbers, instead of waiting on a worker group that never starts. A cluster that autoscales
(nodes arrive when asked) sets SPARSEBK_AUTOSCALING=1 to skip it.

One small task pinned to each alive node (num_cpus=0: it never waits behind running
workers) writes, reads back and deletes a small object under `storage_path` and reads the
dataset manifest under `data_dir`, through pyarrow.fs (the layer Ray Train writes its
checkpoints with), so local paths and URIs are checked alike. Without it a node that cannot
reach a local-only path or a bucket fails at the first checkpoint, `eval_every` steps in,
and again on every retry; with it the run fails within seconds, naming the node, the path
and the reason.
"""

from __future__ import annotations

import json
import logging
import posixpath
import uuid

import ray

logger = logging.getLogger("sparsebk.train")

PROBE_DIR = ".sparsebk-preflight"


class PreflightError(RuntimeError):
    """A node cannot reach the run's storage or its dataset."""


def _fs(location: str):
    """(pyarrow FileSystem, path) of a local path or URI (query options included)."""
    from sparsebk.storage.store import open_store

    store = open_store(location)
    return store.fs, store.root


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def probe_storage(storage_path: str, tag: str) -> None:
    """Write, read back and delete one small object under `storage_path`; raises on failure."""
    fs, base = _fs(storage_path)
    folder = posixpath.join(base, PROBE_DIR)
    fs.create_dir(folder, recursive=True)
    path = posixpath.join(folder, f"{tag}-{uuid.uuid4().hex[:8]}")
    payload = f"sparsebk pre-flight {tag}".encode()
    with fs.open_output_stream(path) as f:
        f.write(payload)
    try:
        with fs.open_input_file(path) as f:
            back = f.read()
        if back != payload:
            raise OSError(f"read back {len(back)} bytes that differ from the {len(payload)} "
                          "written")
    finally:
        fs.delete_file(path)


def probe_data(data_dir: str) -> None:
    """Read and parse the dataset manifest under `data_dir`; raises on failure."""
    from sparsebk.data.manifest import MANIFEST_NAME

    fs, base = _fs(data_dir)
    with fs.open_input_file(posixpath.join(base, MANIFEST_NAME)) as f:
        json.loads(f.read().decode("utf-8"))


@ray.remote(num_cpus=0, max_retries=0)
def _probe(storage_path: str, data_dir: str) -> list[tuple[str, str]]:
    """On one node: [(path, reason)] of what it cannot reach."""
    tag = ray.get_runtime_context().get_node_id()[:12]
    problems = []
    for path, check in ((storage_path, lambda: probe_storage(storage_path, tag)),
                        (data_dir, lambda: probe_data(data_dir))):
        try:
            check()
        except Exception as e:  # noqa: BLE001 -- every failure is a finding to report
            problems.append((path, _why(e)))
    return problems


AUTOSCALING_ENV = "SPARSEBK_AUTOSCALING"
STATE_BYTES_PER_PARAM = 16  # float32 weight, gradient and AdamW's two moments


def worker_state_bytes(cfg) -> int:
    """Bytes of the training state a worker holds: 16 per parameter (weights, gradients,
    AdamW moments; a sharded run holds 1/num_workers of it). Counted on the meta device: no
    memory is allocated. A lower bound: activations come on top."""
    import torch

    from sparsebk.model.lm import SparseBKLM

    with torch.device("meta"):
        params = sum(p.numel() for p in SparseBKLM(cfg.model).parameters())
    share = cfg.run.num_workers if cfg.run.parallel == "fsdp" else 1
    return params * STATE_BYTES_PER_PARAM // share


def check_fit(cfg) -> int:
    """How many workers the alive nodes can hold; PreflightError with the numbers when fewer
    than the run needs (run.min_workers for an elastic run), or when Ray Data has no CPU left
    beside them."""
    import os

    if os.environ.get(AUTOSCALING_ENV) == "1":
        return -1
    need = {"CPU": cfg.run.cpus_per_worker, **({"GPU": 1.0} if cfg.run.use_gpu else {})}
    state = worker_state_bytes(cfg)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits, spare_cpu = 0, 0.0
    for n in nodes:
        res = n.get("Resources", {})
        k = min([int(res.get(r, 0) // v) if v else 10 ** 6 for r, v in need.items()]
                + [int(res.get("memory", 0) // state) if state else 10 ** 6]
                + ([1] if cfg.run.placement_strategy == "STRICT_SPREAD" else []))
        fits += k
        spare_cpu += res.get("CPU", 0) - k * cfg.run.cpus_per_worker
    wanted = cfg.run.min_workers or cfg.run.num_workers
    ask = f"{cfg.run.cpus_per_worker:g} CPU{', 1 GPU' if cfg.run.use_gpu else ''} and " \
          f"~{state / 2 ** 30:.2f} GiB of training state per worker"
    have = "; ".join(f"{n.get('NodeManagerAddress', '?')}: {_resources(n)}" for n in nodes)
    if fits < wanted:
        raise PreflightError(
            f"the cluster cannot place this run: {wanted} worker(s) of {ask}, and its alive "
            f"nodes hold {fits} ({have or 'no alive node'}). Lower run.num_workers, "
            f"run.cpus_per_worker or the model's size, add nodes, or set {AUTOSCALING_ENV}=1 "
            "on a cluster that autoscales")
    placed = min(fits, cfg.run.num_workers)
    if cfg.data.loader == "ray" and spare_cpu + (fits - placed) * cfg.run.cpus_per_worker < 1:
        raise PreflightError(
            f"no CPU is left for Ray Data's read tasks beside {placed} worker(s) of {ask} "
            f"({have}): the run would wait at step 0 forever. Add a CPU, lower "
            "run.cpus_per_worker, or set data.loader=stream (every worker streams its rows from "
            "the store, no Ray Data tasks)")
    return fits


def _resources(node: dict) -> str:
    res = node.get("Resources", {})
    parts = [f"{res.get('CPU', 0):g} CPU"]
    if res.get("GPU"):
        parts.append(f"{res['GPU']:g} GPU")
    return ", ".join(parts + [f"{res.get('memory', 0) / 2 ** 30:.1f} GiB"])


def worker_nodes(use_gpu: bool = False) -> list[dict]:
    """Alive nodes with the resource a worker asks for (a head started with 0 CPUs hosts
    none)."""
    need = "GPU" if use_gpu else "CPU"
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(need, 0) > 0]


def check_nodes(storage_path: str, data_dir: str, use_gpu: bool = False, *,
                timeout_s: float = 60.0) -> int:
    """Probe every worker node; raises PreflightError naming each node (id, ip) that cannot
    reach `storage_path` or `data_dir`, the path and why. Returns the number of nodes."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = worker_nodes(use_gpu)
    refs = {}
    for n in nodes:
        strategy = NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
        refs[_probe.options(scheduling_strategy=strategy).remote(storage_path, data_dir)] = n
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    failures = []
    for ref, n in refs.items():
        where = f"node {n['NodeID'][:12]} ({n.get('NodeManagerAddress', '?')})"
        if ref not in ready:
            ray.cancel(ref, force=True)
            failures.append(f"  {where}: no answer within {timeout_s:.0f} s (a hung mount?)")
            continue
        try:
            problems = ray.get(ref)
        except Exception as e:  # noqa: BLE001 -- the probe task itself failed on that node
            failures.append(f"  {where}: the probe task failed: {_why(e)}")
            continue
        failures += [f"  {where}: cannot use {path}: {why}" for path, why in problems]
    if failures:
        raise PreflightError(
            "pre-flight check: not every node can reach the run's storage (run.storage_path, "
            "written) and dataset (data.dir, its manifest read):\n" + "\n".join(failures)
            + "\nEvery node needs both: a shared file system mounted at the same path, or a "
            "bucket URI (s3://, gs://) with credentials in the nodes' environment.")
    logger.info("pre-flight check: %d node(s) reach %s and %s", len(nodes), storage_path,
                data_dir)
    return len(nodes)
