"""The fault matrix, run for real (docs/operations.md): a node lost mid-run on a two-node
cluster on this machine, with and without elasticity, and SIGTERM to a driver. Each test
prints its row (recovery time, steps redone) so `pytest -s` shows the measured matrix.

This module starts its own cluster (ray.cluster_utils.Cluster, its own temp dir) with Ray
Train's worker-group start timeout at 10 s (60 s by default), so a bounded wait is seconds;
connecting the driver to it ends the session's local Ray, so it runs last (`own_ray_driver`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import RAY_TEST_ENV, free_port, mounted_tmpfs, ray_address_dir

from sparsebk.train.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.own_ray_driver, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "ray_jobs" / "configs" / "tiny.yaml"
# The GCS's health checks of the nodes: every 0.5 s, a node declared dead after 4 failed in a
# row (Ray's defaults: 3 s and 5, 15 s before a killed node's resources leave the cluster, while
# an elastic run sizes its next worker group by them). A check fails on an error or after
# health_check_timeout_ms (10 s, unchanged): a loaded but live node is not declared dead.
ENV = {**RAY_TEST_ENV, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",
       "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4"}
# Ray's processes give up on a lost head after this many seconds (default 60); the driver's
# watch after three quarters of it.
RECONNECT_S = 12


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node, 1 CPU each (so the worker group must shrink when a node is
    lost); the driver connected. One cluster for the module: `two_nodes` adds a second node
    back when a test removed it."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    # read by the nodes' processes; the address pinned (conftest.pytest_collection_modifyitems)
    env = {**ENV, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    temp = tempfile.mkdtemp(prefix="rft", dir="/tmp")
    ray_address_dir()
    c = Cluster(initialize_head=False)
    try:
        c.add_node(num_cpus=1, include_dashboard=False, temp_dir=temp, gcs_server_port=port)
        c.temp = temp
        ray.init(address=c.address, log_to_driver=False, configure_logging=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture
def two_nodes(cluster):
    """(cluster, its second node): a fresh second node when the last test removed it."""
    import ray

    others = [n for n in cluster.list_all_nodes() if n is not cluster.head_node]
    node = others[0] if others else cluster.add_node(num_cpus=1, temp_dir=cluster.temp)
    cluster.wait_for_nodes(timeout=120)
    deadline = time.time() + 60
    while sum(1 for n in ray.nodes() if n["Alive"]) < 2 and time.time() < deadline:
        time.sleep(0.5)
    return cluster, node


def _cfg(tmp_path, *extra):
    return load_config(TINY, [f"data.dir={tmp_path / 'data'}", f"run.storage_path={tmp_path / 'runs'}",
                              "run.name=fault",
                              "data.loader=local", "optim.max_steps=24", "run.eval_every=4",
                              "run.log_every=2", "optim.warmup_steps=1", "run.plots=false",
                              *extra])


def _train_in_thread(cfg):
    from sparsebk.train.ray_train.driver import run_training

    out = {}

    def go():
        try:
            out["summary"] = run_training(cfg)
        except BaseException as e:  # noqa: BLE001 -- the test reads it
            out["error"] = e

    th = threading.Thread(target=go, daemon=True)
    th.start()
    return th, out


def _wait_for_checkpoint(cfg, th, timeout=300) -> float:
    from sparsebk.train.ray_train.driver import latest_checkpoint

    t0 = time.time()
    while time.time() - t0 < timeout and th.is_alive():
        if latest_checkpoint(cfg):
            return time.time()
        time.sleep(0.5)
    raise AssertionError("no checkpoint was written")


def _train_steps(cfg) -> list[int]:
    from sparsebk.train.metrics import read_metrics

    return [r["step"] for r in read_metrics(cfg.run.run_dir).get("train", [])]


def _raw_steps(cfg) -> list[int]:
    path = Path(cfg.run.run_dir) / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()
            if '"kind": "train"' in line]


def test_a_node_lost_mid_run_continues_on_the_node_left(tmp_path, two_nodes):
    """run.min_workers=1: the elastic run resumes from its latest checkpoint on one worker
    and finishes every step."""
    cluster, node = two_nodes
    cfg = _cfg(tmp_path, "run.min_workers=1", "run.max_failures=2", "run.placement_retries=12")
    th, out = _train_in_thread(cfg)
    killed_at = _wait_for_checkpoint(cfg, th)
    before = max(_raw_steps(cfg), default=0)
    cluster.remove_node(node, allow_graceful=False)  # SIGKILL of the node's processes
    th.join(timeout=600)
    assert "error" not in out, out.get("error")
    assert out["summary"]["steps"] == 24
    raw = _raw_steps(cfg)
    redone = len(raw) - len(set(raw))
    print(f"\nROW node lost, elastic: finished {time.time() - killed_at:.0f} s after the kill, "
          f"{redone} logged step(s) redone (last logged before the kill: {before})")
    assert sorted(set(raw)) == sorted(set(_train_steps(cfg)))


def test_a_node_lost_without_elasticity_stops_in_bounded_time(tmp_path, two_nodes):
    """Fixed 2 workers, one per node: after the node is lost the run waits
    run.placement_retries + 1 worker-group starts (10 s each here), then stops with one line
    naming its latest checkpoint: no endless wait."""
    from sparsebk.train.ray_train.driver import RunFailed

    cluster, node = two_nodes
    cfg = _cfg(tmp_path, "run.placement_retries=1", "run.max_failures=1",
               "optim.max_steps=400", "run.eval_every=2")
    th, out = _train_in_thread(cfg)
    _wait_for_checkpoint(cfg, th)
    cluster.remove_node(node, allow_graceful=False)
    killed = time.time()
    th.join(timeout=600)
    took = time.time() - killed
    err = out.get("error")
    print(f"\nROW node lost, no spare capacity: stopped {took:.0f} s after the kill: {err}")
    assert isinstance(err, RunFailed), err
    msg = str(err)
    assert "could not be placed" in msg or "failed more than" in msg
    assert "Latest checkpoint: " in msg and "checkpoint_" in msg and "the same command resumes" in msg
    assert took < 300


@pytest.fixture
def full_disk():
    """A 1.5 MB tmpfs: room for the first checkpoint of `tiny`, not the second."""
    with mounted_tmpfs(1500 << 10) as d:
        yield Path(d)


def test_a_full_disk_stops_the_run_after_one_restart(tmp_path, two_nodes, full_disk):
    """Run storage on a full tmpfs: the checkpoint write fails with ENOSPC, which no retry
    can fix: the run stops after one restart (run.max_failures=5 is not spent) with the reason
    and its latest checkpoint, and no partial file is left by the writer."""
    from sparsebk.train.ray_train.driver import RunFailed

    cfg = _cfg(tmp_path, f"run.storage_path={full_disk}", "run.max_failures=5",
               "optim.max_steps=400", "run.eval_every=2")
    t0 = time.time()
    th, out = _train_in_thread(cfg)
    th.join(timeout=600)
    err = out.get("error")
    print(f"\nROW disk full: stopped {time.time() - t0:.0f} s after the start: {err}")
    assert isinstance(err, RunFailed), err
    msg = str(err)
    assert "no space left on the device" in msg and "Not retried" in msg
    assert "Latest checkpoint: " in msg and "checkpoint_" in msg
    assert not list(Path(full_disk).rglob("*.tmp*"))  # no partial file from the writer


# A driver on a node that is not the head, as `sparsebk train --address` runs on a cluster's
# node: on one machine every node has the same IP, so ray.init is told the node's temp dir
# (which picks its raylet); the rest is the CLI's main.
DRIVER_ON_NODE = ("import ray, sys; ray.init(address=sys.argv[1], _temp_dir=sys.argv[2], "
                  "log_to_driver=False); from sparsebk.train.ray_train.cli import main; "
                  "sys.exit(main(sys.argv[3:]))")


def _head_and_node(port: int, temp: str):
    """A head without CPUs on GCS port `port` and a node with 3 (the workers, the driver),
    temp dirs temp/h and temp/n, started from this process but not connected to it (the
    head's loss would end this process's Ray). Returns the Cluster and the GCS address."""
    from ray.cluster_utils import Cluster

    ray_address_dir()
    c = Cluster(initialize_head=False)
    head = c.add_node(num_cpus=0, gcs_server_port=port, include_dashboard=False,
                      temp_dir=f"{temp}/h")
    c.add_node(num_cpus=3, temp_dir=f"{temp}/n")
    return c, head.gcs_address


def _remove_all(c) -> None:
    """Kills the cluster's processes (the pids it started; no `ray stop`)."""
    for node in [*c.worker_nodes, c.head_node]:
        if node is not None:
            c.remove_node(node, allow_graceful=False)


def _attempts(run_dir: Path) -> list[list[int]]:
    """The steps rank 0 trained, per worker process, in order."""
    seqs: dict[int, list[int]] = {}
    for line in (run_dir / "schedule" / "rank0.jsonl").read_text().splitlines():
        r = json.loads(line)
        seqs.setdefault(r["pid"], []).append(r["step"])
    return list(seqs.values())


def test_a_lost_head_ends_the_driver_in_bounded_time_and_the_run_resumes(tmp_path, monkeypatch):
    """The head's processes killed mid-run, the driver on the other node: the driver ends
    (exit 1) with one line naming the latest checkpoint before Ray's own give-up (its
    processes wait RAY_gcs_rpc_server_reconnect_timeout_s, RECONNECT_S here; the driver's
    watch three quarters of that) and releases the lease; with a head back on the same address the
    same command resumes from that checkpoint and finishes."""
    for k, v in {**ENV, "RAY_gcs_rpc_server_reconnect_timeout_s": str(RECONNECT_S)}.items():
        monkeypatch.setenv(k, v)  # read by the nodes' processes and the driver
    port, temp = free_port(), tempfile.mkdtemp(prefix="rhl", dir="/tmp")
    # the nodes' processes (and the driver) pinned to this cluster's address
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    run_dir, log = tmp_path / "runs" / "hl", tmp_path / "driver.log"
    c, address = _head_and_node(port, temp)
    cmd = [sys.executable, "-c", DRIVER_ON_NODE, address, f"{temp}/n", "--config", str(TINY),
           "--address", address]
    for s in (f"data.dir={tmp_path / 'data'}", f"run.storage_path={tmp_path / 'runs'}",
              "run.name=hl", "optim.max_steps=60", "run.eval_every=4", "run.log_every=2",
              "data.loader=local", "run.plots=false", "optim.warmup_steps=1"):
        cmd += ["--set", s]
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        t0 = time.time()
        while len(list(run_dir.glob("checkpoint_*/manifest_rank0.json"))) < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() - t0 < 300, "no checkpoint"
            time.sleep(0.2)
        # the clock starts before the removal: the head stops answering during remove_node,
        # which can take a second or more to return, and the watch counts from then
        killed = time.time()
        c.remove_node(c.head_node, allow_graceful=False)  # SIGKILL of the head's processes
        try:
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        took = time.time() - killed
        out = log.read_text()
        ours = [line for line in out.splitlines() if line.startswith("sparsebk train:")]
        print(f"\nROW head lost: the driver exited {took:.1f} s after the kill: {ours}")
        assert rc == 1 and len(ours) == 1, out[-3000:]
        assert f"the Ray head at {address} has not answered for" in ours[0]
        assert ours[0].endswith("once the cluster is back the same command resumes from the "
                                "latest checkpoint Ray Train recorded (the steps after it are "
                                "redone)")
        named = Path(ours[0].split("Latest checkpoint: ")[1].split(" ")[0])
        assert named.parent == run_dir and (named / "manifest_rank0.json").is_file()
        named_step = torch.load(named / "state.pt", weights_only=True)["step"]
        assert 0.75 * RECONNECT_S <= took < RECONNECT_S + 5  # the watch's, before Ray's own
        assert not (run_dir / "driver.lease.json").exists()
        _remove_all(c)  # the rest of the old cluster (its processes give up by themselves)

        # the workers on the node left may have trained on (Ray's processes there outlive the
        # head by RECONNECT_S, the driver by a quarter of it) and saved checkpoints Ray Train never recorded (its
        # controller gone with the head): the run resumes from a recorded one, at most the newest
        from sparsebk.train.resume import list_checkpoints

        import pyarrow.fs as pafs

        saved = {torch.load(Path(p) / "state.pt", weights_only=True)["step"]
                 for p in list_checkpoints(pafs.LocalFileSystem(), str(run_dir))}
        step = max(saved)
        before = _attempts(run_dir)
        c, _ = _head_and_node(port, temp)  # a head back on the same address
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert json.loads(done.stdout[done.stdout.index("{"):])["steps"] == 60
        resumed = _attempts(run_dir)[len(before):]  # what the same command trained
        # one attempt, from right after a checkpoint in the folder to the end, no step skipped
        # (every step's rows and weights are checked by the resume tests)
        from_step = resumed[0][0] - 1 if resumed else 60
        assert from_step in saved and resumed in ([list(range(from_step + 1, 61))], []), (
            saved, resumed)
        print(f"ROW head lost: the line named step {named_step}, the newest saved was step "
              f"{step}, the same command resumed from step {from_step}")
    finally:
        _remove_all(c)
        shutil.rmtree(temp, ignore_errors=True)
