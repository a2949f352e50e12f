"""Shared fixtures. Ray is started once per test module that asks for it, never per test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster on 127.0.0.1 for the module's tests."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # More logical CPUs than cores is fine: workers are mostly idle between steps.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False, address="local")
    yield ray
    ray.shutdown()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
