"""Evaluate a run's checkpoint on its validation split: loss, perplexity, next-token accuracy.

    python launch/eval.py --run runs/NAME [--checkpoint latest|best|stepNNNNNNN]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsgpt.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run dir written by launch/train.py (runs/NAME)")
    p.add_argument("--checkpoint", default="latest", help="latest, best, or a tag such as step0000200")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's train.eval_batches)")
    p.add_argument("--batch-size", type=int, default=None)
    args = p.parse_args(argv)
    try:
        from dsgpt.eval.perplexity import evaluate_run
        result = evaluate_run(args.run, args.checkpoint, args.batches, args.batch_size)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.run} [{result['checkpoint']}]: val loss {result['val/loss']:.4f}, "
          f"perplexity {result['val/ppl']:.2f}, next-token accuracy {result['val/accuracy']:.3f} "
          f"over {result['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
