"""dsgpt beside its peers, same machine, same shape, batch, precision and threads per rank.

    python bench/peers.py [--pairs 3] [--steps 20] [--warmup 5] [--ranks 2] [--precision fp32] [key=value ...]

Three comparisons, each run as interleaved pairs (A B A B ...) so that drift of the machine hits both
sides alike; each run reports the median of its timed steps, and the figure is the median of the
pairs' ratios (tokens/s of dsgpt over the peer's):

  - dsgpt (launch/train.py, the real trainer: data loader, step, logging) vs the Hugging Face
    Trainer with its DeepSpeed integration on transformers.GPT2LMHeadModel, both on `--ranks`
    ranks under the same ZeRO stage (default 2).
  - dsgpt in one process (ZeRO 0) vs a plain PyTorch loop of the same model (dsgpt.model.GPT,
    torch AdamW, gradient clipping), one process.
  - dsgpt on `--ranks` ranks (ZeRO 0) vs that plain loop in torch DistributedDataParallel (gloo;
    NCCL on GPUs).

Neither side evaluates or saves inside the timed steps; both log every `--log-every` steps. Each
peer is set up as its documentation advises; its settings are printed beside the figures and go to
bench/RESULTS.md. The shape defaults to 4 layers x 256 wide, block 256, micro batch 8 per rank,
fp32; extra `key=value` overrides go to dsgpt's config (model.*, train.micro_batch_size, ...).

On a CUDA machine every side runs on the GPUs (one per rank; DDP over NCCL). `--precision bf16`
trains dsgpt and the HF Trainer in DeepSpeed's bf16 (bf16 weights, fp32 master) and the plain loop
as PyTorch advises for it: fp32 weights under torch.autocast(bfloat16), fused AdamW on a GPU. On a
GPU the plain loop's and the HF Trainer's timed steps end in a device synchronisation, as dsgpt's
step ends reading its loss back. `--precision bf16-mixed` trains dsgpt in the plain loop's own recipe
(fp32 weights under autocast: dsgpt's precision=bf16-mixed), so the ratio is what the engine and
trainer add to it; the HF Trainer's DeepSpeed integration has no such setting, so it is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SECTION = "dsgpt beside its peers (bench/peers.py)"
COLUMNS = ["date", "machine", "comparison", "shape", "dsgpt tokens/s", "peer tokens/s", "ratio (median, range)",
           "pairs x steps", "peer settings", "versions"]
SHAPE = dict(n_layer=4, n_embd=256, n_head=4, block_size=256, micro=8, vocab=2048, lr=6e-4)


# ---- the workers: each times its own steps and prints one RESULT line ----------------------------

def _threads_per_rank(local_world: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, local_world))


def _random_tokens(steps: int, batch: int, block: int, vocab: int, seed: int):
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (steps * batch, block + 1), generator=g)


def worker_hf(shape: dict, steps: int, warmup: int, zero: int, log_every: int, precision: str) -> None:
    """transformers' Trainer + DeepSpeed, as its docs set it up: a DeepSpeed config dict in
    TrainingArguments(deepspeed=...), the Trainer's own AdamW, no evaluation, no saving."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(_threads_per_rank(local_world))
    rank = int(os.environ.get("RANK", "0"))
    config = GPT2Config(vocab_size=shape["vocab"], n_positions=shape["block_size"], n_embd=shape["n_embd"],
                        n_layer=shape["n_layer"], n_head=shape["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    tokens = _random_tokens(steps + warmup, shape["micro"], shape["block_size"] - 1, shape["vocab"], rank)

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(tokens)

        def __getitem__(self, i):
            return {"input_ids": tokens[i], "labels": tokens[i]}  # the model shifts the labels itself

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's time is its GPU work too
            times.append(time.perf_counter() - self.t0)

    ds_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "gradient_clipping": "auto", "zero_optimization": {"stage": zero}, "bf16": {"enabled": "auto"},
                 "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=shape["micro"], gradient_accumulation_steps=1,
            max_steps=steps + warmup, learning_rate=shape["lr"], weight_decay=0.1, adam_beta1=0.9,
            adam_beta2=0.95, max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=0,
            logging_steps=log_every, save_strategy="no", eval_strategy="no", report_to=[],
            dataloader_num_workers=0, disable_tqdm=True, deepspeed=ds_config, seed=0, bf16=precision == "bf16",
            use_cpu=precision == "bf16" and not torch.cuda.is_available())  # its bf16 check wants it said
        trainer = Trainer(model=model, args=args, train_dataset=Windows(), callbacks=[Clock()])
        trainer.train()
    if rank == 0:
        _report(times[warmup:], shape, world=int(os.environ.get("WORLD_SIZE", "1")))
    _end_launched_rank()  # with the Trainer and its engine still alive


def worker_plain(shape: dict, steps: int, warmup: int, log_every: int, precision: str) -> None:
    """dsgpt's GPT in a plain loop: AdamW (decay on matrices), clip, step. Under a launcher with
    WORLD_SIZE > 1 the model is wrapped in torch's DistributedDataParallel (gloo on CPU, NCCL on
    GPUs), as its docs set it up (one process per rank, each its own micro-batch, gradients averaged
    in backward). bf16 and bf16-mixed: fp32 weights under autocast, PyTorch's mixed-precision recipe."""
    import torch
    import torch.distributed as td

    from dsgpt.model import GPT, GPTConfig, param_groups
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    torch.set_num_threads(_threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=shape["vocab"], block_size=shape["block_size"], n_layer=shape["n_layer"],
                          n_head=shape["n_head"], n_embd=shape["n_embd"])).to(device).train()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=shape["lr"], betas=(0.9, 0.95), fused=on_gpu)
    forward = model
    if world > 1:
        td.init_process_group("nccl" if on_gpu else "gloo")
        forward = torch.nn.parallel.DistributedDataParallel(model)
    tokens = _random_tokens(steps + warmup, shape["micro"], shape["block_size"], shape["vocab"], rank).to(device)
    times = []
    for i in range(steps + warmup):
        batch = tokens[i * shape["micro"]:(i + 1) * shape["micro"]]
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision != "fp32"):
            loss_sum, n = forward(batch[:, :-1], targets=batch[:, 1:])
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (i + 1) % log_every == 0:
            float(loss_sum)  # what a logged step reads back
        if on_gpu:
            torch.cuda.synchronize()  # the step's time is its GPU work too
        times.append(time.perf_counter() - t0)
    if rank == 0:
        _report(times[warmup:], shape, world=world)
    # Ended while DDP still holds the process group: freeing its Reducer (the last reference) joins
    # gloo's worker threads under the GIL while one of them can be waiting for the GIL to free a
    # finished work item (a deadlock, seen once in a test run).
    _end_launched_rank()


def _end_launched_rank() -> None:
    """A launched rank (WORLD_SIZE > 1) ends as dsgpt's do (dsgpt.dist.exit_rank), past the C++
    clean-up of gloo at interpreter exit, which can abort or hang a finished rank; a plain process
    carries on and returns."""
    import torch.distributed as td

    from dsgpt import dist
    if dist.launched_world_size() > 1:
        if td.is_initialized():
            td.barrier()  # every rank is done with its collectives
        dist.exit_rank(0)


def _report(times: list[float], shape: dict, world: int) -> None:
    step = statistics.median(times)
    print("RESULT " + json.dumps({"step_s": step, "tokens_s": shape["micro"] * shape["block_size"] * world / step}),
          flush=True)


# ---- the orchestrator --------------------------------------------------------------------------

def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    from bench.common import child_env
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_worker(kind: str, ranks: int, args) -> float:
    from bench.common import launcher
    cmd = [*launcher(ranks), str(Path(__file__).resolve()), "--worker", kind, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--zero", str(args.zero), "--log-every", str(args.log_every),
           "--precision", args.precision,
           "--shape", json.dumps(args.shape_dict)]
    out = _run(cmd, args.timeout).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])["tokens_s"]


def run_dsgpt(ranks: int, zero: int, args) -> float:
    """The real trainer on the built-in corpus (bench.common.run_trainer)."""
    from bench.common import run_trainer
    s = args.shape_dict
    overrides = [f"model.n_layer={s['n_layer']}", f"model.n_embd={s['n_embd']}", f"model.n_head={s['n_head']}",
                 f"model.block_size={s['block_size']}", f"model.vocab_size={s['vocab']}",
                 # The corpus's own vocabulary stays small (random ids fill the rest on the other sides).
                 f"data.builtin_vocab_size={min(s['vocab'], SHAPE['vocab'])}", f"train.micro_batch_size={s['micro']}",
                 "train.grad_accum_steps=1", f"optim.lr={s['lr']}", "optim.warmup_steps=0",
                 f"precision={args.precision}",
                 f"deepspeed.zero_stage={zero}", *args.overrides]
    return run_trainer("configs/tiny.yaml", overrides, ranks, args.steps, args.warmup, args.timeout)["tokens_s"]


def compare(name: str, ours, theirs, pairs: int) -> dict:
    ratios, mine, peer = [], [], []
    for _ in range(pairs):
        a, b = ours(), theirs()
        mine.append(a)
        peer.append(b)
        ratios.append(a / b)
        print(f"  {name}: dsgpt {a:,.0f} tokens/s, peer {b:,.0f} tokens/s, ratio {a / b:.3f}", flush=True)
    return {"name": name, "dsgpt": statistics.median(mine), "peer": statistics.median(peer),
            "ratio": statistics.median(ratios), "lo": min(ratios), "hi": max(ratios)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--log-every", type=int, default=1, help="the peers' logging cadence (dsgpt logs every step)")
    p.add_argument("--peers", default="hf,plain,ddp", help="comma-separated: hf, plain, ddp (default all)")
    p.add_argument("--precision", choices=("fp32", "bf16", "bf16-mixed"), default="fp32")
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value for dsgpt's config (the peers follow model.*)")
    args = p.parse_args(argv)
    args.shape_dict = dict(SHAPE, **(json.loads(args.shape) if args.shape else {}))
    for item in args.overrides:
        key, _, value = item.partition("=")
        short = {"model.n_layer": "n_layer", "model.n_embd": "n_embd", "model.n_head": "n_head",
                 "model.block_size": "block_size", "model.vocab_size": "vocab",
                 "train.micro_batch_size": "micro"}.get(key)
        if short:
            args.shape_dict[short] = int(value)
    if args.worker:
        if args.worker == "hf":
            worker_hf(args.shape_dict, args.steps, args.warmup, args.zero, args.log_every, args.precision)
        else:
            worker_plain(args.shape_dict, args.steps, args.warmup, args.log_every, args.precision)
        return 0

    peers = {x.strip() for x in args.peers.split(",")}
    if args.precision == "bf16-mixed" and "hf" in peers:
        print("bench/peers.py: --precision bf16-mixed has no HF Trainer side (its DeepSpeed integration trains "
              "in DeepSpeed's bf16, not under autocast with fp32 weights); add --peers plain,ddp, or compare with "
              "the HF Trainer at --precision bf16.", file=sys.stderr)
        return 2
    import torch
    on_gpu = torch.cuda.is_available()
    s = args.shape_dict
    shape = f"{s['n_layer']}x{s['n_embd']}, block {s['block_size']}, micro {s['micro']}/rank, {args.precision}"
    where = (f"{torch.cuda.get_device_name()} per rank" if on_gpu else
             f"{os.cpu_count()} cores, {_threads_per_rank(args.ranks)} threads per rank at {args.ranks} ranks")
    print(f"shape: {shape}; {args.pairs} pairs x {args.steps} timed steps (+{args.warmup} warmup); {where}")

    def per_rank(ranks: int) -> str:  # what each rank runs on, for the settings column
        return "1 GPU/rank" if on_gpu else f"{_threads_per_rank(ranks)} threads/rank"
    loop = (f"dsgpt.model.GPT, torch.optim.AdamW (decay on matrices{', fused' if on_gpu else ''}), clip_grad_norm_ "
            f"1.0{', fp32 weights under bf16 autocast' if args.precision != 'fp32' else ''}, loss read every "
            f"{args.log_every} step(s)")
    backend = "nccl" if on_gpu else "gloo"
    results = []
    if "hf" in peers:
        results.append((compare(f"{args.ranks} ranks ZeRO-{args.zero}: dsgpt vs HF Trainer + DeepSpeed",
                                lambda: run_dsgpt(args.ranks, args.zero, args),
                                lambda: run_worker("hf", args.ranks, args), args.pairs),
                        f"transformers.Trainer, GPT2LMHeadModel (sdpa attention), DeepSpeed ZeRO-{args.zero} config "
                        f"dict, the Trainer's AdamW, {'bf16=True, ' if args.precision == 'bf16' else ''}"
                        f"logging_steps={args.log_every}, no eval/save, dataloader_num_workers=0, {per_rank(args.ranks)}"))
    if "plain" in peers:
        results.append((compare("1 process: dsgpt (ZeRO 0) vs a plain PyTorch loop",
                                lambda: run_dsgpt(1, 0, args), lambda: run_worker("plain", 1, args), args.pairs),
                        f"{loop}, {per_rank(1)}"))
    if "ddp" in peers:
        results.append((compare(f"{args.ranks} ranks: dsgpt (ZeRO 0) vs a plain DDP loop over {backend}",
                                lambda: run_dsgpt(args.ranks, 0, args), lambda: run_worker("ddp", args.ranks, args),
                                args.pairs),
                        f"the same loop in torch DistributedDataParallel ({backend}, default 25 MB buckets): {loop}, "
                        f"{per_rank(args.ranks)}"))
    for res, settings in results:
        print(f"{res['name']}: dsgpt {res['dsgpt']:,.0f} tokens/s, peer {res['peer']:,.0f} tokens/s, "
              f"ratio {res['ratio']:.3f} (pairs {res['lo']:.3f}-{res['hi']:.3f}); peer: {settings}")
        if not args.no_record:
            from bench import common
            date, machine, versions = common.context_cells()
            common.append_row(SECTION, COLUMNS, [
                date, machine, res["name"], shape, f"{res['dsgpt']:,.0f}", f"{res['peer']:,.0f}",
                f"{res['ratio']:.3f} ({res['lo']:.3f}-{res['hi']:.3f})", f"{args.pairs} x {args.steps}",
                settings, versions])
    return 0


if __name__ == "__main__":
    sys.exit(main())
