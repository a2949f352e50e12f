"""Pre-flight check: can every node that may host a worker reach the run's storage and data?

    check_nodes(storage_path, data_dir)    # driver, once, before any training step

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
