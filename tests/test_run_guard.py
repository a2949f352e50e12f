"""A cluster's normal day, driver side: one driver per run (a lease in the run folder, on a
local path and in a real S3 bucket), credentials refused in any storage URI (and never echoed),
run.num_workers=0 refused, runs that cannot be placed refused in seconds with the numbers
(CPUs, Ray Data's spare CPU, memory), and a local Ray that listens on 127.0.0.1 only."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sparsebk.storage.lease import LEASE_FILE, RUN_TIME_FILE, LeaseHeld, RunLease
from sparsebk.storage.store import open_store, redact
from sparsebk.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "ray_jobs" / "configs" / "tiny.yaml"
PTB_CPU = ROOT / "ray_jobs" / "configs" / "ptb-cpu.yaml"


def _lease_round(store):
    first = RunLease(store, stale_s=60, beat_s=0.2, settle_s=0.05).acquire()
    with pytest.raises(LeaseHeld, match=r"another driver \(pid \d+ on .*last heartbeat"):
        RunLease(store, stale_s=60, settle_s=0.05).acquire()
    time.sleep(0.5)  # heartbeats keep it fresh
    held = json.loads(store.read_text(LEASE_FILE))
    assert held["token"] == first.token and held["heartbeat"] > held["started"]
    first.release()
    assert not store.is_file(LEASE_FILE)
    attempts = json.loads(store.read_text(RUN_TIME_FILE))["attempts"]
    assert len(attempts) == 1 and attempts[0][1] >= attempts[0][0]
    with RunLease(store, settle_s=0.05) as second:  # free again
        assert second.total_wall_s() >= attempts[0][1] - attempts[0][0]


def test_one_driver_per_run_on_a_local_folder(tmp_path):
    _lease_round(open_store(tmp_path / "run"))


def test_one_driver_per_run_in_a_bucket(s3_bucket):
    _lease_round(open_store(s3_bucket("lease-run")))


def test_a_stale_lease_is_taken_over_and_its_time_counted(tmp_path, caplog):
    store = open_store(tmp_path / "run")
    gone = RunLease(store, settle_s=0.0)
    gone.acquire()
    gone._stop.set()  # a driver killed with SIGKILL: no more heartbeats, no release
    held = json.loads(store.read_text(LEASE_FILE))
    held["started"], held["heartbeat"] = time.time() - 100, time.time() - 30
    store.write_text(LEASE_FILE, json.dumps(held))
    with RunLease(store, stale_s=10, settle_s=0.05) as new:
        assert "taking over the run's lease" in caplog.text
        assert new.total_wall_s() >= 70  # the dead driver's 70 s count
    assert gone.release() is None and not store.is_file(LEASE_FILE)


def test_the_driver_refuses_a_run_another_driver_holds(tmp_path):
    """`sparsebk train` exits 2 with the holder named, before Ray or any data is touched."""
    runs = tmp_path / "runs"
    store = open_store(runs / "held")
    holder = RunLease(store, settle_s=0.0).acquire()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "sparsebk.cli", "train", "--config", str(TINY),
             "--set", f"run.storage_path={runs}", "--set", "run.name=held",
             "--set", f"data.dir={tmp_path / 'data'}", "--address", "127.0.0.1:1"],
            capture_output=True, text=True, timeout=120, cwd=ROOT)
    finally:
        holder.release()
    assert out.returncode != 0
    assert "is being trained by another driver" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("override, secret", [
    ("run.storage_path=s3://AKIAXX:TOPSECRET@bucket/runs", "TOPSECRET"),
    ("data.dir=s3://bucket/data?region=us-east-1&secret_key=TOPSECRET", "TOPSECRET"),
    ("run.storage_path=gs://bucket/runs?access_key=AKIAXX&secret_key=TOPSECRET", "TOPSECRET"),
])
def test_credentials_in_a_uri_are_refused_and_never_echoed(override, secret):
    with pytest.raises(ValueError, match="carries credentials; give them through the "
                                         "environment") as e:
        load_config(TINY, [override])
    assert secret not in str(e.value) and "***" in str(e.value)
    assert secret not in redact(override.split("=", 1)[1])


def test_the_cli_refuses_credentials_before_ray_starts():
    out = subprocess.run(
        [sys.executable, "-m", "sparsebk.cli", "eval", "--checkpoint",
         "s3://KEY:TOPSECRET@bucket/runs/x"], capture_output=True, text=True, timeout=120,
        cwd=ROOT)
    assert out.returncode == 2 and "carries credentials" in out.stderr
    assert "TOPSECRET" not in out.stderr + out.stdout


def test_num_workers_zero_is_refused():
    with pytest.raises(ValueError, match=r"run.num_workers=0: must be >= 1"):
        load_config(TINY, ["run.num_workers=0"])


@pytest.mark.ray
@pytest.mark.own_ray
def test_a_local_ray_listens_on_the_loopback_only(tmp_path):
    """`connect_ray` as `sparsebk train` calls it, in its own process: every listening socket
    of every Ray process it starts is on 127.0.0.1."""
    script = textwrap.dedent("""
        import json, ray
        import psutil  # Ray ships it (importable once ray is)
        from sparsebk.train.ray_train.cli import connect_ray
        connect_ray(None, 2, 1)
        addrs = set()
        for p in psutil.Process().children(recursive=True):
            try:
                conns = p.net_connections(kind="inet")
            except psutil.Error:
                continue
            addrs |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
        print(json.dumps(sorted(addrs)))
        ray.shutdown()
    """)
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    addrs = json.loads(out.stdout.strip().splitlines()[-1])
    assert addrs and set(addrs) <= {"127.0.0.1", "::ffff:127.0.0.1"}, addrs


@pytest.mark.ray
def test_runs_that_cannot_be_placed_are_refused_with_the_numbers(ray_local):
    """ray_local has 4 CPUs on one node: the numbers in each message are that node's."""
    from sparsebk.train.ray_train.preflight import PreflightError, check_fit

    vocab = ["model.vocab_size=10000"]
    assert check_fit(load_config(PTB_CPU, vocab)) == 4  # 2 workers + Ray Data's CPU fit
    with pytest.raises(PreflightError, match=r"5 worker\(s\) of 1 CPU .* hold 4 \("):
        check_fit(load_config(PTB_CPU, vocab + ["run.num_workers=5", "data.loader=local"]))
    with pytest.raises(PreflightError, match="no CPU is left for Ray Data's read tasks beside 4"
                       ".* set data.loader=stream"):
        check_fit(load_config(PTB_CPU, vocab + ["run.num_workers=4", "data.loader=ray"]))
    # every worker reading its own rows needs no CPU beside the workers: all 4 fit
    for loader in ("local", "stream"):
        assert check_fit(load_config(PTB_CPU, vocab + ["run.num_workers=4",
                                                       f"data.loader={loader}"])) == 4
    with pytest.raises(PreflightError, match=r"~19\.\d\d GiB of training state per worker"):
        check_fit(load_config(PTB_CPU, vocab + ["model.n_seq=10000000"]))
    # an elastic run needs its minimum only
    assert check_fit(load_config(PTB_CPU, vocab + ["run.num_workers=6", "run.min_workers=2",
                                                   "data.loader=local"])) == 4
