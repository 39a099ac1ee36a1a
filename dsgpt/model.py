"""The GPT-2 model: config with presets, the network, its loss and its FLOP count.

One file on purpose (after nanoGPT): everything about the network's shape lives here, and nothing
about parallelism does, because DeepSpeed wraps the module from outside.

Parameter names match Hugging Face's GPT2LMHeadModel exactly, so exporting is a transpose of the
Linear weights (HF stores them as Conv1D, (in, out)); see dsgpt/hf.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dsgpt.errors import UserError

# Label value that the loss skips (prompt tokens in SFT, padding); the same as PyTorch's and HF's.
IGNORE_INDEX = -100


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    block_size: int = 1024  # longest sequence the model can see (size of the position table)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2
    layer_norm_epsilon: float = 1e-5
    activation_checkpointing: bool = False  # recompute each block in backward to save memory
    # Training loss over this many tokens' logits at a time, each chunk's gradients made in
    # forward: the fp32 logits of the whole batch (B x T x vocab) never exist at once, and nothing
    # is recomputed. 0 = all at once.
    loss_chunk_tokens: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"model.{name} = {value!r} is invalid: it must be a positive integer.")
        if self.n_embd % self.n_head != 0:
            raise UserError(
                f"model.n_embd = {self.n_embd} is not divisible by model.n_head = {self.n_head}: "
                f"each head gets n_embd / n_head channels; pick n_head from the divisors of n_embd "
                f"or change n_embd to a multiple of n_head."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout = {self.dropout!r} is invalid: it must be in [0, 1), e.g. 0.0 or 0.1.")
        if not self.layer_norm_epsilon > 0:
            raise UserError(
                f"model.layer_norm_epsilon = {self.layer_norm_epsilon!r} is invalid: it must be > 0 (GPT-2 uses 1e-5)."
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """The preset's shape, with any field replaced by ``overrides`` (e.g. vocab_size=...)."""
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}: valid presets are {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# Shapes only; vocab_size and the rest come from the defaults or the caller's overrides.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "gpt2-1.5b": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None and mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        elif cache is None:  # packed examples: `mask` is block-diagonal and causal
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # attend over the cached tokens plus these; `mask` says which (None: all of them)
            k, v = cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"; exact (erf) GELU would not match its weights
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias),
            )
        )
        self.lm_head = OutputHead(cfg.n_embd, cfg.vocab_size, bias=False)
        # Tied input/output embeddings (GPT-2): one matrix, trained by both uses.
        self.lm_head.weight = self.transformer.wte.weight

        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layer)
        # (two per block), so the stream's variance does not grow with depth.
        for name, module in self.named_modules():
            if name.endswith("c_proj"):
                module.residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        # Initialize through apply() only: under ZeRO-3's deepspeed.zero.Init the parameters are
        # already sharded here, and DeepSpeed makes each module's whole around an apply() call.
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=getattr(module, "residual_std", 0.02))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; tied weights once. ``non_embedding`` subtracts only the position table:
        the token table is also the output layer, so it does real work per token."""
        def numel(p):  # a ZeRO-3 shard knows its whole size
            return getattr(p, "ds_numel", p.numel())
        n = sum(numel(p) for p in self.parameters())
        if non_embedding:
            n -= numel(self.transformer.wpe.weight)
        return n

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, pos: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, last_only: bool = False, targets: torch.Tensor | None = None):
        """Token ids (B, T) -> logits (B, T, vocab_size) for the next token at every position.

        With ``targets`` (B, T) (training): ``(summed loss, target count)`` as `token_loss_sum`
        gives, computed in chunks of ``loss_chunk_tokens`` when that is set.

        With a ``cache`` (generation), ``idx`` holds only the new tokens: they attend to the cached
        ones and to each other causally, their keys and values are appended to the cache, and the
        result is ``(logits, cache)``. ``pos`` (B, T) gives each token's position (default: right
        after the cached ones); ``valid`` (B, T) is False at left padding, which no token attends to;
        ``last_only`` computes the logits of the last position only.

        Without a cache, ``pos`` (B, T) marks packed examples (SFT): each 0 starts a new example,
        and a token attends causally within its own example only (see `packed_mask`).
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise UserError(
                f"input of {start + T} tokens is longer than the model's block_size {self.config.block_size}: "
                f"crop it to the last {self.config.block_size} tokens, or use a shorter data sequence length."
            )
        if cache is None and valid is not None:
            raise ValueError("`valid` (padding) needs a `cache`: only the cached forward masks padding")
        if cache is not None:
            mask = cache.extend(idx, valid)
        else:
            mask = None if pos is None else packed_mask(pos)
        if pos is None:
            pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            if self.config.activation_checkpointing and self.training:
                # Keep only each block's input; recompute its insides during backward.
                x = checkpoint(block, x, None, i, mask, use_reentrant=False)
            else:
                x = block(x, cache, i, mask)
        if last_only:
            x = x[:, -1:]
        x = self.transformer.ln_f(x)
        if targets is not None:
            chunk = self.config.loss_chunk_tokens
            if chunk:
                return self.lm_head(x, targets, chunk)
            return token_loss_sum(self.lm_head(x), targets, overwrite=True)  # the logits are not returned
        logits = self.lm_head(x)
        if cache is None:
            return logits
        cache.length += T
        return logits, cache


def packed_mask(pos: torch.Tensor) -> torch.Tensor:
    """The boolean (B, 1, T, T) attention mask of rows of packed examples, from their position ids
    (B, T): an example starts where pos is 0, and a query attends to the keys of its own example
    at or before it. Block-diagonal, so no attention (and no gradient) crosses an example boundary."""
    pos = pos if pos.dim() == 2 else pos[None]  # (T,) positions: the same for every row
    example = torch.cumsum(pos == 0, dim=1)
    T = pos.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=pos.device).tril()
    return ((example[:, :, None] == example[:, None, :]) & causal)[:, None]


class KVCache:
    """The keys and values of every layer for the tokens seen so far, so that generating a token
    computes only that token instead of the whole context again.

    Buffers hold ``max_len`` positions and are written in place (growing tensors would copy the
    whole cache every step); they are allocated on first use with the keys' shape, dtype and device.
    ``valid`` records which cached positions are real tokens: a batch of prompts of unequal length
    is left-padded, and the padding must never be attended to.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.valid: torch.Tensor | None = None
        self.padded = False  # whether any cached position is padding (then every step needs a mask)

    def reset(self) -> None:
        """Forget every position; the buffers are kept for reuse."""
        self.length, self.padded = 0, False

    def extend(self, idx: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor | None:
        """Record the new tokens idx (B, T); the boolean (B, 1, T, S) mask of the keys each may
        attend to, S = cached + new, or None when every new token may attend to every key."""
        (B, T), device = idx.shape, idx.device
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {end} were asked for")
        if self.valid is None:
            self.valid = torch.zeros(B, self.max_len, dtype=torch.bool, device=device)
        if valid is None:
            self.valid[:, start:end] = True
        else:
            self.valid[:, start:end] = valid
            self.padded = self.padded or not bool(valid.all())
        if T == 1 and not self.padded:
            return None
        q_pos = torch.arange(start, end, device=device)[:, None]
        k_pos = torch.arange(end, device=device)[None, :]
        allowed = (k_pos <= q_pos) & self.valid[:, None, :end]  # causal, offset by the cached length
        # A padding token attends to itself: a query with no key at all would make NaNs, and a NaN
        # value times a zero attention weight is still NaN in the rows that do use it.
        allowed |= k_pos == q_pos
        return allowed[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys and values (B, H, T, D); all of that layer's so far."""
        if len(self.k) <= layer:
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.k.append(k.new_zeros(shape))
            self.v.append(v.new_zeros(shape))
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def _loss_and_gradient(logits: torch.Tensor, labels: torch.Tensor, overwrite: bool,
                       want_gradient: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cross entropy of logits (N, V) against labels (N,): (the fp32 sum over the counted rows, the
    counted-row mask, the fp32 gradient softmax - one-hot or None). The gradient's rows of uncounted
    labels are garbage: the caller masks them.

    One softmax, turned into the gradient in place, written over the logits when ``overwrite``
    says nobody else reads them (or when they are not fp32, as a copy is made anyway). The
    log-sum-exp comes from the softmax too: the largest logit's probability is 1 / sum(exp(x - max)),
    never smaller than 1/V.

    Not torch.exp: in about one training process in five on this CPU build (torch 2.13), its call in
    the loss gave the rows of the second OpenMP thread relative errors of ~1e-4, so that two runs
    of one seed differed; the softmax kernel computes its own exponentials and has not."""
    counted = labels != IGNORE_INDEX
    target = labels.masked_fill(~counted, 0)[:, None]  # any valid index: these rows count as 0
    picked = logits.gather(1, target).squeeze(1).float()
    top, at_top = logits.max(dim=-1, keepdim=True)
    work = logits.float()  # a copy unless the logits are fp32 already: then ours only if allowed
    ours = overwrite or logits.dtype != torch.float32
    probs = torch.softmax(work, -1, out=work if ours else None)
    lse = (top.float() - probs.gather(1, at_top).log()).squeeze(1)
    loss = torch.where(counted, lse - picked, 0.0).sum()
    if not want_gradient:
        return loss, counted, None
    return loss, counted, probs.scatter_add_(1, target, probs.new_full(target.shape, -1.0))


class _SummedCrossEntropy(torch.autograd.Function):
    """Cross entropy of logits (N, V), any float dtype, summed in fp32 over the rows whose label is
    not IGNORE_INDEX; the same value and gradient as F.cross_entropy(..., reduction="sum").

    F.cross_entropy keeps the fp32 log-probabilities (N x V) for backward and builds the gradient
    in more passes over N x V (a zero-filled one-hot, nll and log_softmax backward). Here forward
    makes the gradient (`_loss_and_gradient`) for backward to scale: with ``overwrite`` no N x V
    tensor is allocated at all for fp32 logits, and bf16 logits get only the fp32 softmax, the size
    of F.cross_entropy's fp32 copy."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, overwrite: bool) -> torch.Tensor:
        loss, counted, grad = _loss_and_gradient(logits, labels, overwrite, ctx.needs_input_grad[0])
        if grad is not None:
            ctx.save_for_backward(grad, counted)
            ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad, counted = ctx.saved_tensors
        grad.mul_((counted * grad_out)[:, None])  # in place: a second backward through it fails loudly
        return grad.to(ctx.dtype), None, None


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """Cross entropy summed over positions whose label is not -100, in fp32; any leading shape.
    ``overwrite=True`` lets it use the logits' storage (they hold garbage afterwards)."""
    return _SummedCrossEntropy.apply(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), overwrite)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor,
                   overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross entropy over positions whose label is not -100, and how many there were.

    ``labels`` are aligned with ``logits`` (the caller shifts them). A sum, not a mean, so the trainer
    can divide by the token count of the whole optimizer step: every target token then weighs the
    same whatever the split into micro-batches and ranks. Computed in fp32 (bf16 logits lose the tail).
    ``overwrite``: the caller is done with ``logits``; the loss may use their storage.
    """
    return summed_cross_entropy(logits, labels, overwrite), (labels != IGNORE_INDEX).sum()


def _chunked_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                       want_hidden: bool, want_weight: bool):
    """The summed cross entropy of ``hidden @ weight.T`` (N, V) against labels (N,), `chunk` rows
    at a time, and the gradients of hidden and weight asked for (else None), made chunk by chunk:
    only one chunk's logits (and their fp32 gradient) exist at once. The matmuls run in the dtype
    the logits get (autocast's under autocast), as the unchunked forward and backward do; the
    weight's gradient sums the chunks in fp32."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    weight = weight.to(dtype)  # cast once, not once per chunk
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = weight.new_zeros(weight.shape, dtype=torch.float32) if want_weight else None
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.size(0), chunk):
        rows = slice(i, i + chunk)
        # A call per chunk: its logits are freed before the next chunk's are made.
        total += _head_chunk(hidden[rows].to(dtype), weight, labels[rows],
                             grad_hidden[rows] if want_hidden else None, grad_weight)
    return total, grad_hidden, grad_weight


def _head_chunk(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, grad_hidden: torch.Tensor | None,
                grad_weight: torch.Tensor | None) -> torch.Tensor:
    """One chunk of `_chunked_head_loss`: its summed loss; its gradients written into ``grad_hidden``
    (its rows) and added to ``grad_weight`` when given."""
    logits = F.linear(h, weight)
    want = grad_hidden is not None or grad_weight is not None
    loss, counted, grad = _loss_and_gradient(logits, labels, True, want)
    if not want:
        return loss
    if grad.dtype != logits.dtype:
        grad = logits.copy_(grad)  # back to the matmul dtype, in the logits' storage
    # The rows of uncounted labels are zeroed on the E-wide side, cheaper than on the V-wide one.
    keep = counted[:, None].to(h.dtype)
    if grad_hidden is not None:
        torch.mul(torch.mm(grad, weight), keep, out=grad_hidden)
    if grad_weight is not None:
        if grad.dtype == torch.float32:
            grad_weight.addmm_(grad.t(), h * keep)
        else:  # summed in fp32: no rounding to bf16 per chunk
            grad_weight += torch.mm(grad.t(), h * keep)
    return loss


class _ChunkedHeadLoss(torch.autograd.Function):
    """`_chunked_head_loss` with its gradients made in forward, so nothing is recomputed: backward
    only scales the two it kept (N x E, and V x E in fp32) by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk: int) -> torch.Tensor:
        total, grad_hidden, grad_weight = _chunked_head_loss(hidden, weight, labels, chunk,
                                                             *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors  # scaled in place: a second backward fails loudly
        return (None if grad_hidden is None else grad_hidden.mul_(grad_out),
                None if grad_weight is None else grad_weight.mul_(grad_out).to(ctx.weight_dtype), None, None)


class OutputHead(nn.Linear):
    """The output layer (its weight is the token table). ``head(hidden)`` gives the logits;
    ``head(hidden, labels, chunk)`` the training loss as `token_loss_sum` gives it, computed `chunk`
    tokens at a time by `_ChunkedHeadLoss`. Either way it is called as a module, so ZeRO-3 gathers
    the weight around the call."""

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None, chunk: int = 0):
        if labels is None:
            return super().forward(hidden)
        h, y = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)
        if torch.is_grad_enabled() and (h.requires_grad or self.weight.requires_grad):
            loss = _ChunkedHeadLoss.apply(h, self.weight, y, chunk)
        else:  # no backward to come (Function.apply would still say the inputs need gradients)
            loss = _chunked_head_loss(h, self.weight, y, chunk, False, False)[0]
        return loss, (y != IGNORE_INDEX).sum()


def _num_params_non_embedding(cfg: GPTConfig) -> int:
    """What GPT(cfg).num_params(non_embedding=True) returns, by arithmetic (no allocation)."""
    E, b = cfg.n_embd, int(cfg.bias)
    layer_norm = E + b * E
    attn = (E * 3 * E + b * 3 * E) + (E * E + b * E)
    mlp = (E * 4 * E + b * 4 * E) + (4 * E * E + b * E)
    per_block = 2 * layer_norm + attn + mlp
    return cfg.vocab_size * E + cfg.n_layer * per_block + layer_norm  # wte (also lm_head) + blocks + ln_f


def flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs per token, forward + backward: 6*N + 12*L*H*Q*T (PaLM, appendix B).

    N = non-embedding parameters (as ``GPT.num_params(non_embedding=True)``: the tied token table is
    counted because it is also the output matmul), L = n_layer, H = n_head, Q = head dim,
    T = block_size. 6N is the weight matmuls (2 forward, 4 backward per parameter); 12*L*H*Q*T is
    attention's QK^T and AV over a full context. Used for MFU.
    """
    N = _num_params_non_embedding(cfg)
    L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.block_size
    return float(6 * N + 12 * L * H * Q * T)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups: decay matrices and embeddings (dim >= 2), not biases or LayerNorm.

    named_parameters() yields a tied tensor once, so wte/lm_head appears in exactly one group.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # The whole shape: a parameter built sharded under ZeRO-3 (zero.Init) holds an empty
        # tensor here, and would otherwise land among the biases without weight decay.
        shape = getattr(p, "ds_shape", p.shape)
        (decay if len(shape) >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]  # an empty group upsets some optimizers
