"""The training loss over the vocabulary, whole or in chunks: time and memory of the model's forward
and backward.

    python bench/loss_chunks.py [--preset gpt2-124m] [--block 1024] [--micro 2] [--chunks 512]
                                [--precision fp32|bf16-mixed|bf16] [--repeats 5] [--no-record]

The model alone (dsgpt.model.GPT, no engine, no optimizer step) on random tokens, on the GPU when
there is one, else on this process's CPU threads. Variants, timed in turn (A B C A B C ...), median
of `--repeats`: the loss over the whole micro batch (`model.loss_chunk_tokens: 0`), in chunks of
each `--chunks` size as dsgpt computes it (each chunk's gradients made in its forward), and, for
comparison, the same chunks with each chunk's logits recomputed in backward (activation
checkpointing around the output layer and the loss, the usual way to chunk a loss: one more
vocabulary-wide matmul per token). "peak MB" (2^20 bytes) is the most memory allocated during one
forward and backward above what was allocated before it (the model, without gradients): the
activations, the loss's share and the gradients the backward makes, by CUDA's allocator statistics
on GPU, by the profiler's allocation events on CPU. Rows go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECTION = "The loss whole or in chunks (bench/loss_chunks.py)"
COLUMNS = ["date", "machine", "device", "model", "precision", "tokens", "loss", "fwd+bwd ms", "tokens/s",
           "peak MB", "versions"]
PRECISIONS = ("fp32", "bf16-mixed", "bf16")


def recomputing_head(head):
    """An output layer that chunks the loss the usual way: each chunk's head and loss under
    activation checkpointing, so backward recomputes its logits. For comparison only."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from dsgpt.model import IGNORE_INDEX, OutputHead, summed_cross_entropy

    class RecomputingHead(OutputHead):
        def forward(self, hidden, labels=None, chunk=0):
            if labels is None:
                return super().forward(hidden)
            h, y = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)
            total = h.new_zeros((), dtype=torch.float32)
            for i in range(0, h.size(0), chunk):
                total = total + checkpoint(lambda a, b: summed_cross_entropy(OutputHead.forward(self, a), b, True),
                                           h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
            return total, (y != IGNORE_INDEX).sum()

    new = RecomputingHead(head.in_features, head.out_features, bias=False, device="meta")
    new.weight = head.weight  # the same (tied) parameter
    return new


def measure(preset: str, block: int, micro: int, chunks: list[int], precision: str, repeats: int) -> dict:
    """{variant: (median seconds of a forward and backward, peak bytes)} and the facts of the run."""
    import contextlib
    import dataclasses

    import torch

    from bench.common import peak_allocated_bytes
    from dsgpt.model import GPT, GPTConfig
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    cfg = GPTConfig.from_preset(preset, vocab_size=50304, block_size=block) if preset != "tiny" else \
        GPTConfig(vocab_size=512, block_size=block, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    model = GPT(cfg).to(device).train()
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    plain_head, recomputing = model.lm_head, recomputing_head(model.lm_head)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (micro, block + 1), generator=gen, device=device)
    inputs, labels = x[:, :-1], x[:, 1:]
    variants = {"whole": (0, plain_head)}
    for c in chunks:
        variants[f"chunks of {c}"] = (c, plain_head)
        variants[f"chunks of {c}, recomputed"] = (c, recomputing)

    def step(name: str) -> None:
        chunk, head = variants[name]
        model.config = dataclasses.replace(cfg, loss_chunk_tokens=chunk)
        model.lm_head = head
        autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16-mixed" else \
            contextlib.nullcontext()
        with autocast:
            loss_sum, n = model(inputs, targets=labels)
        (loss_sum / n).backward()
        if on_gpu:
            torch.cuda.synchronize()

    times = {name: [] for name in variants}
    for name in variants:
        step(name)  # warm up (and the allocator's first touch)
    for _ in range(repeats):
        for name in variants:
            model.zero_grad(set_to_none=True)  # freed before the clock starts: each step allocates its own
            t0 = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t0)
    peaks = {}
    for name in variants:
        model.zero_grad(set_to_none=True)
        peaks[name] = peak_allocated_bytes(lambda: step(name), on_gpu)
    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU x{torch.get_num_threads()} threads"
    model_name = f"{cfg.n_layer}L/{cfg.n_embd}d/{cfg.n_head}h, vocab {cfg.vocab_size}"
    return {"device": device_name, "model": model_name, "tokens": micro * block,
            "results": {name: (statistics.median(times[name]), peaks[name]) for name in variants}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m",
                   help="a GPT-2 preset (with its padded vocabulary, 50304), or tiny: 2 layers x 64 wide, vocab 512")
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--chunks", default="512", help="comma-separated chunk sizes in tokens")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args(argv)
    try:
        chunks = [int(c) for c in args.chunks.split(",") if c.strip()]
    except ValueError:
        chunks = [0]
    if not chunks or min(chunks) < 1 or min(args.block, args.micro, args.repeats) < 1:
        print(f"bench/loss_chunks.py: --chunks takes positive token counts, e.g. 256,1024 (got {args.chunks!r}); "
              f"--block, --micro and --repeats must be positive.", file=sys.stderr)
        return 2
    from bench import common
    from dsgpt.model import PRESETS
    if args.preset not in PRESETS:  # tiny among them (its own shape here)
        print(f"bench/loss_chunks.py: unknown --preset {args.preset!r}: one of {', '.join(PRESETS)}.",
              file=sys.stderr)
        return 2
    got = measure(args.preset, args.block, args.micro, chunks, args.precision, args.repeats)
    tokens = got["tokens"]
    print(f"{got['model']} ({got['device']}), {args.precision}, {args.micro} x {args.block} = {tokens:,} tokens, "
          f"median of {args.repeats}:")
    date, machine, versions = common.context_cells()
    for name, (seconds, peak) in got["results"].items():
        print(f"  {name:<28} {seconds * 1000:9.1f} ms  {tokens / seconds:10,.0f} tokens/s  peak {peak / 2**20:,.1f} MB")
        if not args.no_record:
            common.append_row(SECTION, COLUMNS, [
                date, machine, got["device"], f"{args.preset}: {got['model']}", args.precision, f"{tokens:,}", name,
                f"{seconds * 1000:.1f}", f"{tokens / seconds:,.0f}", f"{peak / 2**20:,.1f}", versions])
    return 0


if __name__ == "__main__":
    sys.exit(main())
