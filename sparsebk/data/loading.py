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


def read_shard(root: Store, m: dict, split: str, i: int, *, verify_checksum: bool = True) -> np.ndarray:
    """File `i` of a split (its manifest entry) as int32 rows (rows, block_len + 1), read whole
    once: its SHA-256 checked against the manifest as it is read (unless verify_checksum is
    False), every row checked (shard_rows) and the row count. Errors name the file and field."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    entry, mpath = m["splits"][split]["files"][i], root.location(MANIFEST_NAME)
    fpath, field = root.location(entry["path"]), f"splits.{split}.files[{i}]"
    try:
        data = root.read_bytes(entry["path"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{fpath}: file listed in {mpath} field {field}.path is missing") from None
    if verify_checksum:
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise ValueError(f"{fpath}: sha256 {digest} differs from {mpath} field {field}.sha256 "
                             f"({entry['sha256']}); the file changed after it was written")
    try:
        col = pq.read_table(pa.BufferReader(data), columns=[TOKENS_COLUMN]).column(0)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{fpath}: not a readable Parquet file with a column {TOKENS_COLUMN!r} ({e})") from None
    rows = shard_rows(col, m, fpath, mpath)
    if len(rows) != entry["rows"]:
        raise ValueError(f"{fpath}: holds {len(rows)} rows but {mpath} field {field}.rows says {entry['rows']}")
    return rows


def load_blocks(path: str | Path, split: str, *, vocab_size: int | None = None,
                block_len: int | None = None, verify_checksums: bool = True,
                max_rows: int | None = None):
    """The blocks of one split as a torch.LongTensor (R, block_len + 1); row[:-1] -> row[1:].

    Every row read must hold exactly block_len + 1 ids in [0, vocab_size). `max_rows`: only
    the split's first max_rows rows, reading only the files that hold them (a validation
    of run.eval_batches on a large corpus); None: all of them.
    """
    import torch

    root = dataset_store(path)
    # every file's SHA-256 first; with max_rows, only the files read are (as they are read),
    # the others' footers
    whole = max_rows is None
    m = check_dataset(root.uri, vocab_size=vocab_size, block_len=block_len, splits=[split],
                      verify_checksums=verify_checksums and whole)
    width = m["block_len"] + 1
    parts, have = [], 0
    for i in range(len(m["splits"][split]["files"])):
        if max_rows is not None and have >= max_rows:
            break
        parts.append(read_shard(root, m, split, i, verify_checksum=verify_checksums and not whole))
        have += len(parts[-1])
    blocks = np.concatenate(parts) if parts else np.empty((0, width), dtype=np.int32)
    return torch.from_numpy(blocks[:max_rows].astype(np.int64))


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
