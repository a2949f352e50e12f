"""The text corpora's document and split rule written out plainly, whole bytes at a time: the
reference the streamed implementation (sparsebk.data.corpora, sparsebk.data.plan) is
checked against."""

from __future__ import annotations

import hashlib

SPLIT_NAMES = ("train", "valid", "test")


def reference_documents(data: bytes, doc_bytes: int, valid: float, test: float) -> list[tuple[str, bytes]]:
    """The text rule written out: a document ends at the first newline at or past its
    doc_bytes-th byte; its split comes from the first 8 bytes of its SHA-256 as a fraction."""
    docs, start = [], 0
    while start < len(data):
        nl = data.find(b"\n", start + doc_bytes - 1)
        end = len(data) if nl < 0 else nl + 1
        u = int.from_bytes(hashlib.sha256(data[start:end]).digest()[:8], "big") / 2 ** 64
        docs.append(("test" if u < test else "valid" if u < test + valid else "train", data[start:end]))
        start = end
    return docs


def reference_ids(docs: list[tuple[str, bytes]], encode, eos: int) -> dict[str, list[int]]:
    """Each split's ids for one file in one part: its documents' ids in order, <eos> where the
    next document is in another split (or the file ends)."""
    out = {s: [] for s in SPLIT_NAMES}
    for i, (split, doc) in enumerate(docs):
        out[split] += encode(doc.decode("utf-8"))
        if i + 1 == len(docs) or docs[i + 1][0] != split:
            out[split].append(eos)
    return out
