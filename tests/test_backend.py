"""A run's controller sets up the workers' torch process group without importing torch
(sparsebk.train.ray_train.backend). What the controller receives is unpickled in a fresh
interpreter, as Ray's controller process does, and every part the controller calls is used;
Ray's own TorchConfig, the reference, does import torch there. That the process group the
workers get works is checked by the DDP and FSDP runs (test_scale, test_train_ray)."""

from __future__ import annotations

import pickle
import subprocess
import sys

CONTROLLER = """
import pickle, sys
cfg = pickle.loads(sys.stdin.buffer.read())
backend = cfg.backend_cls()
parts = (backend.share_cuda_visible_devices, cfg.train_func_context, cfg.framework, cfg.to_dict())
print("torch" in sys.modules)
"""


def _controller_imports_torch(config) -> bool:
    out = subprocess.run([sys.executable, "-c", CONTROLLER], input=pickle.dumps(config),
                         capture_output=True, check=True)
    return out.stdout.decode().strip() == "True"


def test_the_controller_side_of_the_process_group_set_up_imports_no_torch():
    from ray.train.torch import TorchConfig

    from sparsebk.train.ray_train.backend import TorchProcessGroupConfig

    assert _controller_imports_torch(TorchConfig(backend="gloo"))  # the reference does
    assert not _controller_imports_torch(TorchProcessGroupConfig(backend="gloo"))


def test_it_is_what_the_trainer_hands_the_controller():
    from sparsebk.train.ray_train.backend import TorchProcessGroupConfig
    from sparsebk.train.ray_train.driver import SparseBKTrainer

    trainer = SparseBKTrainer(lambda: None)
    assert isinstance(trainer.backend_config, TorchProcessGroupConfig)
    assert trainer.backend_config.backend == "gloo"  # TorchTrainer's choice without GPUs
    assert trainer.backend_config.to_dict() == {"backend": "gloo", "init_method": "env",
                                                "timeout_s": 1800}
