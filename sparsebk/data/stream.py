"""Stream a split's shards to one rank, in a global sample order that depends only on a seed.

    order = SampleOrder(shard_rows=[4096, 4096, 1200], window=8192, seed=s)
    for rows in stream_rows(dataset_dir, "train", s, window=8192, start=p, rank=r, world=w):
        ...                                   # int32 (n, block_len + 1): rank r's next rows

The epoch's order over a split's N rows (`SampleOrder`):
  1. the split's files (shards) in a seeded permutation when shuffling and the split spans
     more than one window; in the manifest's order otherwise;
  2. their rows, in that shard order, cut into consecutive windows of `window` rows (the last
     one shorter);
  3. each window's rows in a seeded permutation of their own when shuffling.
The order is the windows' rows one window after another: rows mix across the shards of a
window, and memory holds one window, never the split. The seeds come from `seed` and the
window's index only, so the order is the same for any number of workers and any batch size.
With one window (N <= window) it is one seeded permutation of all rows, seeded with `seed`
itself: the order `data.loader: local` uses (sparsebk.train.run_state.local_batches).

Rank r of `world` takes positions start + r, start + r + world, ... below
start + (N - start) // world * world (equal shares), as local_batches does: one step of all
ranks consumes a contiguous stretch of the order, so a sample count is the position, whatever
the worker count. A rank reads only the windows from `start`'s on (a resume reads nothing
before it) and keeps its 1/world of each. Every shard is checked as it is read: its SHA-256,
row count, row width and token ids against the manifest. A background thread reads and
selects the next window while the caller trains on the current one. Memory: the window being
read and the rank's shares of windows in flight (being made, queued, in use; a share is
1/world of a window), at most about (1 + 5 / world) windows' rows plus two shard files
(tests/test_stream.py measures it).
"""

from __future__ import annotations

import math
import queue
import threading
from typing import Iterator, Sequence

import numpy as np

from sparsebk.data.manifest import MANIFEST_NAME, dataset_store, load_manifest


def _derived_seed(seed: int, *tags: int) -> int:
    """A 63-bit seed for one part of the order (the shard permutation, a window)."""
    return int(np.random.SeedSequence([seed, *tags]).generate_state(1, np.uint64)[0]) >> 1


def _randperm(n: int, seed: int) -> np.ndarray:
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()


class SampleOrder:
    """The global order of one epoch over a split's shards (see the module doc).

    `shard_rows`: rows per file, in the manifest's order; `seed`: the epoch's seed, or None
    for no shuffling (files and rows in the manifest's order)."""

    def __init__(self, shard_rows: Sequence[int], window: int, seed: int | None):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1 (rows), got {window!r}")
        self.shard_rows, self.window, self.seed = [int(r) for r in shard_rows], window, seed
        self.rows = sum(self.shard_rows)
        self.shards = list(range(len(self.shard_rows)))  # manifest indices, in stream order
        if seed is not None and self.rows > window:
            self.shards = _randperm(len(self.shard_rows), _derived_seed(seed, 1)).tolist()
        sizes = [self.shard_rows[s] for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # stream offsets

    @property
    def windows(self) -> int:
        return math.ceil(self.rows / self.window)

    def span(self, j: int) -> tuple[int, int]:
        """Window j's rows of the stream: [lo, hi)."""
        return j * self.window, min(self.rows, (j + 1) * self.window)

    def permutation(self, j: int) -> np.ndarray:
        """Window j's order: entry i is the stream row (minus the window's start) at its i-th
        position."""
        lo, hi = self.span(j)
        if self.seed is None:
            return np.arange(hi - lo)
        return _randperm(hi - lo, self.seed if j == 0 else _derived_seed(self.seed, 2, j))

    def end(self, start: int, world: int) -> int:
        """The position after the last one any rank takes from `start` (equal shares)."""
        return start + max(0, self.rows - start) // world * world

    def positions(self, j: int, start: int, rank: int, world: int) -> np.ndarray:
        """The global positions rank `rank` takes in window j, from `start` on."""
        lo, hi = self.span(j)
        a, b = max(start, lo), min(self.end(start, world), hi)
        return np.arange(a + (start + rank - a) % world, b, world) if a < b else np.arange(0)

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        """The manifest-order row index (the row of the files concatenated in manifest order)
        at each global position: what a reference reads with load_blocks."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty_like(positions)
        firsts = np.concatenate([[0], np.cumsum(self.shard_rows, dtype=np.int64)])
        for j in np.unique(positions // self.window):
            sel = positions // self.window == j
            stream = self.span(j)[0] + self.permutation(int(j))[positions[sel] - self.span(j)[0]]
            k = np.searchsorted(self.starts, stream, side="right") - 1  # stream-order shard
            shard = np.asarray(self.shards)[k]
            out[sel] = firsts[shard] + stream - self.starts[k]
        return out


class _ShardReader:
    """The stream's rows, read shard by shard through the dataset's store; the shard last read
    is kept (the next window may start inside it). Each shard is checked as it is read."""

    def __init__(self, root, manifest: dict, split: str, order: SampleOrder):
        self.root, self.m, self.order = root, manifest, order
        self.split = split
        self.cached: tuple[int, np.ndarray | None] = (-1, None)

    def rows(self, lo: int, hi: int) -> np.ndarray:
        starts, parts = self.order.starts, []
        k = int(np.searchsorted(starts, lo, side="right")) - 1
        while lo < hi:
            shard = self._shard(k)
            take = shard[lo - starts[k]:min(hi, starts[k + 1]) - starts[k]]
            parts.append(take)
            lo += len(take)
            k += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _shard(self, k: int) -> np.ndarray:
        if self.cached[0] != k:
            self.cached = (-1, None)  # the old shard is freed before the next is read
            self.cached = (k, self._read(self.order.shards[k]))
        return self.cached[1]

    def _read(self, i: int) -> np.ndarray:
        from sparsebk.data.loading import read_shard

        return read_shard(self.root, self.m, self.split, i)


def split_order(manifest: dict, split: str, window: int, seed: int | None) -> SampleOrder:
    """The SampleOrder of a manifest's split."""
    return SampleOrder([e["rows"] for e in manifest["splits"][split]["files"]], window, seed)


def stream_rows(path, split: str, seed: int | None, *, window: int, start: int, rank: int,
                world: int, prefetch: bool = True) -> Iterator[np.ndarray]:
    """Rank `rank`'s rows of the split from global position `start` on, in order: one int32
    array (n, block_len + 1) per window (n ~ window / world). `path`: the dataset dir, a local
    path or a URI. `prefetch`: a background thread reads and selects the next window while
    the caller uses the current one."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, world={world})")
    root = dataset_store(path)
    m = load_manifest(root.uri)
    if split not in m["splits"]:
        raise ValueError(f"{root.location(MANIFEST_NAME)}: field splits has no split {split!r}")
    order = split_order(m, split, window, seed)
    chunks = _selections(_ShardReader(root, m, split, order), order, start, rank, world)
    return _background(chunks) if prefetch else chunks


def _selections(reader: _ShardReader, order: SampleOrder, start: int, rank: int,
                world: int) -> Iterator[np.ndarray]:
    end = order.end(start, world)
    if end <= start:
        return
    for j in range(start // order.window, (end - 1) // order.window + 1):
        pos = order.positions(j, start, rank, world)
        if len(pos):
            lo, hi = order.span(j)
            mine = reader.rows(lo, hi)[order.permutation(j)[pos - lo]]  # a copy: the window
            yield mine                                                  # is freed before it
            del mine


_DONE = object()


def _background(items: Iterator, depth: int = 1) -> Iterator:
    """`items` produced by a daemon thread, at most `depth` ahead of the caller; its errors
    are raised in the caller. Abandoning the iterator stops the thread at its next item."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for x in items:
                if not put((True, x)):
                    return
            put((True, _DONE))
        except BaseException as e:  # noqa: BLE001 -- handed to the caller, raised there
            put((False, e))

    threading.Thread(target=run, name="sparsebk-stream-prefetch", daemon=True).start()
    try:
        while True:
            ok, x = q.get()
            if not ok:
                raise x
            if x is _DONE:
                return
            yield x
    finally:
        stop.set()
