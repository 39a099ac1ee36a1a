"""`dsgpt plan`: its byte counts against real DeepSpeed engines, DeepSpeed's own estimators and
autograd's saved tensors; its peak against the measured RSS of CPU runs; the recommendation, the
written run config, and every bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch

from bench.common import peak_allocated_bytes
from conftest import launch
from dsgpt import cli
from dsgpt.config import load_config
from dsgpt.ds_config import resolve_ds_config
from dsgpt.errors import UserError
from dsgpt.model import GPT, GPTConfig
from dsgpt.plan import (STRATEGIES, activation_bytes, activation_widths, autocast_weight_bytes, block_bytes_per_token,
                        format_plan, logits_bytes, make_request, model_states, param_layout,
                        plan, write_run_config)

# Odd sizes on purpose: 45 wide, 33 positions, groups of odd length, so ZeRO's padding shows.
ODD = ["model.n_layer=3", "model.n_head=3", "model.n_embd=45", "model.block_size=33", "data.builtin_vocab_size=500",
       "train.micro_batch_size=2", "model.activation_checkpointing=false"]
ODD_SHAPE = GPTConfig(n_layer=3, n_head=3, n_embd=45, block_size=33, vocab_size=512)  # 500 padded to 64
BF16 = ["precision=bf16"]
MIXED = ["precision=bf16-mixed"]  # fp32 model states, like fp32
SETUPS = {  # job name -> overrides on configs/tiny.yaml: each stage with its template, as users run it
    name: [f"deepspeed.config=ds_configs/{template}.json", f"deepspeed.zero_stage={stage}", *extra]
    for name, template, stage, extra in [
        ("zero0", "zero0", 0, []), ("zero1", "zero1", 1, []), ("zero2", "zero2", 2, []), ("zero3", "zero3", 3, []),
        ("zero0_bf16", "zero0", 0, BF16), ("zero1_bf16", "zero1", 1, BF16), ("zero3_bf16", "zero3", 3, BF16),
        ("zero0_mixed", "zero0", 0, MIXED), ("zero2_mixed", "zero2", 2, MIXED),
        ("zero2_offload", "zero2_offload", 2, []), ("zero3_offload", "zero3_offload", 3, [])]
}


def probe(jobs: list[dict], ranks: int, work) -> dict:
    """Run tests/workers/plan_probe.py; {job name: [summary per rank]}."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "jobs.json").write_text(json.dumps(jobs))
    launch("tests/workers/plan_probe.py", [str(work / "jobs.json"), str(work / "out")], ranks=ranks, timeout=600)
    return {j["name"]: [json.loads((work / "out" / f"{j['name']}.rank{r}.json").read_text()) for r in range(ranks)]
            for j in jobs}


# ---- the parameter layout ----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [ODD_SHAPE, GPTConfig.from_preset("tiny", vocab_size=2048, bias=False),
                                   GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=64)])
def test_layout_is_the_models_parameters(shape):
    with torch.device("meta"):
        model = GPT(shape)
    real = [(name, p.numel(), p.dim() >= 2) for name, p in model.named_parameters()]
    assert param_layout(shape) == real
    assert sum(n for _, n, _ in real) == model.num_params(non_embedding=False)


# ---- model states: exactly what DeepSpeed engines hold ----------------------------------------

@pytest.mark.parametrize("ranks", [1, 2])
def test_model_states_equal_what_real_engines_hold(tmp_path, ranks):
    jobs = [{"name": name, "overrides": ODD + extra, "steps": 1} for name, extra in SETUPS.items()]
    results = probe(jobs, ranks, tmp_path)
    for job in jobs:
        cfg = load_config("configs/tiny.yaml", job["overrides"])
        est = model_states(ODD_SHAPE, resolve_ds_config(cfg, ranks, on_gpu=False), ranks, on_gpu=False)
        for rank, got in enumerate(results[job["name"]]):
            where = f"{job['name']} on rank {rank} of {ranks}"
            e = got["engine"]  # the setting took effect
            assert (e["zero_stage"], e["world_size"], e["offload_optimizer"]) == (
                cfg.deepspeed.zero_stage, ranks, "offload" in job["name"]), where
            assert e["param_dtype"] == ("bfloat16" if cfg.precision == "bf16" else "float32"), where
            assert got["n_params"] == sum(n for _, n, _ in param_layout(ODD_SHAPE)), where
            assert got["params_bytes"] == est.params, where
            assert got["master_bytes"] == est.master, where
            assert e["optimizer_state_bytes"] == est.optimizer, where
    # The shards are real: ZeRO 1-3 hold less optimizer state per rank on 2 ranks than on 1.
    if ranks == 2:
        full = model_states(ODD_SHAPE, resolve_ds_config(load_config("configs/tiny.yaml", ODD), 1, False), 1, False)
        assert results["zero1"][0]["engine"]["optimizer_state_bytes"] < full.optimizer


# ---- DeepSpeed's own estimators, where they assume what we do ---------------------------------

def _ds(template: str, world: int) -> dict:
    cfg = load_config(None, [f"deepspeed.config=ds_configs/{template}.json", "precision=bf16",
                             "model.preset=gpt2-124m"])
    return resolve_ds_config(cfg, world, on_gpu=True)


@pytest.mark.parametrize("gpus,nodes", [(1, 1), (2, 1), (8, 1), (8, 4)])
def test_agrees_with_deepspeeds_estimators(gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    m = GPTConfig.from_preset("gpt2-124m", vocab_size=50304)
    total = sum(n for _, n, _ in param_layout(m))
    world = gpus * nodes
    # These are what the *_all_cold functions print (their per-GPU and per-CPU columns).
    _, ds_gpu = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=False)
    s = model_states(m, _ds("zero2", world), world)
    # theirs: 2 weights + (2 grads + 4 fp32 grads + 4 master + 8 moments) / N; the fp32 grad slice is master-sized
    assert s.params + s.grads + s.master + s.optimizer + s.master == ds_gpu
    _, ds_gpu = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=True)
    assert model_states(m, _ds("zero2_offload", world), world).params == ds_gpu  # the GPU keeps the 16-bit weights

    largest_layer = max(n for _, n, _ in param_layout(m))  # the token table (also the output layer)
    _, ds_gpu, layer_mem = estimate_zero3_model_states_mem_needs(total, largest_layer, gpus, nodes, cpu_offload=False,
                                                                  cpu_offload_params=False)
    s = model_states(m, _ds("zero3", world), world)
    # theirs: 4 x the largest layer + (2 weights + 4 fp32 grads + 4 master + 8 moments) / N; they leave out
    # the 16-bit gradient slice ZeRO-3 also keeps (its grad_partitions_flat_buffer), which we count
    assert s.params + s.master + s.optimizer + s.master == ds_gpu - layer_mem
    ds_cpu, _, _ = estimate_zero3_model_states_mem_needs(total, largest_layer, gpus, nodes, cpu_offload=True,
                                                         cpu_offload_params=True, zero_init=True)
    s = model_states(m, _ds("zero3_offload", world), world)
    assert set(s.host) >= {"params", "master", "optimizer"}
    # theirs, per node without the 1.5 factor: the same 18 bytes per parameter of the node's share
    assert gpus * (s.params + s.master + s.optimizer + s.master) == pytest.approx(ds_cpu / 1.5, rel=1e-9)


# ---- activations: autograd's saved tensors --------------------------------------------------------

def saved_activation_bytes(model: GPT, x, y, checkpointing: bool) -> int:
    """Bytes of the distinct tensors autograd saves for backward, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    model.config.activation_checkpointing = checkpointing
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, targets=y)
    return sum(seen.values())


def one_more_layer_saves(x, y, dtype=torch.float32, autocast: bool = False) -> dict:
    """{checkpointing: bytes autograd saves for a third block over a two-block model}."""
    per_layer = {}
    for ckpt in (False, True):
        saved = []
        for L in (2, 3):
            torch.manual_seed(0)
            model = GPT(GPTConfig(n_layer=L, n_head=4, n_embd=96, block_size=48, vocab_size=256)).to(dtype).train()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                saved.append(saved_activation_bytes(model, x, y, ckpt))
        per_layer[ckpt] = saved[1] - saved[0]
    return per_layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_layer_activation_formula_matches_saved_tensors(dtype):
    a = torch.finfo(dtype).bits // 8
    x = torch.randint(0, 256, (2, 48))
    y = torch.randint(0, 256, (2, 48))
    per_layer = {k: v / x.numel() for k, v in one_more_layer_saves(x, y, dtype).items()}
    m = GPTConfig(n_layer=3, n_head=4, n_embd=96, block_size=48, vocab_size=256)
    assert per_layer[False] == block_bytes_per_token(m, a) == 16 * a * 96 + 4 * a + 4 * 4
    assert per_layer[True] == a * 96  # checkpointing keeps each block's input only


def test_per_layer_activation_formula_under_autocast():
    """bf16-mixed: fp32 weights and residual stream, the matmuls' activations and weight copies in bf16."""
    x = torch.randint(0, 256, (2, 48))
    y = torch.randint(0, 256, (2, 48))
    per_layer = one_more_layer_saves(x, y, autocast=True)
    m = GPTConfig(n_layer=3, n_head=4, n_embd=96, block_size=48, vocab_size=256)
    a, r = activation_widths("bf16-mixed")
    assert (a, r) == (2, 4)
    one_block_copies = autocast_weight_bytes(m, 1, head=False)
    assert one_block_copies == 2 * 12 * 96 ** 2
    assert per_layer[False] == x.numel() * block_bytes_per_token(m, a, r) + one_block_copies
    assert per_layer[True] == x.numel() * r * 96  # checkpointing keeps each block's fp32 input only


@pytest.mark.parametrize("chunk", [0, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_peak_matches_the_logits_formula(dtype, chunk):
    """The training loss's peak, through the model's own forward and backward (allocations recorded
    by the profiler), is logit_bytes_per_entry per vocabulary entry per token (4 in fp32, 6 in bf16)
    of the whole micro batch or of one chunk (with the chunks' head gradient), plus the rest of a
    one-layer, 8-wide model's activations and gradients (2-8% here). A chunk's logits kept while
    the next chunk's are made would double the chunks' share."""
    T, V = 512, 4096
    torch.manual_seed(0)
    m = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=T, vocab_size=V, loss_chunk_tokens=chunk)
    model = GPT(m).to(dtype).train()
    x, y = torch.randint(0, V, (1, T)), torch.randint(0, V, (1, T))

    def forward_and_backward():
        loss_sum, _ = model(x, targets=y)
        loss_sum.backward()
    peak = peak_allocated_bytes(forward_and_backward, on_gpu=False)
    a = torch.finfo(dtype).bits // 8
    assert 1.0 <= peak / logits_bytes(m, T, a) <= 1.1


# ---- the peak: measured RSS of CPU runs (ZeRO 0-2 in fp32, ZeRO 0 in bf16-mixed, 1 rank) --------

# 63M parameters: 8 layers x 768 wide, vocab 8192, 128 tokens; 2 steps so the Adam state and a
# second backward coexist. Each stage is its own process, since ru_maxrss is the process's peak.
BIG = ["model.n_layer=8", "model.n_head=12", "model.n_embd=768", "model.block_size=128",
       "data.builtin_vocab_size=8192", "train.micro_batch_size=4", "model.activation_checkpointing=false"]


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (0, "bf16-mixed")])
def test_peak_estimate_within_25_percent_of_measured_rss(tmp_path, stage, precision):
    overrides = BIG + [f"deepspeed.config=ds_configs/zero{stage}.json", f"deepspeed.zero_stage={stage}",
                       f"precision={precision}"]
    got = probe([{"name": "big", "overrides": overrides, "steps": 2}], 1, tmp_path)["big"][0]
    m = GPTConfig(n_layer=8, n_head=12, n_embd=768, block_size=128, vocab_size=8192)
    assert 50e6 <= got["n_params"] == sum(n for _, n, _ in param_layout(m)) <= 100e6
    ds = resolve_ds_config(load_config("configs/tiny.yaml", overrides), 1, on_gpu=False)
    s = model_states(m, ds, 1, on_gpu=False)
    a, r = activation_widths(precision)
    estimate = s.on_device + s.on_host + activation_bytes(m, 4, a, checkpointing=False, r=r)
    measured = got["peak_rss"] - got["base_rss"]  # growth above the process after imports and init
    print(f"ZeRO {stage} {precision}: estimated {estimate / 2**20:.0f} MiB, measured RSS growth "
          f"{measured / 2**20:.0f} MiB ({(estimate - measured) / measured:+.1%})")
    assert abs(estimate - measured) <= 0.25 * measured


# ---- the recommendation -------------------------------------------------------------------------

def test_gpt2_124m_on_8_gpus_needs_no_tricks():
    p = plan(make_request(preset="gpt2-124m", gpus_per_node=8, gpu_mem_gib=80, batch_tokens=524288))
    best = p.best
    assert (best.strategy.name, best.checkpointing) == ("zero0", False)
    assert best.micro * best.gas * 8 == 512 and p.per_rank == 64
    assert best.device_total <= p.request.usable
    text = format_plan(p)
    assert "recommended: zero0" in text and "524,288 tokens / 1024 per sequence = 512 sequences" in text


def test_gpt2_1_5b_on_one_24gb_gpu_needs_offload():
    p = plan(make_request(preset="gpt2-1.5b", gpu_mem_gib=24, batch_seqs=64))
    best = p.best
    assert best.strategy.offload
    for c in p.candidates:  # every setup ranked above it failed to fit, and the winner's micro batch is maximal
        if not c.strategy.offload:
            assert not c.fits and c.device_total > p.request.usable
    larger = [d for d in range(best.micro + 1, 65) if 64 % d == 0]
    a = activation_bytes(p.request.model, larger[0], 2, best.checkpointing)
    assert best.states.on_device + a > p.request.usable


def test_sharding_that_buys_a_larger_micro_batch_wins_below_zero3():
    """On 8 x 40 GB, ZeRO-0 fits gpt2-1.5b at micro 1 only; ZeRO-1 shards the optimizer state and
    fits micro 8 with the same communication volume: it is recommended. ZeRO-3 still ranks last."""
    p = plan(make_request(preset="gpt2-1.5b", gpus_per_node=8, gpu_mem_gib=40, batch_seqs=256))
    zero0 = next(c for c in p.candidates if c.strategy.name == "zero0" and not c.checkpointing)
    assert zero0.micro == 1
    assert (p.best.strategy.name, p.best.checkpointing, p.best.micro) == ("zero1", False, 8)
    same = [c for c in p.candidates if c.fits and not c.checkpointing and not c.strategy.offload
            and c.strategy.stage < 3 and c.micro == p.best.micro]
    assert min(c.strategy.stage for c in same) == p.best.strategy.stage  # ties go to the lower stage
    assert "ZeRO 0, 1 and 2 communicate the same volume" in format_plan(p)


def test_smaller_gpus_push_to_higher_stages_then_checkpointing():
    small = plan(make_request(preset="gpt2-350m", gpus_per_node=8, gpu_mem_gib=16, batch_seqs=256))
    tiny = plan(make_request(preset="gpt2-350m", gpus_per_node=8, gpu_mem_gib=8, batch_seqs=256))
    big = plan(make_request(preset="gpt2-350m", gpus_per_node=8, gpu_mem_gib=80, batch_seqs=256))
    assert big.best.micro >= small.best.micro >= tiny.best.micro
    assert big.best.device_total <= big.request.usable and tiny.best.device_total <= tiny.request.usable


def test_uneven_batch_is_rounded_up_and_said():
    p = plan(make_request(preset="gpt2-124m", gpus_per_node=8, gpu_mem_gib=80, batch_seqs=100))
    assert p.per_rank == 13 and p.best.micro * p.best.gas == 13
    assert "104 sequences: 100 is not a multiple of 8" in format_plan(p)


def test_zero3_shards_weights_by_rank_count():
    m = GPTConfig.from_preset("gpt2-124m", vocab_size=50304)
    one, eight = (model_states(m, _ds("zero3", n), n) for n in (1, 8))
    assert one.params == 8 * eight.params and one.optimizer == 8 * eight.optimizer


# ---- writing the run config -----------------------------------------------------------------------

def test_write_gives_a_config_the_trainer_resolves(tmp_path):
    out = tmp_path / "planned.yaml"
    assert cli.main(["plan", "--preset", "gpt2-1.5b", "--gpu-mem", "24", "--batch-seqs", "64",
                     "--write", str(out)]) == 0
    cfg = load_config(str(out))
    best = plan(make_request(preset="gpt2-1.5b", gpu_mem_gib=24, batch_seqs=64)).best
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum_steps, cfg.model.activation_checkpointing) == (
        best.micro, best.gas, best.checkpointing)
    assert (cfg.deepspeed.config, cfg.deepspeed.zero_stage, cfg.precision) == (best.strategy.template,
                                                                                best.strategy.stage, "bf16")
    assert (cfg.model.preset, cfg.model.n_layer, cfg.run.name) == ("gpt2-1.5b", 48, "planned")
    ds = resolve_ds_config(cfg, 1, on_gpu=True)
    assert ds["train_batch_size"] == 64 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert [p.name for p in tmp_path.iterdir()] == ["planned.yaml"]  # no temp file left


def test_write_refuses_an_existing_file_without_force(tmp_path, capsys):
    out = tmp_path / "x.yaml"
    out.write_text("mine\n")
    args = ["plan", "--preset", "gpt2-124m", "--gpu-mem", "80", "--batch-seqs", "8", "--write", str(out)]
    assert cli.main(args) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "mine\n"
    assert cli.main(args + ["--force"]) == 0
    assert load_config(str(out)).model.preset == "gpt2-124m"


def test_config_base_keeps_its_settings(tmp_path):
    """A run config's data, precision and vocabulary rule carry over (tiny: builtin 2048, fp32)."""
    req = make_request(config="configs/tiny.yaml", gpu_mem_gib=8, batch_seqs=16)
    assert (req.model.vocab_size, req.base.precision, req.model.n_embd) == (2048, "fp32", 128)
    p = plan(req)
    write_run_config(p, tmp_path / "t.yaml")
    cfg = load_config(str(tmp_path / "t.yaml"))
    assert cfg.data.path == "builtin" and cfg.optim.lr == 3e-3


# ---- bad inputs: one UserError paragraph, exit code 2 ----------------------------------------------

BAD = {
    "unknown preset": (["--preset", "gpt5", "--gpu-mem", "80", "--batch-seqs", "8"], "unknown model preset"),
    "no model": (["--gpu-mem", "80", "--batch-seqs", "8"], "needs a model"),
    "zero GPUs": (["--preset", "tiny", "--gpus-per-node", "0", "--gpu-mem", "80", "--batch-seqs", "8"],
                  "--gpus-per-node = 0"),
    "negative nodes": (["--preset", "tiny", "--nodes", "-2", "--gpu-mem", "80", "--batch-seqs", "8"], "--nodes = -2"),
    "zero memory": (["--preset", "tiny", "--gpu-mem", "0", "--batch-seqs", "8"], "--gpu-mem = 0"),
    "zero batch": (["--preset", "tiny", "--gpu-mem", "80", "--batch-tokens", "0"], "--batch-tokens = 0"),
    "zero block": (["--preset", "tiny", "--block-size", "0", "--gpu-mem", "80", "--batch-seqs", "8"],
                   "--block-size = 0"),
    "zero vocab": (["--preset", "tiny", "--vocab-size", "0", "--gpu-mem", "80", "--batch-seqs", "8"],
                   "--vocab-size = 0"),
    "heads": (["--preset", "tiny", "--n-head", "3", "--gpu-mem", "80", "--batch-seqs", "8"], "not divisible"),
    "headroom": (["--preset", "tiny", "--headroom", "1.5", "--gpu-mem", "80", "--batch-seqs", "8"], "--headroom"),
    "negative chunk": (["--preset", "tiny", "--loss-chunk-tokens", "-1", "--gpu-mem", "80", "--batch-seqs", "8"],
                       "--loss-chunk-tokens = -1"),
    "missing config": (["--config", "nope.yaml", "--gpu-mem", "80", "--batch-seqs", "8"], "does not exist"),
    "nothing fits": (["--preset", "gpt2-1.5b", "--gpu-mem", "3", "--batch-seqs", "8"], "Nothing fits"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_message_and_exit_2(case, capsys):
    args, words = BAD[case]
    assert cli.main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and "Traceback" not in err
    assert err.strip().count("\n") == 0  # one paragraph


def test_nothing_fits_says_the_smallest_need_and_what_to_change():
    with pytest.raises(UserError) as e:
        plan(make_request(preset="gpt2-1.5b", gpu_mem_gib=3, batch_seqs=8, cpu_mem_gib=8))
    msg = str(e.value)
    assert "needs" in msg and "GiB per GPU" in msg and "more GPUs" in msg
    enough = int(re.search(r"GPUs with at least (\d+) GiB", msg).group(1))  # and that advice holds
    assert plan(make_request(preset="gpt2-1.5b", gpu_mem_gib=enough, batch_seqs=8)).best.fits
    # offload would fit the GPU, but host memory stops it: it says so
    with pytest.raises(UserError) as e:
        plan(make_request(preset="gpt2-1.5b", gpu_mem_gib=24, batch_seqs=8, cpu_mem_gib=8))
    assert "Nothing fits the host memory" in str(e.value) and "Raise --cpu-mem" in str(e.value)


def test_every_strategy_has_a_template():
    from dsgpt.config import REPO_ROOT
    for s in STRATEGIES:
        assert (REPO_ROOT / s.template).is_file()


def test_loss_chunking_shrinks_the_logits_and_the_plan_uses_it(tmp_path):
    m = GPTConfig.from_preset("gpt2-124m", vocab_size=50304)
    chunked = GPTConfig.from_preset("gpt2-124m", vocab_size=50304, loss_chunk_tokens=4096)
    assert logits_bytes(m, 16384, 2) == 6 * 50304 * 16384 and logits_bytes(m, 16384, 4) == 4 * 50304 * 16384
    head_gradient = (4 + 2) * 50304 * 768  # kept in fp32, and each chunk's bf16 share made beside it
    assert logits_bytes(chunked, 16384, 2) == logits_bytes(m, 4096, 2) + head_gradient
    assert logits_bytes(chunked, 1024, 2) == logits_bytes(m, 1024, 2) + head_gradient
    assert logits_bytes(chunked, 16384, 4) == logits_bytes(m, 4096, 4) + 4 * 50304 * 768
    plain = plan(make_request(preset="gpt2-124m", gpu_mem_gib=24, batch_seqs=64))
    with_chunks = plan(make_request(preset="gpt2-124m", gpu_mem_gib=24, batch_seqs=64, loss_chunk_tokens=4096))
    assert with_chunks.best.micro > plain.best.micro
    assert "model.loss_chunk_tokens=4096 would" in format_plan(plain)
    assert "hint" not in format_plan(with_chunks)
    write_run_config(with_chunks, tmp_path / "c.yaml")
    assert load_config(str(tmp_path / "c.yaml")).model.loss_chunk_tokens == 4096


def test_bf16_mixed_plans_fp32_model_states_and_autocast_activations():
    def planned(precision):
        return plan(make_request(preset="gpt2-124m", gpu_mem_gib=80, batch_seqs=32, precision=precision))
    mixed, fp32 = planned("bf16-mixed"), planned("fp32")
    for cm, cf in zip(mixed.candidates, fp32.candidates):
        assert cm.states == cf.states  # DeepSpeed holds an fp32 model either way
        m = mixed.request.model
        a, r = activation_widths("bf16-mixed")
        assert cm.activations == activation_bytes(m, cm.micro, a, cm.checkpointing, r)
        if not cm.checkpointing:  # (with it, the bf16 logits' 6V per token outweigh fp32's 4V)
            assert cm.activations < activation_bytes(m, cm.micro, 4, False)  # fp32 at the same micro batch
    text = format_plan(mixed)
    assert "precision  bf16-mixed: weights and gradients 4 bytes, Adam moments 8" in text and "autocast" in text
    assert "2rE + 14aE + 4r + 4H" in text and "bf16 weight copies" in text
