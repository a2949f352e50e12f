"""Two Ray nodes on one machine: a 2-worker `tiny` run with STRICT_SPREAD placement puts one
worker on each node, passes the pre-flight check on both, finishes, and both ranks' files are
in the run's storage: an S3 bucket (a real SeaweedFS server), its dataset on a path both nodes
share (as a shared mount would be). Both nodes also pass the pre-flight check of a run stored
on that shared path. (One run, not one per storage: a 2-node run costs a minute or two.)

This module starts its own cluster (ray.cluster_utils.Cluster, under its own temp dir so no
other Ray on the machine finds it) and must not use the `ray_local` fixture; connecting the
driver to it ends the session's local Ray, so it runs last (`own_ray_driver`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import RAY_TEST_ENV, free_port, ray_address_dir

from sparsebk.train.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.own_ray_driver, pytest.mark.timeout(900)]

TINY = Path(__file__).resolve().parents[1] / "ray_jobs" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def two_nodes(request):
    """A head and one more node, 2 CPUs each; the driver connected to the head. The S3
    server first (when there is one): the nodes inherit its credentials from the environment."""
    import ray

    try:
        request.getfixturevalue("s3_bucket")
    except pytest.skip.Exception:
        pass
    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    # read by the nodes' processes; the address pinned (conftest.pytest_collection_modifyitems)
    env = {**RAY_TEST_ENV, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    temp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's socket paths are limited
    cluster = None
    try:
        cluster = start_cluster(temp, port)
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_cluster(temp: str, port: int, attempts: int = 3):
    """Head + one node. Ray gives a starting node 30 s to register, which a loaded machine
    can miss; a failed attempt is shut down and tried again."""
    from ray.cluster_utils import Cluster

    ray_address_dir()
    for attempt in range(attempts):
        cluster = Cluster(initialize_head=False)
        try:
            cluster.add_node(num_cpus=2, include_dashboard=False, temp_dir=temp,
                             gcs_server_port=port)
            cluster.add_node(num_cpus=2, temp_dir=temp)
            cluster.wait_for_nodes(timeout=120)
            return cluster
        except Exception:
            cluster.shutdown()
            if attempt == attempts - 1:
                raise


def train_worker_nodes() -> dict[str, str]:
    """Actor id -> node id of the Ray Train workers this cluster has run (alive or dead)."""
    import ray._private.state as state

    return {actor_id: a["Address"]["NodeID"] for actor_id, a in state.actors().items()
            if a["ActorClassName"] == "RayTrainWorker"}


def test_two_workers_on_two_nodes_finish_and_store_both_ranks_files(tmp_path, request,
                                                                     two_nodes):
    """Storage in the bucket (a shared path when the `weed` binary is missing), the dataset
    on a shared path; the shared path as storage passes every node's pre-flight check."""
    import ray

    from sparsebk.storage.store import open_store
    from sparsebk.train.ray_train.driver import ensure_dataset, run_training
    from sparsebk.train.ray_train.preflight import PROBE_DIR, check_nodes, worker_nodes
    from sparsebk.train.resume import list_checkpoints

    shared = tmp_path / "runs"
    try:
        storage = request.getfixturevalue("s3_bucket")("multinode")
    except pytest.skip.Exception:
        storage = str(shared)
    before = set(train_worker_nodes())
    assert len(worker_nodes()) == 2
    cfg = load_config(TINY, [f"data.dir={tmp_path / 'data'}", f"run.storage_path={storage}",
                             "run.name=two", "run.placement_strategy=STRICT_SPREAD",
                             "data.loader=local", "optim.max_steps=4", "run.eval_every=4",
                             "run.log_every=2", "optim.warmup_steps=1", "run.plots=false"])
    # a run stored on the shared path: every node writes, reads back and deletes its probe
    assert check_nodes(str(shared), str(ensure_dataset(cfg.data))) == 2
    assert not any((shared / PROBE_DIR).iterdir())
    summary = run_training(cfg)
    assert summary["steps"] == 4

    nodes = [n for a, n in train_worker_nodes().items() if a not in before]
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes  # one worker per node
    assert set(nodes) == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    run = open_store(storage).join("two")
    newest = list_checkpoints(run.fs, run.root)[0]
    files = run.list(run.relative(newest) or newest.rsplit("/", 1)[-1])
    assert {"rng_rank0.pt", "rng_rank1.pt", "state.pt"} <= set(files), files
    records = {name.split(".")[0] for name in run.list("schedule")}
    assert records == {"rank0", "rank1"}
