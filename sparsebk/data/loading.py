"""Read a prepared dataset: a plain pyarrow -> torch loader, and Ray Data datasets for Ray Train.

Both check the dataset against its manifest and against what the caller can take
(`vocab_size`, `block_len` = the model's n_seq) before returning anything. The dataset dir is
a local path or a URI (s3://, gs://, ...), read through pyarrow.fs.
"""

from __future__ import annotations

from pathlib import Path  # noqa: F401 (annotations)
from typing import Sequence

import numpy as np

from sparsebk.data.manifest import MANIFEST_NAME, TOKENS_COLUMN, check_dataset, dataset_store
from sparsebk.storage.store import Store


def _split_files(root: Store, manifest: dict, split: str) -> list[str]:
    """The split's files as paths of `root.fs`."""
    return [root.path(entry["path"]) for entry in manifest["splits"][split]["files"]]


def shard_rows(col, m: dict, fpath: str, mpath: str) -> np.ndarray:
    """A shard's tokens column (pyarrow) as int32 ids (rows, block_len + 1), every row checked:
    exactly block_len + 1 ids, each in [0, vocab_size). Errors name the file (`fpath`) and the
    manifest field (`mpath`)."""
    col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    width = m["block_len"] + 1
    offsets = col.offsets.to_numpy()
    lengths = np.diff(offsets)
    bad = np.flatnonzero(lengths != width)
    if bad.size:
        raise ValueError(f"{fpath}: column {TOKENS_COLUMN} row {bad[0]} has {lengths[bad[0]]} ids, not "
                         f"block_len + 1 = {width} ({mpath} field block_len)")
    values = col.values.to_numpy()[offsets[0]:offsets[-1]]
    if values.size and (values.max() >= m["vocab_size"] or values.min() < 0):
        row = int(np.flatnonzero(((values >= m["vocab_size"]) | (values < 0)).reshape(-1, width).any(1))[0])
        raise ValueError(f"{fpath}: column {TOKENS_COLUMN} row {row} has a token id outside "
                         f"[0, vocab_size={m['vocab_size']}) ({mpath} field vocab_size)")
    return values.reshape(-1, width)


def load_blocks(path: str | Path, split: str, *, vocab_size: int | None = None,
                block_len: int | None = None, verify_checksums: bool = True):
    """All blocks of one split as a torch.LongTensor (R, block_len + 1); row[:-1] -> row[1:].

    Reads every row: each row must hold exactly block_len + 1 ids in [0, vocab_size).
    """
    import pyarrow.parquet as pq
    import torch

    root = dataset_store(path)
    m = check_dataset(root.uri, vocab_size=vocab_size, block_len=block_len, splits=[split],
                      verify_checksums=verify_checksums)
    width = m["block_len"] + 1
    parts = []
    for entry in m["splits"][split]["files"]:
        col = pq.read_table(root.path(entry["path"]), columns=[TOKENS_COLUMN],
                            filesystem=root.fs).column(0)
        parts.append(shard_rows(col, m, root.location(entry["path"]), root.location(MANIFEST_NAME)))
    blocks = np.concatenate(parts) if parts else np.empty((0, width), dtype=np.int32)
    return torch.from_numpy(blocks.astype(np.int64))


def ray_datasets(path: str | Path, splits: Sequence[str] = ("train", "valid", "test"), *,
                 vocab_size: int | None = None, block_len: int | None = None,
                 verify_checksums: bool = True) -> dict:
    """{split: ray.data.Dataset} read with `ray.data.read_parquet` from the split's files.

    Each row is {"tokens": block_len + 1 int32 ids}; `iter_torch_batches` yields "tokens"
    as an int32 tensor (B, block_len + 1). Pass them to `TorchTrainer(datasets=...)`.
    """
    import ray.data

    if isinstance(splits, str):
        splits = (splits,)  # a lone name, not its characters
    root = dataset_store(path)
    m = check_dataset(root.uri, vocab_size=vocab_size, block_len=block_len, splits=list(splits),
                      verify_checksums=verify_checksums)
    fs = None if root.is_local else root.fs
    return {split: ray.data.read_parquet(_split_files(root, m, split), filesystem=fs)
            for split in splits}
