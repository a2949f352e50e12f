"""The dataset manifest: what a prepared dataset holds, and the checks a loader runs on it.

Layout of a prepared dataset directory:

    manifest.json              this module's schema (SCHEMA_VERSION)
    vocab.txt                  word tokeniser only; GPT-2 datasets hold encoder.json, vocab.bpe
    train-00000.parquet ...    one column "tokens": list<int32> of block_len + 1 ids per row

The dataset dir is a local path or a URI (s3://, gs://, ...; sparsebk.storage.store): files are read
through pyarrow.fs. Every error names the file and the manifest field (or Parquet column) at
fault.
"""

from __future__ import annotations

import hashlib
import os
import json
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from sparsebk.storage.store import Store, is_uri, open_store

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
FORMAT = "sparsebk-token-blocks"
TOKENS_COLUMN = "tokens"
SPLITS = ("train", "valid", "test")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


def sha256_stream(f, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    while data := f.read(chunk):
        h.update(data)
    return h.hexdigest()


def dataset_store(path: str | Path) -> Store:
    """The Store of a dataset dir, given the dir or its manifest file (a path or a URI)."""
    path = str(path)
    if is_uri(path):
        s = urlsplit(path)
        if PurePosixPath(s.path).name == MANIFEST_NAME:
            path = urlunsplit((s.scheme, s.netloc, str(PurePosixPath(s.path).parent), s.query, ""))
    elif Path(path).name == MANIFEST_NAME:
        path = str(Path(path).parent)
    return open_store(path)


def _require(cond: bool, mpath: Path, field: str, problem: str) -> None:
    if not cond:
        raise ValueError(f"{mpath}: field {field} {problem}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def load_manifest(path: str | Path) -> dict:
    """Read and validate the manifest of a dataset dir (or the manifest file itself), a local
    path or a URI."""
    store = dataset_store(path)
    mpath = store.location(MANIFEST_NAME)
    try:
        text = store.read_text(MANIFEST_NAME)
    except FileNotFoundError:
        raise ValueError(f"{mpath}: no dataset manifest here (file missing); "
                         f"run `sparsebk prepare-data --out {store.uri}` first") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{mpath}: not a readable JSON manifest ({e})") from None
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{mpath}: not a readable JSON manifest ({e})") from None
    _require(isinstance(m, dict), mpath, "<root>", "must be a JSON object")
    _require(m.get("format") == FORMAT, mpath, "format", f"is {m.get('format')!r}, expected {FORMAT!r}")
    _require(m.get("schema_version") == SCHEMA_VERSION, mpath, "schema_version",
             f"is {m.get('schema_version')!r}; this sparsebk reads version {SCHEMA_VERSION} (prepare the data again)")
    for field in ("vocab_size", "block_len"):
        _require(_is_int(m.get(field)) and m[field] > 0, mpath, field, f"must be a positive integer, got {m.get(field)!r}")
    tok = m.get("tokenizer")
    _require(isinstance(tok, dict), mpath, "tokenizer", "must be an object {name, vocab_size, checksum}")
    for field in ("name", "checksum"):
        _require(isinstance(tok.get(field), str), mpath, f"tokenizer.{field}", f"must be a string, got {tok.get(field)!r}")
    _require(tok.get("vocab_size") == m["vocab_size"], mpath, "tokenizer.vocab_size",
             f"is {tok.get('vocab_size')!r} but field vocab_size is {m['vocab_size']}")
    splits = m.get("splits")
    _require(isinstance(splits, dict) and splits, mpath, "splits", "must be a non-empty object {split: {...}}")
    for split, info in splits.items():
        f = f"splits.{split}"
        _require(isinstance(info, dict), mpath, f, "must be an object {rows, tokens, files}")
        for key in ("rows", "tokens"):
            _require(_is_int(info.get(key)) and info[key] >= 0, mpath, f"{f}.{key}",
                     f"must be a non-negative integer, got {info.get(key)!r}")
        files = info.get("files")
        _require(isinstance(files, list), mpath, f"{f}.files", "must be a list")
        for i, entry in enumerate(files):
            ff = f"{f}.files[{i}]"
            _require(isinstance(entry, dict) and isinstance(entry.get("path"), str), mpath, f"{ff}.path",
                     "must be a relative file path")
            _require(not Path(entry["path"]).is_absolute() and ".." not in Path(entry["path"]).parts,
                     mpath, f"{ff}.path", f"must stay inside the dataset dir, got {entry['path']!r}")
            _require(_is_int(entry.get("rows")) and entry["rows"] >= 0, mpath, f"{ff}.rows",
                     f"must be a non-negative integer, got {entry.get('rows')!r}")
            _require(isinstance(entry.get("sha256"), str), mpath, f"{ff}.sha256", "must be a hex string")
        _require(sum(e["rows"] for e in files) == info["rows"], mpath, f"{f}.rows",
                 f"is {info['rows']} but its files hold {sum(e['rows'] for e in files)} rows")
    return m


def check_dataset(path: str | Path, *, vocab_size: int | None = None, block_len: int | None = None,
                  splits=None, verify_checksums: bool = True) -> dict:
    """Check a prepared dataset against its manifest and against what the caller can take.

    vocab_size: the model's vocabulary size; the data's must not exceed it (a larger model
        vocabulary, e.g. padded to a multiple of 64, is fine).
    block_len: the longest sequence the model takes (its n_seq); the data's blocks of
        block_len inputs must not be longer.
    Checks every listed file exists, its SHA-256 (unless verify_checksums=False), its row
    count, column type and block length, and (from the Parquet statistics, without reading
    the data) that every token id is < the manifest's vocab_size. Returns the manifest.
    """
    root = dataset_store(path)
    m = load_manifest(root.uri)
    mpath = root.location(MANIFEST_NAME)
    if vocab_size is not None and m["vocab_size"] > vocab_size:
        raise ValueError(f"{mpath}: field vocab_size={m['vocab_size']} (tokenizer {m['tokenizer']['name']}) "
                         f"is larger than the model's vocab_size={vocab_size}; set the model's vocab_size to "
                         f"at least {m['vocab_size']}")
    if block_len is not None and m["block_len"] > block_len:
        raise ValueError(f"{mpath}: field block_len={m['block_len']} is longer than the model takes "
                         f"(n_seq={block_len}); prepare the data with --block-len {block_len} or less")
    wanted = list(m["splits"]) if splits is None else list(splits)
    for split in wanted:
        if split not in m["splits"]:
            raise ValueError(f"{mpath}: field splits has no split {split!r} (has {', '.join(m['splits'])})")
        for i, entry in enumerate(m["splits"][split]["files"]):
            _check_file(root, mpath, f"splits.{split}.files[{i}]", entry, m, verify_checksums)
    return m


def _check_file(root: Store, mpath: str, field: str, entry: dict, m: dict, verify_checksums: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fpath = root.location(entry["path"])
    if not root.is_file(entry["path"]):
        raise ValueError(f"{fpath}: file listed in {mpath} field {field}.path is missing")
    if verify_checksums:
        with root.fs.open_input_stream(root.path(entry["path"])) as f:
            actual = sha256_stream(f)
        if actual != entry["sha256"]:
            raise ValueError(f"{fpath}: sha256 {actual} differs from {mpath} field {field}.sha256 "
                             f"({entry['sha256']}); the file changed after it was written")
    try:
        pf = pq.ParquetFile(root.fs.open_input_file(root.path(entry["path"])))
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{fpath}: not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    if schema.names != [TOKENS_COLUMN] or not pa.types.is_list(schema.field(0).type) \
            or schema.field(0).type.value_type != pa.int32():
        raise ValueError(f"{fpath}: columns {schema} are not one column {TOKENS_COLUMN!r} of list<int32>")
    md = pf.metadata
    if md.num_rows != entry["rows"]:
        raise ValueError(f"{fpath}: holds {md.num_rows} rows but {mpath} field {field}.rows says {entry['rows']}")
    n_values, hi, lo = 0, None, None
    for g in range(md.num_row_groups):
        col = md.row_group(g).column(0)
        n_values += col.num_values
        st = col.statistics
        if st is not None and st.has_min_max:
            hi = st.max if hi is None else max(hi, st.max)
            lo = st.min if lo is None else min(lo, st.min)
        elif md.row_group(g).num_rows:
            # No statistics (a file written elsewhere): read this row group's ids to bound them.
            import pyarrow.compute as pc

            vals = pf.read_row_group(g).column(0).combine_chunks().flatten()
            mm = pc.min_max(vals)
            hi = mm["max"].as_py() if hi is None else max(hi, mm["max"].as_py())
            lo = mm["min"].as_py() if lo is None else min(lo, mm["min"].as_py())
    if n_values != md.num_rows * (m["block_len"] + 1):
        raise ValueError(f"{fpath}: column {TOKENS_COLUMN} holds {n_values} ids in {md.num_rows} rows, "
                         f"not block_len + 1 = {m['block_len'] + 1} per row ({mpath} field block_len)")
    if hi is not None and (hi >= m["vocab_size"] or lo < 0):
        raise ValueError(f"{fpath}: column {TOKENS_COLUMN} has token ids in [{lo}, {hi}], outside "
                         f"[0, vocab_size={m['vocab_size']}) ({mpath} field vocab_size)")


def tokenizer_files(dataset_dir: str | os.PathLike) -> dict[str, str]:
    """{name: text} of the files that rebuild a dataset's tokenizer (a path or a URI):
    vocab.txt for word; GPT-2's encoder.json and vocab.bpe when the dataset has them; none for
    byte. A checkpoint's meta["tokenizer_files"], read once when training starts, so the
    checkpoint loads without its dataset (sparsebk.inference.export checks them against the tokenizer
    identity's checksum, as it does files read from a dataset)."""
    store = dataset_store(dataset_dir)
    names = load_manifest(store.uri)["tokenizer"].get("files") or []
    return {name: store.read_text(name) for name in names}
