"""ZeRO-3 builds the model sharded (deepspeed.zero.Init): no rank holds it whole, and the model is
the one a plain build gives with rank 0's seed, weight decay groups included. 2 CPU ranks."""

from __future__ import annotations

import json

from conftest import launch

SCRIPT = r'''
import json, sys
import torch
import deepspeed
from dsgpt import dist
from dsgpt.config import load_config
from dsgpt.ds_config import resolve_ds_config
from dsgpt.model import GPT, GPTConfig, param_groups
from dsgpt.zero import build_model

ctx = dist.setup()
cfg = load_config(None, ["deepspeed.config=ds_configs/zero3.json", "model.n_embd=32"])
ds = resolve_ds_config(cfg, ctx.world_size, False)
mcfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
torch.manual_seed(7 + ctx.rank)  # as the trainer seeds: a different seed on every rank
sharded = build_model(mcfg, ds)
torch.manual_seed(7)  # rank 0's
whole = GPT(mcfg)
same = True
for (name, p), (_, q) in zip(sharded.named_parameters(), whole.named_parameters()):
    with deepspeed.zero.GatheredParameters([p]):
        same = same and torch.equal(p.data, q.data)
groups = [sorted(len(g["params"]) for g in param_groups(m, 0.1)) for m in (sharded, whole)]
out = {
    "rank": ctx.rank,
    "all_sharded": all(hasattr(p, "ds_shape") and p.numel() == 0 for p in sharded.parameters()),
    "shard_elements": sum(p.ds_tensor.numel() for p in sharded.parameters()),
    "num_params": [sharded.num_params(False), whole.num_params(False)],
    "groups": groups, "same_values": bool(same),
}
# A file per rank: the launcher interleaves the ranks' stdout.
with open(f"{sys.argv[-1]}/rank{ctx.rank}.json", "w") as f:  # the launcher puts --local_rank first
    json.dump(out, f)
dist.barrier()  # no rank leaves while a peer's last collective is in flight
torch.distributed.destroy_process_group()
dist.exit_rank(0)  # see exit_rank: no C++ clean-up abort after the work is done
'''


def test_zero3_builds_the_model_sharded_and_equal_to_a_plain_build(tmp_path):
    script = tmp_path / "zero_init_probe.py"
    script.write_text(SCRIPT)
    launch(str(script), [str(tmp_path)], ranks=2, timeout=300)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["all_sharded"], r
        whole, plain = r["num_params"]
        assert whole == plain
        assert r["shard_elements"] < 0.6 * plain  # about half each (small ones may be padded)
        assert r["groups"][0] == r["groups"][1]  # matrices decay, biases and LayerNorm don't
        assert r["same_values"], r
