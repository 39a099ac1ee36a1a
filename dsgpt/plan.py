"""`dsgpt plan`: the memory each rank needs to train a GPT under each ZeRO stage, and the setup
(ZeRO stage, offload, activation checkpointing, micro batch, gradient accumulation) that fits the
GPUs and reaches the global batch.

Model states, in bytes per rank. Ψ = parameters (tied embedding once), N = data-parallel ranks,
p = 2 under bf16/fp16 (weights and gradients in 16 bits, fp32 master copy) and 4 under fp32 and
bf16-mixed (DeepSpeed holds an fp32 model; only the forward runs under autocast).
ZeRO 1/2 split each optimizer group (decayed matrices, undecayed vectors) into N equal slices after
padding it to a multiple of 2N; ZeRO-3 splits every parameter into N slices of ceil(numel / N).
What DeepSpeed 0.19 allocates, read from its source and checked against real engines in
tests/test_plan.py (weights, master and Adam state to the byte):

    stage  weights   grads       fp32 master  Adam moments  buffers                      at the step
    0      pΨ        pΨ          4Ψ (mixed)   8Ψ            flat copy of the gradients   fp32 grads (mixed)
                                                            for the all-reduce, pΨ
    1      pΨ        pΨ (whole)  4Ψ/N         8Ψ/N          reduce bucket                fp32 grad slice
    2      pΨ        pΨ/N        4Ψ/N         8Ψ/N          reduce bucket                fp32 grad slice
    3      pΨ/N      pΨ/N        4Ψ/N         8Ψ/N          bucket + gathered weights    fp32 grad slice

ZeRO 1/2 keep an fp32 master copy even in fp32 (a clone of the slice), so on one rank they hold
more than ZeRO-0. Buffers: the reduce bucket is `reduce_bucket_size` elements (the templates' "auto"
is hidden² on GPUs, at least 2**21 on CPU ranks; zero1.json leaves DeepSpeed's default 5e8), twice when `overlap_comm` is on. ZeRO-3
keeps small parameters (<= `stage3_param_persistence_threshold`) whole on every rank and gathers
the others around each module; with the default `stage3_max_reuse_distance` (1e9) a gathered
weight that is used again in the backward pass stays gathered, so a model under
`stage3_max_live_parameters` (1e9) ends up wholly gathered on every rank: that is what we count
(min(Ψ, max_live) × p). On CPU, 2 ZeRO-3 ranks of a 63M-parameter model (fp32) peaked at
1.9 GiB RSS each against 1.45 GiB estimated with the gathered model and 1.2 without it: the
gathering is real; all-gather buffers and allocator overhead, not modelled, make the rest.
Offload moves the master, the moments and the fp32 gradient slice (and under zero3_offload the
weight shards) to host memory; DeepSpeed's CPU Adam updates them in place. Each rank also builds the whole fp32 model on the host before the
engine moves it (not under ZeRO-3, whose zero.Init builds it sharded): 4Ψ of host memory per rank.

Activations, bytes per token of a micro batch (a = p, E = width, H = heads, V = padded vocab,
L = layers). dsgpt.model uses F.scaled_dot_product_attention, whose flash / memory-efficient
kernels keep no T×T score matrix: only a log-sum-exp per head (4H bytes). Per layer, the tensors
autograd saves (counted with saved_tensors_hooks in the tests): LayerNorm inputs and outputs (4E),
q/k/v (3E), the attention output (E), the MLP's hidden before and after GELU (8E) = 16E elements,
LayerNorm statistics 4a, log-sum-exp 4H; dropout > 0 adds one byte per element for 2 masks.
Outside the blocks: ln_f's input and output (2aE), statistics (2a), token ids and targets (16).
The loss (computed inside the model, dsgpt.model.summed_cross_entropy) turns the logits into their
fp32 gradient in place: 4V per token in fp32; with 2-byte logits their fp32 copy is made beside
them, and in backward the 2-byte gradient beside the fp32 one, so (4 + a)V = 6V. That is per token
of the micro batch, or of one chunk with model.loss_chunk_tokens; the formulas write it lV (l = 4
in fp32, 6 otherwise). Chunks make their gradients in forward: the output layer's weight gradient
is kept in fp32 from forward to backward (4VE), and each chunk's share of it is made beside it
(aVE more when a != 4).

    no checkpointing:  tokens·(L·(16aE + 4a + 4H) + 2aE + 2a + 16) + loss
    checkpointing:     tokens·(L·aE + 2aE + 2a + 16) + max(loss, tokens·one block)
    loss:              lV·tokens, or in chunks lV·chunk + (4 + a)VE (4VE in fp32)

(Without flash attention, e.g. dropout > 0 on CPU, the math kernel adds the H·T scores per token.)

Under bf16-mixed (autocast) the residual stream stays fp32 (r = 4 bytes) while the matmuls' inputs and
outputs are bf16 (a = 2): LayerNorm runs in fp32 and saves its fp32 input and statistics, the Linear
after it saves the bf16 cast of its output. A block then saves 2rE + 14aE + 4r + 4H bytes per token
(the formula above when r = a), checkpointing keeps rE per block, and autograd also keeps the bf16
copy of every matmul weight (12E² per block, V·E for the head: 2 bytes each) from forward to backward.

A rank's peak is the sum of all of it (the step's transients and the activations do not overlap
in time, but the allocator keeps what activations freed: on CPU the RSS shows it, and on GPU the
caching allocator fragments). On CPU runs the estimate adds what the GPU path avoids: torch's
unfused AdamW makes two temporaries the size of the slice it updates, and buckets count only the
pages gradients touch. CPU RSS also carries glibc's allocator overhead (freed heap is kept), which
is why the tests allow 25%.

DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs_all_cold`,
`estimate_zero3_model_states_mem_needs_all_cold`) assume mixed precision and count, per GPU,
2Ψ + 18Ψ/N for ZeRO-2 (18 = 16-bit grads 2 + fp32 grads 4 + master 4 + moments 8) and
4 × the largest layer + 18Ψ/N for ZeRO-3 (18 = 16-bit weights 2 + fp32 grads 4 + master 4 +
moments 8). Ours, with the fp32 gradient slice made at the step (the size of the master), equals
theirs exactly (tested). Where they differ: they ignore padding, the reduce bucket and stage 1;
for ZeRO-3 they leave out the 16-bit gradient slice DeepSpeed keeps (grad_partitions_flat_buffer)
and count one gathered layer where the default reuse distance keeps the whole model gathered; for
offload their host figure is per node, the whole model's 16-18 bytes per parameter on each node
(ZeRO-2: whatever the number of nodes; plus 4 bytes × GPUs for loading), times a 1.5 safety
factor, while we count each rank's slice × ranks per node and the fp32 model each rank builds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dsgpt.config import FP32_WEIGHTS, REPO_ROOT, Config, build_config, load_config
from dsgpt.errors import UserError
from dsgpt.model import PRESETS, GPTConfig

GiB = 2**30
DS_DEFAULT_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size and allreduce_bucket_size defaults
DS_DEFAULT_PERSISTENCE = 100_000  # stage3_param_persistence_threshold
DS_DEFAULT_MAX_LIVE = 1_000_000_000  # stage3_max_live_parameters
DS_DEFAULT_SUB_GROUP = 1_000_000_000  # ZeRO-3 sub_group_size: the step works on one at a time


@dataclass(frozen=True)
class Strategy:
    name: str  # its template is ds_configs/<name>.json
    stage: int
    offload: bool = False

    @property
    def template(self) -> str:
        return f"ds_configs/{self.name}.json"


# Cheapest first: each step down costs speed (more communication, or the CPU doing the update).
STRATEGIES = (Strategy("zero0", 0), Strategy("zero1", 1), Strategy("zero2", 2), Strategy("zero3", 3),
              Strategy("zero2_offload", 2, offload=True), Strategy("zero3_offload", 3, offload=True))


def pad_vocab(vocab_size: int) -> int:
    """The trainer's rule (dsgpt/train/run_setup.model_config): a data vocabulary is padded to a
    multiple of 64 for faster matmuls."""
    return -(-vocab_size // 64) * 64


def param_layout(m: GPTConfig) -> list[tuple[str, int, bool]]:
    """(name, numel, weight-decayed) of every parameter in GPT(m).named_parameters() order; the
    tied lm_head is the token table, listed once. Decayed = dim >= 2, as dsgpt.model.param_groups."""
    E, b = m.n_embd, m.bias
    out = [("transformer.wte.weight", m.vocab_size * E, True), ("transformer.wpe.weight", m.block_size * E, True)]

    def ln(prefix):
        return [(f"{prefix}.weight", E, False)] + ([(f"{prefix}.bias", E, False)] if b else [])

    def linear(prefix, n_in, n_out):
        return [(f"{prefix}.weight", n_in * n_out, True)] + ([(f"{prefix}.bias", n_out, False)] if b else [])

    for i in range(m.n_layer):
        h = f"transformer.h.{i}"
        out += ln(f"{h}.ln_1") + linear(f"{h}.attn.c_attn", E, 3 * E) + linear(f"{h}.attn.c_proj", E, E)
        out += ln(f"{h}.ln_2") + linear(f"{h}.mlp.c_fc", E, 4 * E) + linear(f"{h}.mlp.c_proj", 4 * E, E)
    return out + ln("transformer.ln_f")


@dataclass
class ModelStates:
    """Bytes one rank holds for the model, by kind. `params`, `master` and `optimizer` are exactly
    what a DeepSpeed engine holds (sum of engine.module parameters or their ZeRO-3 shards; the fp32
    master copy; describe_engine's optimizer_state_bytes)."""
    params: int
    grads: int
    master: int
    optimizer: int
    buffers: int  # communication buckets, ZeRO-3's gathered and persistent weights
    step: int  # transients while the optimizer steps
    host: tuple[str, ...] = ()  # which of the above live in host memory (offload)

    KINDS = ("params", "grads", "master", "optimizer", "buffers", "step")

    @property
    def on_device(self) -> int:
        return sum(getattr(self, k) for k in self.KINDS if k not in self.host)

    @property
    def on_host(self) -> int:
        return sum(getattr(self, k) for k in self.host)


def model_states(m: GPTConfig, ds: dict, world: int, on_gpu: bool = True) -> ModelStates:
    """Per-rank model-state bytes of GPT(m) under the resolved DeepSpeed config `ds` on `world`
    data-parallel ranks (see the module docstring for every term)."""
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    mixed = ds.get("bf16", {}).get("enabled") is True or ds.get("fp16", {}).get("enabled") is True
    p = 2 if mixed else 4
    offload_opt = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    offload_param = (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme")
    layout = param_layout(m)
    numels = [n for _, n, _ in layout]
    total = sum(numels)
    groups = [g for g in ([n for _, n, d in layout if d], [n for _, n, d in layout if not d]) if g]
    biggest = max(numels)
    bucket = zero.get("reduce_bucket_size", DS_DEFAULT_BUCKET)
    # A GPU allocates a bucket whole (twice with overlap_comm); CPU pages count once gradients touch them.
    bucket_bytes = p * (bucket * (2 if zero.get("overlap_comm") else 1) if on_gpu else min(bucket, total))
    cpu_adam_temps = 0 if on_gpu else 2 * 4  # bytes per element of torch's unfused AdamW temporaries

    if stage == 0:
        biggest_group = max(sum(g) for g in groups)
        return ModelStates(
            params=p * total, grads=p * total, master=4 * total if mixed else 0, optimizer=8 * total,
            buffers=p * min(total, ds.get("allreduce_bucket_size", DS_DEFAULT_BUCKET)),
            step=(4 * biggest_group if mixed else 0) + cpu_adam_temps * biggest)
    if stage in (1, 2):
        slices = [math.ceil(sum(g) / (2 * world)) * 2 for g in groups]
        part = sum(slices)
        if offload_opt:  # host: master, moments, fp32 grad slice (+ a 16-bit staging copy of the slice,
            # counted with the grads); the GPU keeps the weights, the bucket and one parameter's gradient
            return ModelStates(params=p * total, grads=(4 + p) * part, master=4 * part, optimizer=8 * part,
                               buffers=bucket_bytes + p * biggest, step=0, host=("grads", "master", "optimizer"))
        return ModelStates(
            params=p * total, grads=p * total if stage == 1 else p * part, master=4 * part, optimizer=8 * part,
            buffers=bucket_bytes, step=(4 + (p if mixed else 0) + cpu_adam_temps) * max(slices))
    # ZeRO-3
    shards = [math.ceil(n / world) for n in numels]
    part = sum(shards)
    threshold = zero.get("stage3_param_persistence_threshold", DS_DEFAULT_PERSISTENCE)
    persistent = sum(n for n in numels if n <= threshold)
    gathered = min(total - persistent, zero.get("stage3_max_live_parameters", DS_DEFAULT_MAX_LIVE))
    group_slices = [sum(math.ceil(n / world) for n in g) for g in groups]
    largest_slice = min(max(group_slices), zero.get("sub_group_size", DS_DEFAULT_SUB_GROUP))
    host = (("params",) if offload_param else ()) + (("grads", "master", "optimizer", "step") if offload_opt else ())
    return ModelStates(
        params=p * part, grads=p * part, master=4 * part, optimizer=8 * part,
        buffers=p * (persistent + gathered + (bucket if on_gpu else min(bucket, total))),
        step=(4 + (p if mixed else 0)) * largest_slice + (0 if offload_opt else cpu_adam_temps * largest_slice),
        host=host)


def activation_widths(precision: str) -> tuple[int, int]:
    """(a, r): bytes of the matmuls' activations and of the residual stream (LayerNorm's input and
    statistics). They differ only under autocast (bf16-mixed), where the stream stays fp32."""
    return {"fp32": (4, 4), "bf16-mixed": (2, 4)}.get(precision, (2, 2))


def activation_bytes_per_token(m: GPTConfig, a: int, checkpointing: bool, r: Optional[int] = None) -> int:
    """Activation bytes per token of a micro batch, the logits' loss aside (`logits_bytes`): the
    blocks, and ln_f's input, output and statistics plus the token ids and targets."""
    E, L, r = m.n_embd, m.n_layer, r or a
    outside = r * E + a * E + 2 * r + 16 + (E if m.dropout > 0 else 0)  # ln_f, ids and targets, embedding dropout
    return (L * r * E if checkpointing else L * block_bytes_per_token(m, a, r)) + outside


def block_bytes_per_token(m: GPTConfig, a: int, r: Optional[int] = None) -> int:
    """What autograd saves in one block per token: 16 activations of width E (the two LayerNorm
    inputs in the residual stream's r bytes), LayerNorm statistics, the attention's log-sum-exp
    (fp32 per head), dropout masks."""
    r = r or a
    masks = 2 * m.n_embd if m.dropout > 0 else 0  # one byte per element, two dropouts per block
    return 2 * r * m.n_embd + 14 * a * m.n_embd + 4 * r + 4 * m.n_head + masks


def autocast_weight_bytes(m: GPTConfig, layers: int, head: bool = True) -> int:
    """Under autocast, the bf16 copies of the matmul weights that autograd keeps for backward:
    `layers` blocks' 12E² and the head's V·E."""
    return 2 * (layers * 12 * m.n_embd ** 2 + (m.vocab_size * m.n_embd if head else 0))


def logit_bytes_per_entry(a: int) -> int:
    """The loss's bytes per vocabulary entry per token: the fp32 gradient, made in the logits' own
    storage when they are fp32 (a = 4), else beside the a-byte logits (forward) or gradient (backward)."""
    return 4 if a == 4 else 4 + a


def logits_bytes(m: GPTConfig, tokens: int, a: int) -> int:
    """The loss's peak over the whole micro batch or, with model.loss_chunk_tokens, over one chunk at
    a time (`logit_bytes_per_entry` per vocabulary entry per token) plus `chunk_head_gradient_bytes`."""
    logits = logit_bytes_per_entry(a) * m.vocab_size * logit_tokens(m, tokens)
    return logits + chunk_head_gradient_bytes(m, a) if m.loss_chunk_tokens else logits


def logit_tokens(m: GPTConfig, tokens: int) -> int:
    """How many tokens' logits the loss holds at once: the micro batch's, or one chunk's."""
    return min(m.loss_chunk_tokens, tokens) if m.loss_chunk_tokens else tokens


def chunk_head_gradient_bytes(m: GPTConfig, a: int) -> int:
    """What loss chunks keep besides their logits: the output layer's fp32 weight gradient (4VE)
    and, when a != 4, each chunk's a-byte share of it made beside it (aVE)."""
    return (4 + (a if a != 4 else 0)) * m.vocab_size * m.n_embd


def activation_bytes(m: GPTConfig, micro: int, a: int, checkpointing: bool, r: Optional[int] = None) -> int:
    """Peak activation bytes of a micro batch: everything saved, plus the larger of the loss's peak
    and (with checkpointing) one block recomputed in backward."""
    tokens = micro * m.block_size
    saved = tokens * activation_bytes_per_token(m, a, checkpointing, r)
    casts = r is not None and r != a  # autocast: bf16 weight copies, all blocks' or the recomputed one's
    if checkpointing:
        block = tokens * block_bytes_per_token(m, a, r) + (autocast_weight_bytes(m, 1, head=False) if casts else 0)
        return saved + (autocast_weight_bytes(m, 0) if casts else 0) + max(logits_bytes(m, tokens, a), block)
    return saved + (autocast_weight_bytes(m, m.n_layer) if casts else 0) + logits_bytes(m, tokens, a)


def host_init_bytes(m: GPTConfig, stage: int) -> int:
    """Each rank builds the fp32 model on the host before the engine moves it (not ZeRO-3)."""
    return 0 if stage == 3 else 4 * sum(n for _, n, _ in param_layout(m))


# ---------------------------------------------------------------------------------------------
# Planning: every strategy x checkpointing, the largest micro batch that fits, the best of them.

@dataclass
class Request:
    base: Config  # run config the plan starts from (model shape, precision; written back with --write)
    model: GPTConfig  # the shape planned for (block size and padded vocabulary included)
    gpus_per_node: int
    nodes: int
    gpu_mem_gib: float
    batch_seqs: int  # global batch target, sequences per optimizer step
    batch_note: str  # how the target was given, for the printout
    cpu_mem_gib: Optional[float] = None  # host memory per node; None = not checked
    headroom: float = 0.10  # fraction of GPU memory kept free (allocator fragmentation)
    reserve_gib: float = 1.0  # CUDA context, NCCL buffers

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def usable(self) -> float:
        return self.gpu_mem_gib * (1 - self.headroom) * GiB - self.reserve_gib * GiB


@dataclass
class Candidate:
    strategy: Strategy
    checkpointing: bool
    micro: Optional[int]  # None: not even one sequence fits
    gas: Optional[int]
    states: ModelStates
    activations: int  # at `micro` (or at 1 when nothing fits)
    host_per_node: int
    why_not: str = ""

    @property
    def device_total(self) -> int:
        return self.states.on_device + self.activations

    @property
    def fits(self) -> bool:
        return self.micro is not None


@dataclass
class Plan:
    request: Request
    per_rank: int  # sequences each rank handles per step
    candidates: list[Candidate] = field(default_factory=list)
    best: Optional[Candidate] = None

    @property
    def precision(self) -> str:
        return self.request.base.precision


def _ds_config(req: Request, strategy: Strategy) -> dict:
    """The DeepSpeed config a run with this strategy's template resolves to on the planned GPUs
    (bucket sizes, overlap, offload: what the estimate reads)."""
    from dsgpt.ds_config import resolve_ds_config
    return resolve_ds_config(_run_config(req, strategy, False, 1, 1), req.world, on_gpu=True)


def _check(name: str, value, positive_int: bool = True) -> None:
    ok = (isinstance(value, int) and not isinstance(value, bool) and value > 0) if positive_int else value > 0
    if not ok:
        kind = "a positive whole number" if positive_int else "a positive number"
        raise UserError(f"{name} = {value!r} is invalid: it must be {kind}.")


def make_request(*, config: Optional[str] = None, preset: Optional[str] = None, n_layer=None, n_head=None,
                 n_embd=None, block_size=None, vocab_size=None, loss_chunk_tokens=None,
                 precision: Optional[str] = None,
                 gpus_per_node: int = 1, nodes: int = 1, gpu_mem_gib: float, batch_tokens=None,
                 batch_seqs=None, cpu_mem_gib=None, headroom: float = 0.10, reserve_gib: float = 1.0) -> Request:
    """Resolve what the user gave (a run config and/or a preset and shape flags) into a Request."""
    if config is None and preset is None:
        raise UserError("dsgpt plan needs a model: give --preset (one of " + ", ".join(PRESETS) +
                        ") or --config with a run config such as configs/gpt2-124m.yaml; --n-layer, "
                        "--n-head, --n-embd and --block-size then change its shape.")
    if config is None:  # a preset's shipped run config (configs/gpt2-124m.yaml) is the natural base
        shipped = REPO_ROOT / "configs" / f"{preset}.yaml"
        config = str(shipped) if shipped.is_file() else None
    # Without any run config: what a GPU run of a GPT-2 preset uses (bf16, GPT-2's tokenizer).
    base = load_config(config) if config else Config(precision="bf16", data={"path": "data/corpus"})
    shape = {k: v for k, v in dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size).items()
             if v is not None}
    for k, v in shape.items():
        _check(f"--{k.replace('_', '-')}", v)
    for name, v in (("--gpus-per-node", gpus_per_node), ("--nodes", nodes)):
        _check(name, v)
    for name, v in (("--gpu-mem", gpu_mem_gib), ("--cpu-mem", cpu_mem_gib)):
        if v is not None:
            _check(name, v, positive_int=False)
    if not reserve_gib >= 0:
        raise UserError(f"--reserve = {reserve_gib!r} is invalid: it is the GiB per GPU kept for the CUDA "
                        f"context and NCCL, >= 0 (default 1).")
    if not 0 <= headroom < 1:
        raise UserError(f"--headroom = {headroom!r} is invalid: it is the fraction of GPU memory kept free, "
                        f"in [0, 1), e.g. 0.1.")
    if (batch_tokens is None) == (batch_seqs is None):
        raise UserError("Give the global batch once: --batch-tokens N (tokens per optimizer step, e.g. 524288) "
                        "or --batch-seqs N (sequences per step).")

    data = base.to_dict()
    if preset is not None:  # a preset named here replaces the base config's shape, not only its name
        data["model"].update(preset=preset, n_layer=None, n_head=None, n_embd=None, block_size=None)
    data["model"].update(shape)
    if loss_chunk_tokens is not None:
        if not (isinstance(loss_chunk_tokens, int) and loss_chunk_tokens >= 0):
            raise UserError(f"--loss-chunk-tokens = {loss_chunk_tokens!r} is invalid: it is the tokens per "
                            f"chunk of the loss, a whole number >= 0 (0 = the whole micro batch at once).")
        data["model"]["loss_chunk_tokens"] = loss_chunk_tokens
    base = build_config(data, "the plan's model")
    if vocab_size is not None:
        _check("--vocab-size", vocab_size)
        vocab = pad_vocab(vocab_size)
    elif base.model.vocab_size is not None:
        vocab = base.model.vocab_size  # an explicit model.vocab_size is used as is, as the trainer does
    elif base.data.path == "builtin":
        vocab = pad_vocab(base.data.builtin_vocab_size)
    else:
        vocab = pad_vocab(50257)  # prepared data of unknown vocabulary: GPT-2's tokenizer
    m = base.model
    gpt = GPTConfig.from_preset(m.preset, vocab_size=vocab, dropout=m.dropout, bias=m.bias,
                                loss_chunk_tokens=m.loss_chunk_tokens,
                                **{k: getattr(m, k) for k in ("n_layer", "n_head", "n_embd", "block_size")
                                   if getattr(m, k) is not None})
    if precision is not None:
        base = build_config({**base.to_dict(), "precision": precision}, "the plan")
    T = gpt.block_size
    if batch_tokens is not None:
        _check("--batch-tokens", batch_tokens)
        seqs = -(-batch_tokens // T)
        note = f"{batch_tokens:,} tokens / {T} per sequence = {seqs:,} sequences" + (
            " (rounded up)" if batch_tokens % T else "")
    else:
        _check("--batch-seqs", batch_seqs)
        seqs, note = batch_seqs, f"{batch_seqs:,} sequences x {T} = {batch_seqs * T:,} tokens"
    return Request(base=base, model=gpt, gpus_per_node=gpus_per_node, nodes=nodes, gpu_mem_gib=gpu_mem_gib,
                   batch_seqs=seqs, batch_note=note, cpu_mem_gib=cpu_mem_gib, headroom=headroom,
                   reserve_gib=reserve_gib)


def plan(req: Request) -> Plan:
    per_rank = -(-req.batch_seqs // req.world)
    out = Plan(req, per_rank)
    a, r = activation_widths(req.base.precision)
    divisors = [d for d in range(per_rank, 0, -1) if per_rank % d == 0]  # largest first
    for strategy in STRATEGIES:
        ds = _ds_config(req, strategy)
        states = model_states(req.model, ds, req.world, on_gpu=True)
        host = req.gpus_per_node * max(states.on_host, host_init_bytes(req.model, strategy.stage))
        host_ok = req.cpu_mem_gib is None or host <= req.cpu_mem_gib * GiB
        for ckpt in (False, True):
            micro = next((d for d in divisors
                          if states.on_device + activation_bytes(req.model, d, a, ckpt, r) <= req.usable), None)
            why = ""
            if micro is None:
                why = "one sequence does not fit the GPU"
            elif not host_ok:
                why, micro = f"host needs {host / GiB:.1f} GiB per node > --cpu-mem {req.cpu_mem_gib:g}", None
            out.candidates.append(Candidate(strategy, ckpt, micro, per_rank // micro if micro else None, states,
                                            activation_bytes(req.model, micro or 1, a, ckpt, r), host, why))
    fitting = [c for c in out.candidates if c.fits]
    if not fitting:
        raise UserError(_nothing_fits(out))
    out.best = min(fitting, key=_rank)
    return out


def _rank(c: Candidate) -> tuple:
    """Offload (the CPU does the update, over PCIe) costs most, then recomputing the forward in
    backward (~1/3 more compute), then ZeRO-3's extra communication (it gathers the weights again in
    backward: 1.5x the volume), then small micro batches. ZeRO 1 and 2 move what ZeRO-0's all-reduce
    moves (a reduce-scatter and an all-gather), so among stages 0-2 the larger micro batch wins and
    the lower stage only breaks ties."""
    return c.strategy.offload, c.checkpointing, c.strategy.stage == 3, -(c.micro or 0), c.strategy.stage


def _nothing_fits(p: Plan) -> str:
    req = p.request
    on_gpu = [c for c in p.candidates if c.device_total <= req.usable]  # then host memory stopped them
    if on_gpu:
        c = min(on_gpu, key=lambda c: c.host_per_node)
        return (f"Nothing fits the host memory: {c.strategy.name} fits the GPUs at micro batch 1 but needs "
                f"{c.host_per_node / GiB:.1f} GiB of host memory per node, more than --cpu-mem {req.cpu_mem_gib:g}. "
                f"Raise --cpu-mem if the nodes have it, or use fewer GPUs per node, GPUs with more memory (so "
                f"nothing needs offloading), or a smaller model.")
    c = min(p.candidates, key=lambda c: c.device_total)
    need = c.device_total / GiB
    return (f"Nothing fits: the smallest setup ({c.strategy.name}" + (", activation checkpointing" if c.checkpointing
                                                                     else "") +
            f", micro batch 1) needs {need:.2f} GiB per GPU ({c.states.on_device / GiB:.2f} GiB model states + "
            f"{c.activations / GiB:.2f} GiB activations of one {req.model.block_size}-token sequence), but "
            f"{req.gpu_mem_gib:g} GiB GPUs leave {req.usable / GiB:.2f} GiB usable (after --headroom "
            f"{req.headroom:g} and --reserve {req.reserve_gib:g} GiB). To fit: use GPUs with at least "
            f"{math.ceil((need + req.reserve_gib) / (1 - req.headroom))} GiB, or more GPUs or nodes (ZeRO divides "
            f"optimizer state, gradients and under ZeRO-3 the stored weights between ranks; the weights in use "
            f"and the activations stay whole on each GPU), a shorter --block-size, "
            + ("bf16 instead of fp32, " if p.precision == "fp32" else "")
            + "or a smaller model.")


# ---------------------------------------------------------------------------------------------
# Output: the table, the arithmetic of the winner, and the run config.

def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def format_plan(p: Plan) -> str:
    req, m, best = p.request, p.request.model, p.best
    n = sum(x for _, x, _ in param_layout(m))
    w = 4 if p.precision in FP32_WEIGHTS else 2  # bytes of a weight and a gradient
    world = req.world
    lines = [
        f"model      {m.n_layer} layers x {m.n_embd} wide, {m.n_head} heads, context {m.block_size}, vocab "
        f"{m.vocab_size}{'' if m.bias else ', no biases'}: {n:,} parameters (tied embedding counted once)",
        f"precision  {p.precision}: weights and gradients {w} bytes, "
        + ("fp32 master 4, " if w == 2 else "") + "Adam moments 8 per parameter"
        + ("; the forward's matmuls in bf16 (autocast)" if p.precision == "bf16-mixed" else ""),
        f"ranks      {_n(req.nodes, 'node')} x {_n(req.gpus_per_node, 'GPU')} = {world} data-parallel "
        f"rank{'' if world == 1 else 's'}; usable per GPU "
        f"{req.gpu_mem_gib:g} GiB x {1 - req.headroom:g} - {req.reserve_gib:g} GiB = {req.usable / GiB:.2f} GiB",
        f"batch      {req.batch_note} per step = {_n(world, 'rank')} x {p.per_rank} per rank"
        + (f" ({world * p.per_rank} sequences: {req.batch_seqs} is not a multiple of {world})"
           if world * p.per_rank != req.batch_seqs else ""),
        "",
        "GiB per rank, at the largest micro batch that fits (micro x accumulation = sequences per rank):",
        f"{'strategy':<14} {'ckpt':<4} {'micro x accum':>13} {'weights':>8} {'grads':>7} {'master':>7} "
        f"{'Adam':>7} {'buffers':>8} {'step':>6} {'activ.':>7} {'GPU':>7} {'host/node':>9}  ",
    ]
    for c in p.candidates:
        def cell(kind, width, s=c.states):  # starred: in host memory
            return f"{_gib(getattr(s, kind)) + ('*' if kind in s.host else ''):>{width}}"
        mxg = f"{c.micro} x {c.gas}" if c.fits else "-"
        mark = "<- best" if c is best else ("" if c.fits else f"no: {c.why_not}")
        lines.append(f"{c.strategy.name:<14} {'yes' if c.checkpointing else 'no':<4} {mxg:>13} {cell('params', 8)} "
                     f"{cell('grads', 7)} {cell('master', 7)} {cell('optimizer', 7)} {cell('buffers', 8)} "
                     f"{cell('step', 6)} {_gib(c.activations):>7} {_gib(c.device_total):>7} "
                     f"{_gib(c.host_per_node):>9}  {mark}")
    lines.append("* in host memory (offload). GPU = the unstarred columns + activations; host/node = ranks per "
                 "node x the starred ones (or the fp32 model each rank builds before the engine moves it)"
                 + ("." if req.cpu_mem_gib is None else f", checked against --cpu-mem {req.cpu_mem_gib:g}."))
    lines += ["", *_explain(p)]
    return "\n".join(line.rstrip() for line in lines)


def _explain(p: Plan) -> list[str]:
    req, m, best = p.request, p.request.model, p.best
    a, r = activation_widths(p.precision)
    L, T = m.n_layer, m.block_size
    tokens = best.micro * T
    body = activation_bytes_per_token(m, a, best.checkpointing, r)
    block = block_bytes_per_token(m, a, r)
    logits = logits_bytes(m, tokens, a)
    lv = f"{logit_bytes_per_entry(a)}V"
    loss = f"{lv} x {logit_tokens(m, tokens):,} logit tokens"
    if m.loss_chunk_tokens:
        loss += f" + head gradient {chunk_head_gradient_bytes(m, a):,}"
    if r == a:
        per_block, outside, kept = "16aE + 4a + 4H", "2aE + 2a + 16", "L*aE"
        casts = ""
    else:  # autocast: an fp32 residual stream (r) beside bf16 matmul activations (a), bf16 weight copies
        per_block, outside, kept = "2rE + 14aE + 4r + 4H", "rE + aE + 2r + 16", "L*rE"
        copies = autocast_weight_bytes(m, 0 if best.checkpointing else L)
        casts = f" + bf16 weight copies {copies:,}"
    if best.checkpointing:
        formula = (f"{tokens:,} tokens x ({kept} + {outside} = {body:,}){casts} + max({loss}, "
                   f"tokens x block {block:,}" + (" + its weight copies" if casts else "") + ")")
    else:
        formula = (f"{tokens:,} tokens x (L*({per_block}) + {outside} = {L}*{block:,} + "
                   f"{body - L * block:,} = {body:,}){casts} + {loss}")
    hint = []
    if not m.loss_chunk_tokens and logits > best.activations / 4:
        chunk = 4096
        hint = [f"  hint: the loss's logits take {_gib(logits)} GiB of that; model.loss_chunk_tokens={chunk} would "
                f"take {_gib(logits_bytes(dataclasses.replace(m, loss_chunk_tokens=chunk), tokens, a))} GiB "
                f"(then plan again with it in --config, or --loss-chunk-tokens {chunk})"]
    def names(cs):
        return ", ".join(c.strategy.name + (" +ckpt" if c.checkpointing else "") for c in cs) or "none"
    order = sorted(p.candidates, key=_rank)
    above = [c for c in order[:order.index(best)] if not c.fits]
    below = [c for c in order[order.index(best) + 1:] if c.fits]
    world = req.world
    return [
        f"recommended: {best.strategy.name}" + (" with activation checkpointing" if best.checkpointing else "")
        + f", micro batch {best.micro} x {best.gas} accumulation steps x {_n(world, 'rank')} = "
          f"{best.micro * best.gas * world} sequences ({best.micro * best.gas * world * T:,} tokens) per step",
        f"  activations: {formula} = {_gib(best.activations)} GiB",
        f"  GPU: {_gib(best.states.on_device)} model states + {_gib(best.activations)} activations = "
        f"{_gib(best.device_total)} of {req.usable / GiB:.2f} GiB usable",
        "  why: setups rank by speed: no offload before offload (the CPU updates the weights, over PCIe), no "
        "activation checkpointing before it (~1/3 more compute), ZeRO 0-2 before ZeRO-3 (1.5x the communication), "
        "then the larger micro batch (ZeRO 0, 1 and 2 communicate the same volume), then the lower stage. It is "
        "the first that fits.",
        f"  ranked above but not fitting: {names(above)}",
        f"  fitting but ranked below: {names(below)}",
        *hint,
    ]


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _run_config(req: Request, strategy: Strategy, checkpointing: bool, micro: int, gas: int,
                name: Optional[str] = None) -> Config:
    data = req.base.to_dict()
    m = req.model
    data["model"].update(n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, block_size=m.block_size,
                         activation_checkpointing=checkpointing)
    data["train"].update(micro_batch_size=micro, grad_accum_steps=gas)
    data["deepspeed"].update(config=strategy.template, zero_stage=strategy.stage)
    if name:
        data["run"]["name"] = name
    return build_config(data, "the planned run config")


def write_run_config(p: Plan, path, force: bool = False) -> Path:
    """Write the recommended setup as a run YAML (the full resolved config, as the trainer reads it)."""
    import yaml

    from dsgpt.io import atomic_write_text
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} already exists; pass --force to replace it, or --write another file.")
    best = p.best
    cfg = _run_config(p.request, best.strategy, best.checkpointing, best.micro, best.gas, name=path.stem)
    header = (f"# Written by dsgpt plan: {best.strategy.name}, micro batch {best.micro} x {best.gas} accumulation "
              f"steps on {_n(p.request.world, 'rank')}, {_gib(best.device_total)} GiB per GPU planned.\n"
              f"# Launch it on {_n(p.request.world, 'rank')} (the batch assumes that many); check data.path.\n")
    atomic_write_text(path, header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path
