"""Checkpoints: a manifest of sizes and sha256 checked before anything loads, and no code run
from a checkpoint's files (a sharded checkpoint's DCP metadata read by a restricted
unpickler). Real files, a real model and optimizer; crafted bytes and crafted pickles."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from sparsebk.model.lm import LMConfig, SparseBKLM
from sparsebk.storage.checkpoint import (MANIFEST, SHARDS_DIR, STATE_FILE, load_checkpoint,
                                         load_model_weights, load_sharded_weights,
                                         save_checkpoint, verify_checkpoint, write_manifest)


def _model(seed: int = 0) -> SparseBKLM:
    torch.manual_seed(seed)
    return SparseBKLM(LMConfig.preset("debug"))


def _saved(tmp_path: Path, world: int = 1) -> tuple[Path, SparseBKLM]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    d = tmp_path / "ckpt"
    for rank in range(world):  # what each rank of a `world`-worker run writes
        save_checkpoint(d, rank=rank, model=model, optimizer=opt, lr_scheduler=sched, step=3,
                        world=world)
    return d, model


def test_a_checkpoint_verifies_and_loads_the_same_weights(tmp_path):
    d, model = _saved(tmp_path, world=2)
    record = json.loads((d / MANIFEST.format(rank=0)).read_text())
    assert record["world"] == 2 and set(record["files"]) == {STATE_FILE, "rng_rank0.pt"}
    assert set(json.loads((d / MANIFEST.format(rank=1)).read_text())["files"]) == {"rng_rank1.pt"}
    assert verify_checkpoint(d) is True
    other = _model(seed=1)
    load_model_weights(d, other)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("where", ["middle", "end"])
def test_a_flipped_byte_is_refused_with_the_file_named(tmp_path, where):
    d, _ = _saved(tmp_path)
    data = bytearray((d / STATE_FILE).read_bytes())
    data[len(data) // 2 if where == "middle" else -1] ^= 0x01
    (d / STATE_FILE).write_bytes(bytes(data))
    for load in (lambda: verify_checkpoint(d), lambda: load_model_weights(d, _model()),
                 lambda: load_checkpoint(d, rank=0, model=_model())):
        with pytest.raises(ValueError, match=f"{d / STATE_FILE}: does not match the sha256"):
            load()


def test_a_truncated_file_and_a_missing_rank_are_refused(tmp_path):
    d, _ = _saved(tmp_path, world=2)
    (d / MANIFEST.format(rank=1)).unlink()  # rank 1 never finished its part
    with pytest.raises(ValueError, match="manifest_rank1.json is missing .rank 1 of 2"):
        verify_checkpoint(d)
    d2, _ = _saved(tmp_path / "b")
    full = (d2 / "rng_rank0.pt").read_bytes()
    (d2 / "rng_rank0.pt").write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="truncated or replaced"):
        verify_checkpoint(d2)


def test_a_manifest_cannot_point_outside_the_checkpoint(tmp_path):
    d, _ = _saved(tmp_path)
    m = d / MANIFEST.format(rank=0)
    record = json.loads(m.read_text())
    record["files"]["../../etc/passwd"] = {"bytes": 1, "sha256": "0" * 64}
    m.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="outside the checkpoint"):
        verify_checkpoint(d)


def test_a_checkpoint_without_manifest_loads_unverified(tmp_path, caplog):
    d, model = _saved(tmp_path)
    (d / MANIFEST.format(rank=0)).unlink()
    assert verify_checkpoint(d) is False
    assert "loaded unverified" in caplog.text
    other = _model(seed=1)
    load_model_weights(d, other)
    assert torch.equal(other.tok_emb.weight, model.tok_emb.weight)


class _Payload:
    """Unpickling this runs `open(marker, "w")`: what a crafted file would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _sharded(tmp_path: Path) -> tuple[Path, SparseBKLM]:
    """A sharded checkpoint (DCP shards beside state.pt), written by one process."""
    import torch.distributed.checkpoint as dcp

    d, model = _saved(tmp_path)
    dcp.save({"model": model.state_dict()}, checkpoint_id=d / SHARDS_DIR)
    state = torch.load(d / STATE_FILE, weights_only=True)
    state.pop("model"), state.pop("optimizer")
    torch.save({**state, "sharded": True}, d / STATE_FILE)
    write_manifest(d, 0, 1, sharded=True)
    return d, model


def test_sharded_weights_load_through_the_restricted_reader(tmp_path):
    d, model = _sharded(tmp_path)
    other = _model(seed=1)
    load_model_weights(d, other)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_a_crafted_dcp_metadata_runs_no_code(tmp_path):
    d, _ = _sharded(tmp_path)
    marker = tmp_path / "payload-ran"
    (d / SHARDS_DIR / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    # whoever can write the folder can also rewrite its manifest: the reader must not run code
    write_manifest(d, 0, 1, sharded=True)
    with pytest.raises(ValueError, match=r"\.metadata: not a DCP metadata file this reader trusts "
                                         r"\(refused to load io\.open"):
        load_sharded_weights(d / SHARDS_DIR, _model())
    with pytest.raises(ValueError, match="not a DCP metadata file"):
        load_model_weights(d, _model())
    assert not marker.exists()
    # and pickle itself would have run it: the test's payload is real
    pickle.loads((d / SHARDS_DIR / ".metadata").read_bytes())
    assert marker.exists()
    os.remove(marker)
    shutil.rmtree(d)
