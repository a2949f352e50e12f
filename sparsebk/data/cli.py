"""`sparsebk prepare-data`: tokenise PTB or your text into Parquet blocks (idempotent, resumable;
in this process or on Ray Data)."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsebk prepare-data", description=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--corpus", choices=["ptb"], default="ptb",
                     help="built-in corpus (default: Penn Treebank, Mikolov's LM splits)")
    src.add_argument("--text", metavar="PATH",
                     help="your text instead: a file, a directory of .txt files, or a glob; "
                          "local or in a bucket (s3://bucket/corpus/*.txt?region=...)")
    p.add_argument("--tokenizer", choices=["word", "byte", "gpt2"], default="word")
    p.add_argument("--block-len", type=int, default=128, help="input tokens per block (default 128)")
    p.add_argument("--rows-per-file", type=int, default=4096, help="blocks per Parquet file")
    p.add_argument("--valid-fraction", type=float, default=0.05, help="--text only")
    p.add_argument("--test-fraction", type=float, default=0.05, help="--text only")
    p.add_argument("--max-vocab", type=int, default=None, help="word tokenizer only")
    p.add_argument("--engine", choices=["auto", "local", "ray"], default="auto",
                   help="where the parts run: this process, Ray Data tasks, or auto (Ray when "
                        "connected to a cluster, RAY_ADDRESS is set or the text is over 256 MB, "
                        "and it spans more than one part)")
    p.add_argument("--part-mb", type=float, default=16.0,
                   help="MB of text per part: the unit of parallel work, resume and block packing "
                        "(default 16)")
    p.add_argument("--doc-bytes", type=int, default=None,
                   help="--text only: a document ends at the first line end past this many bytes; "
                        "documents go to splits by the hash of their content (default 4096, less "
                        "for a text under 1 MB: about 256 documents)")
    p.add_argument("--out", required=True,
                   help="output directory (relative: under $SPARSEBK_HOME, default ~/sparsebk, "
                        "as data.dir), or a URI (s3://bucket/data/ptb-word?region=...)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from sparsebk.data.manifest import load_manifest
    from sparsebk.data.prepare import prepare_dataset

    from sparsebk.storage.store import resolve_location

    where = args.out
    try:
        # a relative --out is where data.dir would find it: under $SPARSEBK_HOME, not the cwd
        where = resolve_location(args.out, "--out")
        out = prepare_dataset(where, corpus="text" if args.text else args.corpus, text=args.text,
                              tokenizer=args.tokenizer, block_len=args.block_len,
                              rows_per_file=args.rows_per_file, valid_fraction=args.valid_fraction,
                              test_fraction=args.test_fraction, max_vocab=args.max_vocab,
                              engine=args.engine, part_bytes=max(1, round(args.part_mb * 2**20)),
                              doc_bytes=args.doc_bytes)
    except ValueError as e:
        print(f"sparsebk prepare-data: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a store that refuses: the finished parts stay
        print(f"sparsebk prepare-data: {where}: {e}; the parts finished so far are kept and the "
              f"same command resumes from them", file=sys.stderr)
        return 1
    m = load_manifest(out)
    print(f"{out}: tokenizer {m['tokenizer']['name']} (vocab {m['vocab_size']}), block_len {m['block_len']}")
    for split, info in m["splits"].items():
        print(f"  {split:<5} {info['tokens']:>10,} tokens  {info['rows']:>7,} blocks  {len(info['files'])} files")
    return 0
