"""Generation speed: new tokens per second of greedy generation with dsgpt's KV cache, without it
(the whole context again each token), and with transformers' own GPT2LMHeadModel.generate (its
own cache) on the same weights. Random weights (speed does not depend on them), equal-length
random prompts, no EOS; each figure is one timed call after an untimed warm-up, prompt included.

    python bench/generate.py                                   # tiny and gpt2-124m, batch 1 and 8
    python bench/generate.py --shapes gpt2-124m --batches 1 --new-tokens 256 --device cuda

Prints a table and appends one row per measurement to bench/RESULTS.md. The "same tokens" column
compares each method's tokens with the cached ones: a mismatch on random weights can be a near-tie.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import metadata

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402  (after the path: runs as a script from any directory)

SECTION = "Generation speed (bench/generate.py)"
COLUMNS = ["date", "machine", "device", "model", "batch", "prompt + new tokens", "method", "tokens/s",
           "x no cache", "same tokens", "versions"]
METHODS = ("dsgpt, KV cache", "dsgpt, no cache", "transformers generate")


def build(shape: str, vocab: int, device):
    """(dsgpt model, the same weights as a transformers GPT2LMHeadModel), random, in eval mode."""
    import torch

    from dsgpt.hf import to_hf_model
    from dsgpt.model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(shape, vocab_size=vocab)).eval()
    hf = to_hf_model(model, 0, 0)
    hf.generation_config.eos_token_id = None  # run every new token, as the dsgpt calls do
    return model.to(device), hf.to(device)


def runners(model, hf):
    """method -> function(prompts tensor, n) -> new tokens (B, n) as a list of lists."""
    from dsgpt.generate import GREEDY, generate

    def dsgpt(use_cache):
        return lambda x, n: generate(model, x.tolist(), n, GREEDY, use_cache=use_cache)

    def transformers(x, n):
        out = hf.generate(x, attention_mask=x.new_ones(x.shape), max_new_tokens=n, do_sample=False,
                          pad_token_id=0)
        return out[:, x.size(1):].tolist()
    return dict(zip(METHODS, (dsgpt(True), dsgpt(False), transformers)))


def timed(fn, x, n, device) -> tuple[float, list]:
    import torch
    fn(x, 2)  # warm-up: first-call allocations and kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(x, n)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def same(tokens: list, reference: list) -> str:
    if tokens == reference:
        return "yes"
    diffs = [next(i for i, (a, b) in enumerate(zip(r, t)) if a != b) for r, t in zip(reference, tokens) if r != t]
    return f"no (first difference at new token {min(diffs)})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["tiny", "gpt2-124m"], help="model presets")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: every core)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args(argv)

    import torch

    from dsgpt.generate import resolve_device
    from dsgpt.model import PRESETS
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    date, machine, versions = common.context_cells()
    versions += f", transformers {metadata.version('transformers')}"
    print(f"{where}; greedy, {args.prompt_tokens} prompt + {args.new_tokens} new tokens per row\n"
          f"{'model':<10} {'batch':>5}  {'method':<22} {'tokens/s':>9} {'x no cache':>10}  same tokens")
    for shape in args.shapes:
        model, hf = build(shape, args.vocab, device)
        m = PRESETS[shape]
        name = (f"{shape} ({m['n_layer']}L/{m['n_embd']}d/{m['n_head']}h, block {m['block_size']}, vocab "
                f"{args.vocab}, {model.num_params(non_embedding=False) / 1e6:.1f}M)")
        for batch in args.batches:
            g = torch.Generator().manual_seed(batch)
            x = torch.randint(0, args.vocab, (batch, args.prompt_tokens), generator=g).to(device)
            results = {method: timed(fn, x, args.new_tokens, device) for method, fn in runners(model, hf).items()}
            reference = results[METHODS[0]][1]
            plain_speed = batch * args.new_tokens / results[METHODS[1]][0]
            for method, (seconds, tokens) in results.items():
                speed = batch * args.new_tokens / seconds
                cells = [f"{speed:,.1f}", f"{speed / plain_speed:.2f}", same(tokens, reference)]
                print(f"{shape:<10} {batch:>5}  {method:<22} {cells[0]:>9} {cells[1]:>10}  {cells[2]}")
                if not args.no_record:
                    common.append_row(SECTION, COLUMNS, [
                        date, machine, where, name, str(batch), f"{args.prompt_tokens} + {args.new_tokens}",
                        method, *cells, versions])
    return 0


if __name__ == "__main__":
    sys.exit(main())
