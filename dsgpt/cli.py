"""The `dsgpt` command: thin subcommands over the library.

Each subcommand registers itself in `build_parser` with a `func(args) -> int`; `main` turns a
UserError into one `error: ...` line on stderr and exit status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import sys

from dsgpt.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsgpt", description="Train GPT models with DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prepare(sub)
    _add_config(sub)
    _add_failure(sub)
    return parser


def _add_config(sub) -> None:
    p = sub.add_parser(
        "config",
        help="print a run config as resolved from YAML + overrides (or one key of it)",
        description="Resolve a run config exactly as launch/train.py would and print it as YAML, or "
                    "print one dotted key with --get (run.dir gives the run directory).",
    )
    p.add_argument("config", help="run config YAML (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--get", metavar="KEY", help="print only this dotted key, e.g. run.dir or train.max_steps")
    p.set_defaults(func=_run_config)


def _run_config(args) -> int:
    import yaml

    from dsgpt.config import closest_key, load_config
    cfg = load_config(args.config, args.overrides)
    if not args.get:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if args.get == "run.dir":
        print(cfg.run.dir)
        return 0
    node = cfg.to_dict()
    for part in args.get.split("."):
        if not isinstance(node, dict) or part not in node:
            hint = closest_key(args.get)
            raise UserError(f"The run config has no key '{args.get}'" + (f" (did you mean '{hint}'?)" if hint else "")
                            + ". Run `dsgpt config CONFIG` to see every key.")
        node = node[part]
    print(node if not isinstance(node, dict) else yaml.safe_dump(node, sort_keys=False), end="\n" if not isinstance(node, dict) else "")
    return 0


def _add_failure(sub) -> None:
    p = sub.add_parser(
        "failure",
        help="print why a multi-rank run failed (the watchdog's verdict), if a rank recorded one",
        description="Print the paragraph a rank wrote when it found a peer dead, stopped or hung "
                    "(RUN_DIR/heartbeats/failure.json). Exit status 1 when there is none.",
    )
    p.add_argument("run_dir", help="the run directory (runs/NAME)")
    p.add_argument("--since", type=float, default=0.0, metavar="EPOCH",
                   help="ignore a verdict written before this time (seconds since the epoch)")
    p.set_defaults(func=_run_failure)


def _run_failure(args) -> int:
    from dsgpt.watchdog import verdict_message
    message = verdict_message(args.run_dir, args.since)
    if message is None:
        return 1
    print(message)
    return 0


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="turn text / JSONL / parquet / HF datasets into token shards",
        description="Tokenize documents into memory-mapped token shards plus tokenizer.json and meta.json.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=".txt/.md files, folders, .jsonl, .parquet, save_to_disk dirs, or HF dataset names")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--vocab-size", type=int, metavar="N", help="train a byte-level BPE with N tokens")
    tok.add_argument("--tokenizer", metavar="DIR", help="use an existing HF tokenizer dir or tokenizer.json")
    p.add_argument("--val-fraction", type=float, default=0.005, metavar="F",
                   help="fraction of documents held out for validation (default 0.005)")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSONL field / parquet or dataset column with the text (default: text)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the train/val split (default 1234)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                   help="tokens per shard file (default 100M)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args) -> int:
    from dsgpt.data.prepare import prepare

    meta = prepare(
        args.input, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
        val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field,
        shard_tokens=args.shard_tokens, progress=not args.quiet, overwrite=args.overwrite,
    )
    print(
        f"prepared {meta['n_documents']:,} documents into {args.out}\n"
        f"  train: {meta['n_train_tokens']:,} tokens in {len(meta['train_shards'])} shard(s)\n"
        f"  val:   {meta['n_val_tokens']:,} tokens in {len(meta['val_shards'])} shard(s)\n"
        f"  vocab {meta['vocab_size']} ({meta['dtype']}), eos id {meta['eos_id']}, "
        f"data sha256 {meta['data_sha256'][:12]}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed usage and its message
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
