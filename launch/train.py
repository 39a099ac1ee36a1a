"""Pretrain or fine-tune a GPT with DeepSpeed.

    deepspeed --num_gpus 2 launch/train.py --config configs/tiny.yaml train.max_steps=50
    python launch/train.py --config configs/tiny.yaml optim.lr=3e-4
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsgpt.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML (configs/*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK is read instead
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=50")
    args = parser.parse_args(argv)
    try:
        from dsgpt.config import load_config
        from dsgpt.train.trainer import train
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg, argv=sys.argv)
    except UserError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return 2
    return 1 if summary.stop_reason == "nonfinite" else 0


if __name__ == "__main__":
    from dsgpt.dist import exit_rank
    exit_rank(main())  # not sys.exit: see exit_rank
