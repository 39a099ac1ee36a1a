"""Evaluate a run's checkpoint: the same command, flags and exit codes as `dsgpt eval`.

    python launch/eval.py --run runs/NAME [--checkpoint latest|best|stepNNNNNNN] [--batches N] [--batch-size N]
    python launch/eval.py --run runs/NAME --tasks lm,gen:qa.jsonl

Run `dsgpt eval --help` (or this script with --help) for every flag.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsgpt import cli  # noqa: E402


def main(argv=None) -> int:
    return cli.main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from dsgpt.dist import exit_rank
    exit_rank(main())  # not sys.exit: see exit_rank
