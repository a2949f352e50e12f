"""`sparsebk export`, `sparsebk eval` and `sparsebk generate`: thin command lines over
sparsebk.inference.export and sparsebk.inference.generate.

    sparsebk eval --run tiny [--storage-path s3://bucket/runs?endpoint_override=...] --split test
    sparsebk eval --checkpoint s3://bucket/runs/tiny/checkpoint_...?endpoint_override=...
    sparsebk export --run tiny --out models/tiny
    sparsebk eval --model models/tiny [--data DATASET_DIR_OR_URI] [--stride 16] --json

`add_source_args` gives `sparsebk generate` the same ways to name a model. A bad input exits
with code 2 and one line naming the path or URI at fault.
"""

from __future__ import annotations

import argparse
import json
import sys

STORAGE_HELP = ("where runs are: a local path or a URI such as s3://bucket/runs?endpoint_override="
                "HOST:PORT&scheme=http (default: training's run.storage_path, runs under "
                "$SPARSEBK_HOME)")


def add_source_args(p: argparse.ArgumentParser, *, model_source: bool) -> None:
    """--run NAME | --config YAML | --checkpoint PATH_OR_URI [| --model DIR], --storage-path
    and --set (read by `load_source`)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run's name: its best checkpoint (lowest val_loss)")
    src.add_argument("--config", help="a training config (YAML): the run it names (run.name "
                     "under run.storage_path), its best checkpoint")
    src.add_argument("--checkpoint",
                     help="a checkpoint folder or a run folder (a local path or a URI)")
    if model_source:
        src.add_argument("--model", help="a folder written by `sparsebk export`")
    p.add_argument("--storage-path", default=None, help=STORAGE_HELP)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with --config: override a field, as for `sparsebk train`")


def load_source(args: argparse.Namespace, device="cpu"):
    """The model `add_source_args`' options name (sparsebk.inference.export.Pretrained)."""
    from sparsebk.inference.export import load

    run, storage_path = args.run, args.storage_path
    if args.config is not None:
        from sparsebk.train.config import load_config

        cfg = load_config(args.config, args.overrides).run
        run, storage_path = cfg.name, storage_path or cfg.storage_path
    elif args.overrides:
        raise ValueError("--set goes with --config (a training config's fields)")
    return load(run=run, storage_path=storage_path, checkpoint=args.checkpoint,
                model=getattr(args, "model", None), device=device)


def eval_table(r: dict) -> str:
    layers = " ".join(f"{s:.3f}" for s in r["sparsity_layers"])
    return "\n".join([
        f"model       {r['source']} (run {r['run_name']}, step {r['step']})",
        f"data        {r['dataset_dir']} split {r['split']}: {r['rows']} rows, {r['tokens']} "
        f"predicted tokens (of {r['split_tokens']} in the split)",
        f"loss        {r['loss']:.4f}   perplexity {r['ppl']:.2f} (independent windows)",
        *([f"sliding     {r['loss_strided']:.4f}   perplexity {r['ppl_strided']:.2f} (windows every "
           f"{r['stride']} tokens)"] if "stride" in r else []),
        *_position_lines(r),
        *_context_lines(r),
        f"sparsity    {r['sparsity']:.3f} (eval mode; per layer {layers})",
        f"speed       {r['tokens_per_s']:.0f} tokens/s ({r['seconds']:.2f} s, batch "
        f"{r['batch_size']}, {r['device']})"])


def _position_lines(r: dict) -> list[str]:
    """`--by-position`: the perplexity by the context a prediction had, in doubling buckets."""
    if "loss_by_position" not in r:
        return []
    from sparsebk.evaluation import position_table, safe_ppl

    return ["by context  " + "   ".join(
        f"{lo}{'' if lo == hi else f'-{hi}'}: {safe_ppl(loss):.1f}"
        for lo, hi, loss in position_table(r["loss_by_position"])) + "  (ids seen: perplexity)"]


def _context_lines(r: dict) -> list[str]:
    """`--by-context N`: the same targets' perplexity from exactly c ids, and each doubling's
    gain in millinats with its paired standard error."""
    if "by_context" not in r:
        return []
    from sparsebk.evaluation import safe_ppl

    t = r["by_context"]
    return ["exactly c   " + "   ".join(f"{c}: {safe_ppl(x):.1f}"
                                        for c, x in zip(t["contexts"], t["loss"]))
            + f"  (ids: perplexity of the same {t['targets']} targets, every {t['every']}-th)",
            "  gain      " + "   ".join(
                f"{c}: {1000 * g:+.0f}" + ("" if se is None else f" +- {1000 * se:.0f}")
                for c, g, se in zip(t["contexts"][1:], t["gain"][1:], t["gain_se"][1:]))
            + "  (millinats over half the ids, +- standard error)"]


def export_main(argv: list[str]) -> int:
    from sparsebk.inference.export import export

    p = argparse.ArgumentParser(prog="sparsebk export",
                                description="write a trained model as a self-contained folder")
    add_source_args(p, model_source=False)
    p.add_argument("--out", required=True, help="a new (or empty) local folder")
    args = p.parse_args(argv)
    try:
        out = export(load_source(args), args.out)
    except (ValueError, OSError) as e:  # OSError: an object store that does not answer
        print(f"sparsebk export: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def eval_main(argv: list[str]) -> int:
    import torch

    from sparsebk.inference.export import evaluate_split

    p = argparse.ArgumentParser(
        prog="sparsebk eval", description="perplexity, eval-mode sparsity and speed on a dataset split")
    add_source_args(p, model_source=True)
    p.add_argument("--split", choices=("valid", "test"), default="valid")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per batch (default: the training run's eval_batch_size)")
    p.add_argument("--data", default=None, help="dataset folder or URI (default: the one the "
                   "model was trained on)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stride", type=int, default=None, metavar="S",
                   help="also the sliding-window perplexity: windows every S tokens, each token "
                        "scored once with at least block_len - S before it (about block_len / S "
                        "times the work)")
    p.add_argument("--by-position", action="store_true",
                   help="also the loss at each position of the window (the context a prediction "
                        "had), printed as perplexity over 1, 2-3, 4-7, ... ids of context")
    p.add_argument("--by-context", type=int, default=None, metavar="N",
                   help="also every N-th target scored from exactly 1, 2, 4, ..., block_len ids "
                        "of context (the same targets at each; about 255 / N evaluations at "
                        "block_len 128)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if args.by_context is not None and args.by_context < 1:
        p.error(f"--by-context={args.by_context}: must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size={args.batch_size}: must be >= 1")
    if args.stride is not None and args.stride < 1:
        p.error(f"--stride={args.stride}: must be >= 1")
    try:
        m = load_source(args)
        r = evaluate_split(m, args.split, batch_size=args.batch_size, data_dir=args.data,
                           device=args.device, stride=args.stride,
                           by_position=args.by_position, by_context_every=args.by_context)
    except (ValueError, OSError) as e:
        print(f"sparsebk eval: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=2) if args.json else eval_table(r))
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    import random

    import torch

    from sparsebk.inference.generate import StreamDecoder, check_sampling, encode_prompt, generate

    p = argparse.ArgumentParser(prog="sparsebk generate",
                                description="sample a continuation of a prompt, printed as it comes")
    add_source_args(p, model_source=True)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the likeliest tokens whose probability reaches p")
    p.add_argument("--seed", type=int, default=None,
                   help="fixes the draws (default: a random seed, printed on stderr)")
    p.add_argument("--stop-at-eos", action="store_true",
                   help="stop at the end-of-document token (the word tokenizer's <eos> is a "
                        "line end: it does not stop unless asked)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        m = load_source(args, device=args.device)
        ids = encode_prompt(m.tokenizer, args.prompt)
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 31)
        prompt = torch.tensor([ids], dtype=torch.long, device=args.device)
        stream = generate(m.model.eval(), prompt, args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=seed, eos_id=m.tokenizer.eos_id if args.stop_at_eos else None)
        first = next(stream)  # checks the context length before anything is printed
    except (ValueError, OSError) as e:  # OSError: an object store that does not answer
        print(f"sparsebk generate: {e}", file=sys.stderr)
        return 2
    if args.seed is None:
        print(f"sparsebk generate: --seed {seed} reproduces this", file=sys.stderr)
    out = StreamDecoder(m.tokenizer, ids)
    print(args.prompt, end="", flush=True)
    print(out.push(int(first[0])), end="", flush=True)
    for tok in stream:
        print(out.push(int(tok[0])), end="", flush=True)
    print(out.flush(), flush=True)
    return 0
