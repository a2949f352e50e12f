"""Shared fixtures. Ray is started once per test module that asks for it, never per test.

Not once per session: placement groups that Ray Train leaves behind when Tune stops a trial
early (issue 12's leak) would starve the modules that run after the sweep tests (measured: the
first Ray Train test after them waited forever for its workers)."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster on 127.0.0.1 for the module's tests."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # Ray Train's controller polls workers every 2 s by default, and each ray.train.report
    # waits for that poll; tests report often. Read by the processes ray.init starts.
    old = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    # More logical CPUs than cores is fine: workers are mostly idle between steps.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False, address="local")
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
    else:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = old


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small ops run fastest single-threaded on a loaded 2-core box; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
