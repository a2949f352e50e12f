"""Preparing text in-process and on Ray Data: the same files from both engines, a split that
depends on each document alone, the word vocabulary from merged per-part counts, resume
after a killed run, a real bucket, memory bounded by a shard, and the benchmark's quick run.

References: the rule written out plainly (tests/text_reference.py), `WordTokenizer.build` over
the whole train text, and an uninterrupted run for the resumed one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from sparsebk.data import load_manifest, load_tokenizer, prepare_dataset
from sparsebk.data.engines import RAY_BYTES, pick_engine
from sparsebk.data.manifest import sha256_file
from sparsebk.data.prepare import run_preparation
from sparsebk.data.tokenizers import WordTokenizer
from conftest import grow_tmpfs, mounted_tmpfs
from text_reference import SPLIT_NAMES, reference_documents

WORDS = ("the a red big small cat dog bird runs sits flies on under over quickly slowly . , ; "
         "café naïve 日本 emoji").split()


def write_corpus(root: Path, files: int, lines: int, seed: int = 0) -> Path:
    """`files` text files of `lines` distinct lines of random words."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        text = "".join(f"{f}.{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) + "\n"
                       for i in range(lines))
        (root / f"doc-{f:02d}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), files=6, lines=1500)  # ~330 KB


def dataset_files(out: Path) -> dict[str, str]:
    """{name: sha256} of a dataset's files but its manifest (whose created_unix differs)."""
    return {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.name != "manifest.json"}


def without_time(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "created_unix"}


def reference_train_text(root: Path, doc_bytes: int, valid: float, test: float) -> str:
    return "".join(d.decode() for f in sorted(root.glob("*.txt"))
                   for s, d in reference_documents(f.read_bytes(), doc_bytes, valid, test) if s == "train")


def _kill_after_parts(proc, out, parts: int) -> None:
    """SIGKILL the preparation `proc` (its whole session) once `parts` parts are recorded in
    `out`; it must not have finished (no manifest)."""
    deadline = time.monotonic() + 120
    while len(list((out / ".prepare").glob("part-*.json"))) < parts and time.monotonic() < deadline \
            and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "manifest.json").exists()


# ---------------------------------------------------------------- the engines agree


@pytest.mark.ray
def test_ray_engine_writes_the_same_files_as_the_local_one(ray_local, corpus, tmp_path):
    ray_local.data.DataContext.get_current().enable_progress_bars = False
    args = dict(text=str(corpus / "*.txt"), tokenizer="word", block_len=16, rows_per_file=64,
                part_bytes=48 << 10, doc_bytes=1024)
    local, ls = run_preparation(tmp_path / "local", engine="local", **args)
    ray, rs = run_preparation(tmp_path / "ray", engine="ray", **args)
    assert (ls["engine"], rs["engine"]) == ("local", "ray") and ls["parts"] == rs["parts"] >= 6
    assert rs["worker_pids"] >= 1 and rs["cpus"] == 4  # the parts ran in Ray's workers
    assert dataset_files(ray) == dataset_files(local) and len(dataset_files(local)) > rs["parts"]
    assert without_time(load_manifest(ray)) == without_time(load_manifest(local))
    # the vocabulary from the merged per-part counts equals one count of the whole train text
    whole = WordTokenizer.build(reference_train_text(corpus, 1024, 0.05, 0.05))
    assert load_tokenizer(ray).vocab == whole.vocab and len(whole.vocab) > len(WORDS) + 2
    # asked again with either engine: reused, nothing made
    assert run_preparation(tmp_path / "ray", engine="local", **args)[1] == {"reused": True, "text_read": False}


@pytest.mark.ray
def test_ray_engine_prepares_into_a_bucket(ray_local, s3_bucket, corpus, tmp_path):
    from sparsebk.data.manifest import check_dataset
    from sparsebk.storage.store import open_store

    ray_local.data.DataContext.get_current().enable_progress_bars = False
    args = dict(text=str(corpus / "*.txt"), tokenizer="gpt2", block_len=32, rows_per_file=256,
                part_bytes=96 << 10)
    local = prepare_dataset(tmp_path / "local", engine="local", **args)
    uri = s3_bucket("prepared-on-ray")
    assert prepare_dataset(uri, engine="ray", **args) == uri
    store = open_store(uri)
    assert not store.exists(".prepare")  # the progress records go once the manifest is there
    assert {n: hashlib.sha256(store.read_bytes(n)).hexdigest() for n in store.list() if n != "manifest.json"} \
        == dataset_files(local)
    assert without_time(check_dataset(uri)) == without_time(load_manifest(local))


@pytest.mark.ray
def test_text_in_a_bucket_prepares_as_the_same_text_on_disk(ray_local, s3_bucket, corpus, tmp_path):
    """Text read from objects (a glob, or every .txt under a prefix) by Ray Data's tasks gives
    the files the same text gives from a local folder; unchanged objects are not read again;
    a changed one, a missing prefix or a glob matching nothing is a one-line error."""
    from sparsebk.storage.store import join_location, open_store

    ray_local.data.DataContext.get_current().enable_progress_bars = False
    base = s3_bucket("texts")
    texts = open_store(base)
    for p in sorted(corpus.glob("*.txt")):
        texts.write_bytes(f"corpus/{p.name}", p.read_bytes())
    texts.write_text("corpus/notes.md", "not part of the corpus\n")
    args = dict(tokenizer="gpt2", block_len=32, rows_per_file=256, part_bytes=96 << 10)
    local = prepare_dataset(tmp_path / "local", text=str(corpus / "*.txt"), engine="local", **args)
    on_ray = prepare_dataset(tmp_path / "ray", text=join_location(base, "corpus/*.txt"), engine="ray", **args)
    assert dataset_files(on_ray) == dataset_files(local)
    m_local, m_ray = load_manifest(local), load_manifest(on_ray)
    assert m_ray["source"]["sha256"] == m_local["source"]["sha256"]
    assert m_ray["splits"] == m_local["splits"] and m_ray["vocab_size"] == m_local["vocab_size"]
    assert [f.rsplit("?", 1)[0].rsplit("/", 1)[1] for f in m_ray["source"]["files"]] \
        == sorted(p.name for p in corpus.glob("*.txt"))
    prefix = join_location(base, "corpus")  # the same objects: .txt under the prefix
    assert run_preparation(on_ray, text=prefix, engine="local", **args)[1] == {"reused": True, "text_read": False}
    texts.write_text("corpus/doc-00.txt", "changed\n")
    with pytest.raises(ValueError, match=r"field source\.sha256 differs"):
        prepare_dataset(on_ray, text=prefix, engine="local", **args)
    for spec, message in ((join_location(base, "nothing"), "no such object, and no .txt object under it"),
                          (join_location(base, "corpus/*.json"), "no object matches it as a glob")):
        with pytest.raises(ValueError, match=message):
            prepare_dataset(tmp_path / "never", text=spec, engine="local", **args)
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------- the split rule


def _part_text(out: Path, split: str) -> str:
    """A split's text read back from a byte dataset of block_len 1 (every id is in a row):
    each part's stream from its own shards, <eos> dropped, parts in order."""
    text = b""
    for part in sorted({p.name.split("-")[1] for p in out.glob(f"{split}-*.parquet")}):
        rows = np.concatenate([np.array(pq.read_table(p).column(0).to_pylist(), dtype=np.int64)
                               for p in sorted(out.glob(f"{split}-{part}-*.parquet"))])
        ids = np.r_[rows[:, 0], rows[-1, 1]]
        text += bytes(ids[ids != 256].astype(np.uint8).tolist())
    return text.decode()


def test_hash_split_holds_whatever_the_part_size(corpus, tmp_path):
    want = {s: "".join(d.decode() for f in sorted(corpus.glob("*.txt"))
                       for sp, d in reference_documents(f.read_bytes(), 512, 0.1, 0.1) if sp == s)
            for s in SPLIT_NAMES}
    lengths = [len(d) for f in sorted(corpus.glob("*.txt")) for _, d in reference_documents(f.read_bytes(), 512, 0, 0)]
    starts = np.cumsum(lengths) - lengths  # each document's first byte in the corpus
    counts = []
    for part_bytes in (20 << 10, 1 << 20):
        out = prepare_dataset(tmp_path / f"p{part_bytes}", text=str(corpus), tokenizer="byte", block_len=1,
                              doc_bytes=512, valid_fraction=0.1, test_fraction=0.1, part_bytes=part_bytes,
                              engine="local")
        m = load_manifest(out)
        assert m["parts"] == len({start // part_bytes for start in starts})
        for split in SPLIT_NAMES:
            assert _part_text(out, split) == want[split], (part_bytes, split)
        counts.append({s: m["splits"][s]["documents"] for s in SPLIT_NAMES})
    assert counts[0] == counts[1] and min(counts[0].values()) > 10


def test_auto_engine_choice(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert pick_engine("auto", 10 << 20, 16 << 20, connected=True) == "local"  # one part: nothing to spread
    assert pick_engine("auto", 100 << 20, 16 << 20, connected=False) == "local"
    assert pick_engine("auto", 100 << 20, 16 << 20, connected=True) == "ray"
    assert pick_engine("auto", RAY_BYTES + 1, 16 << 20, connected=False) == "ray"
    assert pick_engine("local", RAY_BYTES + 1, 16 << 20, connected=True) == "local"
    assert pick_engine("ray", 1 << 20, 16 << 20, connected=False) == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert pick_engine("auto", 100 << 20, 16 << 20, connected=False) == "ray"
    assert pick_engine("auto", 1 << 20, 16 << 20, connected=False) == "local"


# ---------------------------------------------------------------- resume after a kill


def test_a_killed_preparation_resumes_and_keeps_its_finished_parts(tmp_path):
    text = write_corpus(tmp_path / "text", files=4, lines=25_000, seed=1)  # ~5 MB
    out = tmp_path / "ds"
    cli = ["--text", str(text / "*.txt"), "--tokenizer", "gpt2", "--block-len", "64", "--part-mb", "0.125",
           "--engine", "local", "--rows-per-file", "512"]
    proc = subprocess.Popen([sys.executable, "-m", "sparsebk.cli", "prepare-data", *cli, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    _kill_after_parts(proc, out, 3)
    records = [json.loads(p.read_text()) for p in sorted((out / ".prepare").glob("part-*.json"))]
    kept = {f["path"]: ((out / f["path"]).stat().st_ino, (out / f["path"]).stat().st_mtime_ns)
            for r in records for s in SPLIT_NAMES for f in r["splits"][s]["files"]}
    assert len(records) >= 3 and kept
    args = dict(text=str(text / "*.txt"), tokenizer="gpt2", block_len=64, part_bytes=1 << 17, rows_per_file=512,
                engine="local")
    _, stats = run_preparation(out, **args)
    assert stats["parts_kept"] == len(records) and stats["parts"] > len(records)
    assert {p: ((out / p).stat().st_ino, (out / p).stat().st_mtime_ns) for p in kept} == kept  # untouched
    whole = prepare_dataset(tmp_path / "whole", **args)
    assert dataset_files(out) == dataset_files(whole)
    assert without_time(load_manifest(out)) == without_time(load_manifest(whole))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())  # no leftovers


@pytest.mark.ray
def test_a_killed_ray_driver_resumes_on_ray(ray_local, tmp_path):
    """The driver of a Ray-engine preparation (connected to this session's Ray through
    RAY_ADDRESS: auto picks Ray) killed mid-run; the same call on Ray finishes it."""
    ray_local.data.DataContext.get_current().enable_progress_bars = False
    text = write_corpus(tmp_path / "text", files=2, lines=6_000, seed=2)  # ~0.55 MB: 9 parts
    out = tmp_path / "ds"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    cli = ["prepare-data", "--text", str(text / "*.txt"), "--tokenizer", "byte", "--block-len", "64",
           "--part-mb", "0.0625", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "sparsebk.cli", *cli], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    _kill_after_parts(proc, out, 2)
    args = dict(text=str(text / "*.txt"), tokenizer="byte", block_len=64, part_bytes=1 << 16)
    _, stats = run_preparation(out, engine="ray", **args)
    assert stats["engine"] == "ray" and 2 <= stats["parts_kept"] < stats["parts"]
    whole = prepare_dataset(tmp_path / "whole", engine="local", **args)
    assert dataset_files(out) == dataset_files(whole)
    assert without_time(load_manifest(out)) == without_time(load_manifest(whole))


@pytest.mark.ray
def test_a_disk_that_fills_on_ray_stops_with_the_reason_and_resumes(ray_local, tmp_path):
    """A Ray-engine preparation (the CLI, which picks Ray from RAY_ADDRESS) onto a tmpfs with
    room for about a third of the dataset: a worker's write fails with ENOSPC, and the driver
    says so in one line (exit 1, no traceback, not Ray's task error), leaves no manifest and no
    partial file, and keeps the parts it recorded; with room made, the same preparation on Ray
    keeps them untouched and ends with the files of an uninterrupted local run."""
    ray_local.data.DataContext.get_current().enable_progress_bars = False
    text = write_corpus(tmp_path / "text", files=2, lines=6_000, seed=3)  # ~0.55 MB: 9 parts
    args = dict(text=str(text / "*.txt"), tokenizer="byte", block_len=64, part_bytes=1 << 16)
    whole = prepare_dataset(tmp_path / "whole", engine="local", **args)
    size = sum(p.stat().st_size for p in whole.iterdir())
    with mounted_tmpfs(size // 3) as disk:
        out = Path(disk) / "ds"
        env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
        proc = subprocess.run([sys.executable, "-m", "sparsebk.cli", "prepare-data", "--text", args["text"],
                               "--tokenizer", "byte", "--block-len", "64", "--part-mb", "0.0625", "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=300)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert last.startswith(f"sparsebk prepare-data: {out}: ") and "No space left on device" in last, last
        assert last.endswith("the same command resumes from them")
        assert not (out / "manifest.json").exists() and not list(out.rglob("*.tmp"))
        records = [json.loads(p.read_text()) for p in sorted((out / ".prepare").glob("part-*.json"))]
        kept = {f["path"]: ((out / f["path"]).stat().st_ino, (out / f["path"]).stat().st_mtime_ns)
                for r in records for s in SPLIT_NAMES for f in r["splits"][s]["files"]}
        assert records and kept
        grow_tmpfs(disk, 3 * size)
        _, stats = run_preparation(out, engine="ray", **args)
        assert stats["engine"] == "ray" and stats["parts_kept"] == len(records) < stats["parts"]
        assert {p: ((out / p).stat().st_ino, (out / p).stat().st_mtime_ns) for p in kept} == kept  # untouched
        assert dataset_files(out) == dataset_files(whole)
        assert without_time(load_manifest(out)) == without_time(load_manifest(whole))
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())  # no leftovers


# ---------------------------------------------------------------- memory


# the child's own peak: /proc's VmHWM (ru_maxrss would carry over the forking parent's peak)
_PEAK = """
import sys
from sparsebk.data.prepare import prepare_dataset
prepare_dataset(sys.argv[1], text=sys.argv[2], tokenizer="byte", block_len=128, engine="local")
print([int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0])
"""


def _peak_rss(out: Path, text: Path) -> int:
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(out), str(text)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    block = "".join(f"line {i} " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(i % 13 + 2)) + "\n"
                    for i in range(20_000)).encode()  # ~1 MB
    sizes = {}
    for name, copies in (("small", 10), ("big", 40)):
        with open(tmp_path / f"{name}.txt", "wb") as f:
            for k in range(copies):
                f.write(f"copy {k}\n".encode() + block)
        sizes[name] = (tmp_path / f"{name}.txt").stat().st_size
    base = _peak_rss(tmp_path / "ds-small", tmp_path / "small.txt")
    peak = _peak_rss(tmp_path / "ds-big", tmp_path / "big.txt")
    # What grows with the text is the plan (per document: 29 bytes scanned + 40 in its part's
    # item); each process also holds, whatever the text, one shard's ids, blocks and Parquet
    # bytes per split (rows_per_file x (block_len + 1) int32 each): allow that set twice more
    # for what an allocator keeps. The whole-corpus preparation grew ~8x the extra text.
    extra = sizes["big"] - sizes["small"]
    shard = 4096 * 129 * 4
    bound = 70 * (extra // 4096 + 1) + 2 * 3 * 3 * shard
    print(f"ROW peak RSS {base / 2**20:.0f} MB ({sizes['small'] / 2**20:.0f} MB text) -> {peak / 2**20:.0f} MB "
          f"({sizes['big'] / 2**20:.0f} MB text); growth bound {bound / 2**20:.0f} MB; the whole-corpus "
          f"preparation: ~{8 * extra / 2**20:.0f} MB more")
    assert peak - base < bound
    assert load_manifest(tmp_path / "ds-big")["splits"]["train"]["tokens"] > 0.8 * sizes["big"]


# ---------------------------------------------------------------- the benchmark


def test_bench_prepare_quick_reports_what_it_prepared(tmp_path):
    from sparsebk.bench import prepare as bench

    out = tmp_path / "out"
    assert bench.main(["--quick", "--out", str(out), "--corpus-dir", str(tmp_path / "corpora")]) == 0
    rec = json.loads((out / "prepare.json").read_text())
    (row,) = rec["rows"]
    assert row["engine"] == "local" and row["text_mb"] == 2 and row["cpus"] == 1
    corpus = tmp_path / "corpora" / "py-2MB"
    assert sum(p.stat().st_size for p in corpus.glob("*.txt")) == 2 << 20
    # the same corpus prepared here gives the tokens the benchmark counted
    ds = prepare_dataset(tmp_path / "ds", text=str(corpus), tokenizer="gpt2", block_len=256,
                         part_bytes=1 << 19, engine="local")
    assert row["tokens"] == sum(s["tokens"] for s in load_manifest(ds)["splits"].values())
    assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"])
    assert row["worker_rss_mb"] == row["driver_rss_mb"] > 0


def test_bench_bucket_quick_reports_what_it_measured(s3_bucket, tmp_path, capsys):
    """`sparsebk bench bucket --quick --no-train`: its preparation row counts the tokens the
    dataset's manifest holds, and its reuse rows say whether the text was read."""
    from sparsebk.bench import bucket
    from sparsebk.bench.common import format_table

    uri = s3_bucket("bench-bucket")
    out = tmp_path / "out"
    assert bucket.main(["--out", str(out), "--quick", "--no-train", "--bucket", uri,
                        "--corpus-dir", str(tmp_path / "corpus")]) == 0
    rec = json.loads((out / "bucket.json").read_text())
    m = load_manifest(uri)
    prep, now, before = rec["rows"]
    assert prep["tokens"] == sum(s["tokens"] for s in m["splits"].values())
    assert prep["text_mb"] * (1 << 20) == m["source"]["bytes"] and prep["seconds"] > 0
    assert (now["text_read"], before["text_read"]) == (False, True) and now["seconds"] > 0
    assert format_table(rec["rows"], bucket.COLUMNS) in capsys.readouterr().out
