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

from sparsebk.train.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.own_ray_driver, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "ray_jobs" / "configs" / "tiny.yaml"
ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",
       "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node, 1 CPU each (so the worker group must shrink when a node is
    lost); the driver connected. One cluster for the module: `two_nodes` adds a second node
    back when a test removed it."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    old = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)  # read by the nodes' processes
    temp = tempfile.mkdtemp(prefix="rft", dir="/tmp")
    c = Cluster(initialize_head=False)
    try:
        c.add_node(num_cpus=1, include_dashboard=False, temp_dir=temp)
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
    """A 1.5 MB tmpfs: room for the first checkpoint of `tiny`, not the second. Needs the
    right to mount (root); skipped where it is missing."""
    d = Path(tempfile.mkdtemp(prefix="sparsebk-tmpfs-"))
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(d)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        d.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)
    d.rmdir()


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


def test_sigterm_to_the_driver_stops_with_one_line_and_frees_the_run(tmp_path):
    """`sparsebk train` (its own local Ray) gets SIGTERM after its first checkpoint: exit 1,
    one line naming the latest checkpoint, the run's lease released, no traceback."""
    runs = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(ENV)
    cmd = [sys.executable, "-m", "sparsebk.cli", "train", "--config", str(TINY),
           "--set", f"run.storage_path={runs}", "--set", "run.name=term",
           "--set", f"data.dir={tmp_path / 'data'}", "--set", "optim.max_steps=2000",
           "--set", "run.eval_every=4", "--set", "run.plots=false", "--num-cpus", "4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        t0 = time.time()
        while not list((runs / "term").glob("checkpoint_*/manifest_rank0.json")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() - t0 < 400, "no checkpoint"
            time.sleep(0.5)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ours = [line for line in err.splitlines() if line.startswith("sparsebk train:")]
    print(f"\nROW SIGTERM to the driver: exited {time.time() - sent:.1f} s later: {ours}")
    assert proc.returncode == 1, err[-3000:]
    assert len(ours) == 1 and "stopped by SIGTERM: latest checkpoint" in ours[0], err[-3000:]
    assert "resumes from it" in ours[0]
    assert "Traceback" not in err
    assert not (runs / "term" / "driver.lease.json").exists()
