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
    _add_inspect(sub)
    _add_config(sub)
    _add_failure(sub)
    _add_export(sub)
    _add_generate(sub)
    _add_chat(sub)
    _add_eval(sub)
    _add_plan(sub)
    _add_lr_find(sub)
    _add_sweep(sub)
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
    tok.add_argument("--tokenizer", metavar="DIR",
                     help="use an existing HF tokenizer dir or tokenizer.json (with --chat also a run dir: "
                          "the tokenizer of the model to fine-tune)")
    p.add_argument("--val-fraction", type=float, default=0.005, metavar="F",
                   help="fraction of documents held out for validation (default 0.005)")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSONL field / parquet or dataset column with the text (default: text)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the train/val split (default 1234)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                   help="tokens per shard file (default 100M)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--doc-separator", metavar="REGEX",
                   help="split .txt/.md files into documents at lines matching REGEX as a whole (e.g. '%%', "
                        "'' for an empty line); default: one document per file")
    p.add_argument("--block-sizes", default="128,256,512,1024,2048", metavar="N,N,...",
                   help="context lengths whose share of out-of-window tokens the report measures "
                        "(default 128,256,512,1024,2048)")
    clean = p.add_argument_group(
        "cleaning", "all off by default; they run in the order quality filters -> PII -> exact dedup -> "
                    "near dedup, before the train/val split and the BPE")
    clean.add_argument("--clean", action="store_true",
                       help="the Gopher quality and repetition filters at the paper's thresholds")
    clean.add_argument("--script", metavar="NAME[,NAME]",
                       help="drop documents whose letters are < 80%% in these Unicode scripts (e.g. Latin)")
    clean.add_argument("--scrub-pii", action="store_true",
                       help="replace e-mails, phone numbers, IPs and card numbers by <EMAIL>, <PHONE>, ...")
    clean.add_argument("--dedup", action="store_true",
                       help="remove exact and near duplicates across all inputs (the first copy stays)")
    clean.add_argument("--near-threshold", type=float, metavar="J",
                       help="with --dedup: Jaccard similarity of word 3-gram sets that counts as a near "
                            "duplicate (default 0.6)")
    clean.add_argument("--clean-config", metavar="FILE",
                       help="YAML naming filters and thresholds, PII kinds and dedup settings (the flags add to it)")
    chat = p.add_argument_group("chat (SFT) data", "conversation JSONL: {\"messages\": [{\"role\", \"content\"}, ...]} "
                                "or {\"prompt\", \"response\"}; labels only on the assistant's replies")
    chat.add_argument("--chat", action="store_true", help="prepare conversations for fine-tuning")
    chat.add_argument("--block-size", type=int, metavar="N",
                      help="with --chat (required): the model's block_size; longer conversations are cut to fit")
    chat.add_argument("--chat-template", metavar="FILE",
                      help="a Jinja chat template marking assistant content with {%% generation %%} "
                           "(default: <|system|>/<|user|>/<|assistant|> markers, <|end|> ends each turn)")
    chat.add_argument("--no-pack", action="store_true",
                      help="one example per training row (padded) instead of packing short examples together")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args) -> int:
    from dsgpt.data.prepare import prepare, prepare_chat

    cleaning = [flag for flag, on in (("--doc-separator", args.doc_separator is not None), ("--clean", args.clean),
                                      ("--script", args.script), ("--scrub-pii", args.scrub_pii),
                                      ("--dedup", args.dedup), ("--near-threshold", args.near_threshold is not None),
                                      ("--clean-config", args.clean_config)) if on]
    if args.chat and cleaning:
        raise UserError(f"{', '.join(cleaning)} {'is' if len(cleaning) == 1 else 'are'} for pretraining documents, "
                        "not --chat conversations. Leave them out, or clean the text before making conversations of it.")
    if args.chat:
        return _run_prepare_chat(args, prepare_chat)
    if args.block_size is not None or args.chat_template or args.no_pack:
        raise UserError("--block-size, --chat-template and --no-pack only apply with --chat.")
    from dsgpt.data.clean import clean_settings
    from dsgpt.data.clean.report import read_report, summary_lines

    settings = clean_settings(args.clean_config, gopher=args.clean, script=args.script, pii=args.scrub_pii,
                              dedup=args.dedup, near_threshold=args.near_threshold)
    meta = prepare(
        args.input, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
        val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field,
        shard_tokens=args.shard_tokens, progress=not args.quiet, overwrite=args.overwrite,
        doc_separator=args.doc_separator, clean=settings, block_sizes=_int_list(args.block_sizes, "--block-sizes"),
    )
    print(
        f"prepared {meta['n_documents']:,} documents into {args.out}\n"
        f"  train: {meta['n_train_tokens']:,} tokens in {len(meta['train_shards'])} shard(s)\n"
        f"  val:   {meta['n_val_tokens']:,} tokens in {len(meta['val_shards'])} shard(s)\n"
        f"  vocab {meta['vocab_size']} ({meta['dtype']}), eos id {meta['eos_id']}, "
        f"data sha256 {meta['data_sha256'][:12]}"
    )
    report = read_report(args.out)
    if report is not None:
        print("\n".join(summary_lines(report)))
        print(f"report: {args.out}/report.json" + (f", histogram: {args.out}/{report['histogram_png']}"
                                                   if report.get("histogram_png") else ""))
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} must be comma-separated integers, e.g. 128,256,512,1024,2048.") from None


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="print a prepared dir's report and a few random documents as the model sees them",
        description="Print what `dsgpt prepare` reported (cleaning counts, document lengths, context "
                    "fractions) and a few randomly drawn documents decoded from the token shards.",
    )
    p.add_argument("data_dir", metavar="DATA_DIR", help="a directory written by dsgpt prepare")
    p.add_argument("--n", type=int, default=3, metavar="N", help="documents to show (default 3; 0: report only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    p.add_argument("--split", default="train", choices=("train", "val"), help="split to draw from (default train)")
    p.add_argument("--max-chars", type=int, default=2000, metavar="N",
                   help="show at most N characters of each document (default 2000)")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> int:
    from dsgpt.data.inspect import inspect_lines
    print("\n".join(inspect_lines(args.data_dir, n=args.n, seed=args.seed, split=args.split,
                                  max_chars=args.max_chars)))
    return 0


def _add_run_args(p) -> None:
    """--run and --checkpoint: which trained weights a command reads (export, generate, eval)."""
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run dir written by launch/train.py (runs/NAME)")
    p.add_argument("--checkpoint", default="latest", metavar="WHICH",
                   help="latest (default), best, or a checkpoint tag such as step0000200")


def _run_prepare_chat(args, prepare_chat) -> int:
    if args.block_size is None:
        raise UserError("--chat needs --block-size N: the block_size of the model to fine-tune, which every "
                        "example must fit.")
    from dsgpt.runs import tokenizer_of
    meta = prepare_chat(
        args.input, args.out, block_size=args.block_size, vocab_size=args.vocab_size,
        tokenizer=tokenizer_of(args.tokenizer) if args.tokenizer else None,
        chat_template=args.chat_template, pack=not args.no_pack, val_fraction=args.val_fraction,
        seed=args.seed, shard_tokens=args.shard_tokens, progress=not args.quiet, overwrite=args.overwrite,
    )
    skipped = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in meta["skipped"].items())
    print(
        f"prepared {meta['n_examples']:,} conversations into {args.out} (skipped: {skipped})\n"
        f"  train: {meta['n_train_examples']:,} examples, {meta['n_train_tokens']:,} tokens\n"
        f"  val:   {meta['n_val_examples']:,} examples, {meta['n_val_tokens']:,} tokens\n"
        f"  vocab {meta['vocab_size']} ({meta['dtype']}), block_size {meta['block_size']}, "
        f"{'packed' if meta['pack'] else 'one example per row'}, data sha256 {meta['data_sha256'][:12]}"
    )
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's checkpoint as a Hugging Face model dir (safetensors + config + tokenizer)",
        description="Write a checkpoint of a run as a directory that transformers' "
                    "AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained load.",
    )
    _add_run_args(p)
    p.add_argument("--hf", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in DIR")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from dsgpt.hf import export
    done = export(args.run, args.hf, which=args.checkpoint, overwrite=args.overwrite)
    print(f"exported checkpoint {done.tag} of {args.run} to {done.dir}\n"
          f"  load it with transformers.AutoModelForCausalLM.from_pretrained({str(done.dir)!r})")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a prompt (or a file of prompts) with a run's checkpoint",
        description="Sample text from a run's checkpoint with a KV cache: greedy or temperature / top-k / "
                    "top-p, repetition penalty, stop strings; a single prompt streams to the terminal.",
    )
    _add_run_args(p)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt", default="", help="text to continue (default: empty, start from EOS)")
    what.add_argument("--prompts-file", metavar="FILE",
                      help="one prompt per line, or a .jsonl file of objects with a \"prompt\" field")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help=">= 1 (default 200)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--temperature", type=float, default=0.8, help=">= 0; 0 = greedy (default 0.8)")
    how.add_argument("--greedy", action="store_true", help="always the most likely token (temperature 0)")
    p.add_argument("--top-k", type=int, default=50, help=">= 0; 0 = off (default 50)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]; default off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="P",
                   help="> 0; > 1 discourages tokens already in the text (CTRL / Hugging Face); default 1 = off")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a text where this string appears (cut before it); repeatable. In bash, "
                        "$'\\n' is a newline")
    p.add_argument("--num-samples", type=int, default=1, help="texts per prompt, >= 1 (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="texts generated together (default 8)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto (default): the GPU when there is one")
    p.add_argument("--no-stream", action="store_true", help="print a single text at the end, not as it grows")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context each token (slow; a check)")
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    from dsgpt.generate import generate_text, read_prompts
    named = read_prompts(args.prompts_file) if args.prompts_file else [("the prompt", args.prompt)]
    single = len(named) == 1 and args.num_samples == 1
    stream = (lambda text: print(text, end="", flush=True)) if single and not args.no_stream else None
    texts = generate_text(
        args.run, [prompt for _, prompt in named], args.max_new_tokens, 0.0 if args.greedy else args.temperature,
        args.top_k, args.top_p, args.num_samples, args.seed, args.checkpoint,
        repetition_penalty=args.repetition_penalty, stop=args.stop, device=args.device,
        batch_size=args.batch_size, on_text=stream, use_cache=not args.no_cache,
        prompt_names=[name for name, _ in named])
    if stream:
        print()
        return 0
    for i, text in enumerate(texts):
        if len(texts) > 1:
            prompt, sample = divmod(i, args.num_samples)
            print(f"--- prompt {prompt + 1}, sample {sample + 1} ---" if len(named) > 1 else f"--- sample {i + 1} ---")
        print(text)
    return 0


def _add_chat(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="talk to a run fine-tuned on chat data (interactive, or user turns from stdin)",
        description="A multi-turn chat with a run trained on `dsgpt prepare --chat` data, through the chat "
                    "template it was trained with. On a terminal: interactive, streamed, /reset and /exit. "
                    "With stdin from a pipe or file: one user turn per line, one reply per line on stdout.",
    )
    _add_run_args(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="a system prompt, kept however long the chat")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="longest reply, >= 1 (default 256; at most half the context is kept for it)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0 = greedy (the default)")
    how.add_argument("--greedy", action="store_true", help="always the most likely token (temperature 0)")
    p.add_argument("--top-k", type=int, default=50, help=">= 0; 0 = off (default 50; with --temperature > 0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]; default off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="P", help="> 0; default 1 = off")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws; /reset starts it again (default 0)")
    p.add_argument("--echo", action="store_true",
                   help="with stdin from a pipe or file: write a transcript (you> / assistant> lines)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto (default): the GPU when there is one")
    p.set_defaults(func=_run_chat)


def _run_chat(args) -> int:
    from dsgpt.chat import main as chat_main
    return chat_main(args)


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a run's checkpoint: val loss / perplexity / accuracy / bits per byte, generation tasks",
        description="Evaluate a run's checkpoint (any ZeRO stage; the GPU when there is one) in one process, or on "
                    "several ranks under deepspeed/srun/mpirun (see --zero-stage). "
                    "Tasks: lm (the prepared val split: loss, perplexity, next-token accuracy over the "
                    "trainer's val windows, and bits per byte over whole val documents) and gen:FILE.jsonl "
                    "(greedy continuations of {\"prompt\", \"reference\"} lines scored by BLEU, ROUGE-1/2/L "
                    "F1 and exact match); any other name is an lm-evaluation-harness task (offline: local "
                    "task YAMLs with --include-path). Writes RUN/eval/<tag>.json and TensorBoard scalars "
                    "eval/<task>/<metric>.",
    )
    _add_run_args(p)
    p.add_argument("--tasks", default="lm", metavar="LIST",
                   help="comma-separated: lm, gen:FILE.jsonl, lm-eval task names (default lm)")
    p.add_argument("--include-path", default=None, metavar="DIR", help="lm-eval: a folder of your own task YAMLs")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="lm-eval: at most N examples per task")
    p.add_argument("--batches", type=int, default=None, help="lm: validation batches (default: the run's train.eval_batches)")
    p.add_argument("--batch-size", type=int, default=None, help="lm: windows per forward (memory only)")
    p.add_argument("--max-docs", type=int, default=100, metavar="N",
                   help="lm: bits per byte over the first N val documents (default 100)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="gen: tokens per answer (default 64)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="fp32 (default) or bf16 autocast")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto (default): the GPU when there is one; on several ranks each takes its own")
    p.add_argument("--zero-stage", type=int, default=None, choices=(0, 1, 2, 3),
                   help="several ranks: 3 shards the model and runs the ranks in lockstep, 0-2 give each rank "
                        "the whole model and a share of the work (default: the run's stage)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from dsgpt import dist
    from dsgpt.eval.harness import EvalOptions, format_table, run_eval
    opts = EvalOptions(which=args.checkpoint, tasks=args.tasks, batches=args.batches, batch_size=args.batch_size,
                       max_docs=args.max_docs, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                       device=args.device, include_path=args.include_path, limit=args.limit,
                       zero_stage=args.zero_stage)
    result = run_eval(args.run, opts)
    if dist.rank() == 0:
        print(format_table(args.run, result), flush=True)
    dist.teardown()
    return 0


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="estimate per-GPU memory under each ZeRO stage and pick the setup that fits",
        description="Estimate the memory each rank needs (weights, gradients, fp32 master, Adam moments, "
                    "buffers, activations) under ZeRO 0-3 and offload, with and without activation "
                    "checkpointing, and recommend the ZeRO stage, offload, micro batch and gradient "
                    "accumulation that fit the GPUs and reach the global batch. --preset NAME starts from "
                    "configs/NAME.yaml when it exists.",
    )
    model = p.add_argument_group("model (a run config and/or a preset; the flags change its shape)")
    model.add_argument("--config", metavar="YAML", help="run config to start from (configs/*.yaml)")
    model.add_argument("--preset", help="model preset: tiny, gpt2-124m, gpt2-350m, gpt2-774m, gpt2-1.5b")
    for flag in ("--n-layer", "--n-head", "--n-embd", "--block-size"):
        model.add_argument(flag, type=int, metavar="N")
    model.add_argument("--vocab-size", type=int, metavar="N",
                       help="the tokenizer's vocabulary (padded to a multiple of 64, as the trainer does)")
    model.add_argument("--loss-chunk-tokens", type=int, metavar="N",
                       help="model.loss_chunk_tokens: the loss over N tokens' logits at a time (0 = all at once)")
    model.add_argument("--precision", choices=("bf16", "bf16-mixed", "fp16", "fp32"), help="default: the config's, else bf16")
    hw = p.add_argument_group("machines")
    hw.add_argument("--gpus-per-node", type=int, default=1, metavar="G", help="default 1")
    hw.add_argument("--nodes", type=int, default=1, metavar="N", help="default 1")
    hw.add_argument("--gpu-mem", type=float, required=True, metavar="GIB", help="memory of one GPU, GiB (e.g. 80)")
    hw.add_argument("--cpu-mem", type=float, metavar="GIB", help="host memory per node, GiB (checked for offload)")
    hw.add_argument("--headroom", type=float, default=0.10, metavar="F",
                    help="fraction of GPU memory kept free for fragmentation (default 0.1)")
    hw.add_argument("--reserve", type=float, default=1.0, metavar="GIB",
                    help="GiB per GPU for the CUDA context and NCCL (default 1)")
    batch = p.add_mutually_exclusive_group(required=True)
    batch.add_argument("--batch-tokens", type=int, metavar="N", help="global batch: tokens per optimizer step")
    batch.add_argument("--batch-seqs", type=int, metavar="N", help="global batch: sequences per optimizer step")
    p.add_argument("--write", metavar="FILE.yaml", help="write the recommended setup as a run config")
    p.add_argument("--force", action="store_true", help="with --write: replace an existing file")
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    from dsgpt.plan import format_plan, make_request, plan, write_run_config
    req = make_request(config=args.config, preset=args.preset, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd, block_size=args.block_size, vocab_size=args.vocab_size,
                       loss_chunk_tokens=args.loss_chunk_tokens, precision=args.precision,
                       gpus_per_node=args.gpus_per_node, nodes=args.nodes,
                       gpu_mem_gib=args.gpu_mem, batch_tokens=args.batch_tokens, batch_seqs=args.batch_seqs,
                       cpu_mem_gib=args.cpu_mem, headroom=args.headroom, reserve_gib=args.reserve)
    result = plan(req)
    print(format_plan(result))
    if args.write:
        path = write_run_config(result, args.write, force=args.force)
        print(f"wrote {path}")
    return 0


def _add_lr_find(sub) -> None:
    p = sub.add_parser(
        "lr-find",
        help="the learning-rate range test: loss vs an exponentially growing LR, a plot and a suggested LR",
        description="Train a fresh model from a run config while the learning rate grows exponentially from "
                    "--start to --end (stopping once the smoothed loss passes 4x its minimum), write "
                    "RUN/lr_find/lr_find.csv and lr_find.png, and suggest the rate where the smoothed loss "
                    "falls fastest against log10(LR), before its minimum. Runs on any launcher "
                    "(deepspeed --num_gpus N .venv/bin/dsgpt lr-find ...).",
    )
    p.add_argument("--config", required=True, help="run config (configs/*.yaml)")
    p.add_argument("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    p.add_argument("--end", type=float, default=10.0, help="last learning rate (default 10)")
    p.add_argument("--steps", type=int, default=200, help="steps of the ramp (default 200)")
    p.add_argument("--out", default=None, metavar="DIR", help="where the table and plot go (default RUN/lr_find)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.set_defaults(func=_run_lr_find)


def _run_lr_find(args) -> int:
    from dsgpt import dist
    from dsgpt.config import load_config
    from dsgpt.lr_find import check_range, run_lr_find
    check_range(args.start, args.end, args.steps)  # before any work
    res = run_lr_find(load_config(args.config, args.overrides), args.start, args.end, args.steps, args.out)
    if res.table is not None:  # rank 0
        end = "stopped early: the loss diverged" if res.stopped_early else "ran every step"
        print(f"lr-find: {len(res.lrs)} steps from {res.lrs[0]:.2e} to {res.lrs[-1]:.2e} ({end})")
        print(f"lowest smoothed loss {min(res.smoothed):.4f}; suggested optim.lr="
              f"{res.suggestion:.3g}" if res.suggestion else "no suggestion: the loss never fell")
        print(f"table: {res.table}\nplot: {res.plot}")
    dist.teardown()  # gloo's threads left to interpreter exit can abort a finished process
    return 0


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="a hyperparameter search over run configs (grid, random or TPE, with pruning), here or as workers",
        description="Run the trials of a sweep file (see dsgpt/sweep.py and configs/sweeps/), each a "
                    "launch/train.py run: here one after another, N side by side (--jobs N), or as one of any "
                    "number of workers on the shared study (--worker, e.g. Slurm array tasks: "
                    "slurm/sweep.sbatch); rerunning skips finished trials, resumes an interrupted one and "
                    "retries failed ones. Writes sweep.csv, sweep.json, plots and TensorBoard HParams into "
                    "runs/sweeps/NAME.",
    )
    p.add_argument("sweep_file", metavar="SWEEP.yaml", nargs="?")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="trials at a time here: one worker per GPU (round robin), or N shares of the CPU cores")
    p.add_argument("--worker", metavar="SWEEP.yaml|SWEEP_DIR",
                   help="be one worker: claim the study's next trial, run it, repeat until the sweep is done")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args) -> int:
    from dsgpt.sweep import main
    return main(args.sweep_file, args.worker, args.jobs)


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
