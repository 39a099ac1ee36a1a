#!/bin/bash
# The GPU checks in one go, on a machine with CUDA GPUs and dsgpt's dependencies installed:
#
#   bash bench/gpu_suite.sh smoke   # the GPU tests (bf16/fp16/bf16-mixed over NCCL, ZeRO 0/2/3), the matmul rate
#   bash bench/gpu_suite.sh bench   # host syncs of a step, the ops that take gpt2-124m's step time
#                                   # (train.profile), MFU of the GPT-2 presets as shipped (block 1024)
#   bash bench/gpu_suite.sh peers   # gpt2-124m's shape: dsgpt (bf16, then bf16-mixed) beside a plain PyTorch
#                                   # loop (bf16 autocast, fused AdamW) on one GPU: how much of the step
#                                   # is the model's own
#   bash bench/gpu_suite.sh mixed   # the host's operations per step (DeepSpeed's bf16 ZeRO-1 vs bf16-mixed
#                                   # ZeRO-0 with fused AdamW), then gpt2-350m as shipped (bf16, ZeRO-2)
#                                   # beside bf16-mixed ZeRO-0 at the same micro batch, then gpt2-124m's
#                                   # loss whole or in chunks (time and memory of forward and backward)
#
# Every figure goes to bench/RESULTS.md. PYTHON picks the interpreter (default: python). The built-in
# corpus stands in for real data: the presets train on it with GPT-2's padded vocabulary size, each in
# its config's own precision unless a part says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DATA="data.path=builtin model.vocab_size=50304 train.grad_accum_steps=1"
# Read back every 10 steps, as the GPU configs log: two timed windows after one of warmup (compilation).
TIMED="--warmup 10 --steps 20 --log-interval 10"

case "${1:-}" in
smoke)
    $PY -m pytest -q -m gpu tests/test_gpu.py
    $PY bench/matmul_peak.py
    ;;
bench)
    # Eager, so that compilation's one-off work is not counted as the step's.
    $PY bench/sync_count.py --config configs/gpt2-124m.yaml --steps 30 $DATA model.compile=false
    out=$(mktemp -d)
    $PY launch/train.py --config configs/gpt2-124m.yaml $DATA train.max_steps=6 train.profile=true \
        train.eval_interval=1000000 train.eval_batches=1 run.out_dir="$out" run.name=profile
    head -40 "$out/profile/profile/rank00000.top_ops.txt"
    rm -rf "$out"
    $PY bench/throughput.py --config configs/gpt2-124m.yaml $TIMED $DATA --matrix micro=16,32
    $PY bench/throughput.py --config configs/gpt2-350m.yaml $TIMED $DATA model.compile=true \
        --matrix micro=16
    $PY bench/throughput.py --config configs/gpt2-1.5b.yaml $TIMED $DATA model.compile=true \
        deepspeed.zero_stage=1 model.activation_checkpointing=false --matrix micro=8
    ;;
peers)
    for precision in bf16 bf16-mixed; do
        $PY bench/peers.py --peers plain --pairs 2 --steps 10 --warmup 3 --precision $precision model.n_layer=12 \
            model.n_embd=768 model.n_head=12 model.block_size=1024 model.vocab_size=50304 train.micro_batch_size=16
    done
    ;;
mixed)
    $PY bench/host_ops.py --config configs/gpt2-124m.yaml --steps 3 $DATA model.compile=false \
        --variant "precision=bf16 deepspeed.zero_stage=1" --variant "precision=bf16-mixed deepspeed.zero_stage=0"
    $PY bench/throughput.py --config configs/gpt2-350m.yaml $TIMED $DATA model.compile=true --matrix micro=8
    $PY bench/throughput.py --config configs/gpt2-350m.yaml $TIMED $DATA model.compile=true \
        precision=bf16-mixed deepspeed.zero_stage=0 --matrix micro=8
    $PY bench/loss_chunks.py --preset gpt2-124m --block 1024 --micro 16 --chunks 4096,16384 --precision bf16-mixed
    ;;
*)
    echo "usage: bash bench/gpu_suite.sh smoke|bench|peers|mixed (see the top of this file)" >&2
    exit 2
    ;;
esac
