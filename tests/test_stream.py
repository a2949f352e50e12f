"""data.loader stream: a global sample order that depends only on the seed and the dataset,
read a window at a time, with exact resume for any worker count.

Pure Python first, on Parquet shards of uneven sizes written here, whose rows carry their
manifest-order index as their first token (so a row names itself): the order against the
uninterrupted single-reader order and against `local_batches` (the exact in-memory loader),
every rank and start, window and shard boundaries crossed; bounded memory; prefetching;
errors that name the file and field. Then a real SeaweedFS bucket, then real Ray Train runs
(one local Ray for the module): an interrupted run resumed, on the same and on another
worker count, trains on the same rows, to the same weights, as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sparsebk.data.loading import load_blocks
from sparsebk.data.stream import SampleOrder, split_order, stream_rows
from sparsebk.train.config import TrainConfig
from sparsebk.train.run_state import local_batches, shuffle_seed, stream_batches

SHARDS = [13, 40, 7, 29, 1, 22]  # 112 rows, uneven shards (one of a single row)
BLOCK_LEN = 7
VOCAB = 4096


def write_shards(root: Path, shard_rows: list[int], *, block_len: int = BLOCK_LEN,
                 seed: int = 0, vocab: int = VOCAB) -> Path:
    """A dataset dir with a train split of `shard_rows` and one-shard valid/test splits; every
    train row's first token is its index in manifest order, the rest random ids."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    splits, first = {}, 0
    for split, sizes in (("train", shard_rows), ("valid", [5]), ("test", [5])):
        files = []
        for i, n in enumerate(sizes):
            rows = rng.integers(0, vocab, (n, block_len + 1), dtype=np.int32)
            if split == "train":
                rows[:, 0] = np.arange(first, first + n)
                first += n
            name = f"{split}-{i:05d}.parquet"
            offsets = pa.array(np.arange(0, rows.size + 1, block_len + 1, dtype=np.int32))
            col = pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1), type=pa.int32()))
            pq.write_table(pa.table({"tokens": col}), root / name)
            files.append({"path": name, "rows": n,
                          "sha256": hashlib.sha256((root / name).read_bytes()).hexdigest()})
        splits[split] = {"rows": sum(sizes), "tokens": sum(sizes) * block_len, "files": files}
    manifest = {"format": "sparsebk-token-blocks", "schema_version": 1, "vocab_size": vocab,
                "block_len": block_len, "splits": splits,
                "tokenizer": {"name": "ids", "vocab_size": vocab, "checksum": "-"}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("stream") / "ds", SHARDS)


def ids(chunks) -> list[int]:
    """The first token (the row's own index) of every row of a stream of arrays / tensors."""
    return [int(i) for c in chunks for i in np.asarray(c)[:, 0]]


def order_of(path, seed, window) -> list[int]:
    """The uninterrupted order: one reader, from position 0, no background thread."""
    return ids(stream_rows(path, "train", seed, window=window, start=0, rank=0, world=1,
                           prefetch=False))


def cfg_for(path, *, batch_size=3, window=16, shuffle=1, seed=5) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"preset": "debug", "vocab_size": VOCAB},
        "data": {"dir": str(path), "block_len": BLOCK_LEN, "batch_size": batch_size,
                 "loader": "stream", "shuffle_buffer": shuffle, "shuffle_window": window},
        "run": {"seed": seed, "num_workers": 1, "eval_every": 10},
        "optim": {"max_steps": 10}})


# --- the order -------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [16, 30, 111])
def test_the_order_is_every_row_once_mixed_across_shards_within_a_window(shards, window):
    full = load_blocks(shards, "train")  # the independent reader: every row, manifest order
    n = len(full)
    order = order_of(shards, seed=11, window=window)
    assert sorted(order) == list(range(n))  # each row once per epoch
    assert order != list(range(n))  # shuffled
    # a window mixes rows of more than one shard (every window here spans a shard boundary
    # in the shuffled shard order, or is larger than the biggest shard)
    shard_of = np.repeat(np.arange(len(SHARDS)), SHARDS)
    spans = [set(shard_of[order[j:j + window]]) for j in range(0, n, window)]
    assert any(len(s) > 1 for s in spans)
    # bounded: a window holds rows of consecutive shards of one shard order only; so each
    # shard's rows sit in at most ceil(its rows / window) + 1 windows
    for s, rows in enumerate(SHARDS):
        holding = {p // window for p, i in enumerate(order) if shard_of[i] == s}
        assert len(holding) <= -(-rows // window) + 1, (s, holding)
    # the rows themselves are the files' rows: tokens too, not just the first one
    got = torch.cat([torch.from_numpy(c.astype(np.int64)) for c in stream_rows(
        shards, "train", 11, window=window, start=0, rank=0, world=1)])
    assert torch.equal(got, full[order])


def test_one_window_is_the_local_loaders_order_and_no_shuffle_is_file_order(shards):
    cfg = cfg_for(shards, batch_size=1, window=10_000)
    full = load_blocks(shards, "train")
    for epoch in (0, 1):
        local = ids(local_batches(full, cfg, epoch, 0, 0, 1))
        assert ids(stream_batches(shards, cfg, epoch, 0, 0, 1)) == local
    assert ids(stream_batches(shards, cfg_for(shards, batch_size=1, shuffle=0), 0, 0, 0, 1)) \
        == list(range(sum(SHARDS)))


def test_the_order_depends_on_the_seed_and_epoch_only(shards):
    a = order_of(shards, shuffle_seed(5, 0), 16)
    assert order_of(shards, shuffle_seed(5, 0), 16) == a
    assert order_of(shards, shuffle_seed(5, 1), 16) != a
    assert order_of(shards, shuffle_seed(6, 0), 16) != a
    # the positions' rows, computed without reading: what the readers returned
    n = sum(SHARDS)
    assert split_order({"splits": {"train": {"files": [{"rows": r} for r in SHARDS]}}},
                       "train", 16, shuffle_seed(5, 0)).rows_at(np.arange(n)).tolist() == a


# --- every rank, every start, any worker count ----------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_r_from_position_p_reads_the_uninterrupted_rows_at_its_positions(shards, world):
    window, n = 16, sum(SHARDS)
    full = order_of(shards, 7, window)
    # starts at 0, inside a window, on a window boundary, just before one, near the end
    for start in (0, 5, 16, 31, 47, 100, 110, n):
        end = start + (n - start) // world * world  # equal shares
        for rank in range(world):
            got = ids(stream_rows(shards, "train", 7, window=window, start=start, rank=rank,
                                  world=world))
            assert got == full[start + rank:end:world], (world, start, rank)
            assert len(got) == (n - start) // world


def test_one_step_of_all_ranks_is_the_same_stretch_of_the_order_whatever_the_world(shards):
    """Batches of b rows on w ranks: step k of all ranks together takes positions
    [start + k*w*b, start + (k+1)*w*b) of the uninterrupted order, as a set; resuming at a
    step boundary of one shape with another shape continues the same sequence."""
    window, b = 16, 3
    cfg = cfg_for(shards, batch_size=b, window=window)
    seed = shuffle_seed(cfg.run.seed, 0)
    full = order_of(shards, seed, window)
    for world in (1, 2, 3):
        for start in (0, 18, 42):  # 42: step 7 of 2x3 rows, step 14 of 1x3, step 5 of 3x3 (45)
            ranks = [list(stream_batches(shards, cfg, 0, start, r, world)) for r in range(world)]
            assert len({len(r) for r in ranks}) == 1  # every rank runs the same number of steps
            steps = len(ranks[0])
            assert steps == (sum(SHARDS) - start) // world // b
            for k in range(steps):
                union = sorted(i for r in ranks for i in ids([r[k]]))
                lo = start + k * world * b
                assert union == sorted(full[lo:lo + world * b]), (world, start, k)


def test_prefetching_changes_nothing_and_forwards_errors(shards, tmp_path):
    for world, rank in ((1, 0), (3, 2)):
        args = dict(window=16, start=9, rank=rank, world=world)
        assert ids(stream_rows(shards, "train", 3, prefetch=True, **args)) == \
            ids(stream_rows(shards, "train", 3, prefetch=False, **args))
    # a shard that changed after it was written: the error names the file and the field,
    # raised in the caller when the background thread reaches it
    bad = write_shards(tmp_path / "bad", [10, 10, 10])
    rows = pq.read_table(bad / "train-00001.parquet")
    pq.write_table(rows.slice(0, 9), bad / "train-00001.parquet")
    it = stream_rows(bad, "train", None, window=10, start=0, rank=0, world=1)
    assert ids([next(it)]) == list(range(10))  # the first window is fine
    with pytest.raises(ValueError, match=r"train-00001\.parquet: sha256 .* field "
                                         r"splits\.train\.files\[1\]\.sha256"):
        next(it)
    (bad / "train-00002.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"train-00002\.parquet: file listed in .* "
                                                r"splits\.train\.files\[2\]\.path is missing"):
        list(stream_rows(bad, "train", None, window=10, start=20, rank=0, world=1))


def test_memory_holds_a_window_not_the_split(tmp_path):
    """A split of 128 shards of 500 rows of 65 ids (16.6 MB as int32), windows of 700 rows
    (spanning shards). Python's allocations while one reader streams the whole epoch stay
    below what the loader may hold at once, far below the split: the window being read and
    the rank's share of it made from it, one share queued, the caller's current and previous
    shares (on one worker a share is the whole window), and the file of the shard being read
    and the one before it. (Python's: the modules it imports are imported before.)"""
    root = write_shards(tmp_path / "big", [500] * 128, block_len=64, vocab=1 << 16)
    row_bytes = 65 * 4
    split_bytes, window_bytes = 64_000 * row_bytes, 700 * row_bytes
    file_bytes = max(f.stat().st_size for f in root.glob("train-*.parquet"))
    n = 0
    list(stream_rows(root, "train", 1, window=700, start=63_000, rank=0, world=1))  # imports
    tracemalloc.start()
    try:
        for chunk in stream_rows(root, "train", 1, window=700, start=0, rank=0, world=1):
            n += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 64_000
    bound = 6 * window_bytes + 2 * file_bytes
    assert bound < split_bytes / 10
    assert peak < bound, (peak, bound)


def test_bad_settings_are_refused_naming_the_field(shards):
    with pytest.raises(ValueError, match="data.shuffle_window"):
        cfg_for(shards, window=0)
    with pytest.raises(ValueError, match="data.loader"):
        TrainConfig.from_dict({"data": {"loader": "streaming"}})
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        SampleOrder([3, 4], 0, None)
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world=2\)"):
        next(stream_rows(shards, "train", None, window=4, start=0, rank=2, world=2))


# --- a bucket ------------------------------------------------------------------------------------
def test_streams_from_a_bucket_as_from_a_path(shards, s3_bucket):
    """The same dataset uploaded to a real S3 server (SeaweedFS): every rank reads the same
    rows from the bucket as from the local copy."""
    from sparsebk.storage.store import open_store

    uri = s3_bucket("stream-ds")
    open_store(uri).upload(shards, last="manifest.json")
    for world in (1, 2):
        for rank in range(world):
            args = dict(window=16, start=21, rank=rank, world=world)
            assert ids(stream_rows(uri, "train", 4, **args)) == \
                ids(stream_rows(shards, "train", 4, **args))



def test_bench_data_quick_run_reports_what_it_measured(shards, s3_bucket, tmp_path, capsys):
    """`sparsebk bench data --quick`'s loader comparison and its time to the first step on a
    dataset in a bucket: the JSON holds what it printed, and its figures agree with each
    other (tokens/s from the step time, the ratio from the tokens/s)."""
    from sparsebk.bench import data as bench_data
    from sparsebk.bench.common import format_table
    from sparsebk.storage.store import open_store

    uri = s3_bucket("bench-ds")
    open_store(uri).upload(shards, last="manifest.json")
    out = tmp_path / "out"
    assert bench_data.main(["--out", str(out), "--quick", "--no-prepare", "--train-data",
                            str(shards), "--bucket-data", uri, "--window", "16",
                            "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    rec = json.loads((out / "data.json").read_text())
    train = {r["loader"]: r for r in rec["training"]}
    assert set(train) == {"local (in memory)", "stream", "stream, no prefetch thread"}
    for r in train.values():
        assert r["windows"] == 1 and 0 <= r["data_wait_pct"] <= 100
        assert r["tokens_per_s"] == pytest.approx(4 * BLOCK_LEN / (r["step_ms"] / 1e3), rel=1e-9)
        assert r["ratio_to_local"] == pytest.approx(
            r["tokens_per_s"] / train["local (in memory)"]["tokens_per_s"], rel=1e-9)
    first = {r["what"]: r for r in rec["first_step"]}
    assert {"loader stream", "loader stream, resumed mid-epoch",
            "loader local (whole split)"} <= set(first)
    for r in first.values():
        assert r["train_rows"] == sum(SHARDS) and r["first_step_s"] > 0
        if r["what"].startswith("loader"):  # the first batch comes before the step's end
            assert 0 < r["first_batch_s"] <= r["first_step_s"]
    assert format_table(rec["training"]) in printed and format_table(rec["first_step"]) in printed


# --- real Ray Train runs -------------------------------------------------------------------------
TINY = Path(__file__).resolve().parents[1] / "ray_jobs" / "configs" / "tiny.yaml"
# 2 workers of 8 rows: 16 samples a step; windows of 40 rows: a window boundary every 2.5 steps
STREAM = ("data.loader=stream", "data.shuffle_buffer=1", "data.shuffle_window=40",
          "optim.max_steps=12", "run.eval_every=4", "run.log_every=4", "run.plots=false",
          "optim.warmup_steps=1")


def tiny_stream(workdir: Path, name: str, *overrides: str):
    from sparsebk.train.config import load_config

    return load_config(TINY, [f"data.dir={workdir / 'data' / 'tiny'}",
                              f"run.storage_path={workdir / 'runs'}", f"run.name={name}",
                              *STREAM, *overrides])


def trained_rows(run_dir: Path) -> dict[int, list[list[int]]]:
    """{step: [rank 0's rows, rank 1's rows, ...]} from the ranks' schedule records (CRC-32s
    of the rows each rank trained on); a step trained twice (before and after a restart)
    keeps its last record."""
    out: dict[int, dict[int, list[int]]] = {}
    for f in sorted((run_dir / "schedule").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out.setdefault(r["step"], {})[int(f.stem[4:])] = r["rows"]
    return {s: [ranks[k] for k in sorted(ranks)] for s, ranks in sorted(out.items())}


def in_order(steps: dict[int, list[list[int]]], first: int) -> list[int]:
    """The rows of steps `first`.. in the global order: within a step rank r's i-th row is
    position i * world + r."""
    return [row for s in sorted(steps) if s >= first for group in zip(*steps[s]) for row in group]


def final_weights(run_dir: Path) -> dict:
    snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    name = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
    state = torch.load(run_dir / name / "state.pt", weights_only=True)
    return state


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_an_interrupted_run_resumes_on_the_same_rows_for_any_worker_count(ray_local, tmp_path):
    """A: 12 uninterrupted steps on 2 workers. B: the same, a worker failing at step 7 (Ray
    restarts the workers from the step-4 checkpoint). C: the same, a worker exiting at step 7
    with no retry left (the run stops), then run again on 1 worker. B ends on A's weights
    bit for bit having trained every step on A's rows; C trains from sample 64 on exactly
    the rows A's order holds there; A's rows are the SampleOrder's over the files as
    load_blocks reads them."""
    import zlib

    from sparsebk.data.manifest import load_manifest
    from sparsebk.train.ray_train.driver import RunFailed, run_training

    a = tiny_stream(tmp_path, "a")
    run_training(a)
    runs = tmp_path / "runs"
    rows_a = trained_rows(runs / "a")
    assert sorted(rows_a) == list(range(1, 13)) and all(len(r) == 2 for r in rows_a.values())

    # A's rows are the order's: positions 0..191 of epoch 0, read independently
    data = Path(a.data.dir)
    full = load_blocks(data, "train")
    order = split_order(load_manifest(data), "train", 40, shuffle_seed(a.run.seed, 0))
    want = [zlib.crc32(full[i].numpy().tobytes()) for i in order.rows_at(np.arange(192))]
    assert in_order(rows_a, 1) == want

    run_training(tiny_stream(tmp_path, "b", "run.inject_faults=[raise@7]", "run.max_failures=1"))
    assert (runs / "b" / "faults" / "raise@7").is_file()
    assert trained_rows(runs / "b") == rows_a
    wa, wb = final_weights(runs / "a"), final_weights(runs / "b")
    assert wa["step"] == wb["step"] == 12
    for name, tensor in wa["model"].items():
        assert torch.equal(tensor, wb["model"][name]), name

    with pytest.raises(RunFailed):
        run_training(tiny_stream(tmp_path, "c", "run.inject_faults=[exit@7]",
                                 "run.max_failures=0"))
    summary = run_training(tiny_stream(tmp_path, "c", "run.inject_faults=[exit@7]",
                                       "run.max_failures=0", "run.num_workers=1"))
    assert summary["steps"] == 12
    rows_c = trained_rows(runs / "c")
    resumed = {s: r for s, r in rows_c.items() if s > 4}
    assert all(len(r) == 2 for s, r in rows_c.items() if s <= 4)  # rank 1's record: steps 1-6
    assert in_order({s: r[:1] for s, r in resumed.items()}, 5) == in_order(rows_a, 1)[64:128]
    assert final_weights(runs / "c")["data_position"]["sample_in_epoch"] == 128
